//! Shared pieces of the daemon end-to-end tests (`proxy.rs`, `control.rs`, `reload.rs`,
//! `shutdown.rs`): a test bed (topology + backends + `lb run`), config text, the `lb` CLI and the
//! raw control socket, and client helpers.
//!
//! Every backend namespace runs `lb-testsrv http` on :8080 (answers `bI\n`) and `lb-testsrv echo`
//! on :7. The standard config has a service `web` on VIP:80 → bI:8080 and, when asked, `echo` on
//! VIP:7 → bI:7, both with `health.kind = "none"` (backends simply up).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_tests::{
    Child, Topology, connect_from, http_get_from, start_echo_backends, start_http_backends, unique_prefix,
};
#[allow(
    unused_imports,
    reason = "used by the XDP test binaries; every binary includes common"
)]
pub use lb_tests::{PinDir, Pins};

pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 7;
pub const WEB_VIP_PORT: u16 = 80;
pub const ECHO_VIP_PORT: u16 = 7;

#[allow(unused_imports)]
pub use lb_tests::daemon::{CLI_TIMEOUT, raw_request};
/// The daemon under test: `lb run` entered with `nsenter --net` ([`Lb::start`]), so pins outlive it.
#[allow(unused_imports)]
pub use lb_tests::{Daemon as Lb, Enter, TempDir};

/// One `[[service]]` with health checks off; `backends` are (topology index, weight), named `bI`.
pub fn service_toml(
    topo: &Topology,
    name: &str,
    vip_port: u16,
    backend_port: u16,
    extra: &str,
    backends: &[(usize, u32)],
) -> String {
    let mut s = format!(
        "\n[[service]]\nname = \"{name}\"\nlisten = \"{}:{vip_port}\"\ndatapath = \"proxy\"\n{extra}\n\n[service.health]\nkind = \"none\"\n",
        topo.vip()
    );
    for &(i, w) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{backend_port}\"\nweight = {w}\n",
            topo.backend_addr(i)
        ));
    }
    s
}

/// A whole config: top-level keys (`shutdown_timeout = "1s"` unless `top` sets it), `[control]`
/// with `socket` and `control` lines, then the service tables.
pub fn config_toml(socket: &Path, top: &str, control: &str, services: &[String]) -> String {
    let mut c = String::new();
    if !top.contains("shutdown_timeout") {
        c.push_str("shutdown_timeout = \"1s\"\n");
    }
    c.push_str(top);
    c.push_str(&format!(
        "\n[control]\nsocket = \"{}\"\n{control}\n",
        socket.display()
    ));
    for s in services {
        c.push_str(s);
    }
    c
}

/// `web` (VIP:80 → bI:8080) over backends `1..=n` with weight 1, plus `echo` (VIP:7 → bI:7) when
/// `echo` is set.
pub fn std_services(topo: &Topology, n: usize, echo: bool) -> Vec<String> {
    let bs: Vec<(usize, u32)> = (1..=n).map(|i| (i, 1)).collect();
    let mut v = vec![service_toml(topo, "web", WEB_VIP_PORT, HTTP_PORT, "", &bs)];
    if echo {
        v.push(service_toml(topo, "echo", ECHO_VIP_PORT, ECHO_PORT, "", &bs));
    }
    v
}

/// The topology, its backend servers (http :8080 and echo :7 in each backend namespace) and the
/// daemon. Field order is drop order: daemon, servers, then the namespaces.
#[derive(Debug)]
pub struct Bed {
    pub lb: Lb,
    pub servers: Vec<Child>,
    pub topo: Topology,
}

impl Bed {
    /// `backends` backend namespaces (all running servers), `clients` extra client addresses, and
    /// `lb run` in the lb namespace with the config `config(topo, socket)`.
    pub fn new(
        tag: &str,
        backends: usize,
        clients: usize,
        config: impl FnOnce(&Topology, &Path) -> String,
    ) -> Bed {
        let topo = Topology::new(&unique_prefix(tag), backends, clients).expect("create topology");
        let mut servers = start_http_backends(&topo, HTTP_PORT).expect("http backends");
        servers.extend(start_echo_backends(&topo, ECHO_PORT).expect("echo backends"));
        let lb = Lb::start(topo.lb_ns(), tag, |socket| config(&topo, socket));
        Bed { lb, servers, topo }
    }

