//! AJP health checks against a real Tomcat 10 AJP/1.3 connector (issue #3).
//!
//! Tomcat (Debian's `tomcat10`, installed by `cargo xtask setup`) runs in a backend namespace with
//! a private CATALINA_BASE and only an AJP connector on 10.1.1.2:8009; `lb run` checks it with
//! CPing/CPong. Stopping Tomcat (SIGTERM to the JVM) takes it out of the ring within
//! interval × fall + interval; starting it again brings it back after `rise` good checks. The
//! times are printed as `MEASURED …` lines (straight to stderr, visible without `--nocapture`).
//!
//! Needs root (skipped otherwise). A missing Tomcat is a failure, not a skip: setup installs it.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::tomcat::{CatalinaBase, Tomcat, check_installed};
use lb_tests::{
    AJP_CPONG, Daemon, Enter, Topology, ajp_cping_from, lb_bin, require_root, run_with_timeout, unique_prefix,
};
use serde_json::Value;

const AJP_PORT: u16 = 8009;
/// Tomcat's own startup on a busy 2-core machine.
const TOMCAT_START: Duration = Duration::from_secs(60);
const INTERVAL: Duration = Duration::from_millis(500);
/// The checks' timeout: a Tomcat that pauses its connector while it stops accepts the connect
/// and leaves the CPing unanswered, so each failing check lasts this long before the next wait.
const TIMEOUT: Duration = Duration::from_millis(400);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// On top of interval × fall (or rise) + interval: scheduling and status polling.
const SLACK: Duration = Duration::from_millis(700);

/// Starts `lb run` in the lb namespace with `services` under the control socket header; stopped
/// on drop.
fn start_lb(topo: &Topology, services: &str) -> Daemon {
    Daemon::start_in(topo.lb_ns(), Enter::Namespace, "tomcat", |socket| {
        format!(
            "shutdown_timeout = \"0s\"\nring_size = 1009\n\n[control]\nsocket = \"{}\"\n{services}",
            socket.display()
        )
    })
}

