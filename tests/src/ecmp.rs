//! [`Ecmp`]: two load-balancer nodes behind a router that spreads the VIP over both with ECMP,
//! learnt over BGP from a BIRD 2 on each node ([`Bird`]), and the backends on a LAN both nodes
//! reach.
//!
//! ```text
//!  <p>-c                     <p>-r (router, BIRD)                <p>-nI (lb + BIRD, I = 1, 2)
//!  eth0 10.30.0.2/24 ─ veth ─ to-c  10.30.0.1/24
//!       10.30.0.10../24       to-nI 10.31.I.1/24 ──── veth ──── to-r 10.31.I.2/24
//!  default via 10.30.0.1      VIP via 10.31.1.2 + 10.31.2.2      default via 10.31.I.1
//!                             (ECMP, fib_multipath_hash_policy 0: L3)
//!                                                                 to-s 10.32.0.I/24 ─ veth ─┐
//!  <p>-bJ (J = 1..N)                                              <p>-s: bridge br0 ───────┘
//!  eth0 10.32.0.(10+J)/24 ─────────────── veth ─────────────────  (ports n1, n2, b1..bN)
//! ```
//!
//! With [`Forwarding::Nat`] the VIP is not a local address anywhere: the router sends it to a
//! node, whose XDP program forwards it (full NAT, the node's `to-s` address as source), and the
//! backends answer that node. With [`Forwarding::Dsr`] the backends are set up for
//! `forwarding = "dsr"`: the router also has a port on the LAN
//! (`to-s` [`ROUTER_LAN`]/24, bridge port `r`), and each backend holds the VIP on `lo`, ignores
//! ARP for it, and answers clients through its default route via the router (`advmss 1440`: room
//! for the outer header), never through a node; [`Ecmp::attach_decap`] puts `lb_decap` on the
//! backends. The router also has two fixed paths that bypass ECMP: packets with IP TOS
//! [`TOS_VIA`]`[I-1]` go to node I (ip rules into tables 11 and 12), so a test can send any
//! client's connection through either node.
//! Namespaces go on drop (declare the `Ecmp` before the [`Child`]ren that run in it).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};

use crate::decap::{Decap, attach_decap};
use crate::netns::{Netns, in_netns};
use crate::{Child, TempDir};

/// The VIP the nodes announce.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 100);
/// AS of the router; node I has AS `65000 + I`.
pub const ROUTER_AS: u32 = 65000;
/// BGP timers of every session: hold time and keepalive, in seconds.
pub const HOLD_SECS: u32 = 3;
pub const KEEPALIVE_SECS: u32 = 1;
/// IP TOS values the router sends through node 1 and node 2 whatever ECMP would choose.
pub const TOS_VIA: [u8; 2] = [0x04, 0x08];
/// Most client addresses (10.30.0.10 ..= 10.30.0.99).
pub const MAX_CLIENTS: usize = 90;
/// The router's address on the backends' LAN ([`Forwarding::Dsr`] only): the backends' gateway.
pub const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 254);

/// How the services of the test forward, and so how the backends are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Full NAT: the backends answer the node that forwarded (its LAN address), nothing more.
    Nat,
    /// DSR: the backends hold the VIP on `lo` and answer clients through the router.
    Dsr,
}

/// The two-node ECMP network.
#[derive(Debug)]
pub struct Ecmp {
    prefix: String,
    // Drop order: backends, switch, nodes, router, client.
    backends: Vec<Netns>,
    switch: Netns,
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

fn ethtool(ns: &Netns, dev: &str, args: &[&str]) -> io::Result<()> {
    let mut full = vec!["ethtool", "-K", dev];
    full.extend_from_slice(args);
    ns.exec_ok(&full).map(drop)
}

impl Ecmp {
    /// Builds the network with `backends` (1..=50) backends and `clients` (1..=90) client
    /// addresses from 10.30.0.10, the backends set up for NAT.
    pub fn new(prefix: &str, backends: usize, clients: usize) -> io::Result<Ecmp> {
        Ecmp::with_forwarding(prefix, backends, clients, Forwarding::Nat)
    }

