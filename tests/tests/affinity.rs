//! Affinity you can see and move, end to end on both datapaths: per-backend counts in `lb status`,
//! `lb affinity list|flush|set` changing where `lb which` and real connections go, the "drained"
//! mark once a draining backend has nothing left; and, on the proxy, a healthy backup reached by
//! the retries of every new connection while both primaries refuse, before the checks mark them
//! down.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::daemon::{backend_of, service_of};
use lb_tests::require_root;

/// An XDP bed over `backends` (its config passed through `edit`), once every backend's checks
/// have succeeded.
fn xdp_bed(
    tag: &str,
    backends: usize,
    clients: usize,
    pins: &Path,
    edit: impl FnOnce(String) -> String,
) -> Bed {
    let bed = Bed::new(tag, backends, clients, |topo, socket| {
        edit(xdp_config(
            topo,
            socket,
            pins,
            backends,
            &[("web", 80, HTTP_PORT)],
            "",
        ))
    });
    prepare_peers(&bed.topo);
    wait_checked(&bed, "web");
    bed
}

/// Clients with affinity per backend, from `lb status --json`.
fn affinity_counts(bed: &Bed) -> BTreeMap<String, u64> {
    let st = bed.lb.status();
    service_of(&st, "web")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["affinity_clients"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The whole walk on one bed: counts, list, set, drain + flush → drained, flush all.
fn list_flush_set_and_drained(bed: &Bed) {
    let clients = bed.topo.client_addrs();
    let first = bed.wave(&clients);
    let spread = counts(&first);
    assert_eq!(spread.len(), 3, "clients reach all 3 backends: {spread:?}");

    // Per-backend counts in status agree with where clients went.
    let by_backend = affinity_counts(bed);
    for (name, n) in &spread {
        assert_eq!(by_backend[name], *n as u64, "affinity_clients of {name}");
    }
    assert_eq!(
        service_of(&bed.lb.status(), "web")["affinity_entries"],
        clients.len() as u64
    );

    // List one backend's clients, limited.
    let list = bed.lb.json(&["affinity", "list", "web", "--backend", "b1"]);
    assert_eq!(list["total"], spread["b1"] as u64, "{list}");
    let listed: Vec<Ipv4Addr> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["backend"], "b1", "{e}");
            e["client"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    let mut want: Vec<Ipv4Addr> = first
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(c, _)| *c)
        .collect();
    let mut got = listed.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "the clients listed on b1 are those that went there");
    let limited = bed.lb.json(&["affinity", "list", "web", "--limit", "2"]);
    assert_eq!(limited["entries"].as_array().unwrap().len(), 2, "{limited}");
    assert_eq!(limited["total"], clients.len() as u64);
    let table = bed.lb.cli_ok(&["affinity", "list", "web", "--limit", "2"]);
    assert!(
        table.contains("--limit shows more") && table.contains("CLIENT"),
        "{table}"
    );

    // Set: a client of b1 is pinned to b2; `which` and its next connection follow.
    let pinned = want[0];
    let out = bed
        .lb
        .cli_ok(&["affinity", "set", "web", &pinned.to_string(), "b2"]);
    assert!(out.contains("sticks to b2"), "{out}");
    let (b, reason) = bed.lb.which("web", pinned);
    assert_eq!((b.as_deref(), reason.as_str()), (Some("b2"), "affinity"));
    assert_eq!(bed.get(pinned), "b2");
    assert!(bed.lb.log().contains("sticks to b2"), "the change is logged");

    // A refused pin names its reason and changes nothing.
    bed.lb.cli_ok(&["backend", "disable", "web", "b3"]);
    let refused = bed.lb.cli(&["affinity", "set", "web", &pinned.to_string(), "b3"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("takes no clients now"), "{err}");
    assert_eq!(bed.lb.which("web", pinned).0.as_deref(), Some("b2"));
    bed.lb.cli_ok(&["backend", "enable", "web", "b3"]);

    // Drain b2: not drained while clients stick to it; flushing them finishes the drain.
    bed.lb.cli_ok(&["backend", "drain", "web", "b2"]);
    let b2 = bed.lb.backend("web", "b2").unwrap();
    assert_eq!(b2["drained"], false, "{b2}");
    assert!(b2["affinity_clients"].as_u64().unwrap() > 0);
    let out = bed.lb.cli_ok(&["affinity", "flush", "web", "--backend", "b2"]);
    assert!(out.starts_with("forgot "), "{out}");
    bed.lb.wait_status(Duration::from_secs(5), "b2 drained", |st| {
        backend_of(st, "web", "b2").unwrap()["drained"] == true
    });
    let table = bed.lb.cli_ok(&["status"]);
    assert!(table.contains("drain (drained)"), "{table}");
    // b2's former clients follow the ring, away from the draining b2.
    let (b, reason) = bed.lb.which("web", pinned);
    assert_eq!(reason, "ring");
    assert_ne!(b.as_deref(), Some("b2"));
    assert_eq!(Some(bed.get(pinned)), b);
    // Others kept their entries.
    assert!(affinity_counts(bed)["b1"] > 0 || spread["b1"] == 1);

    // Flush everything.
    bed.lb.cli_ok(&["affinity", "flush", "web"]);
    assert_eq!(bed.lb.json(&["affinity", "list", "web"])["total"], 0);
    for c in &clients {
        assert_eq!(bed.lb.which("web", *c).1, "ring", "{c} after a flush");
    }
}

#[test]
fn proxy_affinity_list_flush_set_and_drained() {
    if !require_root("proxy_affinity_list_flush_set_and_drained") {
        return;
    }
    let bed = Bed::new("paffc", 3, 12, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, false))
    });
    list_flush_set_and_drained(&bed);
}

