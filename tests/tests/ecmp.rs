//! Two lb nodes behind ECMP, with BGP (BIRD 2) announcing the VIP from each ([`lb_tests::ecmp`]):
//! the same config and seed make both nodes send every client to the same backend, whichever node
//! its connection crosses; a node that stops, or whose service has no healthy backend, withdraws
//! its route and the router's ECMP set shrinks to the other node while every client keeps its
//! backend; a node restarted without memory, or whose backends came in another order, picks the
//! same backends; `lb check` exits 0, 1, 3 or 4 as the README says; a killed lb's route goes with
//! `lb withdraw`.
//!
//! With `forwarding = "dsr"` (backends set up by [`lb_tests::ecmp::Forwarding::Dsr`]): every
//! client reaches the same backend through ECMP and through either node, and a long byte-checked
//! transfer through node 1 survives node 1's death: the router's BGP hold timer drops node 1 from
//! the ECMP set, and node 2 forwards the connection's packets, mid-flow, to the same backend.
//!
//! BGP timers of every session: hold time 3 s, keepalive 1 s ([`lb_tests::ecmp::HOLD_SECS`],
//! [`lb_tests::ecmp::KEEPALIVE_SECS`]). A withdrawal reaches the router as a BGP UPDATE as soon
//! as BIRD sees the route go from lb's table; a dead node is dropped when the router's hold timer
//! runs out (2 to 3 s after its last keepalive). The assertions allow the hold time plus 2 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use lb_tests::decap::Decap;
use lb_tests::ecmp::{Bird, Ecmp, Forwarding, HOLD_SECS, TOS_VIA, http_get_tos, vip, vip_addr};
use lb_tests::servers::start_testsrv;
use lb_tests::{Child, connect_from, lb_bin, require_root, run_with_timeout, unique_prefix};

/// lb's routing table on both nodes.
const TABLE: u32 = 100;
const CLIENTS: usize = 30;
const BACKENDS: usize = 3;
/// Clients compared through `which` only (ring slots, not connections).
const MANY: usize = 3000;

/// The services of the test: (name, VIP port, backend port). Full NAT: `web` to the backends'
/// :8080; dsr (the backend's port must be the VIP's): `web` to :80 and `echo` to :7.
fn services(forwarding: Forwarding) -> &'static [(&'static str, u16, u16)] {
    match forwarding {
        Forwarding::Nat => &[("web", 80, HTTP_PORT)],
        Forwarding::Dsr => &[("web", 80, 80), ("echo", ECHO_PORT, ECHO_PORT)],
    }
}

/// The config both nodes run: the same seed, ring and backends; `[announce]` into [`TABLE`].
fn node_config(net: &Ecmp, socket: &Path, pins: &Path, forwarding: Forwarding) -> String {
    let [up, lan] = net.node_interfaces();
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nseed = 7\nring_size = 1009\n\n[control]\nsocket = \"{}\"\n\n[announce]\ntable = {TABLE}\n\n[xdp]\nmode = \"driver\"\ninterfaces = [\"{up}\", \"{lan}\"]\npin_path = \"{}\"\n",
        socket.display(),
        pins.display(),
    );
    let line = match forwarding {
        Forwarding::Nat => "",
        Forwarding::Dsr => "forwarding = \"dsr\"\n",
    };
    for &(name, port, backend_port) in services(forwarding) {
        c.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{}\"\ndatapath = \"xdp\"\n{line}[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n",
            vip(port)
        ));
        for j in 1..=net.backend_count() {
            c.push_str(&format!(
                "\n[[service.backend]]\nname = \"b{j}\"\naddress = \"{}:{backend_port}\"\n",
                net.backend_addr(j)
            ));
        }
    }
    c
}