    pub fn web(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip().into(), WEB_VIP_PORT)
    }

    pub fn echo(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip().into(), ECHO_VIP_PORT)
    }

    /// One GET via the VIP from `src` on a new connection; the backend name that answered.
    pub fn get(&self, src: Ipv4Addr) -> String {
        let body = http_get_from(self.topo.client_ns().name(), src, self.web(), "/")
            .unwrap_or_else(|e| panic!("GET via VIP from {src}: {e}\n--- lb log ---\n{}", self.lb.log()));
        body.trim().to_string()
    }

    /// Where each client lands (one new connection each).
    pub fn wave(&self, clients: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, String> {
        clients.iter().map(|&c| (c, self.get(c))).collect()
    }

    /// A new echo connection via the VIP from `src` (checked with one round trip).
    pub fn open_echo(&self, src: Ipv4Addr) -> TcpStream {
        let mut s = connect_from(
            self.topo.client_ns().name(),
            src,
            self.echo(),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("connect echo from {src}: {e}"));
        echo_roundtrip(&mut s, b"hello");
        s
    }
}

/// Write `payload` and read exactly as many bytes back; they must be equal.
pub fn echo_roundtrip(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).expect("echo write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("echo read");
    assert_eq!(back, payload, "echo answered different bytes");
}

/// Half-close and expect a clean EOF after nothing more.
pub fn close_echo(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to EOF after half-close");
    assert!(rest.is_empty(), "unexpected bytes after half-close: {rest:?}");
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Number of clients per backend name.
pub fn counts(m: &BTreeMap<Ipv4Addr, String>) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for b in m.values() {
        *c.entry(b.clone()).or_default() += 1;
    }
    c
}

/// The backend with the most clients (ties: lowest name).
pub fn busiest(m: &BTreeMap<Ipv4Addr, String>) -> String {
    let c = counts(m);
    let max = *c.values().max().expect("no clients");
    c.into_iter().find(|(_, n)| *n == max).unwrap().0
}

/// 1-based line number of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in config:\n{text}"))
        + 1
}

// ---- XDP datapath test beds ----------------------------------------------------------------

/// The eBPF object the test suite runs with (`cargo xtask test` sets `LB_EBPF_OBJECT`; tests that
/// load a program of their own, such as `lb_decap`, skip without it unless `LB_REQUIRE_EBPF=1`).
pub fn ebpf_object() -> Option<PathBuf> {
    let path = std::env::var_os("LB_EBPF_OBJECT").map(PathBuf::from);
    if path.is_none() {
        assert!(
            !std::env::var_os("LB_REQUIRE_EBPF").is_some_and(|v| v == "1"),
            "LB_REQUIRE_EBPF=1 but LB_EBPF_OBJECT is unset"
        );
    }
    path
}

pub fn pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/lbt-{tag}-{}", std::process::id()))
}

/// Services as (name, VIP port, backend port).
pub const XDP_STD: &[(&str, u16, u16)] = &[("web", 80, HTTP_PORT), ("echo", 7, ECHO_PORT)];

/// An XDP config with `services` over backends 1..=n, TCP checks; `tables` (e.g. `[metrics]`)
/// go before `[control]`.
pub fn xdp_config(
    topo: &Topology,
    socket: &Path,
    pins: &Path,
    n: usize,
    services: &[(&str, u16, u16)],
    tables: &str,
) -> String {
    let mut interfaces = vec!["\"to-c\"".to_string()];
    interfaces.extend((1..=n).map(|i| format!("\"to-b{i}\"")));
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nring_size = 1009\n{tables}\n[control]\nsocket = \"{}\"\n\n[xdp]\nmode = \"driver\"\ninterfaces = [{}]\npin_path = \"{}\"\n",
        socket.display(),
        interfaces.join(", "),
        pins.display()
    );
    for (name, vip_port, port) in services {
        c.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{}:{vip_port}\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n",
            topo.vip()
        ));
        for i in 1..=n {
            c.push_str(&format!(
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{port}\"\n",
                topo.backend_addr(i)
            ));
        }
    }
    c
}

