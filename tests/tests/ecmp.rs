//! Two lb nodes behind ECMP, with BGP (BIRD 2) announcing the VIP from each ([`lb_tests::ecmp`]):
//! the same config and seed make both nodes send every client to the same backend, whichever node
//! its connection crosses; a node that stops, or whose service has no healthy backend, withdraws
//! its route and the router's ECMP set shrinks to the other node while every client keeps its
//! backend; a node restarted without memory, or whose backends came in another order, picks the
//! same backends; `lb check` exits 0, 1, 3 or 4 as the README says; a killed lb's route goes with
//! `lb withdraw`.
//!
//! BGP timers of every session: hold time 3 s, keepalive 1 s ([`lb_tests::ecmp::HOLD_SECS`],
//! [`lb_tests::ecmp::KEEPALIVE_SECS`]). A withdrawal reaches the router as a BGP UPDATE as soon
//! as BIRD sees the route go from lb's table, so the assertions allow the hold time plus 2 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::ecmp::{Bird, Ecmp, HOLD_SECS, TOS_VIA, http_get_tos, vip};
use lb_tests::servers::start_testsrv;
use lb_tests::{lb_bin, require_root, run_with_timeout, unique_prefix};

/// lb's routing table on both nodes.
const TABLE: u32 = 100;
const CLIENTS: usize = 30;
const BACKENDS: usize = 3;
/// Clients compared through `which` only (ring slots, not connections).
const MANY: usize = 3000;

/// The second node's pin directory (the first is a [`Pins`], which holds the binary's XDP lock),
/// removed on drop like a [`Pins`].
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
        let record = format!(
            "/run/lb/sysctl/{}.json",
            self.0
                .display()
                .to_string()
                .replace('%', "%25")
                .replace('/', "%2F")
        );
        let _ = std::fs::remove_file(record);
    }
}

/// The config both nodes run: the same seed, ring and backends; `[announce]` into [`TABLE`].
fn node_config(net: &Ecmp, socket: &std::path::Path, pins: &std::path::Path) -> String {
    let [up, lan] = net.node_interfaces();
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nseed = 7\nring_size = 1009\n\n[control]\nsocket = \"{}\"\n\n[announce]\ntable = {TABLE}\n\n[xdp]\ninterfaces = [\"{up}\", \"{lan}\"]\npin_path = \"{}\"\n\n[[service]]\nname = \"web\"\nlisten = \"{}\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n",
        socket.display(),
        pins.display(),
        vip(80)
    );
    for j in 1..=net.backend_count() {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{j}\"\naddress = \"{}:{HTTP_PORT}\"\n",
            net.backend_addr(j)
        ));
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

