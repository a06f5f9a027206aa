//! [`DsrTopology`]: the network of the `forwarding = "dsr"` tests, where backends answer clients
//! directly, never through a load balancer.
//!
//! ```text
//!  <p>-c  eth0 10.0.0.2/24 (+ 10.0.0.10.. extra)  default via 10.0.0.1
//!    │
//!  <p>-r  to-c 10.0.0.1/24      router, ip_forward; VIP/32 via node 1 (10.3.1.2) or node 2
//!    │    to-l1 10.3.1.1/24 ─── <p>-l1 to-r 10.3.1.2/24 (XDP here), default via 10.3.1.1
//!    │    to-l2 10.3.2.1/24 ─── <p>-l2 to-r 10.3.2.2/24
//!    │    lan (bridge) 10.2.0.1/24
//!    │     ├── ln-l1 ─── <p>-l1 to-lan 10.2.0.11/24 (the LB's address toward the backends)
//!    │     ├── ln-l2 ─── <p>-l2 to-lan 10.2.0.12/24
//!    │     └── ln-bI ─── <p>-bI eth0 10.2.0.(20+I)/24, default via 10.2.0.1 advmss 1440,
//!    │                           VIP/32 on lo, lb_decap (or tunl0) on eth0
//! ```
//!
//! Client packets to the VIP cross the router and one LB node, which encapsulates them toward a
//! backend on the shared `lan`; the backend's replies go to the router and straight to the client.
//! The bridge ports toward the LB nodes have GRO on (a veth needs NAPI on its peer to take XDP
//! redirects), the client's TX checksum offload is off (XDP never sees a partial checksum).
//! Namespaces are deleted on drop.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::Ebpf;
use aya::programs::{Xdp, XdpMode};

use crate::netns::Netns;

/// `lb_decap` attached somewhere; dropping it detaches it.
pub struct Decap(#[allow(dead_code, reason = "held: its links live as long as it does")] Ebpf);

impl std::fmt::Debug for Decap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decap")
    }
}

/// Loads `lb_decap` from the eBPF object at `object` and attaches it (driver mode) to `ifname` in
/// each of `namespaces`: the backends' half of dsr where the kernel has no ipip module.
pub fn attach_decap(object: &Path, namespaces: &[&Netns], ifname: &str) -> io::Result<Decap> {
    let err = |what: &str, e: &dyn std::fmt::Display| io::Error::other(format!("{what}: {e}"));
    let mut ebpf = Ebpf::load_file(object).map_err(|e| err("load the eBPF object", &e))?;
    let prog: &mut Xdp = ebpf
        .program_mut("lb_decap")
        .ok_or_else(|| io::Error::other("no lb_decap in the eBPF object"))?
        .try_into()
        .map_err(|e| err("lb_decap", &e))?;
    prog.load().map_err(|e| err("load lb_decap", &e))?;
    for ns in namespaces {
        ns.run(|| prog.attach(ifname, XdpMode::Driver).map(|_| ()))?
            .map_err(|e| err(&format!("attach lb_decap to {ifname} in {}", ns.name()), &e))?;
    }
    Ok(Decap(ebpf))
}

/// The VIP of the dsr services (on each backend's `lo`, routed to an LB node by the router).
pub const DSR_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 100);
/// The LB nodes' interface toward the router (where XDP runs) and toward the backends.
pub const LB_UP_IF: &str = "to-r";
pub const LB_DOWN_IF: &str = "to-lan";

/// The router, two LB nodes, backends on a shared segment, and a client.
#[derive(Debug)]
pub struct DsrTopology {
    // Field order is drop order.
    backends: Vec<Netns>,
    nodes: Vec<Netns>,
    router: Netns,
    client: Netns,
    clients: usize,
}

fn base_sysctls(ns: &Netns) -> io::Result<()> {
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    let _ = ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    let _ = ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    Ok(())
}