/// Veth peers as a real NIC would behave: XDP_REDIRECT into a veth needs NAPI on the receiving
/// peer (GRO on turns it on), and packets sent by a local stack carry only a partial TCP checksum
/// (TX offload) that a rewrite cannot complete (TX checksum offload off).
pub fn prepare_peers(topo: &Topology) {
    let mut names = vec![topo.client_ns().name().to_string()];
    names.extend((1..=topo.backend_count()).map(|i| topo.backend_ns(i).name().to_string()));
    for ns in names {
        let out = topo
            .exec_in(&ns, &["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])
            .expect("run ethtool");
        assert!(
            out.status.success(),
            "ethtool in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An XDP counter of the daemon, from `lb status`.
pub fn xdp_counter(bed: &Bed, name: &str) -> u64 {
    bed.lb.status()["xdp"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("xdp counter {name} missing"))
}

/// `/proc/net/snmp` and `/proc/net/netstat` as read inside `ns`, keyed like nstat
/// (`TcpOutRsts`, `TcpExtTCPSynRetrans`).
pub fn tcp_counters(ns: &lb_tests::Netns) -> BTreeMap<String, u64> {
    let text = ns
        .exec_ok(&["cat", "/proc/net/snmp", "/proc/net/netstat"])
        .expect("read /proc/net counters");
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((prefix, names)), Some((_, values))) = (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse::<u64>() {
                out.insert(format!("{prefix}{n}"), v);
            }
        }
    }
    out
}

/// Waits until every backend of `service` has passed a health check (for XDP the first good
/// checks also resolve the backends' neighbours).
pub fn wait_checked(bed: &Bed, service: &str) {
    bed.lb
        .wait_status(Duration::from_secs(5), "first good checks", |st| {
            lb_tests::daemon::service_of(st, service)["backends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["check"]["consecutive_ok"].as_u64().unwrap_or(0) > 0)
        });
}

/// Waits until the daemon's log (read by a background thread) shows `needle`.
pub fn wait_for_log(bed: &Bed, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !bed.lb.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "log never showed {needle:?}:\n{}",
            bed.lb.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the XDP datapath's program runs in a test: the XDP hook (`[xdp] mode = "driver"`: the
/// beds are veths, where `auto` would take TC) or TC ingress (`mode = "tc"`). Tests that matter at
/// both run once per hook ([`lb_tests::per_hook!`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// `config` (with an `[xdp]` table, its `mode` left out or `"driver"` as its first key) set to
    /// run at this hook.
    pub fn config(self, config: String) -> String {
        let mode = match self {
            Hook::Xdp => "driver",
            Hook::Tc => "tc",
        };
        config
            .replacen("[xdp]\nmode = \"driver\"\n", "[xdp]\n", 1)
            .replacen("[xdp]\n", &format!("[xdp]\nmode = \"{mode}\"\n"), 1)
    }

    /// `tag` made distinct per hook (namespace names, pin directories), so the twins run side by side.
    pub fn tag(self, tag: &str) -> String {
        match self {
            Hook::Xdp => tag.to_string(),
            Hook::Tc => format!("{tag}t"),
        }
    }
}

/// The names of the programs attached at `interface`'s TC ingress by TCX links in `ns` (what a
/// running `lb` with `mode = "tc"` attached).
pub fn tcx_ingress_programs(ns: &lb_tests::Netns, interface: &str) -> Vec<String> {
    ns.run(|| {
        aya::programs::SchedClassifier::query_tcx(interface, aya::programs::TcAttachType::Ingress).map(
            |(_, programs)| {
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_string())
                    .collect()
            },
        )
    })
    .expect("enter the namespace")
    .expect("query the TCX programs")
}

/// The MAC address of `interface` in `ns`.
pub fn mac(ns: &lb_tests::Netns, interface: &str) -> [u8; 6] {
    let text = ns
        .exec_ok(&["cat", &format!("/sys/class/net/{interface}/address")])
        .expect("read MAC");
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC byte"))
        .collect();
    bytes.try_into().expect("6 bytes")
}
