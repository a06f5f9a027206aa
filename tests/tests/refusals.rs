//! Refused changes leave no trace, on the XDP datapath (root, namespaces): for every kind of
//! command (and reload), a refused one leaves `lb status`, `lb which` and the kernel's maps
//! (dumped from the pins, `lb_tests::kernel_maps`) exactly as they were. Refusals come from each
//! layer: the request's own fields, the state (unknown names, duplicates), the running daemon's
//! rules (IPv6 on XDP, listen overlap, ring size) and the kernel datapath itself (no route toward
//! a backend: the change was half-written and is rolled back). Afterwards a health event still
//! reaches the kernel: a killed backend receives no new clients.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::kernel_maps;
use lb_tests::require_root;
use serde_json::Value;

/// What an operator and the kernel see: per service its settings and per backend the fields a
/// change could touch (not counters or check timings, which move on their own), `which` for
/// some clients, and the kernel's forwarding maps.
#[derive(Debug, PartialEq)]
struct Seen {
    services: Vec<Value>,
    which: Vec<(Ipv4Addr, Option<String>, String)>,
    maps: BTreeMap<&'static str, Vec<String>>,
}

fn seen(bed: &Bed, pins: &std::path::Path, clients: &[Ipv4Addr]) -> Seen {
    let st = bed.lb.status();
    let services = st["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            let backends: Vec<Value> = s["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| {
                    serde_json::json!([
                        b["name"],
                        b["address"],
                        b["weight"],
                        b["backup"],
                        b["state"],
                        b["health"],
                        b["ring_slots"]
                    ])
                })
                .collect();
            serde_json::json!([
                s["name"],
                s["listen"],
                s["datapath"],
                s["affinity_timeout_secs"],
                s["affinity_entries"],
                s["on_backups"],
                backends
            ])
        })
        .collect();
    let which = clients
        .iter()
        .map(|&c| {
            let (b, reason) = bed.lb.which("web", c);
            (c, b, reason)
        })
        .collect();
    let maps = kernel_maps::dump(pins).unwrap_or_else(|e| panic!("dumping the pinned maps: {e}"));
    Seen {
        services,
        which,
        maps,
    }
}

/// Every refusal: (what, how it is sent). CLI arguments, or a raw request line.
enum Send<'a> {
    Cli(Vec<String>),
    Raw(&'a str),
}

