//! The proxy datapath end to end: HTTP from several client addresses through the VIP, bulk TCP
//! byte-exact with half-close, source-IP affinity, spread over backends, `lb which` agreeing
//! with where clients actually went, and connections spread evenly over the worker threads.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::{
    Bed, ECHO_PORT, ECHO_VIP_PORT, close_echo, config_toml, counts, echo_roundtrip, random_bytes,
    service_toml, std_services,
};
use lb_tests::{HttpConn, connect_from, require_root};

/// A connection from `src` to the echo service through the VIP, reads timing out after `secs`.
fn echo_from(bed: &Bed, src: std::net::Ipv4Addr, secs: u64) -> std::net::TcpStream {
    let s = connect_from(
        bed.topo.client_ns().name(),
        src,
        bed.echo(),
        Duration::from_secs(5),
    )
    .expect("connect echo via VIP");
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    s
}

#[test]
fn http_via_vip_from_several_clients() {
    if !require_root("http_via_vip_from_several_clients") {
        return;
    }
    let bed = Bed::new("phttp", 3, 6, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, false))
    });
    let clients = bed.topo.client_addrs();
    let mut connections = 0;
    for &c in &clients {
        for _ in 0..3 {
            let b = bed.get(c);
            assert!(["b1", "b2", "b3"].contains(&b.as_str()), "{c} got body {b:?}");
            connections += 1;
        }
    }
    // Keep-alive through the proxy: several requests on one client connection.
    let mut conn = HttpConn::connect_from(bed.topo.client_ns().name(), clients[0], bed.web()).unwrap();
    let first = conn.get("/a").unwrap();
    assert_eq!(first.status, 200);
    for p in ["/b", "/c", "/d"] {
        let r = conn.get(p).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, first.body, "one connection, one backend");
    }
    drop(conn);
    connections += 1;

    // Every connection was counted on some backend.
    let st = bed.lb.status();
    let total: u64 = st["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["total_connections"].as_u64().unwrap())
        .sum();
    assert_eq!(total, connections, "total_connections in status: {st}");
}

/// Connections opened in a burst (as `iperf3 -P 4` opens its streams) are served evenly by the
/// worker threads, not all by whichever worker was awake to accept them, and each is counted
/// off its worker when it closes. (The debug build the tests run asserts that a connection is
/// served on the worker it is counted on.)
#[test]
fn a_burst_of_connections_spreads_evenly_over_the_workers() {
    if !require_root("a_burst_of_connections_spreads_evenly_over_the_workers") {
        return;
    }
    let bed = Bed::new("pwork", 2, 1, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, true))
    });
    let src = bed.topo.client_addrs()[0];
    let workers = |bed: &Bed| -> Vec<u64> {
        let stats = bed.lb.json(&["stats"]);
        let w = stats["proxy_workers"]
            .as_array()
            .unwrap_or_else(|| panic!("{stats}"));
        w.iter().map(|n| n.as_u64().unwrap()).collect()
    };
    for round in 0..3 {
        let mut streams: Vec<_> = (0..8).map(|_| echo_from(&bed, src, 5)).collect();
        for s in &mut streams {
            echo_roundtrip(s, b"served");
        }
        let loads = workers(&bed);
        if round == 0 && loads.len() == 1 {
            eprintln!("one CPU, one worker: nothing to spread, only the counts are checked");
        }
        assert_eq!(
            loads.iter().sum::<u64>(),
            8,
            "round {round}: every connection counted: {loads:?}"
        );
        let (least, most) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(
            most - least <= 1,
            "round {round}: uneven over the workers: {loads:?}"
        );
        streams.into_iter().for_each(close_echo);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while workers(&bed).iter().sum::<u64>() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "closed connections still counted: {:?}",
                workers(&bed)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `idle_timeout` through the daemon: a connection that moves nothing for the service's limit is
/// closed, one that echoes a byte now and then stays open well past it.
#[test]
fn a_quiet_connection_is_closed_after_idle_timeout() {
    if !require_root("a_quiet_connection_is_closed_after_idle_timeout") {
        return;
    }
    let bed = Bed::new("pidle", 1, 1, |topo, sock| {
        let echo = service_toml(
            topo,
            "echo",
            ECHO_VIP_PORT,
            ECHO_PORT,
            "idle_timeout = \"1s\"",
            &[(1, 1)],
        );
        config_toml(sock, "", "", &[echo])
    });
    let src = bed.topo.client_addrs()[0];
    let (mut busy, mut quiet) = (echo_from(&bed, src, 5), echo_from(&bed, src, 5));
    echo_roundtrip(&mut busy, b"first");
    echo_roundtrip(&mut quiet, b"first");
    // Three times the limit, a byte each way every 300 ms on the busy one only.
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(300));
        echo_roundtrip(&mut busy, b"b");
    }
    let mut byte = [0u8; 1];
    match quiet.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the quiet connection is still open after 3 s of a 1 s idle_timeout: {other:?}"),
    }
    echo_roundtrip(&mut busy, b"still open");
}