/// Polls `f` every 50 ms until it holds; panics after `timeout` with `what` and `explain()`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}\n{}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// What the router, the nodes' tables and the daemons say, for a failed wait.
fn explain(net: &Ecmp, router: &Bird, nodes: &[Lb]) -> String {
    format!(
        "router: {:?}\n{}\n{}\nnode 1 table: {:?}\nnode 2 table: {:?}\nrouter bird log:\n{}\nlb n1 log:\n{}\nlb n2 log:\n{}",
        net.router_next_hops(),
        router.birdc(&["show", "protocols"]).unwrap_or_default(),
        router.birdc(&["show", "route", "all"]).unwrap_or_default(),
        net.node_table(1, TABLE),
        net.node_table(2, TABLE),
        router.child.stderr_text(),
        nodes[0].log_tail(20),
        nodes[1].log_tail(20),
    )
}

/// `which web CLIENT` for many clients over one control connection (requests pipelined): the
/// backend each would reach.
fn which_many(node: &Lb, clients: &[Ipv4Addr]) -> Vec<Option<String>> {
    let stream = UnixStream::connect(&node.socket).expect("control socket");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = Vec::with_capacity(clients.len());
    for chunk in clients.chunks(100) {
        let mut text = String::new();
        for c in chunk {
            text.push_str(&format!(
                "{{\"cmd\":\"which\",\"service\":\"web\",\"client\":\"{c}\"}}\n"
            ));
        }
        (&stream).write_all(text.as_bytes()).unwrap();
        for c in chunk {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["ok"], true, "which {c}: {line}");
            out.push(v["result"]["backend"].as_str().map(String::from));
        }
    }
    out
}

/// Clients that never connect, for comparing the nodes' rings through `which`.
fn many_clients() -> Vec<Ipv4Addr> {
    (0..MANY)
        .map(|k| Ipv4Addr::new(10, 60, (k / 250) as u8, (k % 250 + 1) as u8))
        .collect()
}