#[test]
fn refused_commands_leave_status_which_and_kernel_maps_unchanged() {
    if !require_root("refused_commands_leave_status_which_and_kernel_maps_unchanged") {
        return;
    }
    let pins = Pins::new(pin_dir("refuse"));
    let mut bed = Bed::new("xref", 3, 30, |topo, socket| {
        xdp_config(topo, socket, &pins.0, 3, XDP_STD, "")
    });
    prepare_peers(&bed.topo);
    // Every check of every backend passed: health is settled.
    bed.lb.wait_status(
        Duration::from_secs(10),
        "every check passed twice",
        |st: &Value| {
            st["services"].as_array().unwrap().iter().all(|s| {
                s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|b| b["health"] == "up" && b["check"]["consecutive_ok"].as_u64().unwrap_or(0) >= 2)
            })
        },
    );
    let clients = bed.topo.client_addrs();
    let (known, fresh) = clients.split_at(15);
    // Flows and affinity in the kernel, so the maps hold more than configuration.
    let before_wave = bed.wave(known);
    std::thread::sleep(Duration::from_millis(500));
    let probe: Vec<Ipv4Addr> = known.iter().chain(&fresh[..5]).copied().collect();
    let baseline = seen(&bed, &pins.0, &probe);
    assert!(!baseline.maps["lb_conntrack"].is_empty() && !baseline.maps["lb_affinity"].is_empty());
    assert!(!baseline.maps["lb_ring"].is_empty());

    let addr = |i: usize| format!("{}:{HTTP_PORT}", bed.topo.backend_addr(i));
    let vip = bed.topo.vip();
    // 10.50.0.0/16 has no route in the lb namespace: the kernel datapath cannot find the source
    // address toward it, after the state accepted the change.
    let unroutable = "10.50.0.1:8080";
    let cli = |args: &[&str]| Send::Cli(args.iter().map(ToString::to_string).collect());
    let eight: Vec<String> = (0..8)
        .map(|k| format!("{}:{}", bed.topo.backend_addr(2), 9000 + k))
        .collect();
    let mut ring_args = vec!["backend", "add", "web"];
    ring_args.extend(eight.iter().map(String::as_str));
    let b2_other_port = format!("{}:9999", bed.topo.backend_addr(2));
    // lb's own address toward backend 1: its health check would pass, but XDP cannot deliver.
    let own_address = format!("{}:{HTTP_PORT}", bed.topo.lb_backend_side_addr(1));
    let refusals: Vec<(&str, Send)> = vec![
        (
            "add-service: name taken",
            cli(&[
                "service",
                "add",
                "web",
                "--listen",
                &format!("{vip}:81"),
                "--datapath",
                "xdp",
            ]),
        ),
        (
            "add-service: listen in use",
            cli(&[
                "service",
                "add",
                "web2",
                "--listen",
                &format!("{vip}:80"),
                "--datapath",
                "xdp",
            ]),
        ),
        ("remove-service: unknown", cli(&["service", "remove", "nosuch"])),
        (
            "add-backend: IPv6 on xdp",
            cli(&["backend", "add", "web", "[2001:db8::1]:8080"]),
        ),
        (
            "add-backend: no route (datapath)",
            cli(&["backend", "add", "web", unroutable]),
        ),
        (
            "add-backend: an address of lb's own host (datapath)",
            cli(&["backend", "add", "web", &own_address]),
        ),
        (
            "add-backend: address taken",
            cli(&["backend", "add", "web", &addr(1), "--name", "dup"]),
        ),
        (
            "add-backends: one without a route (datapath)",
            cli(&["backend", "add", "web", &b2_other_port, unroutable]),
        ),
        (
            "add-backends: one address taken",
            cli(&["backend", "add", "web", &b2_other_port, &addr(3)]),
        ),
        (
            "add-backends: ring_size 1009 takes 10",
            Send::Cli(ring_args.iter().map(ToString::to_string).collect()),
        ),
        (
            "remove-backend: unknown",
            cli(&["backend", "remove", "web", "nosuch"]),
        ),
        (
            "set-state drain: unknown",
            cli(&["backend", "drain", "web", "nosuch"]),
        ),
        (
            "set-state enable: unknown",
            cli(&["backend", "enable", "web", "nosuch"]),
        ),
        (
            "set-state disable: unknown",
            cli(&["backend", "disable", "web", "nosuch"]),
        ),
        (
            "set-weight: unknown",
            cli(&["backend", "weight", "web", "nosuch", "2"]),
        ),
        (
            "set-weight: out of range (the daemon's own check)",
            Send::Raw(r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":300}"#),
        ),
        (
            "add-backends: bad element (the daemon's own check)",
            Send::Raw(
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"10.1.2.2:9001"},{"address":"10.1.2.2"}]}"#,
            ),
        ),
        ("reload: broken file", cli(&["reload"])),
    ];
    let config = std::fs::read_to_string(&bed.lb.config).expect("config");
    for (what, send) in refusals {
        if what.starts_with("reload") {
            std::fs::write(&bed.lb.config, format!("{config}\n[[service]]\nname = 7\n")).unwrap();
        }
        let answer = match send {
            Send::Cli(args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = bed.lb.cli(&args);
                assert!(
                    !out.status.success(),
                    "{what}: lb {args:?} was accepted: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                String::from_utf8_lossy(&out.stderr).into_owned()
            }
            Send::Raw(line) => {
                let v = bed
                    .lb
                    .request(format!("{line}\n").as_bytes())
                    .expect("control request");
                assert_eq!(v["ok"], false, "{what}: accepted: {v}");
                v["error"].to_string()
            }
        };
        if what.starts_with("reload") {
            std::fs::write(&bed.lb.config, &config).unwrap();
        }
        assert!(!answer.trim().is_empty(), "{what}: refused without a reason");
        if what.contains("lb's own host") {
            assert!(answer.contains("is an address of this host"), "{what}: {answer}");
        }
        let now = seen(&bed, &pins.0, &probe);
        assert_eq!(
            now.services, baseline.services,
            "{what} ({answer}): status changed"
        );
        assert_eq!(now.which, baseline.which, "{what} ({answer}): which changed");
        for (map, entries) in &baseline.maps {
            assert_eq!(
                &now.maps[map], entries,
                "{what} ({answer}): kernel map {map} changed"
            );
        }
    }
    bed.lb.assert_running();

    // A health event after the refusals still reaches the kernel: kill b1's HTTP server.
    drop(bed.servers.remove(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = bed.lb.backend("web", "b1").unwrap();
        if b["health"] == "down" && b["ring_slots"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b1 never went down: {b}\n{}",
            bed.lb.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = bed.wave(&fresh[5..]);
    assert!(
        after.values().all(|b| b != "b1"),
        "new clients sent to the killed b1: {after:?}"
    );
    let had_b1: Vec<Ipv4Addr> = before_wave
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(c, _)| *c)
        .collect();
    for (c, b) in bed.wave(&had_b1) {
        assert_ne!(b, "b1", "{c}: a client with affinity to the killed b1 reached it");
    }
    // And a good batch still applies, kernel included (the new backends have no server, so they
    // are looked at before their health checks fail).
    let b3_other_port = format!("{}:9999", bed.topo.backend_addr(3));
    bed.lb
        .cli_ok(&["backend", "add", "web", &b2_other_port, &b3_other_port]);
    let st = bed.lb.status();
    for name in [&b2_other_port, &b3_other_port] {
        let b =
            lb_tests::daemon::backend_of(&st, "web", name).unwrap_or_else(|| panic!("{name} missing: {st}"));
        assert!(
            b["ring_slots"].as_u64().unwrap() > 0 || b["health"] == "down",
            "{b}"
        );
    }
    let maps = kernel_maps::dump(&pins.0).unwrap();
    assert_eq!(
        maps["lb_backends"].len(),
        baseline.maps["lb_backends"].len() + 2,
        "both backends of the batch are in the kernel"
    );
    assert_ne!(
        maps["lb_ring"], baseline.maps["lb_ring"],
        "the accepted batch rewrote ring slots"
    );
}
