//! Reloading the config file (`lb reload` and SIGHUP) applies weight changes, added and removed
//! backends without resetting open connections or forgetting affinity; a broken file is refused
//! with file and line and the daemon keeps serving unchanged.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Bed, Lb, busiest, close_echo, config_toml, echo_roundtrip, line_of, service_toml, std_services,
};
use lb_tests::require_root;
use nix::sys::signal::Signal;
use serde_json::Value;

/// (name, weight, state) of every backend of `service`.
fn backends(lb: &Lb, service: &str) -> BTreeMap<String, (u64, String)> {
    let st = lb.status();
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no service {service}: {st}"))["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                (
                    b["weight"].as_u64().unwrap(),
                    b["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn idx(name: &str) -> usize {
    name[1..].parse().unwrap()
}

/// Wait (up to 5 s) until `cond` holds on the daemon's status.
fn wait_status(lb: &Lb, what: &str, cond: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = lb.status();
        if cond(&st) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen in status within 5 s: {st}\n{}",
            lb.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_applies_changes_keeping_connections_and_affinity() {
    if !require_root("reload_applies_changes_keeping_connections_and_affinity") {
        return;
    }
    let mut bed = Bed::new("rapply", 4, 30, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    let clients = bed.topo.client_addrs();
    let known = bed.wave(&clients[..12]);
    let fresh: Vec<Ipv4Addr> = clients[12..24].to_vec();
    let mut echo = bed.open_echo(clients[29]);
    let echo_backend = bed.lb.only_active_backend("echo");

    // New file: web loses its busiest backend R, another gets weight 3, b4 joins; echo loses the
    // backend carrying the open echo connection and gains b4.
    let removed = busiest(&known);
    let heavy = ["b1", "b2", "b3"]
        .into_iter()
        .find(|b| *b != removed)
        .unwrap()
        .to_string();
    let web: Vec<(usize, u32)> = [1, 2, 3, 4]
        .into_iter()
        .filter(|i| *i != idx(&removed))
        .map(|i| (i, if i == idx(&heavy) { 3 } else { 1 }))
        .collect();
    let echo_bs: Vec<(usize, u32)> = [1, 2, 3, 4]
        .into_iter()
        .filter(|i| *i != idx(&echo_backend))
        .map(|i| (i, 1))
        .collect();
    let write = |web: &[(usize, u32)], echo: &[(usize, u32)]| {
        let text = config_toml(
            &bed.lb.socket,
            "",
            "",
            &[
                service_toml(&bed.topo, "web", 80, 8080, "", web),
                service_toml(&bed.topo, "echo", 7, 7, "", echo),
            ],
        );
        fs::write(&bed.lb.config, text).unwrap();
    };
    write(&web, &echo_bs);
    let r = bed.lb.json(&["reload"]);
    assert!(
        r["problems"].as_array().unwrap().is_empty(),
        "reload problems: {r}"
    );
    assert!(
        r["applied"].as_array().unwrap().len() >= 5,
        "reload applied too little: {r}"
    );

    let now = backends(&bed.lb, "web");
    let want: Vec<String> = web.iter().map(|(i, _)| format!("b{i}")).collect();
    assert_eq!(
        now.keys().cloned().collect::<Vec<_>>(),
        want,
        "web backends after reload"
    );
    assert_eq!(now[&heavy].0, 3, "weight of {heavy}");
    assert_eq!(now["b4"], (1, "active".to_string()));
    assert!(!backends(&bed.lb, "echo").contains_key(&echo_backend));

    // The open echo connection (its backend removed from the file) still works.
    echo_roundtrip(&mut echo, b"after reload");
    // Known clients keep their backend unless it was removed; nobody reaches the removed one.
    let again = bed.wave(&known.keys().copied().collect::<Vec<_>>());
    for (c, b) in &again {
        if known[c] == removed {
            assert_ne!(*b, removed, "client {c} reached removed {removed}");
        } else {
            assert_eq!(*b, known[c], "client {c} lost its backend on reload");
            assert_eq!(bed.lb.which("web", *c), (Some(b.clone()), "affinity".to_string()));
        }
    }
    let new = bed.wave(&fresh);
    assert!(
        new.values().all(|b| *b != removed),
        "new client reached {removed}: {new:?}"
    );

    // SIGHUP: bring R back, b4 to weight 0, heavy back to 1.
    let web2: Vec<(usize, u32)> = (1..=4).map(|i| (i, u32::from(i != 4))).collect();
    write(&web2, &echo_bs);
    // Wait for the daemon's "reloaded" log line before asking for status: a status call running
    // side by side with the reload is covered by `concurrent_status_and_reload_do_not_deadlock`.
    let reloaded = |lb: &Lb| lb.log().lines().filter(|l| l.contains("reloaded")).count();
    let seen = reloaded(&bed.lb);
    bed.lb.child.signal(Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloaded(&bed.lb) == seen {
        assert!(
            Instant::now() < deadline,
            "no reload logged after SIGHUP:\n{}",
            bed.lb.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    wait_status(&bed.lb, "the SIGHUP reload", |st| {
        let web = &st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "web")
            .unwrap()["backends"];
        web.as_array().unwrap().len() == 4
            && web
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["weight"] == i32::from(b["name"] != "b4"))
    });
    assert!(
        bed.lb.child.is_running(),
        "SIGHUP killed the daemon:\n{}",
        bed.lb.log()
    );
    echo_roundtrip(&mut echo, b"after SIGHUP");
    // Every client keeps the backend it had after the first reload: clients that moved off R do
    // not move back, clients of b4 (weight 0 now) keep it.
    let after: BTreeMap<_, _> = again.into_iter().chain(new).collect();
    let clients: Vec<_> = after.keys().copied().collect();
    assert_eq!(bed.wave(&clients), after, "clients moved on SIGHUP reload");
    close_echo(echo);
}

#[test]
fn broken_reload_names_file_and_line_and_keeps_serving() {
    if !require_root("broken_reload_names_file_and_line_and_keeps_serving") {
        return;
    }
    let mut bed = Bed::new("rbroken", 3, 8, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    let clients = bed.topo.client_addrs();
    let known = bed.wave(&clients[..6]);
    let mut echo = bed.open_echo(clients[7]);
    let good = fs::read_to_string(&bed.lb.config).unwrap();
    let before = (backends(&bed.lb, "web"), backends(&bed.lb, "echo"));
    let path = bed.lb.config.display().to_string();

    // The first web backend's weight is out of range; the second one is a TOML syntax error.
    let weight_line = line_of(&good, "weight = 1");
    let mut lines: Vec<&str> = good.lines().collect();
    lines[weight_line - 1] = "weight = 300";
    let bad_weight = lines.join("\n") + "\n";
    let addr_line = line_of(&good, "address = ");
    let mut lines: Vec<&str> = good.lines().collect();
    lines[addr_line - 1] = "address = \"10.1.1.2:8080";
    let bad_syntax = lines.join("\n") + "\n";

    for (what, text, line) in [
        ("weight 300", &bad_weight, weight_line),
        ("syntax", &bad_syntax, addr_line),
    ] {
        fs::write(&bed.lb.config, text).unwrap();
        let out = bed.lb.cli(&["reload"]);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{what}: {err}");
        assert!(
            err.contains(&format!("{path}:{line}")),
            "{what}: error should name {path}:{line}: {err}"
        );
        if what.starts_with("weight") {
            assert!(err.contains("weight"), "{err}");
        }
        // Unchanged and serving.
        assert_eq!(
            (backends(&bed.lb, "web"), backends(&bed.lb, "echo")),
            before,
            "{what}"
        );
        assert_eq!(
            bed.wave(&known.keys().copied().collect::<Vec<_>>()),
            known,
            "{what}"
        );
        echo_roundtrip(&mut echo, what.as_bytes());

        // SIGHUP with the same file: logged with file and line, daemon keeps running unchanged.
        let want = format!("{path}:{line}");
        let logged = |lb: &Lb| {
            lb.log()
                .lines()
                .filter(|l| l.contains(&want) && l.contains("SIGHUP"))
                .count()
        };
        let seen = logged(&bed.lb);
        bed.lb.child.signal(Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while logged(&bed.lb) == seen {
            assert!(
                Instant::now() < deadline,
                "{what}: SIGHUP reload failure not logged with {want}:\n{}",
                bed.lb.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            bed.lb.child.is_running(),
            "{what}: SIGHUP killed the daemon:\n{}",
            bed.lb.log()
        );
        assert_eq!(
            (backends(&bed.lb, "web"), backends(&bed.lb, "echo")),
            before,
            "{what} (SIGHUP)"
        );
        assert_eq!(
            bed.wave(&known.keys().copied().collect::<Vec<_>>()),
            known,
            "{what} (SIGHUP)"
        );
        echo_roundtrip(&mut echo, what.as_bytes());
    }

    // A fixed file reloads fine afterwards.
    fs::write(&bed.lb.config, good.replacen("weight = 1", "weight = 2", 1)).unwrap();
    let r = bed.lb.json(&["reload"]);
    assert_eq!(r["problems"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(backends(&bed.lb, "web")["b1"].0, 2);
    echo_roundtrip(&mut echo, b"fixed");
    close_echo(echo);
}

#[test]
fn reload_reports_a_service_that_cannot_start_and_retries_it() {
    if !require_root("reload_reports_a_service_that_cannot_start_and_retries_it") {
        return;
    }
    let bed = Bed::new("rretry", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);
    // A new service on 10.0.0.200:80, an address the lb namespace does not have (yet).
    let extra =
        service_toml(&bed.topo, "extra", 80, 8080, "", &[(1, 1)]).replace("10.0.0.100:80", "10.0.0.200:80");
    let text = fs::read_to_string(&bed.lb.config).unwrap() + &extra;
    fs::write(&bed.lb.config, text).unwrap();
    // With --json too, a change not made fails the command (the document still says which).
    let out = bed.lb.cli(&["--json", "reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let problems = r["result"]["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p.as_str().unwrap().contains("extra")),
        "reload should report the service that could not start: {r}"
    );
    let st = bed.lb.status();
    assert!(
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "extra"),
        "{st}"
    );
    assert_eq!(bed.get(src), home);

    // Once the address exists, the next reload of the same file brings the service up.
    bed.topo
        .lb_ns()
        .ip(&["addr", "add", "10.0.0.200/32", "dev", bed.topo.lb_client_if()])
        .unwrap();
    let r = bed.lb.json(&["reload"]);
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    assert!(
        r["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("extra")),
        "second reload did not retry the service: {r}"
    );
    let addr: std::net::SocketAddr = "10.0.0.200:80".parse().unwrap();
    let body = lb_tests::http_get_from(bed.topo.client_ns().name(), src, addr, "/").unwrap();
    assert_eq!(body, "b1\n");
    assert_eq!(bed.get(src), home);
}

/// A reload that moves a service to an address it cannot bind reports it, exits non-zero and
/// leaves the service untouched where it was: never removed, so runtime changes, affinity and
/// counters are all as before. The next reload makes the move once it can.
#[test]
fn reload_moving_a_service_to_an_address_it_cannot_bind_keeps_it_where_it_was() {
    if !require_root("reload_moving_a_service_to_an_address_it_cannot_bind_keeps_it_where_it_was") {
        return;
    }
    let bed = Bed::new("rmove", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);
    let other = if home == "b1" { "b2" } else { "b1" };
    bed.lb.cli_ok(&["backend", "weight", "web", other, "7"]);
    let total = |lb: &Lb| -> u64 {
        let be = lb.backend("web", &home).expect("home backend");
        be["total_connections"].as_u64().unwrap()
    };
    let served = total(&bed.lb);
    assert!(served >= 1, "the first request is counted");
    let text = fs::read_to_string(&bed.lb.config).unwrap();
    // 10.0.0.201 is not an address of the lb namespace (yet).
    fs::write(&bed.lb.config, text.replace("10.0.0.100:80", "10.0.0.201:80")).unwrap();
    let out = bed.lb.cli(&["reload"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused change fails the command: {out:?}"
    );
    assert!(
        printed.contains("problem: service web kept as it was, on 10.0.0.100:80")
            && printed.contains("10.0.0.201:80"),
        "{printed}\n{}",
        bed.lb.log()
    );
    assert!(
        !bed.lb.log().contains("proxy stopped listening"),
        "the service was never taken down: {}",
        bed.lb.log()
    );
    let st = bed.lb.status();
    let web = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web");
    assert_eq!(web.expect("web gone")["listen"], "10.0.0.100:80", "{st}");
    assert_eq!(
        backends(&bed.lb, "web")[other].0,
        7,
        "the runtime weight survives"
    );
    assert_eq!(total(&bed.lb), served, "the counters survive");
    for _ in 0..5 {
        assert_eq!(bed.get(src), home, "affinity survives");
    }

    bed.topo
        .lb_ns()
        .ip(&["addr", "add", "10.0.0.201/32", "dev", bed.topo.lb_client_if()])
        .unwrap();
    let r = bed.lb.json(&["reload"]);
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    let addr: std::net::SocketAddr = "10.0.0.201:80".parse().unwrap();
    let body = lb_tests::http_get_from(bed.topo.client_ns().name(), src, addr, "/").unwrap();
    assert!(body.starts_with('b'), "{body}");
}

/// `status` (balancer lock, then config lock) and `reload` (config lock, then balancer lock for
/// each change) running at the same time must not deadlock the daemon.
#[test]
fn concurrent_status_and_reload_do_not_deadlock() {
    if !require_root("concurrent_status_and_reload_do_not_deadlock") {
        return;
    }
    let bed = Bed::new("rlock", 2, 1, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);
    let one = fs::read_to_string(&bed.lb.config).unwrap();
    let two = one.replacen("weight = 1", "weight = 2", 1);
    assert_ne!(one, two);

    let request = |s: &UnixStream, line: &[u8]| -> Result<Value, String> {
        (&*s).write_all(line).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&answer).map_err(|e| format!("{e}: {answer:?}"))
    };
    let connect = || {
        let s = UnixStream::connect(&bed.lb.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    };
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(3);
    let (reloads, statuses) = thread::scope(|s| {
        let statuses = s.spawn(|| -> Result<u32, String> {
            let c = connect();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let v = request(&c, b"{\"cmd\":\"status\"}\n")
                    .map_err(|e| format!("status #{n} got no answer within 3 s: {e}"))?;
                if v["ok"] != true {
                    return Err(format!("status #{n}: {v}"));
                }
                n += 1;
            }
            Ok(n)
        });
        let c = connect();
        let mut n = 0u32;
        let reloads = (|| {
            while Instant::now() < deadline {
                fs::write(&bed.lb.config, if n.is_multiple_of(2) { &two } else { &one }).unwrap();
                let v = request(&c, b"{\"cmd\":\"reload\"}\n")
                    .map_err(|e| format!("reload #{n} got no answer within 3 s: {e}"))?;
                if v["ok"] != true {
                    return Err(format!("reload #{n}: {v}"));
                }
                n += 1;
            }
            Ok(n)
        })();
        stop.store(true, Ordering::Relaxed);
        let statuses = statuses.join().unwrap();
        if reloads.is_err() || statuses.is_err() {
            // Show what else is stuck: new client connections need the same lock.
            let fwd = lb_tests::http_get_from(bed.topo.client_ns().name(), src, bed.web(), "/");
            panic!(
                "the daemon hung while `status` and `reload` ran side by side:\n  reload: {reloads:?}\n  \
                 status: {statuses:?}\n  a new HTTP connection via the VIP afterwards: {fwd:?}"
            );
        }
        (reloads.unwrap(), statuses.unwrap())
    });
    eprintln!("{reloads} reloads and {statuses} status calls side by side");
    assert!(
        reloads > 10 && statuses > 10,
        "too little overlap to mean anything"
    );
    assert_eq!(bed.get(src), home);
}

/// A reload that changes a service's protocol (same listen address) restarts the service in place:
/// it keeps serving and the open connection is kept.
#[test]
fn reload_changing_protocol_keeps_the_service_listening() {
    if !require_root("reload_changing_protocol_keeps_the_service_listening") {
        return;
    }
    let bed = Bed::new("rproto", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, true))
    });
    let src = bed.topo.client_addrs()[0];
    bed.get(src);
    let mut echo = bed.open_echo(bed.topo.client_addrs()[1]);
    let text = fs::read_to_string(&bed.lb.config).unwrap();
    let web_line = line_of(&text, "name = \"web\"");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.insert(web_line, "protocol = \"ajp\"".to_string());
    fs::write(&bed.lb.config, lines.join("\n") + "\n").unwrap();

    let r = bed.lb.json(&["reload"]);
    let st = bed.lb.status();
    let web = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .cloned();
    assert!(
        r["problems"].as_array().unwrap().is_empty(),
        "reload changing only the protocol of web failed: {r}\nweb in status afterwards: {web:?}"
    );
    assert_eq!(web.expect("web gone from status")["protocol"], "ajp");
    let b = lb_tests::http_get_from(bed.topo.client_ns().name(), src, bed.web(), "/")
        .unwrap_or_else(|e| panic!("web does not answer after the reload: {e}\n{}", bed.lb.log()));
    assert!(b.starts_with('b'), "{b}");
    echo_roundtrip(&mut echo, b"other service untouched");
    close_echo(echo);
}
