//! [`Topology`]: client ns ↔ load-balancer ns ↔ backend namespaces, wired with veth pairs.
//!
//! ```text
//!  <prefix>-c                      <prefix>-lb                         <prefix>-bI
//!  eth0 10.0.0.2/24   ─── veth ─── to-c  10.0.0.1/24                   (I = 1..N)
//!       10.0.0.10../24                   10.0.0.100/32 (VIP)
//!  default via 10.0.0.1                  to-bI 10.1.I.1/24 ─── veth ─── eth0 10.1.I.2/24
//!                                        ip_forward = 1                 default via 10.1.I.1
//! ```
//!
//! The VIP is a local address of the lb namespace (so a user-space proxy can bind it) and on-link
//! for the client (which ARPs for it on `eth0`). With `ip_forward` on, a client can also reach a
//! backend directly (routed through the lb namespace): the no-load-balancer baseline.
//! `rp_filter` is 0 everywhere and IPv6 is disabled on the test links (no RS/MLD noise for XDP).

use std::ffi::OsStr;
use std::io;
use std::net::Ipv4Addr;
use std::process::Output;

use crate::netns::Netns;

/// Interface name on the client side and on each backend side of the veth pairs.
pub const PEER_IF: &str = "eth0";
/// Interface in the lb namespace facing the client.
pub const LB_CLIENT_IF: &str = "to-c";
/// The VIP configured on [`LB_CLIENT_IF`].
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// First extra client address (10.0.0.10); extra addresses run up to 10.0.0.99.
const FIRST_CLIENT_HOST: u8 = 10;
/// Most extra client addresses (10.0.0.10 ..= 10.0.0.99; the VIP is .100).
pub const MAX_CLIENTS: usize = 90;
/// Most backends (10.1.1.0/24 ..= 10.1.250.0/24).
pub const MAX_BACKENDS: usize = 250;

/// The standard end-to-end test network; every namespace is deleted on drop.
///
/// Stop the processes running in it first: declare the `Topology` before their
/// [`Child`](crate::Child) handles so they drop (are killed) earlier.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // Field order is drop order: backends, then lb, then client.
    backends: Vec<Netns>,
    lb: Netns,
    client: Netns,
    clients: usize,
}

/// Best-effort sysctls for a fresh namespace: no reverse-path filtering, no IPv6 on new links.
fn base_sysctls(ns: &Netns) -> io::Result<()> {
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    // IPv6 may be compiled out; that is fine.
    let _ = ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    let _ = ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    Ok(())
}

