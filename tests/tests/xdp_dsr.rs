//! `forwarding = "dsr"` end to end: client → router → one of two LB nodes (XDP, IPIP toward the
//! backend) → backend, and the backend's replies straight to the client through the router, never
//! through an LB node ([`lb_tests::ecmp::Ecmp`] set up for dsr, the VIP routed statically, no BGP).
//! Both nodes run `lb` with the same config and seed. Backends decapsulate with `lb_decap` (this kernel has no ipip module; real backends use
//! tunl0, see the README's DSR section).
//!
//! - HTTP and iperf3 (both directions) through dsr services, byte-exact, with the LB's interface
//!   and kernel counters showing that no reply crossed it;
//! - mid-flow packets: a connection opened through node 1 continues through node 2, which never
//!   saw its SYN (counted as `dsr_mid_flow`, same backend).
//!
//! A transfer surviving its node's death under ECMP and BGP is in `tests/ecmp.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{Hook, Lb, PinDir, Pins, ebpf_object, pin_dir, random_bytes};
use lb_tests::decap::Decap;
use lb_tests::ecmp::{Ecmp, Forwarding, VIP, vip_addr};
use lb_tests::servers::start_testsrv;
use lb_tests::{Child, connect_from, http_get_from, require_root, unique_prefix};

const WEB: u16 = 80;
const ECHO: u16 = 7;
const IPERF: u16 = 5201;

fn config(topo: &Ecmp, socket: &Path, pins: &Path) -> String {
    let up = topo.node_interfaces()[0];
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nseed = 4242\nring_size = 1009\n[control]\nsocket = \"{}\"\n\n[xdp]\nmode = \"driver\"\ninterfaces = [\"{up}\"]\npin_path = \"{}\"\n",
        socket.display(),
        pins.display()
    );
    // iperf3 serves one test at a time: no health checks poking it.
    for (name, port, check) in [
        ("web", WEB, "tcp"),
        ("echo", ECHO, "tcp"),
        ("iperf", IPERF, "none"),
    ] {
        c.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{VIP}:{port}\"\ndatapath = \"xdp\"\nforwarding = \"dsr\"\n[service.health]\nkind = \"{check}\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n"
        ));
        for i in 1..=topo.backend_count() {
            c.push_str(&format!(
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{port}\"\n",
                topo.backend_addr(i)
            ));
        }
    }
    c
}

/// The topology, backends (http, echo, iperf3 on every backend), `lb` on both nodes.
struct Bed {
    lbs: Vec<Lb>,
    _servers: Vec<Child>,
    _decap: Decap,
    topo: Ecmp,
    _pins: (Pins, PinDir),
}

impl Bed {
    fn new(hook: Hook, tag: &str, backends: usize, clients: usize) -> Option<Bed> {
        let tag = &hook.tag(tag);
        let object = ebpf_object()?;
        let pins = (
            Pins::new(pin_dir(&format!("{tag}1"))),
            PinDir(pin_dir(&format!("{tag}2"))),
        );
        let dirs = [pins.0.0.clone(), pins.1.0.clone()];
        let topo = Ecmp::with_forwarding(&unique_prefix(tag), backends, clients, Forwarding::Dsr)
            .expect("dsr topology");
        topo.route_vip_via(1).expect("VIP route via node 1");
        let decap = topo.attach_decap(&object).expect("lb_decap on the backends");
        let mut servers = Vec::new();
        for i in 1..=backends {
            let ns = topo.backend_ns(i);
            servers.push(
                start_testsrv(
                    ns,
                    &[
                        "http",
                        "--listen",
                        &format!("0.0.0.0:{WEB}"),
                        "--name",
                        &format!("b{i}"),
                    ],
                )
                .expect("http server"),
            );
            servers.push(
                start_testsrv(ns, &["echo", "--listen", &format!("0.0.0.0:{ECHO}")]).expect("echo server"),
            );
            servers.push(
                Child::spawn(ns.command("iperf3", &["-s", "-p", &IPERF.to_string()])).expect("iperf3 server"),
            );
        }
        let lbs = (1..=2)
            .map(|k| {
                let pin = dirs[k - 1].clone();
                Lb::start(topo.node_ns(k), &format!("{tag}{k}"), |socket| {
                    hook.config(config(&topo, socket, &pin))
                })
            })
            .collect();
        let bed = Bed {
            lbs,
            _servers: servers,
            _decap: decap,
            topo,
            _pins: pins,
        };
        for lb in &bed.lbs {
            for service in ["web", "echo", "iperf"] {
                lb.wait_status(Duration::from_secs(10), "backends up", |st| {
                    lb_tests::daemon::service_of(st, service)["backends"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|b| b["health"] == "up")
                });
            }
        }
        Some(bed)
    }

