//! Connections never hang (issue 12 item 2), end to end: an XDP connection whose conntrack entry
//! expired gets an RST on its next packet and the client reconnects at once; `on_down = "reset"`
//! on `xdp` makes both ends see an RST; `lb backend disable --reset` resets a backend's open
//! connections on `xdp` and on `proxy`.
//!
//! The backend end of a connection is a listener the test opens inside the backend namespace
//! (`in_netns`), so the test holds both sockets and sees what each end sees.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use lb_tests::servers::start_testsrv;
use lb_tests::{Topology, connect_from, in_netns, require_root};

/// The service whose connections the test holds both ends of: VIP:7000 → b1:7000.
const HOLD_PORT: u16 = 7000;
/// Where `on_down` tests point the health checks of `hold` (a server the test can stop).
const HEALTH_PORT: u16 = 9999;
/// Longest wait for an RST that must come at once (without one, the read times out).
const RST_WAIT: Duration = Duration::from_secs(3);

/// A listener on b1:[`HOLD_PORT`], inside the backend namespace.
fn backend_listener(topo: &Topology) -> TcpListener {
    in_netns(topo.backend_ns(1).name(), || {
        TcpListener::bind(("0.0.0.0", HOLD_PORT))
    })
    .expect("enter b1")
    .expect("listen on b1:7000")
}

/// A connection through the VIP to `hold`: (client end, backend end), checked both ways.
fn open_held(bed: &Bed, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let vip = SocketAddr::new(bed.topo.vip().into(), HOLD_PORT);
    let client = bed.topo.client_addrs()[0];
    let mut c = connect_from(bed.topo.client_ns().name(), client, vip, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {vip}: {e}\n{}", bed.lb.log()));
    let (mut b, _) = listener.accept().expect("backend accepts");
    for s in [&c, &b] {
        s.set_read_timeout(Some(RST_WAIT)).unwrap();
    }
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).expect("backend reads the client's bytes");
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").unwrap();
    c.read_exact(&mut buf).expect("client reads the backend's bytes");
    assert_eq!(&buf, b"pong");
    (c, b)
}

/// Sends `bytes` (unless empty) on `s`, then reads: the connection must be reset at once (an
/// RST, not a timeout and not an orderly close). `who` names the end in messages.
fn expect_reset(s: &mut TcpStream, bytes: &[u8], who: &str) -> Duration {
    let start = Instant::now();
    if !bytes.is_empty() {
        // The first write may already fail if the RST came before (proxy: sent unasked).
        if let Err(e) = s.write_all(bytes) {
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{who}: write: {e}");
            return start.elapsed();
        }
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => start.elapsed(),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{who}: no RST within {RST_WAIT:?}: the connection hangs")
        }
        other => panic!("{who}: expected a reset, got {other:?}"),
    }
}

/// One-backend bed for `hold` on `datapath`. `service_keys` go into the `[[service]]` table and
/// `health` into `[service.health]` (XDP beds check b1:[`HEALTH_PORT`]).
fn hold_bed(tag: &str, pins: Option<&Pins>, service_keys: &str, health: &str) -> Bed {
    let bed = Bed::new(tag, 1, 1, |topo, socket| match pins {
        Some(pins) => xdp_config(topo, socket, &pins.0, 1, &[("hold", HOLD_PORT, HOLD_PORT)], "").replace(
            "[service.health]\nkind = \"tcp\"\n",
            &format!("{service_keys}\n[service.health]\n{health}\n"),
        ),
        None => config_toml(
            socket,
            "",
            "",
            &[
                service_toml(topo, "hold", HOLD_PORT, HOLD_PORT, service_keys, &[(1, 1)])
                    .replace("kind = \"none\"\n", &format!("{health}\n")),
            ],
        ),
    });
    if pins.is_some() {
        prepare_peers(&bed.topo);
    }
    bed
}