#[test]
fn bulk_echo_8mib_byte_exact_with_half_close() {
    if !require_root("bulk_echo_8mib_byte_exact_with_half_close") {
        return;
    }
    let bed = Bed::new("pbulk", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, true))
    });
    let data = random_bytes(8 << 20, 0x5eed_1234);
    let src = bed.topo.client_addrs()[1];
    let mut stream = echo_from(&bed, src, 30);
    let mut writer = stream.try_clone().unwrap();
    writer.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let echoed = thread::scope(|s| {
        s.spawn(|| {
            writer.write_all(&data).expect("write 8 MiB");
            writer.shutdown(Shutdown::Write).expect("half-close");
        });
        let mut echoed = Vec::with_capacity(data.len());
        stream.read_to_end(&mut echoed).expect("read echo to EOF");
        echoed
    });
    assert_eq!(echoed.len(), data.len(), "echoed length");
    assert!(echoed == data, "echoed bytes differ");

    // The byte counters of the backend that carried it say the same.
    let st = bed.lb.status();
    let echo = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    let used: Vec<_> = echo["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["total_connections"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(used.len(), 1, "{echo}");
    assert_eq!(used[0]["bytes_in"].as_u64().unwrap(), data.len() as u64, "{echo}");
    assert_eq!(
        used[0]["bytes_out"].as_u64().unwrap(),
        data.len() as u64,
        "{echo}"
    );
}

#[test]
fn affinity_spread_and_which_agree() {
    if !require_root("affinity_spread_and_which_agree") {
        return;
    }
    let bed = Bed::new("paff", 3, 30, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, false))
    });
    let clients = bed.topo.client_addrs();

    // Before any connection, `which` predicts from the ring; the first connection goes there.
    let mut predicted = BTreeMap::new();
    for &c in &clients {
        let (b, reason) = bed.lb.which("web", c);
        assert_eq!(reason, "ring", "unseen client {c}");
        predicted.insert(c, b.expect("a backend for an unseen client"));
    }
    let first = bed.wave(&clients);
    assert_eq!(first, predicted, "first connections vs `lb which` predictions");

    // 30 clients spread over all 3 backends.
    let c = counts(&first);
    assert_eq!(c.len(), 3, "30 clients did not reach all 3 backends: {c:?}");

    // 20 connections each from 5 clients all reach that client's backend.
    let five = &clients[..5];
    thread::scope(|s| {
        for &ip in five {
            let (bed, want) = (&bed, first[&ip].clone());
            s.spawn(move || {
                for k in 0..20 {
                    assert_eq!(bed.get(ip), want, "client {ip}, connection {k}");
                }
            });
        }
    });
    // The five clients do not all sit on one backend, so stickiness is not trivial.
    let five_backends: BTreeSet<_> = five.iter().map(|c| first[c].clone()).collect();
    assert!(
        five_backends.len() > 1,
        "first five clients all on {five_backends:?}"
    );

    // Now `which` answers from affinity, and agrees with where each client went.
    for &c in &clients {
        let (b, reason) = bed.lb.which("web", c);
        assert_eq!(reason, "affinity", "known client {c}");
        assert_eq!(b.as_deref(), Some(first[&c].as_str()), "which vs actual for {c}");
    }
    // Status counts agree too: 30 + 5 × 20 connections.
    let st = bed.lb.status();
    let per: BTreeMap<String, u64> = st["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["total_connections"].as_u64().unwrap(),
            )
        })
        .collect();
    for (name, n) in &per {
        let expect = c.get(name).copied().unwrap_or(0) as u64
            + 20 * five.iter().filter(|ip| &first[*ip] == name).count() as u64;
        assert_eq!(*n, expect, "total_connections of {name}: {st}");
    }
    assert_eq!(st["services"][0]["affinity_entries"], 30, "{st}");
}