    fn lb(&self, k: usize) -> &Lb {
        &self.lbs[k - 1]
    }

    fn counter(&self, k: usize, name: &str) -> u64 {
        self.lb(k).status()["xdp"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("xdp counter {name} missing"))
    }

    /// Sum of a per-backend status field over `service`'s backends on node `k`.
    fn backend_sum(&self, k: usize, service: &str, field: &str) -> u64 {
        lb_tests::daemon::service_of(&self.lb(k).status(), service)["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[field].as_u64().unwrap_or(0))
            .sum()
    }
}

fn ready(test: &str) -> bool {
    require_root(test)
}

/// An echo connection from `src` through the VIP.
fn echo_conn(bed: &Bed, src: Ipv4Addr) -> TcpStream {
    let s = connect_from(
        bed.topo.client_ns().name(),
        src,
        vip_addr(ECHO),
        Duration::from_secs(3),
    )
    .expect("connect to the echo service");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn round_trip(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).expect("echo write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("echo read");
    assert!(back == payload, "echo answered different bytes");
}

fn iperf3(bed: &Bed, reverse: bool) -> (u64, u64) {
    let vip = VIP.to_string();
    let port = IPERF.to_string();
    let mut args = vec!["iperf3", "-c", &vip, "-p", &port, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let out = bed.topo.client_ns().exec(&args).expect("iperf3 client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 {args:?} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("iperf3 JSON");
    (
        v["end"]["sum_sent"]["bytes"].as_u64().unwrap(),
        v["end"]["sum_received"]["bytes"].as_u64().unwrap(),
    )
}

fn dsr_http_and_iperf3_replies_bypass_the_lb(hook: Hook) {
    if !ready("dsr_http_and_iperf3_replies_bypass_the_lb") {
        return;
    }
    let Some(bed) = Bed::new(hook, "dsrh", 3, 20) else {
        eprintln!("SKIP: dsr_http_and_iperf3_replies_bypass_the_lb: LB_EBPF_OBJECT unset");
        return;
    };
    // The operator sees the forwarding mode.
    let list = bed.lb(1).cli_ok(&["service", "list"]);
    assert!(list.contains("xdp dsr"), "lb service list:\n{list}");
    let st = bed.lb(1).status();
    assert_eq!(
        lb_tests::daemon::service_of(&st, "web")["forwarding"],
        "dsr",
        "{st}"
    );
    let [up, down] = bed.topo.node_interfaces();
    let (down_rx0, _) = bed.topo.node_if_bytes(1, down).unwrap();
    let (_, up_tx0) = bed.topo.node_if_bytes(1, up).unwrap();

    // HTTP: every client gets its backend's exact answer, the backend both nodes name.
    let mut seen = std::collections::BTreeSet::new();
    for c in bed.topo.client_addrs() {
        let body = http_get_from(bed.topo.client_ns().name(), c, vip_addr(WEB), "/").expect("GET via dsr");
        let (b1, _) = bed.lb(1).which("web", c);
        let (b2, _) = bed.lb(2).which("web", c);
        assert_eq!(b1, b2, "{c}: the two nodes disagree");
        assert_eq!(
            Some(body.trim_end().to_string()),
            b1,
            "{c}: answered by another backend than `lb which` says"
        );
        assert_eq!(body, format!("{}\n", b1.unwrap()), "{c}: body not byte-exact");
        seen.insert(body);
    }
    assert!(seen.len() > 1, "20 clients all landed on one backend: {seen:?}");

    // iperf3 up (the client's data crosses the LB) and down (-R: the backend's data does not).
    let (sent, received) = iperf3(&bed, false);
    assert!(received > 1 << 20, "iperf3 moved only {received} bytes");
    // iperf3 counts the sender's bytes as written and the receiver's as read within the test
    // time: the receiver never has more (TCP itself is byte-exact; the echo tests check bytes).
    assert!(
        sent >= received,
        "iperf3 upload: {received} received of {sent} sent"
    );
    let (sent_r, received_r) = iperf3(&bed, true);
    assert!(received_r > 1 << 20, "iperf3 -R moved only {received_r} bytes");
    assert!(
        sent_r >= received_r,
        "iperf3 download: {received_r} received of {sent_r} sent"
    );

    // Replies never crossed node 1: what it sent toward the router and got from the backends
    // (health checks, ARP) is a small fraction of the download.
    let (down_rx1, _) = bed.topo.node_if_bytes(1, down).unwrap();
    let (_, up_tx1) = bed.topo.node_if_bytes(1, up).unwrap();
    assert!(
        down_rx1 - down_rx0 < received_r / 20,
        "node 1 received {} bytes from the backends during a {received_r}-byte download",
        down_rx1 - down_rx0
    );
    assert!(
        up_tx1 - up_tx0 < received_r / 20,
        "node 1 sent {} bytes toward the router during a {received_r}-byte download",
        up_tx1 - up_tx0
    );
    // Node 1's kernel counted the clients' packets; node 2 saw none.
    for service in ["web", "iperf"] {
        assert!(
            bed.backend_sum(1, service, "bytes_in") > 0,
            "{service}: no bytes in"
        );
        assert_eq!(
            bed.backend_sum(2, service, "bytes_in"),
            0,
            "{service}: node 2 forwarded"
        );
    }
    assert!(
        bed.backend_sum(1, "iperf", "bytes_in") >= received,
        "the upload crossed node 1's XDP"
    );
    assert!(
        bed.counter(1, "new_flows") >= 20 + 4,
        "every connection is a new flow"
    );
    assert_eq!(bed.counter(1, "no_conntrack"), 0);
    assert_eq!(
        bed.counter(1, "too_big"),
        0,
        "advmss 1440 leaves room for the outer header"
    );
}

fn dsr_mid_flow_packets_go_to_the_same_backend_through_the_other_node(hook: Hook) {
    if !ready("dsr_mid_flow_packets_go_to_the_same_backend_through_the_other_node") {
        return;
    }
    let Some(bed) = Bed::new(hook, "dsrm", 3, 8) else {
        eprintln!("SKIP: dsr mid-flow: LB_EBPF_OBJECT unset");
        return;
    };
    let clients = bed.topo.client_addrs();
    let mut conns: Vec<TcpStream> = clients.iter().map(|c| echo_conn(&bed, *c)).collect();
    for (n, s) in conns.iter_mut().enumerate() {
        round_trip(s, &random_bytes(3000, n as u64 + 1));
    }
    let where1: Vec<Option<String>> = clients.iter().map(|c| bed.lb(1).which("echo", *c).0).collect();
    assert_eq!(
        bed.counter(2, "packets"),
        0,
        "node 2 saw traffic before the route moved"
    );
    bed.topo.route_vip_via(2).unwrap();
    // Node 2 never saw these connections' SYNs: their next packets are mid-flow.
    for (n, s) in conns.iter_mut().enumerate() {
        round_trip(s, &random_bytes(50_000, n as u64 + 100));
    }
    let mid = bed.counter(2, "dsr_mid_flow");
    assert!(
        mid >= clients.len() as u64,
        "node 2 counted {mid} mid-flow packets for {} connections",
        clients.len()
    );
    assert_eq!(bed.counter(2, "no_conntrack"), 0, "node 2 reset nothing");
    assert_eq!(bed.counter(2, "rst_sent"), 0, "node 2 reset nothing");
    assert_eq!(bed.counter(2, "new_flows"), 0, "no SYN crossed node 2");
    for (n, c) in clients.iter().enumerate() {
        let (b2, reason) = bed.lb(2).which("echo", *c);
        assert_eq!(b2, where1[n], "{c}: node 2 sends it elsewhere ({reason})");
    }
    // Each connection is still one stream to one backend: the echo kept every byte in order.
    for (n, s) in conns.iter_mut().enumerate() {
        round_trip(s, &random_bytes(1000, n as u64 + 200));
    }
}

lb_tests::per_hook!(
    dsr_http_and_iperf3_replies_bypass_the_lb,
    dsr_mid_flow_packets_go_to_the_same_backend_through_the_other_node,
);
