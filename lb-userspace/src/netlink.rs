//! rtnetlink, as lb uses it: the VIP routes [`crate::announce`] keeps (host routes, `/32` and
//! `/128`, of type blackhole in one kernel routing table, marked with lb's route protocol, added,
//! listed and deleted), and the kind of the interfaces the XDP datapath attaches to.
//!
//! A blackhole route is the usual "announce this prefix" marker (BIRD's own `route … blackhole`):
//! it needs no interface, and in a table of its own that no `ip rule` consults it forwards nothing.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a route netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("route netlink: {0}")]
    Io(std::io::Error),
    #[error("route netlink answered with a message lb cannot read: {0}")]
    Decode(String),
    #[error("{what} {ip} in table {table}: {source}{hint}")]
    Refused {
        what: &'static str,
        ip: IpAddr,
        table: u32,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// Where lb keeps its routes: the table and the protocol number that marks them as lb's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTable {
    pub table: u32,
    pub protocol: u8,
}

/// A route netlink socket (blocking; each call is one request and its answer).
pub struct Rtnetlink {
    socket: Socket,
    sequence: u32,
}

impl Rtnetlink {
    pub fn open() -> Result<Rtnetlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // Lets the kernel filter a dump by table, protocol and type (older kernels ignore it and
        // the answer is filtered here as well).
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Rtnetlink { socket, sequence: 0 })
    }

    /// lb's host routes in `at`: the addresses they are for.
    pub fn list(&mut self, at: RouteTable) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            msg.header.protocol = RouteProtocol::from(at.protocol);
            msg.header.kind = RouteType::BlackHole;
            set_table(&mut msg, at.table);
            let dump = match self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST | NLM_F_DUMP) {
                // A table nothing was ever added to does not exist yet: it holds no routes.
                Err(NetlinkError::Io(e)) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => {
                    Vec::new()
                }
                dump => dump?,
            };
            for m in dump {
                if let RouteNetlinkMessage::NewRoute(m) = m
                    && let Some(ip) = ours(&m, at)
                {
                    found.push(ip);
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// Adds (or replaces) the route for `ip`.
    pub fn add(&mut self, at: RouteTable, ip: IpAddr) -> Result<(), NetlinkError> {
        let msg = host_route(at, ip);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|e| refused(e, "adding the route for", ip, at.table))
    }

    /// Deletes the route for `ip`; a route that is not there is no error.
    pub fn delete(&mut self, at: RouteTable, ip: IpAddr) -> Result<(), NetlinkError> {
        let msg = host_route(at, ip);
        match self.request(RouteNetlinkMessage::DelRoute(msg), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(NetlinkError::Io(e)) if e.raw_os_error() == Some(libc_esrch()) => Ok(()),
            Err(e) => Err(refused(e, "deleting the route for", ip, at.table)),
        }
    }

    /// The indexes of the interfaces (of this network namespace) whose link kind is veth.
    pub fn veths(&mut self) -> Result<Vec<u32>, NetlinkError> {
        self.links_where(is_veth)
    }

    /// The indexes of the veth ends (of this network namespace) whose other end lives in another
    /// namespace (the kernel names that namespace's id in the link's attributes).
    pub fn veths_to_other_namespaces(&mut self) -> Result<Vec<u32>, NetlinkError> {
        self.links_where(|link| {
            is_veth(link)
                && link
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)))
        })
    }

    /// The indexes of the interfaces (of this network namespace) that satisfy `pick`.
    fn links_where(&mut self, pick: impl Fn(&LinkMessage) -> bool) -> Result<Vec<u32>, NetlinkError> {
        let dump = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        Ok(dump
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => pick(&link).then_some(link.header.index),
                _ => None,
            })
            .collect())
    }

    /// Sends one request and collects the messages of its answer, up to the ACK or the end of
    /// the dump. A NACK (or a dump ended with an error) is returned as [`NetlinkError::Io`] with
    /// its errno; a dump the kernel marks as interrupted (the table changed meanwhile) as
    /// [`NetlinkError::Decode`].
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Io)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (bytes, _) = self.socket.recv_from_full().map_err(NetlinkError::Io)?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.sequence {
                    interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                    match reply.payload {
                        NetlinkPayload::Done(done) if done.code != 0 => {
                            return Err(NetlinkError::Io(std::io::Error::from_raw_os_error(-done.code)));
                        }
                        NetlinkPayload::Done(_) if interrupted => {
                            return Err(NetlinkError::Decode("the dump was interrupted; try again".into()));
                        }
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(code) => {
                                    Err(NetlinkError::Io(std::io::Error::from_raw_os_error(-code.get())))
                                }
                            };
                        }
                        NetlinkPayload::InnerMessage(m) => out.push(m),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    })
}

fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

fn refused(e: NetlinkError, what: &'static str, ip: IpAddr, table: u32) -> NetlinkError {
    match e {
        NetlinkError::Io(source) => {
            let hint = if source.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) {
                "; lb needs CAP_NET_ADMIN (run it as root, or with AmbientCapabilities=CAP_NET_ADMIN)"
            } else {
                ""
            };
            NetlinkError::Refused {
                what,
                ip,
                table,
                source,
                hint,
            }
        }
        other => other,
    }
}

/// Tables above 255 go in RTA_TABLE only (the header's byte says RT_TABLE_UNSPEC).
fn set_table(msg: &mut RouteMessage, table: u32) {
    msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    msg.attributes.push(RouteAttribute::Table(table));
}

/// The blackhole host route for `ip` in `at`.
fn host_route(at: RouteTable, ip: IpAddr) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    msg.header.protocol = RouteProtocol::from(at.protocol);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::BlackHole;
    set_table(&mut msg, at.table);
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    msg
}

/// The address of `m` when it is one of lb's host routes in `at`.
fn ours(m: &RouteMessage, at: RouteTable) -> Option<IpAddr> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != at.table
        || u8::from(m.header.protocol) != at.protocol
        || m.header.kind != RouteType::BlackHole
    {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let full = if ip.is_ipv4() { 32 } else { 128 };
    (m.header.destination_prefix_length == full).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_lb_adds_is_one_it_recognises_and_no_other_is() {
        let at = RouteTable {
            table: 4242,
            protocol: 201,
        };
        for ip in ["10.0.0.100", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let m = host_route(at, ip);
            assert_eq!(m.header.table, RouteHeader::RT_TABLE_UNSPEC);
            assert_eq!(ours(&m, at), Some(ip));
            let other_proto = RouteTable { protocol: 12, ..at };
            assert_eq!(ours(&m, other_proto), None);
            let other_table = RouteTable { table: 100, ..at };
            assert_eq!(ours(&m, other_table), None);
        }
        let small = RouteTable {
            table: 100,
            protocol: 201,
        };
        assert_eq!(host_route(small, "10.0.0.1".parse().unwrap()).header.table, 100);
    }
}