    /// [`Ecmp::new`] with the backends set up for `forwarding`.
    pub fn with_forwarding(
        prefix: &str,
        backends: usize,
        clients: usize,
        forwarding: Forwarding,
    ) -> io::Result<Ecmp> {
        if !(1..=50).contains(&backends) || !(1..=MAX_CLIENTS).contains(&clients) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backends must be 1..=50 and clients 1..={MAX_CLIENTS}"),
            ));
        }
        let client = Netns::new(&format!("{prefix}-c"))?;
        let router = Netns::new(&format!("{prefix}-r"))?;
        let nodes = vec![
            Netns::new(&format!("{prefix}-n1"))?,
            Netns::new(&format!("{prefix}-n2"))?,
        ];
        let switch = Netns::new(&format!("{prefix}-s"))?;
        let mut bns = Vec::with_capacity(backends);
        for j in 1..=backends {
            bns.push(Netns::new(&format!("{prefix}-b{j}"))?);
        }
        for ns in [&client, &router, &switch].into_iter().chain(&nodes).chain(&bns) {
            base_sysctls(ns)?;
        }
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // L3 multipath hash: source and destination address only, so a client keeps its node.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "0")?;

        let mut links = vec![
            format!("link add to-c type veth peer name eth0 netns {}", client.name()),
            "addr add 10.30.0.1/24 dev to-c".to_string(),
            "link set to-c up".to_string(),
        ];
        // The fixed paths through node I (for packets with TOS_VIA[I-1]), added once the links
        // are up.
        let mut routes = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            let i = k + 1;
            links.push(format!(
                "link add to-n{i} type veth peer name to-r netns {}",
                n.name()
            ));
            links.push(format!("addr add 10.31.{i}.1/24 dev to-n{i}"));
            links.push(format!("link set to-n{i} up"));
            routes.push(format!("route add {VIP}/32 via 10.31.{i}.2 table 1{i}"));
            routes.push(format!(
                "rule add tos {:#04x} table 1{i} priority 10{i}",
                TOS_VIA[k]
            ));
        }
        if forwarding == Forwarding::Dsr {
            links.push(format!(
                "link add to-s type veth peer name r netns {}",
                switch.name()
            ));
            links.push(format!("addr add {ROUTER_LAN}/24 dev to-s"));
            links.push("link set to-s up".into());
        }
        router.ip_batch(&links)?;

        let mut cmds = vec!["addr add 10.30.0.2/24 dev eth0".to_string()];
        for k in 0..clients {
            cmds.push(format!("addr add 10.30.0.{}/24 dev eth0", 10 + k));
        }
        cmds.push("link set eth0 up".into());
        cmds.push("route add default via 10.30.0.1".into());
        client.ip_batch(&cmds)?;

        let mut sw = vec![
            "link add br0 type bridge".to_string(),
            "link set br0 up".to_string(),
        ];
        for (k, n) in nodes.iter().enumerate() {
            let i = k + 1;
            n.ip_batch(&[
                format!("addr add 10.31.{i}.2/24 dev to-r"),
                "link set to-r up".into(),
                format!("route add default via 10.31.{i}.1"),
            ])?;
            sw.push(format!(
                "link add n{i} type veth peer name to-s netns {}",
                n.name()
            ));
            sw.push(format!("link set n{i} master br0"));
            sw.push(format!("link set n{i} up"));
        }
        for (k, b) in bns.iter().enumerate() {
            let j = k + 1;
            sw.push(format!(
                "link add b{j} type veth peer name eth0 netns {}",
                b.name()
            ));
            sw.push(format!("link set b{j} master br0"));
            sw.push(format!("link set b{j} up"));
        }
        if forwarding == Forwarding::Dsr {
            sw.push("link set r master br0".into());
            sw.push("link set r up".into());
        }
        switch.ip_batch(&sw)?;
        for (k, n) in nodes.iter().enumerate() {
            n.ip_batch(&[
                format!("addr add 10.32.0.{}/24 dev to-s", k + 1),
                "link set to-s up".into(),
            ])?;
        }
        for (k, b) in bns.iter().enumerate() {
            b.ip_batch(&[
                format!("addr add 10.32.0.{}/24 dev eth0", 11 + k),
                "link set eth0 up".into(),
            ])?;
            if forwarding == Forwarding::Dsr {
                // The backend setup `lb check-config` prints, less the tunnel device (see
                // `lb_decap`).
                b.ip_batch(&[
                    "link set lo up".into(),
                    format!("addr add {VIP}/32 dev lo"),
                    format!("route add default via {ROUTER_LAN} advmss 1440"),
                ])?;
                b.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
                b.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            }
        }
        router.ip_batch(&routes)?;

        // Veths as real NICs: NAPI (GRO on) where the nodes' XDP program redirects into, and full
        // checksums from the hosts whose packets it rewrites (TX checksum offload off).
        for i in 1..=nodes.len() {
            ethtool(&router, &format!("to-n{i}"), &["gro", "on"])?;
            ethtool(&switch, &format!("n{i}"), &["gro", "on"])?;
        }
        ethtool(&client, "eth0", &["gro", "on", "tx", "off"])?;
        for b in &bns {
            ethtool(b, "eth0", &["gro", "on", "tx", "off"])?;
        }
        Ok(Ecmp {
            prefix: prefix.to_string(),
            backends: bns,
            switch,
            nodes,
            router,
            client,
            clients,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    pub fn router_ns(&self) -> &Netns {
        &self.router
    }

    pub fn switch_ns(&self) -> &Netns {
        &self.switch
    }

    /// Node `i` (1 or 2).
    pub fn node_ns(&self, i: usize) -> &Netns {
        &self.nodes[i - 1]
    }

    /// Backend `j` (1-based).
    pub fn backend_ns(&self, j: usize) -> &Netns {
        &self.backends[j - 1]
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Backend `j`'s address on the LAN.
    pub fn backend_addr(&self, j: usize) -> Ipv4Addr {
        assert!((1..=self.backends.len()).contains(&j));
        Ipv4Addr::new(10, 32, 0, 10 + j as u8)
    }

    /// Node `i`'s address toward the router (its BGP address and the next hop the router uses).
    pub fn node_uplink(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 31, i as u8, 2)
    }

    /// The client addresses 10.30.0.10, 10.30.0.11, …
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.clients)
            .map(|k| Ipv4Addr::new(10, 30, 0, 10 + k as u8))
            .collect()
    }

    /// Loads `lb_decap` from the eBPF object at `object` onto every backend's `eth0` (the
    /// backends' half of [`Forwarding::Dsr`]); detached when the result is dropped.
    pub fn attach_decap(&self, object: &Path) -> io::Result<Decap> {
        let backends: Vec<&Netns> = self.backends.iter().collect();
        attach_decap(object, &backends, "eth0")
    }

    /// `(rx_bytes, tx_bytes)` of interface `ifname` in node `i`.
    pub fn node_if_bytes(&self, i: usize, ifname: &str) -> io::Result<(u64, u64)> {
        let read = |what: &str| -> io::Result<u64> {
            let text = self
                .node_ns(i)
                .exec_ok(&["cat", &format!("/sys/class/net/{ifname}/statistics/{what}")])?;
            text.trim()
                .parse()
                .map_err(|e| io::Error::other(format!("{what} of {ifname}: {e}")))
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }

    /// Cuts the wire between the router and node `i` at the router's port: nftables `netdev`
    /// ingress and egress hooks on `to-nI` drop every packet, while the link's carrier stays up (as
    /// when a switch sits between them). The node looks dead to the router, whose BGP session
    /// notices only when its hold time runs out; taking a link down instead would end the session
    /// at once (BIRD sees the carrier go).
    pub fn cut_node(&self, i: usize) -> io::Result<()> {
        let table = format!("cut_n{i}");
        self.router.exec_ok(&["nft", "add", "table", "netdev", &table])?;
        for (chain, hook) in [("in", "ingress"), ("out", "egress")] {
            self.router.exec_ok(&[
                "nft",
                "add",
                "chain",
                "netdev",
                &table,
                chain,
                &format!("{{ type filter hook {hook} device to-n{i} priority 0; policy drop; }}"),
            ])?;
        }
        Ok(())
    }

    /// Routes the VIP via node `i` in the router's main table (replacing the route), for tests
    /// without BGP.
    pub fn route_vip_via(&self, i: usize) -> io::Result<()> {
        let via = self.node_uplink(i);
        self.router
            .ip_batch(&[format!("route replace {VIP}/32 via {via}")])
    }

    /// The XDP interfaces of a node.
    pub fn node_interfaces(&self) -> [&'static str; 2] {
        ["to-r", "to-s"]
    }

    /// BIRD config of node `i`: learn lb's routes from kernel table `table` and export them to
    /// the router over eBGP.
    pub fn node_bird_config(&self, i: usize, table: u32) -> String {
        let me = self.node_uplink(i);
        format!(
            "router id {me};
log stderr all;
protocol device {{ scan time 1; }}
protocol kernel lbvip {{
  kernel table {table};
  learn;
  scan time 1;
  ipv4 {{ import all; export none; }};
}}
protocol bgp uplink {{
  local {me} as {las};
  neighbor 10.31.{i}.1 as {ROUTER_AS};
  hold time {HOLD_SECS};
  keepalive time {KEEPALIVE_SECS};
  connect retry time 1;
  error wait time 1, 2;
  ipv4 {{ import none; export where proto = \"lbvip\"; next hop self; }};
}}
",
            las = ROUTER_AS + i as u32,
        )
    }

    /// BIRD config of the router: a BGP session to each node, the VIP installed in the main
    /// table with every equal path (`merge paths`).
    pub fn router_bird_config(&self) -> String {
        let mut c = String::from(
            "router id 10.30.0.1;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
  merge paths on;
  scan time 1;
  ipv4 { import none; export all; };
}
",
        );
        for i in 1..=self.nodes.len() {
            c.push_str(&format!(
                "protocol bgp n{i} {{
  local 10.31.{i}.1 as {ROUTER_AS};
  neighbor 10.31.{i}.2 as {las};
  hold time {HOLD_SECS};
  keepalive time {KEEPALIVE_SECS};
  connect retry time 1;
  error wait time 1, 2;
  ipv4 {{ import all; export none; }};
}}
",
                las = ROUTER_AS + i as u32
            ));
        }
        c
    }

    /// The next hops of the router's route to the VIP in its main table (empty without one),
    /// sorted.
    pub fn router_next_hops(&self) -> io::Result<Vec<Ipv4Addr>> {
        let out =
            self.router
                .exec_ok(&["ip", "-j", "route", "show", "table", "main", &format!("{VIP}/32")])?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        let mut hops = Vec::new();
        for r in v.as_array().into_iter().flatten() {
            if let Some(g) = r["gateway"].as_str() {
                hops.extend(g.parse::<Ipv4Addr>().ok());
            }
            for nh in r["nexthops"].as_array().into_iter().flatten() {
                if let Some(g) = nh["gateway"].as_str() {
                    hops.extend(g.parse::<Ipv4Addr>().ok());
                }
            }
        }
        hops.sort_unstable();
        Ok(hops)
    }

    /// `ip route show table TABLE` in node `i` (lb's announced routes).
    pub fn node_table(&self, i: usize, table: u32) -> io::Result<String> {
        self.node_ns(i)
            .exec_ok(&["ip", "route", "show", "table", &table.to_string()])
    }
}

