//! Graceful shutdown: on SIGTERM `lb` stops accepting at once, lets open connections finish
//! (at most `shutdown_timeout`), then exits 0.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::{Bed, close_echo, config_toml, echo_roundtrip, std_services};
use lb_tests::{connect_from, require_root};
use nix::sys::signal::Signal;

/// Poll until a new connection to the echo VIP is refused; returns how long that took.
fn wait_refused(bed: &Bed, src: Ipv4Addr, to: SocketAddr, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        match connect_from(bed.topo.client_ns().name(), src, to, Duration::from_secs(1)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return t.elapsed(),
            Err(e) => panic!("new connection after SIGTERM: expected refused, got {e}"),
            Ok(_) => {}
        }
        assert!(
            t.elapsed() < within,
            "new connections still accepted {within:?} after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_refuses_new_lets_open_finish_then_exits_zero() {
    if !require_root("sigterm_refuses_new_lets_open_finish_then_exits_zero") {
        return;
    }
    let mut bed = Bed::new("sterm", 2, 3, |topo, sock| {
        config_toml(
            sock,
            "shutdown_timeout = \"20s\"\n",
            "",
            &std_services(topo, 2, true),
        )
    });
    let clients = bed.topo.client_addrs();
    let mut echo = bed.open_echo(clients[0]);
    let t0 = Instant::now();
    bed.lb.child.signal(Signal::SIGTERM).unwrap();

    let took = wait_refused(&bed, clients[1], bed.echo(), Duration::from_secs(1));
    eprintln!("new connections refused {took:?} after SIGTERM");
    // The web VIP too (each listener closes in its own task), and the control socket is gone.
    wait_refused(&bed, clients[2], bed.web(), Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(1);
    while bed.lb.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "control socket still there after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    }

    // The open connection keeps working while the daemon waits for it.
    for k in 0..4 {
        echo_roundtrip(&mut echo, format!("draining {k}").as_bytes());
        thread::sleep(Duration::from_millis(300));
        assert!(
            bed.lb.child.is_running(),
            "lb exited with a connection still open:\n{}",
            bed.lb.log()
        );
    }
    close_echo(echo);
    let status = bed
        .lb
        .child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "lb did not exit after its last connection closed:\n{}",
                bed.lb.log()
            )
        });
    assert!(status.success(), "lb exited with {status}:\n{}", bed.lb.log());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "lb waited {:?}, longer than needed",
        t0.elapsed()
    );
}

#[test]
fn sigterm_closes_lingering_connections_after_shutdown_timeout() {
    if !require_root("sigterm_closes_lingering_connections_after_shutdown_timeout") {
        return;
    }
    let mut bed = Bed::new("stmo", 1, 2, |topo, sock| {
        config_toml(
            sock,
            "shutdown_timeout = \"2s\"\n",
            "",
            &std_services(topo, 1, true),
        )
    });
    let mut echo = bed.open_echo(bed.topo.client_addrs()[0]);
    let t0 = Instant::now();
    bed.lb.child.signal(Signal::SIGTERM).unwrap();
    echo_roundtrip(&mut echo, b"still served during the grace period");
    let status = bed
        .lb
        .child
        .wait_timeout(Duration::from_secs(8))
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "lb still running 8 s after SIGTERM (timeout 2s):\n{}",
                bed.lb.log()
            )
        });
    let took = t0.elapsed();
    assert!(status.success(), "lb exited with {status}:\n{}", bed.lb.log());
    assert!(
        took >= Duration::from_millis(1800),
        "lb exited after {took:?}, before its 2s shutdown_timeout"
    );
    // The lingering connection is closed by the exit (EOF or reset), not left hanging.
    echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    match echo.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected {n} bytes after lb exited"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "after lb exited: {e}"),
    }
}