/// `lb check web` (exit code, stdout) against a node's socket.
fn check(node: &Lb, service: &str) -> (i32, String) {
    let out = node.cli(&["check", service]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// Every backend of `service` on `node` has passed a check.
fn healthy(node: &Lb, service: &str) -> bool {
    node.try_status().is_ok_and(|st| {
        lb_tests::daemon::service_of(&st, service)["backends"]
            .as_array()
            .is_some_and(|bs| {
                bs.iter()
                    .all(|b| b["health"] == "up" && b["check"]["consecutive_ok"].as_u64().unwrap_or(0) > 0)
            })
    })
}

/// GET / from every client (through the route TOS `tos` picks; 0 = ECMP): the backend that
/// answered, by client.
fn reached(net: &Ecmp, tos: u8) -> BTreeMap<Ipv4Addr, String> {
    net.client_addrs()
        .into_iter()
        .map(|c| {
            let body = http_get_tos(net.client_ns().name(), c, vip(80), tos, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("GET from {c} (tos {tos:#x}): {e}"));
            (c, body.trim().to_string())
        })
        .collect()
}

/// The ECMP network with its backends' servers, BIRD on the router and on both nodes, and lb on
/// both nodes, every backend checked and the router's route over both nodes. Field order is drop
/// order: the daemons first, the namespaces and pin directories last.
struct Bed {
    nodes: Vec<Lb>,
    birds: Vec<Bird>,
    router: Bird,
    _servers: Vec<Child>,
    _decap: Option<Decap>,
    net: Ecmp,
    _pins: (PinDir, Pins),
}

impl Bed {
    /// `tag` names the namespaces and pin directories; `object` (the eBPF object, for
    /// `lb_decap`) is needed with [`Forwarding::Dsr`].
    fn new(tag: &str, forwarding: Forwarding, object: Option<&Path>) -> Bed {
        assert!(
            Command::new("bird").arg("--version").output().is_ok(),
            "bird (BIRD 2, Debian package bird2) is not installed; `cargo xtask setup` installs it"
        );
        let pins = (
            PinDir(pin_dir(&format!("{tag}2"))),
            Pins::new(pin_dir(&format!("{tag}1"))),
        );
        let net = Ecmp::with_forwarding(&unique_prefix(tag), BACKENDS, CLIENTS, forwarding)
            .expect("build the ECMP network");
        let decap = object.map(|o| net.attach_decap(o).expect("lb_decap on the backends"));
        assert_eq!(
            decap.is_some(),
            forwarding == Forwarding::Dsr,
            "dsr backends need lb_decap, NAT backends none"
        );
        let mut servers = Vec::new();
        for j in 1..=BACKENDS {
            for &(name, _, port) in services(forwarding) {
                let listen = format!("0.0.0.0:{port}");
                let me = format!("b{j}");
                let args: Vec<&str> = match name {
                    "web" => vec!["http", "--listen", &listen, "--name", &me],
                    _ => vec!["echo", "--listen", &listen],
                };
                servers.push(start_testsrv(net.backend_ns(j), &args).expect("start a backend"));
            }
        }
        let router = Bird::start(
            net.router_ns(),
            &format!("{tag}-router"),
            &net.router_bird_config(),
        )
        .expect("router bird");
        let birds: Vec<Bird> = (1..=2)
            .map(|i| {
                Bird::start(
                    net.node_ns(i),
                    &format!("{tag}-bird{i}"),
                    &net.node_bird_config(i, TABLE),
                )
                .expect("node bird")
            })
            .collect();
        let nodes: Vec<Lb> = [(1, &pins.1.0), (2, &pins.0.0)]
            .into_iter()
            .map(|(i, dir)| {
                Lb::start(net.node_ns(i), &format!("{tag}-lb{i}"), |s| {
                    node_config(&net, s, dir, forwarding)
                })
            })
            .collect();
        for node in &nodes {
            for &(service, _, _) in services(forwarding) {
                wait_until(
                    "every backend checked",
                    Duration::from_secs(10),
                    || healthy(node, service),
                    || node.log_tail(30),
                );
            }
        }
        // Both nodes announce; the router learns the VIP from both and installs both paths.
        let both = [net.node_uplink(1), net.node_uplink(2)];
        wait_until(
            "the router's ECMP route over both nodes",
            Duration::from_secs(30),
            || net.router_next_hops().is_ok_and(|h| h == both),
            || explain(&net, &router, &nodes),
        );
        Bed {
            nodes,
            birds,
            router,
            _servers: servers,
            _decap: decap,
            net,
            _pins: pins,
        }
    }
}

#[test]
fn two_nodes_behind_ecmp_agree_withdraw_and_keep_every_client_on_its_backend() {
    if !require_root("two_nodes_behind_ecmp_agree_withdraw_and_keep_every_client_on_its_backend") {
        return;
    }
    let mut bed = Bed::new("ecmp", Forwarding::Nat, None);
    // Identical decisions: `lb which` agrees on every client, by the ring.
    let expected = agreed(&bed, "web");
    let (net, router, nodes) = (&bed.net, &bed.router, &mut bed.nodes);
    let (n1, n2) = (net.node_uplink(1), net.node_uplink(2));
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            net.node_table(i + 1, TABLE).unwrap().trim(),
            format!("blackhole {} proto 201", vip(80).ip())
        );
        let (code, line) = check(node, "web");
        assert_eq!(code, 0, "node {}: {line}", i + 1);
        assert!(line.ends_with("VIP announced"), "{line}");
    }

    // ... and on many more clients.
    let many = many_clients();
    let ring = which_many(&nodes[0], &many);
    assert!(ring.iter().all(Option::is_some));
    assert!(
        ring == which_many(&nodes[1], &many),
        "node 1 and node 2 disagree on some of {MANY} clients"
    );
    let used: BTreeSet<&String> = expected.values().collect();
    assert_eq!(used.len(), BACKENDS, "30 clients over 3 backends: {expected:?}");

    // Real connections through ECMP reach the backend both nodes named, and both nodes carry some.
    assert_eq!(reached(net, 0), expected, "through ECMP");
    let affinity: Vec<u64> = nodes
        .iter()
        .map(|n| n.json(&["affinity", "list", "web"])["total"].as_u64().unwrap())
        .collect();
    assert!(
        affinity.iter().all(|&n| n > 0) && affinity.iter().sum::<u64>() == CLIENTS as u64,
        "the L3 hash spreads the 30 clients over both nodes: {affinity:?}"
    );
    // Every client through each node: the same backend.
    for (k, tos) in TOS_VIA.iter().enumerate() {
        assert_eq!(
            reached(net, *tos),
            expected,
            "every client through node {}",
            k + 1
        );
    }

    // Stopping lb on node 1 withdraws its route at once; the router keeps node 2 only.
    let stopped = Instant::now();
    nodes[0].stop().expect("stop lb on node 1");
    assert_eq!(net.node_table(1, TABLE).unwrap().trim(), "", "withdrawn on stop");
    let took = wait_until(
        "the router's ECMP set shrinks to node 2",
        Duration::from_secs(u64::from(HOLD_SECS) + 2),
        || net.router_next_hops().is_ok_and(|h| h == [n2]),
        || explain(net, router, nodes),
    );
    eprintln!(
        "node 1 stopped: router down to node 2 after {:?} ({took:?} of polling)",
        stopped.elapsed()
    );
    let (code, line) = check(&nodes[0], "web");
    assert_eq!(code, 4, "daemon down: {line}");
    assert!(line.starts_with("daemon down"), "{line}");
    assert_eq!(reached(net, 0), expected, "new connections after node 1 left");

    // Node 1 comes back with no memory (pins and affinity removed): it picks the same backends.
    let cleanup = {
        let mut cmd = Command::new(lb_bin());
        cmd.args(["cleanup", "-c"]).arg(&nodes[0].config);
        run_with_timeout(cmd, Duration::from_secs(10)).expect("lb cleanup")
    };
    assert!(cleanup.status.success(), "{cleanup:?}");
    nodes[0].run_again(net.node_ns(1));
    wait_until(
        "node 1 checked again",
        Duration::from_secs(10),
        || healthy(&nodes[0], "web"),
        || nodes[0].log_tail(30),
    );
    wait_until(
        "node 1 back in the router's ECMP set",
        Duration::from_secs(15),
        || net.router_next_hops().is_ok_and(|h| h == [n1, n2]),
        || explain(net, router, nodes),
    );
    for c in net.client_addrs() {
        assert_eq!(
            nodes[0].which("web", c),
            (Some(expected[&c].clone()), "ring".to_string()),
            "{c} on the restarted node 1"
        );
    }
    assert_eq!(
        reached(net, TOS_VIA[0]),
        expected,
        "every client through the restarted node 1"
    );

    // Node 2 takes b1 out and adds it again at run time, so b1 comes last in its list while it
    // is first in node 1's: the rings still agree, client by client.
    nodes[1].cli_ok(&["backend", "remove", "web", "b1"]);
    let b1 = format!("{}:{HTTP_PORT}", net.backend_addr(1));
    nodes[1].cli_ok(&["backend", "add", "web", &b1, "--name", "b1"]);
    for c in net.client_addrs() {
        assert_eq!(
            nodes[1].which("web", c).0.as_deref(),
            Some(expected[&c].as_str()),
            "{c} on node 2 after b1 was added again"
        );
    }
    assert_eq!(
        reached(net, TOS_VIA[1]),
        expected,
        "every client through node 2 after b1 was added again"
    );
    let differ = which_many(&nodes[1], &many)
        .iter()
        .zip(&ring)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ, 0,
        "node 2 (b1 added again) and node 1 disagree on {differ} of {MANY} clients"
    );

    // Node 2 loses its backends (its LAN link goes down): its checks fail, it withdraws, and
    // the router keeps node 1 only. `lb check` says why.
    net.node_ns(2).ip(&["link", "set", "to-s", "down"]).unwrap();
    wait_until(
        "node 2 sees no healthy backend",
        Duration::from_secs(5),
        || check(&nodes[1], "web").0 == 1,
        || nodes[1].log_tail(30),
    );
    let (_, line) = check(&nodes[1], "web");
    assert_eq!(
        line,
        // b1 last: it was added again above.
        "web: no backend takes new clients (b2 down, b3 down, b1 down); VIP not announced"
    );
    assert_eq!(net.node_table(2, TABLE).unwrap().trim(), "");
    wait_until(
        "the router's ECMP set shrinks to node 1",
        Duration::from_secs(u64::from(HOLD_SECS) + 2),
        || net.router_next_hops().is_ok_and(|h| h == [n1]),
        || explain(net, router, nodes),
    );
    assert_eq!(reached(net, 0), expected, "new connections with node 2 withdrawn");
    net.node_ns(2).ip(&["link", "set", "to-s", "up"]).unwrap();
    wait_until(
        "node 2 announces again once a backend is up",
        Duration::from_secs(15),
        || net.router_next_hops().is_ok_and(|h| h == [n1, n2]),
        || explain(net, router, nodes),
    );
    assert_eq!(check(&nodes[1], "web").0, 0);

    // An unknown service.
    let (code, line) = check(&nodes[1], "nope");
    assert_eq!((code, line.as_str()), (3, "nope: no service `nope`"));

    // lb on node 2 is killed (SIGKILL: no withdrawal of its own): its route stays until
    // `lb withdraw` (the unit's ExecStopPost) removes it; then the router drops node 2.
    nodes[1]
        .child
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill lb on node 2");
    nodes[1]
        .child
        .wait_timeout(Duration::from_secs(5))
        .expect("wait for lb on node 2");
    assert_eq!(
        net.node_table(2, TABLE).unwrap().trim(),
        format!("blackhole {} proto 201", vip(80).ip()),
        "a killed lb leaves its route"
    );
    assert_eq!(net.router_next_hops().unwrap(), [n1, n2]);
    let withdraw = {
        let mut cmd = net.node_ns(2).command(lb_bin(), &["withdraw", "-c"]);
        cmd.arg(&nodes[1].config);
        run_with_timeout(cmd, Duration::from_secs(10)).expect("lb withdraw")
    };
    assert!(withdraw.status.success(), "{withdraw:?}");
    assert_eq!(
        String::from_utf8_lossy(&withdraw.stdout).trim(),
        format!("withdrew 1 VIP routes from table {TABLE}: {}", vip(80).ip())
    );
    assert_eq!(net.node_table(2, TABLE).unwrap().trim(), "");
    wait_until(
        "the router's ECMP set shrinks to node 1 after lb withdraw",
        Duration::from_secs(u64::from(HOLD_SECS) + 2),
        || net.router_next_hops().is_ok_and(|h| h == [n1]),
        || explain(net, router, nodes),
    );
}