/// Every backend of `web` on `node` has passed a check.
fn healthy(node: &Lb) -> bool {
    node.try_status().is_ok_and(|st| {
        lb_tests::daemon::service_of(&st, "web")["backends"]
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

#[test]
fn two_nodes_behind_ecmp_agree_withdraw_and_keep_every_client_on_its_backend() {
    if !require_root("two_nodes_behind_ecmp_agree_withdraw_and_keep_every_client_on_its_backend") {
        return;
    }
    assert!(
        Command::new("bird").arg("--version").output().is_ok(),
        "bird (BIRD 2, Debian package bird2) is not installed; `cargo xtask setup` installs it"
    );
    let pins1 = Pins::new(pin_dir("ecmp1"));
    let pins2 = PinDir(pin_dir("ecmp2"));
    let net = Ecmp::new(&unique_prefix("ecmp"), BACKENDS, CLIENTS).expect("build the ECMP network");
    let _servers: Vec<_> = (1..=BACKENDS)
        .map(|j| {
            start_testsrv(
                net.backend_ns(j),
                &[
                    "http",
                    "--listen",
                    &format!("0.0.0.0:{HTTP_PORT}"),
                    "--name",
                    &format!("b{j}"),
                ],
            )
            .expect("start a backend")
        })
        .collect();
    let router = Bird::start(net.router_ns(), "ecmp-router", &net.router_bird_config()).expect("router bird");
    let _birds: Vec<Bird> = (1..=2)
        .map(|i| {
            Bird::start(
                net.node_ns(i),
                &format!("ecmp-bird{i}"),
                &net.node_bird_config(i, TABLE),
            )
            .expect("node bird")
        })
        .collect();
    let mut nodes: Vec<Lb> = [(1, &pins1.0), (2, &pins2.0)]
        .into_iter()
        .map(|(i, pins)| {
            Lb::start(net.node_ns(i), &format!("ecmp-lb{i}"), |s| {
                node_config(&net, s, pins)
            })
        })
        .collect();
    let (n1, n2) = (net.node_uplink(1), net.node_uplink(2));
    for node in &nodes {
        wait_until(
            "every backend checked",
            Duration::from_secs(10),
            || healthy(node),
            || node.log_tail(30),
        );
    }

    // Both nodes announce; the router learns the VIP from both and installs both paths.
    wait_until(
        "the router's ECMP route over both nodes",
        Duration::from_secs(30),
        || net.router_next_hops().is_ok_and(|h| h == [n1, n2]),
        || explain(&net, &router, &nodes),
    );
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            net.node_table(i + 1, TABLE).unwrap().trim(),
            format!("blackhole {} proto 201", vip(80).ip())
        );
        let (code, line) = check(node, "web");
        assert_eq!(code, 0, "node {}: {line}", i + 1);
        assert!(line.ends_with("VIP announced"), "{line}");
    }

    // Identical decisions: `lb which` agrees on every client, by the ring.
    let mut expected = BTreeMap::new();
    for c in net.client_addrs() {
        let (a, ra) = nodes[0].which("web", c);
        let (b, rb) = nodes[1].which("web", c);
        assert_eq!(
            (&a, ra.as_str(), rb.as_str()),
            (&b, "ring", "ring"),
            "{c}: node 1 says {a:?} ({ra}), node 2 {b:?} ({rb})"
        );
        expected.insert(c, a.expect("a backend"));
    }
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
    assert_eq!(reached(&net, 0), expected, "through ECMP");
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
            reached(&net, *tos),
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
        || explain(&net, &router, &nodes),
    );
    eprintln!(
        "node 1 stopped: router down to node 2 after {:?} ({took:?} of polling)",
        stopped.elapsed()
    );
    let (code, line) = check(&nodes[0], "web");
    assert_eq!(code, 4, "daemon down: {line}");
    assert!(line.starts_with("daemon down"), "{line}");
    assert_eq!(reached(&net, 0), expected, "new connections after node 1 left");

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
        || healthy(&nodes[0]),
        || nodes[0].log_tail(30),
    );
    wait_until(
        "node 1 back in the router's ECMP set",
        Duration::from_secs(15),
        || net.router_next_hops().is_ok_and(|h| h == [n1, n2]),
        || explain(&net, &router, &nodes),
    );
    for c in net.client_addrs() {
        assert_eq!(
            nodes[0].which("web", c),
            (Some(expected[&c].clone()), "ring".to_string()),
            "{c} on the restarted node 1"
        );
    }
    assert_eq!(
        reached(&net, TOS_VIA[0]),
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
        reached(&net, TOS_VIA[1]),
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
        || explain(&net, &router, &nodes),
    );
    assert_eq!(
        reached(&net, 0),
        expected,
        "new connections with node 2 withdrawn"
    );
    net.node_ns(2).ip(&["link", "set", "to-s", "up"]).unwrap();
    wait_until(
        "node 2 announces again once a backend is up",
        Duration::from_secs(15),
        || net.router_next_hops().is_ok_and(|h| h == [n1, n2]),
        || explain(&net, &router, &nodes),
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
        || explain(&net, &router, &nodes),
    );
}
