//! Packet builder and parser for the XDP fixtures, the eBPF unit tests and the micro-benchmarks:
//! Ethernet + IPv4 (with options) + TCP (flags, options) frames and ARP requests with valid
//! checksums computed by [`lb_common::csum`], and [`parse`], which reads a (rewritten) frame back
//! and verifies its checksums.

use std::net::Ipv4Addr;

use lb_common::csum::checksum;
use thiserror::Error;

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Length of an Ethernet header.
pub const ETH_LEN: usize = 14;
/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// IPv4 protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;

/// An Ethernet + IPv4 + TCP frame to build. Defaults: IP id 0x1234, DF, TTL 64, sequence 1,
/// acknowledgment 0, window 0xffff, no options, no payload.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub flags: u8,
    pub id: u16,
    /// IPv4 fragment field (flags and offset) as on the wire: 0x4000 is DF, 0x2000 MF.
    pub frag: u16,
    pub ttl: u8,
    /// The IPv4 protocol byte (TCP unless a test builds something else on the same layout).
    pub protocol: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// IPv4 options, a multiple of 4 bytes (IHL = 5 + len / 4).
    pub ip_options: Vec<u8>,
    /// TCP options, a multiple of 4 bytes (data offset = 5 + len / 4).
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    /// A frame from `src` to `dst` with `flags` and the defaults above; MACs 02:00:00:00:00:01 →
    /// 02:00:00:00:00:02 until set with [`Tcp::macs`].
    pub fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Tcp {
        Tcp {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            flags,
            id: 0x1234,
            frag: 0x4000,
            ttl: 64,
            protocol: IPPROTO_TCP,
            seq: 1,
            ack: 0,
            window: 0xffff,
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Tcp {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn ip_options(mut self, options: &[u8]) -> Tcp {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "IPv4 options: {options:?}"
        );
        self.ip_options = options.to_vec();
        self
    }

    pub fn tcp_options(mut self, options: &[u8]) -> Tcp {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "TCP options: {options:?}"
        );
        self.tcp_options = options.to_vec();
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Tcp {
        self.payload = payload.to_vec();
        self
    }

    /// Sets the IPv4 "more fragments" bit (a first fragment).
    pub fn more_fragments(mut self) -> Tcp {
        self.frag |= 0x2000;
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Tcp {
        self.protocol = protocol;
        self
    }

    pub fn seq(mut self, seq: u32) -> Tcp {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Tcp {
        self.ack = ack;
        self
    }

    pub fn id(mut self, id: u16) -> Tcp {
        self.id = id;
        self
    }

    /// The frame's bytes, IPv4 and TCP checksums filled in.
    pub fn build(&self) -> Vec<u8> {
        let ihl = 5 + self.ip_options.len() / 4;
        let doff = 5 + self.tcp_options.len() / 4;
        let total = ihl * 4 + doff * 4 + self.payload.len();
        let mut f = Vec::with_capacity(ETH_LEN + total);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let mut ip = Vec::with_capacity(ihl * 4);
        ip.push(0x40 | ihl as u8);
        ip.push(0);
        ip.extend_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        ip.extend_from_slice(&self.src.0.octets());
        ip.extend_from_slice(&self.dst.0.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = Vec::with_capacity(doff * 4 + self.payload.len());
        tcp.extend_from_slice(&self.src.1.to_be_bytes());
        tcp.extend_from_slice(&self.dst.1.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.extend_from_slice(&[(doff as u8) << 4, self.flags]);
        tcp.extend_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(&self.tcp_options);
        tcp.extend_from_slice(&self.payload);
        let c = checksum(&tcp, pseudo_sum(self.src.0, self.dst.0, self.protocol, tcp.len()));
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
        f.extend_from_slice(&tcp);
        f
    }
}

/// Ethernet broadcast ARP request: who has `target`, tell `sender` (at `sender_mac`).
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Hardware type Ethernet, protocol IPv4, address lengths 6 and 4, operation request.
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// SYN options as Linux sends them: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
pub fn syn_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o.extend_from_slice(&[1, 3, 3, 7]);
    o
}

/// Options of an established segment: NOP, NOP, timestamps.
pub fn ack_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// One's complement sum of the TCP/UDP pseudo header, as the `initial` of [`checksum`].
pub fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = protocol;
    p[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_ne_bytes([c[0], c[1]])))
        .sum()
}

/// Why [`parse`] refused a frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("frame of {0} bytes is too short for {1}")]
    Short(usize, &'static str),
    #[error("not IPv4 (EtherType {0:#06x})")]
    NotIpv4(u16),
    #[error("not TCP (protocol {0})")]
    NotTcp(u8),
    #[error("IPv4 header checksum does not verify")]
    IpChecksum,
    #[error("TCP checksum does not verify")]
    TcpChecksum,
}

/// What an Ethernet + IPv4 + TCP frame carries (checksums verified by [`parse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub ttl: u8,
    /// IPv4 total length, identification and fragment field (flags and offset), as on the wire.
    pub tot_len: u16,
    pub id: u16,
    pub frag: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// TCP window and urgent pointer.
    pub window: u16,
    pub urgent: u16,
    pub ip_options: Vec<u8>,
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Parsed {
    /// (TSval, TSecr) of the TCP timestamp option, if the segment carries one.
    pub fn timestamps(&self) -> Option<(u32, u32)> {
        let o = &self.tcp_options;
        let mut i = 0;
        while i < o.len() {
            match o[i] {
                0 => return None,
                1 => i += 1,
                kind => {
                    let len = *o.get(i + 1)? as usize;
                    if len < 2 || i + len > o.len() {
                        return None;
                    }
                    if kind == 8 && len == 10 {
                        let w = |at: usize| u32::from_be_bytes([o[at], o[at + 1], o[at + 2], o[at + 3]]);
                        return Some((w(i + 2), w(i + 6)));
                    }
                    i += len;
                }
            }
        }
        None
    }
}

/// Reads an Ethernet + IPv4 + TCP frame and verifies both checksums.
pub fn parse(f: &[u8]) -> Result<Parsed, PacketError> {
    if f.len() < ETH_LEN + 20 {
        return Err(PacketError::Short(f.len(), "Ethernet + IPv4"));
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    if ethertype != ETH_P_IP {
        return Err(PacketError::NotIpv4(ethertype));
    }
    let ihl = (f[ETH_LEN] & 0x0f) as usize * 4;
    if ihl < 20 || f.len() < ETH_LEN + ihl + 20 {
        return Err(PacketError::Short(f.len(), "IPv4 header with options + TCP"));
    }
    let ip = &f[ETH_LEN..ETH_LEN + ihl];
    if ip[9] != IPPROTO_TCP {
        return Err(PacketError::NotTcp(ip[9]));
    }
    if checksum(ip, 0) != 0 {
        return Err(PacketError::IpChecksum);
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = &f[ETH_LEN + ihl..];
    let doff = (tcp[12] >> 4) as usize * 4;
    if doff < 20 || tcp.len() < doff {
        return Err(PacketError::Short(f.len(), "TCP header with options"));
    }
    if checksum(tcp, pseudo_sum(src, dst, IPPROTO_TCP, tcp.len())) != 0 {
        return Err(PacketError::TcpChecksum);
    }
    Ok(Parsed {
        dst_mac: f[0..6].try_into().expect("6 bytes"),
        src_mac: f[6..12].try_into().expect("6 bytes"),
        src: (src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: (dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        ttl: ip[8],
        tot_len: u16::from_be_bytes([ip[2], ip[3]]),
        id: u16::from_be_bytes([ip[4], ip[5]]),
        frag: u16::from_be_bytes([ip[6], ip[7]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        flags: tcp[13],
        window: u16::from_be_bytes([tcp[14], tcp[15]]),
        urgent: u16::from_be_bytes([tcp[18], tcp[19]]),
        ip_options: ip[20..].to_vec(),
        tcp_options: tcp[20..doff].to_vec(),
        payload: tcp[doff..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::flags::{ACK, SYN};
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn built_frames_parse_back_with_every_field() {
        let f = Tcp::new((A, 40000), (B, 80), SYN | ACK)
            .seq(0xdead_beef)
            .macs([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 8])
            .ip_options(&[1, 1, 1, 0])
            .tcp_options(&syn_options(7, 9))
            .payload(b"odd")
            .build();
        assert_eq!(f.len(), ETH_LEN + 24 + 40 + 3);
        let p = parse(&f).unwrap();
        assert_eq!((p.src, p.dst), ((A, 40000), (B, 80)));
        assert_eq!((p.src_mac, p.dst_mac), ([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 8]));
        assert_eq!(p.flags, SYN | ACK);
        assert_eq!(p.seq, 0xdead_beef);
        assert_eq!(p.ip_options, [1, 1, 1, 0]);
        assert_eq!(p.payload, b"odd");
        assert_eq!(p.timestamps(), Some((7, 9)));
        let p = parse(
            &Tcp::new((A, 1), (B, 2), ACK)
                .tcp_options(&ack_options(3, 4))
                .build(),
        )
        .unwrap();
        assert_eq!(p.timestamps(), Some((3, 4)));
        assert_eq!(
            parse(&Tcp::new((A, 1), (B, 2), ACK).build())
                .unwrap()
                .timestamps(),
            None
        );
    }

    #[test]
    fn parse_refuses_broken_frames() {
        let f = Tcp::new((A, 1), (B, 2), SYN).payload(b"x").build();
        let mut bad_ip = f.clone();
        bad_ip[ETH_LEN + 8] ^= 1; // TTL changed without fixing the checksum
        assert_eq!(parse(&bad_ip), Err(PacketError::IpChecksum));
        let mut bad_tcp = f.clone();
        *bad_tcp.last_mut().unwrap() ^= 1;
        assert_eq!(parse(&bad_tcp), Err(PacketError::TcpChecksum));
        assert!(matches!(parse(&f[..ETH_LEN + 30]), Err(PacketError::Short(..))));
        let icmp = Tcp::new((A, 0), (B, 0), 0).protocol(IPPROTO_ICMP).build();
        assert_eq!(parse(&icmp), Err(PacketError::NotTcp(IPPROTO_ICMP)));
        let arp = arp_request([2, 0, 0, 0, 0, 1], A, B);
        assert_eq!(arp.len(), 42);
        assert_eq!(parse(&arp), Err(PacketError::NotIpv4(ETH_P_ARP)));
    }
}