fn ethtool(ns: &Netns, args: &[&str]) -> io::Result<()> {
    let out = ns.exec(&[&["ethtool", "-K"][..], args].concat())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ethtool -K {args:?} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl DsrTopology {
    /// Two LB nodes, `backends` (1..=200) backends and `clients` (0..=90) extra client addresses;
    /// the VIP routed via node 1.
    pub fn new(prefix: &str, backends: usize, clients: usize) -> io::Result<DsrTopology> {
        if !(1..=200).contains(&backends) || clients > 90 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backends must be 1..=200 and clients at most 90, got {backends}, {clients}"),
            ));
        }
        let client = Netns::new(&format!("{prefix}-c"))?;
        let router = Netns::new(&format!("{prefix}-r"))?;
        let nodes = (1..=2)
            .map(|k| Netns::new(&format!("{prefix}-l{k}")))
            .collect::<io::Result<Vec<_>>>()?;
        let bns = (1..=backends)
            .map(|i| Netns::new(&format!("{prefix}-b{i}")))
            .collect::<io::Result<Vec<_>>>()?;
        for ns in [&client, &router].into_iter().chain(&nodes).chain(&bns) {
            base_sysctls(ns)?;
        }
        router.sysctl("net.ipv4.ip_forward", "1")?;
        let mut cmds = vec![
            format!("link add to-c type veth peer name eth0 netns {}", client.name()),
            "addr add 10.0.0.1/24 dev to-c".into(),
            "link set to-c up".into(),
            "link add lan type bridge".into(),
            "addr add 10.2.0.1/24 dev lan".into(),
            "link set lan up".into(),
        ];
        for (idx, n) in nodes.iter().enumerate() {
            let k = idx + 1;
            cmds.push(format!(
                "link add to-l{k} type veth peer name {LB_UP_IF} netns {}",
                n.name()
            ));
            cmds.push(format!("addr add 10.3.{k}.1/24 dev to-l{k}"));
            cmds.push(format!("link set to-l{k} up"));
            cmds.push(format!(
                "link add ln-l{k} type veth peer name {LB_DOWN_IF} netns {}",
                n.name()
            ));
            cmds.push(format!("link set ln-l{k} master lan"));
            cmds.push(format!("link set ln-l{k} up"));
        }
        for (idx, b) in bns.iter().enumerate() {
            let i = idx + 1;
            cmds.push(format!(
                "link add ln-b{i} type veth peer name eth0 netns {}",
                b.name()
            ));
            cmds.push(format!("link set ln-b{i} master lan"));
            cmds.push(format!("link set ln-b{i} up"));
        }
        cmds.push(format!("route add {DSR_VIP}/32 via 10.3.1.2"));
        router.ip_batch(&cmds)?;
        for k in 1..=nodes.len() {
            ethtool(&router, &[&format!("ln-l{k}"), "gro", "on"])?;
        }

        let mut cmds = vec!["addr add 10.0.0.2/24 dev eth0".to_string()];
        for c in 0..clients {
            cmds.push(format!("addr add 10.0.0.{}/24 dev eth0", 10 + c));
        }
        cmds.push("link set eth0 up".into());
        cmds.push("route add default via 10.0.0.1".into());
        client.ip_batch(&cmds)?;
        ethtool(&client, &["eth0", "tx", "off"])?;

        for (idx, n) in nodes.iter().enumerate() {
            let k = idx + 1;
            n.sysctl("net.ipv4.ip_forward", "1")?;
            n.ip_batch(&[
                format!("addr add 10.3.{k}.2/24 dev {LB_UP_IF}"),
                format!("link set {LB_UP_IF} up"),
                format!("addr add 10.2.0.{}/24 dev {LB_DOWN_IF}", 10 + k),
                format!("link set {LB_DOWN_IF} up"),
                format!("route add default via 10.3.{k}.1"),
            ])?;
        }
        for (idx, b) in bns.iter().enumerate() {
            let i = idx + 1;
            // The backend setup `lb check-config` prints (less the tunnel device: see lb_decap).
            b.ip_batch(&[
                "link set lo up".into(),
                format!("addr add {DSR_VIP}/32 dev lo"),
                format!("addr add 10.2.0.{}/24 dev eth0", 20 + i),
                "link set eth0 up".into(),
                "route add default via 10.2.0.1 advmss 1440".into(),
            ])?;
            b.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            b.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        Ok(DsrTopology {
            backends: bns,
            nodes,
            router,
            client,
            clients,
        })
    }

    pub fn vip(&self) -> Ipv4Addr {
        DSR_VIP
    }

    /// Backend `i` (1-based): 10.2.0.(20+i).
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        assert!((1..=self.backends.len()).contains(&i), "no backend {i}");
        Ipv4Addr::new(10, 2, 0, 20 + i as u8)
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends[i - 1]
    }

    /// LB node `k` (1 or 2).
    pub fn node_ns(&self, k: usize) -> &Netns {
        &self.nodes[k - 1]
    }

    /// LB node `k`'s address toward the backends, the outer source of its IPIP packets.
    pub fn node_backend_addr(&self, k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 2, 0, 10 + k as u8)
    }

    pub fn router_ns(&self) -> &Netns {
        &self.router
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// The client's primary address (10.0.0.2) and its extra ones (10.0.0.10..).
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        std::iter::once(Ipv4Addr::new(10, 0, 0, 2))
            .chain((0..self.clients).map(|c| Ipv4Addr::new(10, 0, 0, 10 + c as u8)))
            .collect()
    }

    /// Routes the VIP via LB node `k` (replacing the route): the router's view of which node
    /// is alive.
    pub fn route_vip_via(&self, k: usize) -> io::Result<()> {
        self.router
            .ip_batch(&[format!("route replace {DSR_VIP}/32 via 10.3.{k}.2")])
    }

    /// Takes LB node `k`'s links down (the node is gone from the network).
    pub fn node_down(&self, k: usize) -> io::Result<()> {
        self.nodes[k - 1].ip_batch(&[
            format!("link set {LB_UP_IF} down"),
            format!("link set {LB_DOWN_IF} down"),
        ])
    }

    /// `(rx_bytes, tx_bytes)` of interface `ifname` in LB node `k`.
    pub fn node_if_bytes(&self, k: usize, ifname: &str) -> io::Result<(u64, u64)> {
        let read = |what: &str| -> io::Result<u64> {
            let text =
                self.nodes[k - 1].exec_ok(&["cat", &format!("/sys/class/net/{ifname}/statistics/{what}")])?;
            text.trim()
                .parse()
                .map_err(|e| io::Error::other(format!("{what} of {ifname}: {e}")))
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }
}