impl Topology {
    /// Build the topology with `backends` backend namespaces (1..=250) and `clients` extra client
    /// addresses (0..=90, from 10.0.0.10). Stale namespaces with the same names are replaced.
    pub fn new(prefix: &str, backends: usize, clients: usize) -> io::Result<Topology> {
        if !(1..=MAX_BACKENDS).contains(&backends) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backends must be 1..={MAX_BACKENDS}, got {backends}"),
            ));
        }
        if clients > MAX_CLIENTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("clients must be at most {MAX_CLIENTS}, got {clients}"),
            ));
        }
        // Create all namespaces first; if anything fails later, dropping these cleans up.
        let client = Netns::new(&format!("{prefix}-c"))?;
        let lb = Netns::new(&format!("{prefix}-lb"))?;
        let mut bns = Vec::with_capacity(backends);
        for i in 1..=backends {
            bns.push(Netns::new(&format!("{prefix}-b{i}"))?);
        }
        for ns in std::iter::once(&client).chain([&lb]).chain(&bns) {
            base_sysctls(ns)?;
        }
        lb.sysctl("net.ipv4.ip_forward", "1")?;

        // lb side: create every veth pair from inside the lb namespace, peers straight into theirs.
        let mut cmds = vec![
            format!(
                "link add {LB_CLIENT_IF} type veth peer name {PEER_IF} netns {}",
                client.name()
            ),
            format!("addr add 10.0.0.1/24 dev {LB_CLIENT_IF}"),
            format!("addr add {VIP}/32 dev {LB_CLIENT_IF}"),
            format!("link set {LB_CLIENT_IF} up"),
        ];
        for (idx, b) in bns.iter().enumerate() {
            let i = idx + 1;
            let ifname = Self::lb_backend_if_name(i);
            cmds.push(format!(
                "link add {ifname} type veth peer name {PEER_IF} netns {}",
                b.name()
            ));
            cmds.push(format!("addr add 10.1.{i}.1/24 dev {ifname}"));
            cmds.push(format!("link set {ifname} up"));
        }
        lb.ip_batch(&cmds)?;

        let mut cmds = vec![format!("addr add 10.0.0.2/24 dev {PEER_IF}")];
        for k in 0..clients {
            cmds.push(format!(
                "addr add 10.0.0.{}/24 dev {PEER_IF}",
                FIRST_CLIENT_HOST as usize + k
            ));
        }
        cmds.push(format!("link set {PEER_IF} up"));
        cmds.push("route add default via 10.0.0.1".to_string());
        client.ip_batch(&cmds)?;

        for (idx, b) in bns.iter().enumerate() {
            let i = idx + 1;
            b.ip_batch(&[
                format!("addr add 10.1.{i}.2/24 dev {PEER_IF}"),
                format!("link set {PEER_IF} up"),
                format!("route add default via 10.1.{i}.1"),
            ])?;
        }

        Ok(Topology {
            prefix: prefix.to_string(),
            backends: bns,
            lb,
            client,
            clients,
        })
    }

    fn lb_backend_if_name(i: usize) -> String {
        format!("to-b{i}")
    }

    fn check_backend(&self, i: usize) {
        assert!(
            (1..=self.backends.len()).contains(&i),
            "backend index {i} out of range 1..={}",
            self.backends.len()
        );
    }

    /// The prefix the namespace names were built from.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The VIP, 10.0.0.100 (a /32 on the lb side of the client link).
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    /// The lb namespace's address on the client link, 10.0.0.1 (the client's default gateway).
    pub fn lb_client_side_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, 1)
    }

    /// The client namespace's primary address, 10.0.0.2.
    pub fn client_primary_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, 2)
    }

    /// The extra client addresses, 10.0.0.10 .. 10.0.0.(10+clients-1), in order.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.clients)
            .map(|k| Ipv4Addr::new(10, 0, 0, FIRST_CLIENT_HOST + k as u8))
            .collect()
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Backend `i`'s address (1-based): 10.1.i.2. Panics when out of range.
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        self.check_backend(i);
        Ipv4Addr::new(10, 1, i as u8, 2)
    }

    /// The lb namespace's address on backend `i`'s link (1-based): 10.1.i.1.
    pub fn lb_backend_side_addr(&self, i: usize) -> Ipv4Addr {
        self.check_backend(i);
        Ipv4Addr::new(10, 1, i as u8, 1)
    }

    /// The client namespace (`<prefix>-c`).
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// The load-balancer namespace (`<prefix>-lb`).
    pub fn lb_ns(&self) -> &Netns {
        &self.lb
    }

    /// Backend `i`'s namespace (1-based, `<prefix>-bI`). Panics when out of range.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        self.check_backend(i);
        &self.backends[i - 1]
    }

    /// Names of all namespaces: client, lb, b1..bN.
    pub fn namespace_names(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain([&self.lb])
            .chain(&self.backends)
            .map(|n| n.name().to_string())
            .collect()
    }

    /// Interface in the lb namespace facing the client (`to-c`).
    pub fn lb_client_if(&self) -> &'static str {
        LB_CLIENT_IF
    }

    /// Interface in the lb namespace facing backend `i` (`to-bI`).
    pub fn lb_backend_if(&self, i: usize) -> String {
        self.check_backend(i);
        Self::lb_backend_if_name(i)
    }

    /// Interface name in the client and backend namespaces (`eth0`).
    pub fn peer_if(&self) -> &'static str {
        PEER_IF
    }

    /// Run a command inside namespace `ns` (any name, typically one of [`Self::namespace_names`])
    /// and return its output whatever the exit status.
    pub fn exec_in<S: AsRef<OsStr>>(&self, ns: &str, args: &[S]) -> io::Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "exec_in: empty command"))?;
        std::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(rest)
            .stdin(std::process::Stdio::null())
            .output()
    }
}