fn wait_health(bed: &Bed, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = bed.lb.backend("hold", "b1").expect("b1 in status");
        if b["health"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "b1 never became {want}: {b}\n{}",
            bed.lb.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `text` without terminal colour sequences (the daemon's log fields are coloured).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn xdp_expired_connection_gets_rst_and_the_client_reconnects_at_once() {
    if !require_root("xdp_expired_connection_gets_rst_and_the_client_reconnects_at_once") {
        return;
    }
    let pins = Pins::new(pin_dir("rstidle"));
    let bed = Bed::new("xrstidle", 1, 1, |topo, socket| {
        xdp_config(topo, socket, &pins.0, 1, XDP_STD, "").replace(
            "[xdp]\n",
            "[xdp]\nidle_timeout = \"1s\"\nclosed_timeout = \"500ms\"\n",
        )
    });
    prepare_peers(&bed.topo);
    let client = bed.topo.client_addrs()[0];
    let mut s = bed.open_echo(client);
    s.set_read_timeout(Some(RST_WAIT)).unwrap();
    let (no_conntrack, sent) = (xdp_counter(&bed, "no_conntrack"), xdp_counter(&bed, "rst_sent"));
    // Idle past idle_timeout: the kernel no longer knows the connection.
    std::thread::sleep(Duration::from_millis(1600));
    let took = expect_reset(&mut s, b"are you there?", "client");
    eprintln!("expired connection reset after {took:?}");
    assert!(xdp_counter(&bed, "no_conntrack") > no_conntrack);
    assert!(xdp_counter(&bed, "rst_sent") > sent);
    // The client reconnects at once and is served.
    let mut again = bed.open_echo(client);
    echo_roundtrip(&mut again, b"served again");
}

#[test]
fn xdp_on_down_reset_makes_both_ends_see_rst() {
    if !require_root("xdp_on_down_reset_makes_both_ends_see_rst") {
        return;
    }
    let pins = Pins::new(pin_dir("rstdown"));
    let bed = hold_bed(
        "xrstdown",
        Some(&pins),
        "on_down = \"reset\"",
        &format!("kind = \"tcp\"\nport = {HEALTH_PORT}"),
    );
    let listener = backend_listener(&bed.topo);
    let health = start_testsrv(
        bed.topo.backend_ns(1),
        &["echo", "--listen", &format!("0.0.0.0:{HEALTH_PORT}")],
    )
    .expect("health target");
    wait_health(&bed, "up");
    let (mut c, mut b) = open_held(&bed, &listener);
    // The health target goes away: b1 is marked down and its flows are marked for reset; the
    // connection itself is still open on both ends.
    drop(health);
    wait_health(&bed, "down");
    wait_for_log(&bed, "on_down = reset: open connections reset");
    let before = xdp_counter(&bed, "reset_flow");
    expect_reset(&mut c, b"client speaks", "client");
    expect_reset(&mut b, b"backend speaks", "backend");
    assert!(
        xdp_counter(&bed, "reset_flow") > before,
        "the client's packet was answered as a reset flow"
    );
    let log = plain(&bed.lb.log());
    assert!(
        log.lines()
            .any(|l| l.contains("on_down = reset: open connections reset") && l.contains("connections=1")),
        "one connection reset:\n{log}"
    );
}

#[test]
fn xdp_disable_reset_makes_both_ends_see_rst() {
    if !require_root("xdp_disable_reset_makes_both_ends_see_rst") {
        return;
    }
    let pins = Pins::new(pin_dir("rstdis"));
    let bed = hold_bed("xrstdis", Some(&pins), "", "kind = \"none\"");
    let listener = backend_listener(&bed.topo);
    let (mut c, mut b) = open_held(&bed, &listener);
    let out = bed.lb.cli_ok(&["backend", "disable", "hold", "b1", "--reset"]);
    assert_eq!(
        out,
        "ok: backend b1 of hold in maintenance, 1 open connection reset\n"
    );
    assert_eq!(bed.lb.backend("hold", "b1").unwrap()["state"], "maintenance");
    // The backend speaks first this time; then the client.
    expect_reset(&mut b, b"backend speaks", "backend");
    expect_reset(&mut c, b"client speaks", "client");
    wait_for_log(&bed, "maintenance with reset: open connections reset");
    // Refused with a clear error, nothing changed: drain with reset makes no sense.
    let line = r#"{"cmd":"set-state","service":"hold","backend":"b1","state":"drain","reset":true}"#;
    let refused = bed.lb.request(format!("{line}\n").as_bytes());
    let refused = refused.expect("answer");
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("only with state \"maintenance\""),
        "{refused}"
    );
    assert_eq!(bed.lb.backend("hold", "b1").unwrap()["state"], "maintenance");
}

#[test]
fn proxy_disable_reset_makes_both_ends_see_rst() {
    if !require_root("proxy_disable_reset_makes_both_ends_see_rst") {
        return;
    }
    let bed = hold_bed("prstdis", None, "", "kind = \"none\"");
    let listener = backend_listener(&bed.topo);
    let (mut c, mut b) = open_held(&bed, &listener);
    let out = bed.lb.cli_ok(&["backend", "disable", "hold", "b1", "--reset"]);
    assert_eq!(
        out,
        "ok: backend b1 of hold in maintenance, 1 open connection reset\n"
    );
    // The proxy resets both sides itself: neither end has to speak first.
    expect_reset(&mut c, b"", "client");
    expect_reset(&mut b, b"", "backend");
    // Enabled again, the client is served at once.
    bed.lb.cli_ok(&["backend", "enable", "hold", "b1"]);
    open_held(&bed, &listener);
}