/// An HTTP GET of `/` from client address `src` to `dst` with IP TOS `tos` (0: plain, the route
/// ECMP picks); the response body.
pub fn http_get_tos(
    ns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    tos: u8,
    timeout: Duration,
) -> io::Result<String> {
    in_netns(ns, move || -> io::Result<String> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        if tos != 0 {
            setsockopt(&fd, sockopt::Ipv4Tos, &i32::from(tos))?;
        }
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
        let mut stream = TcpStream::from(fd);
        stream.set_write_timeout(Some(timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        connect(stream.as_raw_fd(), &SockaddrIn::from(dst)).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("connect {src} -> {dst} (tos {tos:#x}): {e}"),
            )
        })?;
        stream.write_all(format!("GET / HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("no HTTP response: {text:?}"))
            })?;
        Ok(body)
    })?
}

/// A BIRD 2 daemon in a namespace with its own config, control socket and PID file in a temp
/// dir, run in the foreground and stopped by its PID when dropped.
#[derive(Debug)]
pub struct Bird {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Bird {
    /// Writes `config` and starts `bird -f` in `ns`; returns once its control socket answers.
    pub fn start(ns: &Netns, tag: &str, config: &str) -> io::Result<Bird> {
        let dir = TempDir::try_new(tag)?;
        let conf = dir.path().join("bird.conf");
        let socket = dir.path().join("bird.ctl");
        std::fs::write(&conf, config)?;
        let pid = dir.path().join("bird.pid");
        let args = [
            "-f".as_ref(),
            "-c".as_ref(),
            conf.as_os_str(),
            "-s".as_ref(),
            socket.as_os_str(),
            "-P".as_ref(),
            pid.as_os_str(),
        ];
        let child = Child::spawn(ns.command("bird", &args))?;
        let mut bird = Bird { child, socket, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while bird.birdc(&["show", "status"]).is_err() {
            if std::time::Instant::now() > deadline || !bird.child.is_running() {
                return Err(io::Error::other(format!(
                    "bird in {} did not start: {}",
                    ns.name(),
                    bird.child.stderr_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bird)
    }

    /// `birdc -s SOCKET ARGS…`: its output, or an error when it fails.
    pub fn birdc(&self, args: &[&str]) -> io::Result<String> {
        let mut cmd = std::process::Command::new("birdc");
        cmd.arg("-s").arg(&self.socket).args(args);
        let out = crate::run_with_timeout(cmd, Duration::from_secs(5))?;
        if !out.status.success() || !self.socket.exists() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The config file BIRD runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("bird.conf")
    }
}

/// The socket address of the VIP on `port`.
pub fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// `vip(port)` as a [`SocketAddr`].
pub fn vip_addr(port: u16) -> SocketAddr {
    SocketAddr::V4(vip(port))
}