/// `which SERVICE CLIENT` on both nodes for every client: both name the same backend, by the
/// ring; that backend, by client.
fn agreed(bed: &Bed, service: &str) -> BTreeMap<Ipv4Addr, String> {
    bed.net
        .client_addrs()
        .into_iter()
        .map(|c| {
            let (a, ra) = bed.nodes[0].which(service, c);
            let (b, rb) = bed.nodes[1].which(service, c);
            assert_eq!(
                (&a, ra.as_str(), rb.as_str()),
                (&b, "ring", "ring"),
                "{service} {c}: node 1 says {a:?} ({ra}), node 2 {b:?} ({rb})"
            );
            (c, a.expect("a backend"))
        })
        .collect()
}

/// The clients `node` has affinity entries for in `service`.
fn affinity_clients(node: &Lb, service: &str) -> BTreeSet<Ipv4Addr> {
    let v = node.json(&["affinity", "list", service, "--limit", "1000"]);
    v["entries"]
        .as_array()
        .expect("affinity entries")
        .iter()
        .map(|e| e["client"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// One echo round trip of `payload` (compared without printing it).
fn round_trip(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).expect("echo write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("echo read");
    assert!(back == payload, "echo answered different bytes");
}

/// A status field of the echo backend `backend` on `node`.
fn echo_backend(node: &Lb, backend: &str, field: &str) -> u64 {
    lb_tests::daemon::backend_of(&node.status(), "echo", backend)
        .unwrap_or_else(|| panic!("no echo backend {backend}"))[field]
        .as_u64()
        .unwrap_or(0)
}

/// An XDP counter of `node`, from its status.
fn xdp_counter(node: &Lb, name: &str) -> u64 {
    node.status()["xdp"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("xdp counter {name} missing"))
}

#[test]
fn dsr_long_transfer_survives_the_death_of_its_node_as_ecmp_moves_it_to_the_other() {
    const NAME: &str = "dsr_long_transfer_survives_the_death_of_its_node_as_ecmp_moves_it_to_the_other";
    /// The transfer's chunk, echoed back and compared.
    const CHUNK: usize = 16 * 1024;
    if !require_root(NAME) {
        return;
    }
    let Some(object) = ebpf_object() else {
        eprintln!("SKIP: {NAME}: LB_EBPF_OBJECT unset (lb_decap is loaded from it)");
        return;
    };
    let mut bed = Bed::new("ecmpd", Forwarding::Dsr, Some(&object));
    let (n1, n2) = (bed.net.node_uplink(1), bed.net.node_uplink(2));
    for node in &bed.nodes {
        let st = node.status();
        for service in ["web", "echo"] {
            assert_eq!(
                lb_tests::daemon::service_of(&st, service)["forwarding"],
                "dsr",
                "{st}"
            );
        }
    }

    // Both nodes name the same backend for every client, and every client reaches it through
    // ECMP and through each node (the backend's answer crossing only the router).
    let web = agreed(&bed, "web");
    let echo = agreed(&bed, "echo");
    assert_eq!(
        web.values().collect::<BTreeSet<_>>().len(),
        BACKENDS,
        "30 clients over 3 backends: {web:?}"
    );
    assert_eq!(reached(&bed.net, 0), web, "through ECMP");
    // Where ECMP sent each client: the node that made its affinity entry.
    let via = [
        affinity_clients(&bed.nodes[0], "web"),
        affinity_clients(&bed.nodes[1], "web"),
    ];
    assert!(
        via[0].is_disjoint(&via[1])
            && via[0].len() + via[1].len() == CLIENTS
            && via.iter().all(|v| !v.is_empty()),
        "the L3 hash spreads the 30 clients over both nodes, each client on one: {via:?}"
    );
    for (k, tos) in TOS_VIA.iter().enumerate() {
        assert_eq!(
            reached(&bed.net, *tos),
            web,
            "every client through node {}",
            k + 1
        );
    }

    // A long echo transfer from a client that ECMP sends through node 1, byte-checked chunk by
    // chunk until told to stop.
    let client = *via[0].first().unwrap();
    let backend = echo[&client].clone();
    let mut s = connect_from(
        bed.net.client_ns().name(),
        client,
        vip_addr(ECHO_PORT),
        Duration::from_secs(3),
    )
    .expect("connect to the echo service");
    // Long enough for the BGP hold time and TCP's backed-off retransmissions after it.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let transfer = {
        let (stop, moved) = (Arc::clone(&stop), Arc::clone(&moved));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round_trip(&mut s, &random_bytes(CHUNK, n + 1));
                n += 1;
                moved.fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
            s
        })
    };
    let wait_moved = |at_least: u64, within: Duration| {
        let deadline = Instant::now() + within;
        while moved.load(Ordering::Relaxed) < at_least {
            assert!(
                Instant::now() < deadline && !transfer.is_finished(),
                "the transfer stalled at {} bytes (wanted {at_least} within {within:?})",
                moved.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_moved(4 << 20, Duration::from_secs(10));
    assert!(
        echo_backend(&bed.nodes[0], &backend, "bytes_in") >= 4 << 20,
        "node 1 carries the transfer to {backend}"
    );
    for j in 1..=BACKENDS {
        assert_eq!(
            echo_backend(&bed.nodes[1], &format!("b{j}"), "bytes_in"),
            0,
            "node 2 carried echo bytes before node 1 died"
        );
    }
    let mid_flow0 = xdp_counter(&bed.nodes[1], "dsr_mid_flow");
    let (_, up_tx0) = bed.net.node_if_bytes(2, "to-r").unwrap();

    // Node 1 dies: the router's wire to it goes silent (its carrier stays up, as behind a
    // switch), and its lb and its BIRD are killed (SIGKILL). Nothing tells the router: its BGP
    // session to node 1 ends when the hold time (HOLD_SECS) runs out without a keepalive.
    let died = Instant::now();
    bed.net.cut_node(1).expect("cut the router's wire to node 1");
    // What moves from now on crosses node 2 (but for the chunk under way).
    let at_death = moved.load(Ordering::Relaxed);
    for child in [&mut bed.nodes[0].child, &mut bed.birds[0].child] {
        child
            .signal(nix::sys::signal::Signal::SIGKILL)
            .expect("kill a node 1 process");
        child
            .wait_timeout(Duration::from_secs(5))
            .expect("wait for a node 1 process");
    }
    wait_until(
        "the router's ECMP set shrinks to node 2",
        Duration::from_secs(u64::from(HOLD_SECS) + 2),
        || bed.net.router_next_hops().is_ok_and(|h| h == [n2]),
        || explain(&bed.net, &bed.router, &bed.nodes),
    );
    let shrank = died.elapsed();
    // The hold timer, not a link event or a message from node 1, ended the session.
    wait_until(
        "the router's BIRD logs n1's hold timer",
        Duration::from_secs(2),
        || {
            bed.router
                .child
                .stderr_text()
                .contains("n1: Error: Hold timer expired")
        },
        || bed.router.child.stderr_text(),
    );
    eprintln!(
        "node 1 died: the router's ECMP set is node 2 alone after {shrank:?} (hold time {HOLD_SECS} s)"
    );
    assert!(!bed.net.router_next_hops().unwrap().contains(&n1));

    // The transfer goes on through node 2, to the same backend, byte-exact.
    wait_moved(at_death + (8 << 20), Duration::from_secs(20));
    eprintln!(
        "8 MiB more echoed through node 2 {:?} after node 1 died",
        died.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut s = transfer.join().expect("the transfer failed");
    round_trip(&mut s, b"still the same connection");
    let node2 = &bed.nodes[1];
    assert!(
        xdp_counter(node2, "dsr_mid_flow") > mid_flow0,
        "node 2 took the flow over mid-flow"
    );
    assert_eq!(xdp_counter(node2, "rst_sent"), 0, "node 2 reset nothing");
    assert_eq!(xdp_counter(node2, "no_conntrack"), 0, "node 2 reset nothing");
    assert_eq!(node2.which("echo", client).0.as_deref(), Some(backend.as_str()));
    let after = moved.load(Ordering::Relaxed) - at_death;
    let bytes = echo_backend(node2, &backend, "bytes_in");
    assert!(
        bytes >= after - CHUNK as u64,
        "node 2 forwarded only {bytes} bytes to {backend} of the {after} sent since node 1 died"
    );
    for other in (1..=BACKENDS).map(|j| format!("b{j}")).filter(|b| *b != backend) {
        assert_eq!(
            echo_backend(node2, &other, "bytes_in"),
            0,
            "node 2 sent echo bytes to {other}, not {backend}"
        );
    }
    // The echo's answers went from the backend to the router, not back through node 2.
    let (_, up_tx1) = bed.net.node_if_bytes(2, "to-r").unwrap();
    assert!(
        up_tx1 - up_tx0 < bytes / 20,
        "node 2 sent {} bytes toward the router while forwarding {bytes}",
        up_tx1 - up_tx0
    );
    // New connections of every client still reach their backend, now all through node 2.
    assert_eq!(reached(&bed.net, 0), web, "through ECMP after node 1 died");
}