#[test]
fn xdp_affinity_list_flush_set_and_drained() {
    if !require_root("xdp_affinity_list_flush_set_and_drained") {
        return;
    }
    let pins = Pins::new(pin_dir("affc"));
    let bed = xdp_bed("xaffc", 3, 12, &pins.0, |c| c);
    list_flush_set_and_drained(&bed);
}

#[test]
fn proxy_reaches_a_healthy_backup_while_both_primaries_refuse() {
    if !require_root("proxy_reaches_a_healthy_backup_while_both_primaries_refuse") {
        return;
    }
    // Checks slow enough that the primaries stay "up" through the loop, and no passive health
    // (it would mark them down after 3 refused connects): only the retries can save the clients.
    let mut bed = Bed::new("pbackup", 3, 10, |topo, sock| {
        let mut s = format!(
            "\n[[service]]\nname = \"web\"\nlisten = \"{}:{WEB_VIP_PORT}\"\ndatapath = \"proxy\"\n\
             connect_timeout = \"1s\"\n[service.health]\nkind = \"tcp\"\ninterval = \"30s\"\ntimeout = \"1s\"\nfall = 3\nobserve = \"none\"\n",
            topo.vip()
        );
        for i in 1..=3 {
            s.push_str(&format!(
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{HTTP_PORT}\"\n{}\n",
                topo.backend_addr(i),
                if i == 3 { "backup = true" } else { "" }
            ));
        }
        config_toml(sock, "", "", &[s])
    });
    let clients = bed.topo.client_addrs();
    // Both primaries take their clients before they stop.
    let first = bed.wave(&clients);
    assert!(
        first.values().all(|b| b != "b3"),
        "the backup took nobody: {first:?}"
    );
    // Stop the primaries' HTTP servers: connects to them are refused from now on.
    for i in 0..2 {
        bed.servers[i].stop().expect("stop a primary");
    }
    let started = Instant::now();
    let mut failed = 0;
    let mut served = BTreeMap::new();
    for round in 0..3 {
        for &c in &clients {
            match lb_tests::http_get_from(bed.topo.client_ns().name(), c, bed.web(), "/") {
                Ok(body) => *served.entry(body.trim().to_string()).or_insert(0) += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("round {round}, {c}: {e}");
                }
            }
        }
    }
    let st = bed.lb.status();
    let web = service_of(&st, "web");
    for name in ["b1", "b2"] {
        let b = backend_of(&st, "web", name).unwrap();
        assert_eq!(
            b["health"],
            "up",
            "{name} not yet marked down ({:?} in): the retries did the work",
            started.elapsed()
        );
        assert!(b["connect_failures"].as_u64().unwrap() > 0, "{b}");
    }
    assert_eq!(failed, 0, "no new connection failed; served {served:?}\n{web}");
    assert_eq!(served.keys().collect::<Vec<_>>(), ["b3"], "{served:?}");
    assert_eq!(web["failed_connections"], 0, "{web}");
    // The clients now stick to the backup: their next connections go straight there.
    let failures_before: u64 = ["b1", "b2"]
        .iter()
        .map(|n| {
            backend_of(&st, "web", n).unwrap()["connect_failures"]
                .as_u64()
                .unwrap()
        })
        .sum();
    for &c in &clients {
        assert_eq!(bed.get(c), "b3");
    }
    let st = bed.lb.status();
    let failures_after: u64 = ["b1", "b2"]
        .iter()
        .map(|n| {
            backend_of(&st, "web", n).unwrap()["connect_failures"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(
        failures_after, failures_before,
        "with affinity to the backup, no connect goes to the refusing primaries"
    );
}

/// `failback = true` on both datapaths: clients that came while every primary was out sit on
/// the backup; once a primary is back, their next connections follow the ring to it (the
/// backup's affinity entries are forgotten), and without failback they stay.
fn failback_leaves_the_backup(bed: &Bed, failback: bool) {
    let clients = bed.topo.client_addrs();
    bed.lb.cli_ok(&["backend", "disable", "web", "b1"]);
    bed.lb.cli_ok(&["backend", "disable", "web", "b2"]);
    for &c in &clients {
        assert_eq!(bed.get(c), "b3", "{c} while every primary is in maintenance");
    }
    assert_eq!(affinity_counts(bed)["b3"], clients.len() as u64);
    bed.lb.cli_ok(&["backend", "enable", "web", "b1"]);
    for &c in &clients {
        let want = if failback { "b1" } else { "b3" };
        assert_eq!(bed.get(c), want, "{c} once b1 is back (failback = {failback})");
    }
}

/// `web` over b1, b2 and the backup b3, with `failback` as given.
fn with_backup(config: String, failback: bool) -> String {
    let config = config.replacen(
        "[[service]]\nname = \"web\"\n",
        &format!("[[service]]\nname = \"web\"\nfailback = {failback}\n"),
        1,
    );
    let at = config.find("name = \"b3\"\n").expect("a backend b3");
    let end = at + config[at..].find("\"\n").unwrap() + 2;
    let end = end + config[end..].find('\n').unwrap() + 1;
    format!("{}backup = true\n{}", &config[..end], &config[end..])
}

#[test]
fn failback_moves_clients_off_the_backup_on_both_datapaths() {
    if !require_root("failback_moves_clients_off_the_backup_on_both_datapaths") {
        return;
    }
    for failback in [true, false] {
        let bed = Bed::new("pfailb", 3, 6, |topo, sock| {
            with_backup(config_toml(sock, "", "", &std_services(topo, 3, false)), failback)
        });
        failback_leaves_the_backup(&bed, failback);
        drop(bed);
        let pins = Pins::new(pin_dir("failb"));
        let bed = xdp_bed("xfailb", 3, 6, &pins.0, |c| with_backup(c, failback));
        failback_leaves_the_backup(&bed, failback);
    }
}