/// Polls the status every 10 ms until `pred(view of the tomcat backend)` holds; returns it and when.
fn wait_backend(
    lb: &Daemon,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Instant) {
    let (st, at) = lb.wait_status(timeout, what, |st| {
        let b = &st["services"][0]["backends"][0];
        assert_eq!(b["name"], "tomcat", "{st}");
        pred(b)
    });
    (st["services"][0]["backends"][0].clone(), at)
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn slots(b: &Value) -> u64 {
    b["ring_slots"].as_u64().expect("ring_slots")
}

fn check_field(b: &Value, key: &str) -> u64 {
    b["check"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("check.{key} missing in {b}"))
}

#[test]
fn tomcat_ajp_connector_checked_down_and_up_again() {
    if !require_root("tomcat_ajp_connector_checked_down_and_up_again") {
        return;
    }
    if let Err(e) = check_installed() {
        panic!("{e}");
    }
    let topo = Topology::new(&unique_prefix("tcat"), 1, 1).expect("topology");
    let base = CatalinaBase::new("tcat", topo.backend_addr(1), AJP_PORT).expect("CATALINA_BASE");
    let lb_ns = topo.lb_ns().name().to_string();

    let t = Instant::now();
    let mut tomcat = Tomcat::start(topo.backend_ns(1), &base).expect("start Tomcat");
    tomcat
        .wait_cping(&lb_ns, TOMCAT_START)
        .unwrap_or_else(|e| panic!("{e}\n--- catalina log ---\n{}", base.log_tail(30)));
    report(&format!(
        "tomcat (pid {}) answers CPing on {} after {:.2}s",
        tomcat.pid(),
        base.ajp_addr(),
        t.elapsed().as_secs_f64()
    ));

    let vip = SocketAddr::new(topo.vip().into(), AJP_PORT);
    let lb = start_lb(
        &topo,
        &format!(
            r#"
[[service]]
name = "ajp"
listen = "{vip}"
protocol = "ajp"

[service.health]
kind = "ajp"
interval = "{}ms"
timeout = "{}ms"
rise = {RISE}
fall = {FALL}

[[service.backend]]
name = "tomcat"
address = "{}"
"#,
            INTERVAL.as_millis(),
            TIMEOUT.as_millis(),
            base.ajp_addr()
        ),
    );

    // Up, with CPong answered by Tomcat; and a CPing through the VIP reaches Tomcat.
    let (b, _) = wait_backend(&lb, Duration::from_secs(5), "two good checks", |b| {
        check_field(b, "checks") >= 2
    });
    assert_eq!(b["health"], "up", "{b}");
    assert_eq!(b["check"]["last_result"], "ok", "{b}");
    assert_eq!(check_field(&b, "consecutive_failed"), 0, "{b}");
    let latency = b["check"]["last_latency_ms"].as_f64().expect("latency");
    assert!(
        latency > 0.0 && latency < TIMEOUT.as_millis() as f64,
        "CPong latency {latency} ms"
    );
    assert!(slots(&b) > 0);
    let (cns, src) = (topo.client_ns().name(), topo.client_addrs()[0]);
    let reply = ajp_cping_from(cns, src, vip, Duration::from_secs(3)).expect("CPing through lb");
    assert_eq!(reply, AJP_CPONG, "CPing via {vip}");

    // Stop Tomcat: SIGTERM to the JVM; detection counted from the signal.
    tomcat.terminate().expect("SIGTERM Tomcat");
    let signalled = Instant::now();
    // Checks are `interval` apart, from the end of one to the start of the next.
    let bound = (INTERVAL + TIMEOUT) * FALL + INTERVAL + SLACK;
    let (b, at) = wait_backend(
        &lb,
        bound + Duration::from_secs(10),
        "Tomcat out of the ring",
        |b| slots(b) == 0,
    );
    let detection = at - signalled;
    assert_eq!(b["health"], "down", "{b}");
    assert!(check_field(&b, "consecutive_failed") >= u64::from(FALL), "{b}");
    let reason = b["check"]["last_result"].as_str().unwrap().to_string();
    assert_ne!(reason, "ok");
    let exited = tomcat
        .wait_exit(Duration::from_secs(20))
        .expect("wait for Tomcat");
    assert!(exited.is_some(), "Tomcat still runs 20 s after SIGTERM");
    report(&format!(
        "tomcat stopped after {:.2}s; marked down with: {reason}",
        signalled.elapsed().as_secs_f64()
    ));
    assert!(
        detection <= bound,
        "Tomcat stop detected after {detection:?}, more than (interval + timeout) × fall + interval + slack = {bound:?}"
    );
    let reply = ajp_cping_from(cns, src, vip, Duration::from_secs(3));
    assert!(
        !matches!(&reply, Ok(r) if r == &AJP_CPONG),
        "CPing via {vip} answered while the only backend is down"
    );
    drop(tomcat);

    // Start it again; restore counted from the first CPong (Tomcat's own startup excluded).
    let mut tomcat = Tomcat::start(topo.backend_ns(1), &base).expect("restart Tomcat");
    let answering = tomcat
        .wait_cping(&lb_ns, TOMCAT_START)
        .unwrap_or_else(|e| panic!("{e}\n--- catalina log ---\n{}", base.log_tail(30)));
    let bound = INTERVAL * RISE + INTERVAL + SLACK;
    let (b, at) = wait_backend(
        &lb,
        bound + Duration::from_secs(10),
        "Tomcat back in the ring",
        |b| slots(b) > 0,
    );
    let restore = at.saturating_duration_since(answering);
    assert_eq!(b["health"], "up", "{b}");
    assert_eq!(b["check"]["last_result"], "ok", "{b}");
    assert!(check_field(&b, "consecutive_ok") >= u64::from(RISE), "{b}");
    assert_eq!(check_field(&b, "transitions"), 2, "one down, one up: {b}");
    assert!(
        restore <= bound,
        "Tomcat restore took {restore:?}, more than interval × rise + interval + slack = {bound:?}"
    );
    report(&format!(
        "MEASURED tomcat-ajp detection {:.2}s restore {:.2}s (interval {}ms, fall {FALL}, rise {RISE})",
        detection.as_secs_f64(),
        restore.as_secs_f64(),
        INTERVAL.as_millis()
    ));
    let reply = ajp_cping_from(cns, src, vip, Duration::from_secs(3)).expect("CPing through lb");
    assert_eq!(reply, AJP_CPONG, "CPing via {vip} after the restore");

    // The CLI shows it too.
    let mut cmd = Command::new(lb_bin());
    cmd.arg("--socket").arg(&lb.socket).arg("status");
    let out = run_with_timeout(cmd, Duration::from_secs(10)).expect("lb status");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tomcat") && text.contains(" up "), "{text}");

    let pid = tomcat.pid();
    drop(lb);
    drop(tomcat);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "Tomcat's JVM (pid {pid}) still runs after drop"
    );
}
