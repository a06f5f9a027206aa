//! Health checks end to end (issue #3): `lb run` in the lb namespace checks real peers in backend
//! namespaces, and what `lb status` reports and where clients go follow from it.
//!
//! - AJP CPing/CPong against misbehaving peers (`lb-testsrv ajp` modes): each one is marked down
//!   with the right reason, the good one stays up, and the daemon keeps serving.
//! - TCP and AJP: a killed backend leaves the ring within interval × fall + interval and comes
//!   back after `rise` good checks (the times are printed as `MEASURED …` lines).
//! - Failover under a stream of short connections, with and without `failback`.
//! - Hot spare: a `backup = true` backend takes clients only while no primary is healthy, and keeps
//!   the clients it took.
//! - `on_down = "reset"` resets established connections of a backend marked down; the default
//!   (`keep`) lets them run.
//! - A drained backend is still checked.
//!
//! Needs root (network namespaces); every test skips with a `SKIP:` line otherwise. `MEASURED`
//! lines go straight to stderr, so they show without `--nocapture`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::daemon::{backend_of, service_of};
use lb_tests::servers::start_testsrv;
use lb_tests::{
    AJP_CPONG, AjpMode, Child, Daemon, Enter, Topology, ajp_cping_from, connect_from, http_get_from,
    require_root, start_ajp_backend, start_echo_backends, start_http_backends, unique_prefix,
};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const AJP_PORT: u16 = 8009;
/// A small Maglev ring (prime, > 100 × the most backends used here): the tests poll `lb status`
/// every 10 ms, and status counts every backend's ring slots while holding the balancer lock
/// (about 40 ms per call with the default 65537 slots in a debug build, delaying new connections).
const RING_SIZE: u32 = 1009;
/// Extra time allowed on top of interval × fall + interval (scheduling on a busy 2-core machine,
/// status polling).
const SLACK: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------------------------
// A daemon under test
// ---------------------------------------------------------------------------------------------

/// `lb run` in the lb namespace (lb_tests::Daemon). Declare it after the [`Topology`] and the
/// backends: it is stopped first.
type Lb = Daemon;

/// Writes `services` (TOML `[[service]]` tables) under a header with the control socket and a
/// zero shutdown timeout, starts the daemon and waits until its control socket answers.
fn start_lb(topo: &Topology, services: &str) -> Lb {
    // LB_TEST_LOG=debug shows the proxy's connect attempts in a failing test's log.
    let level = std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into());
    Daemon::start_in(topo.lb_ns(), Enter::Namespace, "health", |socket| {
        format!(
            "log_level = \"{level}\"\nshutdown_timeout = \"0s\"\nring_size = {RING_SIZE}\n\n[control]\nsocket = \"{}\"\n{services}",
            socket.display()
        )
    })
}

/// `status.services[name=svc].backends[name=backend]`.
fn be<'a>(st: &'a Value, svc: &str, backend: &str) -> &'a Value {
    backend_of(st, svc, backend).unwrap_or_else(|| panic!("no backend {svc}/{backend} in status: {st}"))
}

fn slots(st: &Value, svc: &str, backend: &str) -> u64 {
    be(st, svc, backend)["ring_slots"].as_u64().expect("ring_slots")
}

fn health<'a>(st: &'a Value, svc: &str, backend: &str) -> &'a str {
    be(st, svc, backend)["health"].as_str().expect("health")
}

fn check<'a>(st: &'a Value, svc: &str, backend: &str) -> &'a Value {
    let c = &be(st, svc, backend)["check"];
    assert!(c.is_object(), "{svc}/{backend} has no check details: {st}");
    c
}

fn check_u64(st: &Value, svc: &str, backend: &str, key: &str) -> u64 {
    check(st, svc, backend)[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{svc}/{backend} check.{key} missing"))
}

fn last_result(st: &Value, svc: &str, backend: &str) -> String {
    check(st, svc, backend)["last_result"]
        .as_str()
        .expect("last_result")
        .to_string()
}

/// `[[service]]` text: `backends` are (name, address, extra lines such as `backup = true`).
fn service_toml(
    name: &str,
    listen: SocketAddr,
    extra: &str,
    health: &str,
    backends: &[(String, SocketAddr, &str)],
) -> String {
    let mut s = format!(
        "\n[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\ndatapath = \"proxy\"\n{extra}\n\n[service.health]\n{health}\n"
    );
    for (n, a, x) in backends {
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{n}\"\naddress = \"{a}\"\n{x}\n"
        ));
    }
    s
}

fn tcp_health(interval_ms: u64, rise: u32, fall: u32, extra: &str) -> String {
    format!(
        "kind = \"tcp\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"{}ms\"\nrise = {rise}\nfall = {fall}\n{extra}",
        interval_ms * 4 / 5
    )
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn vip(topo: &Topology, port: u16) -> SocketAddr {
    addr(topo.vip(), port)
}

/// `lb-testsrv http` on :8080 in backend `i`, named `bI`.
fn start_http(topo: &Topology, i: usize) -> Child {
    start_testsrv(
        topo.backend_ns(i),
        &[
            "http",
            "--listen",
            &format!("0.0.0.0:{HTTP_PORT}"),
            "--name",
            &format!("b{i}"),
        ],
    )
    .expect("start http backend")
}

/// Print a line to the process's stderr, past the test harness's output capture.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn get(topo: &Topology, src: Ipv4Addr, port: u16) -> String {
    http_get_from(topo.client_ns().name(), src, vip(topo, port), "/")
        .unwrap_or_else(|e| panic!("GET {} from {src}: {e}", vip(topo, port)))
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. AJP checks against misbehaving peers
// ---------------------------------------------------------------------------------------------

#[test]
fn ajp_checks_mark_misbehaving_peers_down_with_the_reason() {
    if !require_root("ajp_checks_mark_misbehaving_peers_down_with_the_reason") {
        return;
    }
    let modes = AjpMode::ALL;
    let web_idx = modes.len() + 1;
    let topo = Topology::new(&unique_prefix("hajpm"), web_idx, 4).expect("topology");
    // Backend i (1..=6) runs one AJP mode on :8009; backend 7 an HTTP server for a TCP service.
    let mut peers: Vec<Child> = modes
        .iter()
        .enumerate()
        .map(|(k, m)| {
            start_ajp_backend(topo.backend_ns(k + 1), addr(Ipv4Addr::UNSPECIFIED, AJP_PORT), *m)
                .expect("start ajp peer")
        })
        .collect();
    let _web = start_http(&topo, web_idx);

    let ajp_backends: Vec<_> = modes
        .iter()
        .enumerate()
        .map(|(k, m)| {
            (
                m.as_str().to_string(),
                addr(topo.backend_addr(k + 1), AJP_PORT),
                "",
            )
        })
        .collect();
    let cfg = service_toml(
        "ajp",
        vip(&topo, AJP_PORT),
        "protocol = \"ajp\"",
        "kind = \"ajp\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2",
        &ajp_backends,
    ) + &service_toml(
        "web",
        vip(&topo, 80),
        "",
        &tcp_health(500, 2, 2, ""),
        &[("web".into(), addr(topo.backend_addr(web_idx), HTTP_PORT), "")],
    );
    let mut lb = start_lb(&topo, &cfg);

    let bad: Vec<&str> = modes[1..].iter().map(|m| m.as_str()).collect();
    let (st, _) = lb.wait_status(Duration::from_secs(15), "every bad AJP peer down", |st| {
        bad.iter().all(|b| health(st, "ajp", b) == "down") && check_u64(st, "ajp", "good", "checks") >= 2
    });

    // The good peer: up, in the ring, with a latency.
    let good = check(&st, "ajp", "good");
    assert_eq!(health(&st, "ajp", "good"), "up", "{st}");
    assert_eq!(good["last_result"], "ok", "good peer: {good}");
    let latency = good["last_latency_ms"].as_f64().expect("good peer has a latency");
    assert!(latency > 0.0 && latency < 500.0, "good peer latency {latency} ms");
    assert_eq!(good["consecutive_failed"], 0, "{good}");
    assert_eq!(good["transitions"], 0, "good peer never changed state: {good}");
    assert!(slots(&st, "ajp", "good") > 0);

    // Each bad peer: down for its own reason.
    let expect: [(&str, &[&str]); 5] = [
        ("silent", &["timed out after 500 ms", "0 of 5 CPong bytes"]),
        ("garbage", &["not an AJP server packet", "magic de ad"]),
        ("cpong-close", &["short reply", "3 of 5 bytes", "41 42 00"]),
        ("reset", &[]),
        ("slow-cpong", &["timed out after 500 ms", "0 of 5 CPong bytes"]),
    ];
    for (name, needles) in expect {
        let c = check(&st, "ajp", name);
        let reason = last_result(&st, "ajp", name);
        report(&format!("ajp peer {name:<12} -> {reason}"));
        assert_eq!(health(&st, "ajp", name), "down", "{name}: {c}");
        assert_eq!(slots(&st, "ajp", name), 0, "{name} still in the ring");
        assert!(
            c["last_latency_ms"].is_null(),
            "{name}: failed check with a latency: {c}"
        );
        assert!(c["consecutive_failed"].as_u64().unwrap() >= 2, "{name}: {c}");
        assert_eq!(c["transitions"], 1, "{name}: {c}");
        for n in needles {
            assert!(reason.contains(n), "{name}: reason {reason:?} lacks {n:?}");
        }
        if name == "reset" {
            let r = reason.to_ascii_lowercase();
            assert!(
                r.contains("reset") || r.contains("broken pipe"),
                "reset peer: reason {reason:?} does not mention the reset"
            );
        }
    }

    // The daemon keeps serving: CLI status, the TCP service, and the AJP service (only `good`).
    lb.assert_running();
    let table = lb.cli_ok(&["status"]);
    assert!(table.contains("service ajp") && table.contains("down"), "{table}");
    let json: Value = serde_json::from_str(&lb.cli_ok(&["--json", "status"])).expect("--json status");
    assert_eq!(json["ok"], true);
    assert_eq!(health(&json["result"], "ajp", "garbage"), "down");
    let cns = topo.client_ns().name();
    for &src in &topo.client_addrs() {
        assert_eq!(get(&topo, src, 80), "b7", "web service from {src}");
        let reply = ajp_cping_from(cns, src, vip(&topo, AJP_PORT), Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("CPing through the ajp service from {src}: {e}"));
        assert_eq!(reply, AJP_CPONG, "from {src}");
    }
    let st = lb.status();
    assert!(
        be(&st, "ajp", "good")["total_connections"].as_u64().unwrap() >= 4,
        "clients went to the good peer: {st}"
    );
    for name in &bad {
        assert_eq!(
            be(&st, "ajp", name)["total_connections"],
            0,
            "client reached {name}"
        );
    }
    for (p, m) in peers.iter_mut().zip(modes) {
        assert!(p.is_running(), "{m:?} peer died: {}", p.stderr_text());
    }
    lb.assert_running();
}

// ---------------------------------------------------------------------------------------------
// 2. Detection and restore times, TCP and AJP
// ---------------------------------------------------------------------------------------------

/// Kill a backend, wait for it to leave the ring, restart it, wait for it to come back; returns
/// (detection, restore) and checks them against interval × fall + interval (+ slack), and the
/// rise/fall counters.
#[allow(clippy::too_many_arguments)]
fn kill_and_restore(
    lb: &Lb,
    svc: &str,
    backend: &str,
    interval: Duration,
    rise: u32,
    fall: u32,
    child: &mut Option<Child>,
    restart: impl FnOnce() -> Child,
) -> (Duration, Duration) {
    let before = lb.status();
    assert_eq!(health(&before, svc, backend), "up");
    assert!(slots(&before, svc, backend) > 0);
    let transitions = check_u64(&before, svc, backend, "transitions");

    child
        .take()
        .expect("backend running")
        .stop()
        .expect("stop backend");
    let killed = Instant::now();
    let bound = interval * fall + interval + SLACK;
    let (st, at) = lb.wait_status(
        bound + Duration::from_secs(5),
        &format!("{svc}/{backend} out of the ring"),
        |st| slots(st, svc, backend) == 0,
    );
    let detection = at - killed;
    assert_eq!(health(&st, svc, backend), "down");
    assert!(
        check_u64(&st, svc, backend, "consecutive_failed") >= u64::from(fall),
        "down before {fall} failed checks: {}",
        check(&st, svc, backend)
    );
    let reason = last_result(&st, svc, backend);
    assert!(reason.contains("connect failed"), "{svc}/{backend}: {reason}");
    assert!(
        detection <= bound,
        "{svc}/{backend}: detection took {detection:?}, more than interval × fall + interval + slack = {bound:?}"
    );

    *child = Some(restart());
    let listening = Instant::now();
    let bound = interval * rise + interval + SLACK;
    let (st, at) = lb.wait_status(
        bound + Duration::from_secs(5),
        &format!("{svc}/{backend} back in the ring"),
        |st| slots(st, svc, backend) > 0,
    );
    let restore = at - listening;
    assert_eq!(health(&st, svc, backend), "up");
    assert!(
        check_u64(&st, svc, backend, "consecutive_ok") >= u64::from(rise),
        "up before {rise} good checks: {}",
        check(&st, svc, backend)
    );
    assert_eq!(last_result(&st, svc, backend), "ok");
    assert_eq!(
        check_u64(&st, svc, backend, "transitions"),
        transitions + 2,
        "exactly one down and one up transition"
    );
    assert!(
        restore <= bound,
        "{svc}/{backend}: restore took {restore:?}, more than interval × rise + interval + slack = {bound:?}"
    );
    (detection, restore)
}

#[test]
fn tcp_and_ajp_detection_and_restore_times() {
    if !require_root("tcp_and_ajp_detection_and_restore_times") {
        return;
    }
    let (interval, rise, fall) = (Duration::from_millis(300), 2, 3);
    let topo = Topology::new(&unique_prefix("hdet"), 3, 1).expect("topology");
    let mut b1 = Some(start_http(&topo, 1));
    let _b2 = start_http(&topo, 2);
    let ajp_listen = addr(Ipv4Addr::UNSPECIFIED, AJP_PORT);
    let mut b3 = Some(start_ajp_backend(topo.backend_ns(3), ajp_listen, AjpMode::Good).expect("ajp peer"));
    let cfg = service_toml(
        "web",
        vip(&topo, 80),
        "",
        &tcp_health(300, rise, fall, ""),
        &[
            ("b1".into(), addr(topo.backend_addr(1), HTTP_PORT), ""),
            ("b2".into(), addr(topo.backend_addr(2), HTTP_PORT), ""),
        ],
    ) + &service_toml(
        "ajp",
        vip(&topo, AJP_PORT),
        "protocol = \"ajp\"",
        &format!("kind = \"ajp\"\ninterval = \"300ms\"\ntimeout = \"250ms\"\nrise = {rise}\nfall = {fall}"),
        &[("b3".into(), addr(topo.backend_addr(3), AJP_PORT), "")],
    );
    let lb = start_lb(&topo, &cfg);
    lb.wait_status(Duration::from_secs(5), "first checks done", |st| {
        ["b1", "b2"]
            .iter()
            .all(|b| check(st, "web", b)["last_result"] == "ok")
            && check(st, "ajp", "b3")["last_result"] == "ok"
    });

    let (d, r) = kill_and_restore(&lb, "web", "b1", interval, rise, fall, &mut b1, || {
        start_http(&topo, 1)
    });
    report(&format!(
        "MEASURED tcp detection {:.2}s restore {:.2}s (interval 300ms, fall {fall}, rise {rise})",
        d.as_secs_f64(),
        r.as_secs_f64()
    ));
    let (d, r) = kill_and_restore(&lb, "ajp", "b3", interval, rise, fall, &mut b3, || {
        start_ajp_backend(topo.backend_ns(3), ajp_listen, AjpMode::Good).expect("restart ajp peer")
    });
    report(&format!(
        "MEASURED ajp detection {:.2}s restore {:.2}s (interval 300ms, fall {fall}, rise {rise})",
        d.as_secs_f64(),
        r.as_secs_f64()
    ));
    // b2 was never touched.
    let st = lb.status();
    assert_eq!(check_u64(&st, "web", "b2", "transitions"), 0);
    assert_eq!(get(&topo, topo.client_addrs()[0], 80).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Failover under a stream of short connections; failback off and on
// ---------------------------------------------------------------------------------------------

struct Sample {
    start: Instant,
    end: Instant,
    result: Result<String, String>,
}

fn failover_scenario(short: &str, failback: bool) {
    let topo = Topology::new(&unique_prefix(short), 3, 1).expect("topology");
    let mut backends: Vec<Option<Child>> = start_http_backends(&topo, HTTP_PORT)
        .expect("http backends")
        .into_iter()
        .map(Some)
        .collect();
    let list: Vec<_> = (1..=3)
        .map(|i| (format!("b{i}"), addr(topo.backend_addr(i), HTTP_PORT), ""))
        .collect();
    let cfg = service_toml(
        "web",
        vip(&topo, 80),
        &format!("failback = {failback}"),
        &tcp_health(200, 2, 2, ""),
        &list,
    );
    let lb = start_lb(&topo, &cfg);
    lb.wait_status(Duration::from_secs(5), "first checks done", |st| {
        (1..=3).all(|i| check(st, "web", &format!("b{i}"))["last_result"] == "ok")
    });

    // One client address, a new connection every 20 ms.
    let src = topo.client_addrs()[0];
    let stop = Arc::new(AtomicBool::new(false));
    let samples = thread::scope(|s| {
        let client = s.spawn(|| {
            let mut out = Vec::new();
            let cns = topo.client_ns().name();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let result = http_get_from(cns, src, vip(&topo, 80), "/")
                    .map(|b| b.trim().to_string())
                    .map_err(|e| e.to_string());
                out.push(Sample {
                    start,
                    end: Instant::now(),
                    result,
                });
                thread::sleep(Duration::from_millis(20));
            }
            out
        });
        let mut run = || -> Result<_, String> {
            // Which backend is the client on?
            thread::sleep(Duration::from_millis(400));
            let st = lb.status();
            let used: Vec<usize> = (1..=3)
                .filter(|i| be(&st, "web", &format!("b{i}"))["total_connections"].as_u64() > Some(0))
                .collect();
            let [home] = used[..] else {
                return Err(format!("the client reached backends {used:?}, not exactly one"));
            };
            let home_name = format!("b{home}");

            let kill_start = Instant::now();
            backends[home - 1]
                .take()
                .unwrap()
                .stop()
                .map_err(|e| e.to_string())?;
            let killed = Instant::now();
            let (_, detected) =
                lb.wait_status(Duration::from_secs(5), "killed backend out of the ring", |st| {
                    slots(st, "web", &home_name) == 0
                });
            thread::sleep(Duration::from_millis(500));
            let restarted = Instant::now();
            backends[home - 1] = Some(start_http(&topo, home));
            let (_, up) = lb.wait_status(
                Duration::from_secs(5),
                "restarted backend back in the ring",
                |st| slots(st, "web", &home_name) > 0 && health(st, "web", &home_name) == "up",
            );
            thread::sleep(Duration::from_millis(1000));
            Ok((home_name, kill_start, killed, detected, restarted, up))
        };
        let r = run();
        stop.store(true, Ordering::Relaxed);
        let samples = client.join().expect("client thread");
        r.map(|r| (r, samples))
    });
    let ((home, kill_start, killed, detected, restarted, up), samples) =
        samples.unwrap_or_else(|e| panic!("{e}"));

    let before: Vec<_> = samples.iter().filter(|s| s.end < kill_start).collect();
    assert!(
        before.len() >= 10,
        "only {} requests before the kill",
        before.len()
    );
    for s in &before {
        assert_eq!(s.result.as_deref(), Ok(home.as_str()), "before the kill");
    }
    // Failures: only requests in flight at the kill or started before the detection; few.
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    for s in &failed {
        assert!(
            s.end >= kill_start && s.start <= detected,
            "request at {:?} after the kill (detected at {:?}) failed: {:?}",
            s.start.saturating_duration_since(kill_start),
            detected - kill_start,
            s.result
        );
    }
    assert!(
        failed.len() <= 3,
        "{} requests failed around the kill: {:?}",
        failed.len(),
        failed.iter().map(|s| &s.result).collect::<Vec<_>>()
    );
    // From the kill until the restart, the client is on one other backend.
    let after_kill: Vec<_> = samples
        .iter()
        .filter(|s| s.start >= killed && s.end < restarted)
        .filter_map(|s| s.result.as_ref().ok())
        .collect();
    let new_home = (*after_kill.first().expect("requests after the kill")).clone();
    assert_ne!(new_home, home, "still on the killed backend");
    for b in &after_kill {
        assert_eq!(**b, new_home, "client moved between backends after the failover");
    }
    let in_window = samples
        .iter()
        .filter(|s| s.start >= killed && s.start <= detected && s.result.is_ok())
        .count();
    let window_total = samples
        .iter()
        .filter(|s| s.start >= killed && s.start <= detected)
        .count();
    assert!(
        in_window >= 1,
        "no request succeeded between the kill and the detection (connect retry)"
    );
    for s in samples.iter().filter(|s| s.start > detected) {
        assert!(s.result.is_ok(), "request after detection failed: {:?}", s.result);
    }
    // While the restarted backend is being checked back up, the client moves at most once (to
    // its old backend, with failback)...
    let mut seen = samples
        .iter()
        .filter(|s| s.start >= restarted && s.start <= up)
        .filter_map(|s| s.result.as_deref().ok())
        .collect::<Vec<_>>();
    seen.dedup();
    let allowed: &[&str] = if failback {
        &[new_home.as_str(), home.as_str()]
    } else {
        &[new_home.as_str()]
    };
    assert!(
        allowed.starts_with(&seen) || allowed.ends_with(&seen),
        "while {home} came back (failback = {failback}) the client went {seen:?}"
    );
    // ...and once it is up, failback decides.
    let after_up: Vec<_> = samples.iter().filter(|s| s.start > up).collect();
    assert!(
        after_up.len() >= 10,
        "only {} requests after the restore",
        after_up.len()
    );
    let expected = if failback { &home } else { &new_home };
    for s in &after_up {
        assert_eq!(
            s.result.as_deref(),
            Ok(expected.as_str()),
            "after {home} came back (failback = {failback})"
        );
    }
    report(&format!(
        "failover (failback = {failback}): {home} -> {new_home}, detection {:.2}s, {}/{} requests in \
         the detection window succeeded, {} failed in all, after restore on {expected}",
        (detected - killed).as_secs_f64(),
        in_window,
        window_total,
        failed.len()
    ));
}

#[test]
fn failover_of_a_streaming_client_without_failback() {
    if !require_root("failover_of_a_streaming_client_without_failback") {
        return;
    }
    failover_scenario("hfo", false);
}

#[test]
fn failover_of_a_streaming_client_with_failback() {
    if !require_root("failover_of_a_streaming_client_with_failback") {
        return;
    }
    failover_scenario("hfb", true);
}

// ---------------------------------------------------------------------------------------------
// 4. Hot spare
// ---------------------------------------------------------------------------------------------

#[test]
fn backup_takes_over_only_when_no_primary_is_up_and_keeps_its_clients() {
    if !require_root("backup_takes_over_only_when_no_primary_is_up_and_keeps_its_clients") {
        return;
    }
    let topo = Topology::new(&unique_prefix("hspare"), 3, 12).expect("topology");
    let mut backends: Vec<Option<Child>> = start_http_backends(&topo, HTTP_PORT)
        .expect("http backends")
        .into_iter()
        .map(Some)
        .collect();
    let cfg = service_toml(
        "web",
        vip(&topo, 80),
        "",
        &tcp_health(200, 2, 2, ""),
        &[
            ("b1".into(), addr(topo.backend_addr(1), HTTP_PORT), ""),
            ("b2".into(), addr(topo.backend_addr(2), HTTP_PORT), ""),
            (
                "b3".into(),
                addr(topo.backend_addr(3), HTTP_PORT),
                "backup = true",
            ),
        ],
    );
    let lb = start_lb(&topo, &cfg);
    let (st, _) = lb.wait_status(Duration::from_secs(5), "first checks done", |st| {
        (1..=3).all(|i| check(st, "web", &format!("b{i}"))["last_result"] == "ok")
    });
    assert_eq!(service_of(&st, "web")["on_backups"], false);
    assert_eq!(
        slots(&st, "web", "b3"),
        0,
        "backup in the ring while primaries are up"
    );
    assert_eq!(health(&st, "web", "b3"), "up", "the backup is checked too");

    let clients = topo.client_addrs();
    let (early, rest) = clients.split_at(4);
    let (on_backup, late) = rest.split_at(4);

    // Both primaries up: nobody reaches the backup.
    let mut first = Vec::new();
    for &c in early {
        for _ in 0..2 {
            let b = get(&topo, c, 80);
            assert!(
                b == "b1" || b == "b2",
                "{c} reached {b} while both primaries are up"
            );
        }
        first.push(get(&topo, c, 80));
    }
    report(&format!("hot spare: primaries up, clients on {first:?}"));

    // Both primaries die: the backup takes everyone.
    for i in [1, 2] {
        backends[i - 1].take().unwrap().stop().expect("stop primary");
    }
    let (st, _) = lb.wait_status(Duration::from_secs(5), "service on its backup", |st| {
        service_of(st, "web")["on_backups"] == true
    });
    assert_eq!(health(&st, "web", "b1"), "down");
    assert_eq!(health(&st, "web", "b2"), "down");
    assert!(slots(&st, "web", "b3") > 0);
    for &c in early.iter().chain(on_backup) {
        assert_eq!(get(&topo, c, 80), "b3", "{c} with no primary up");
    }

    // One primary back: new clients go to it; clients on the backup stay there.
    backends[0] = Some(start_http(&topo, 1));
    let (st, _) = lb.wait_status(Duration::from_secs(5), "b1 up, off the backup", |st| {
        health(st, "web", "b1") == "up" && service_of(st, "web")["on_backups"] == false
    });
    assert_eq!(slots(&st, "web", "b3"), 0, "backup still in the ring");
    assert!(slots(&st, "web", "b1") > 0);
    for &c in late {
        assert_eq!(get(&topo, c, 80), "b1", "new client {c}");
    }
    for &c in early.iter().chain(on_backup) {
        for _ in 0..2 {
            assert_eq!(
                get(&topo, c, 80),
                "b3",
                "{c} was pinned to the backup (failback off)"
            );
        }
    }
    let st = lb.status();
    assert!(be(&st, "web", "b3")["total_connections"].as_u64().unwrap() >= 8 + 16);
}

// ---------------------------------------------------------------------------------------------
// 5. on_down = "reset" vs "keep"
// ---------------------------------------------------------------------------------------------

fn echo_round(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    assert_eq!(buf, msg);
    Ok(())
}

#[test]
fn on_down_reset_closes_established_connections_and_keep_does_not() {
    if !require_root("on_down_reset_closes_established_connections_and_keep_does_not") {
        return;
    }
    const CHECK_PORT: u16 = 9000;
    let topo = Topology::new(&unique_prefix("hreset"), 1, 1).expect("topology");
    let mut echo = start_echo_backends(&topo, 7).expect("echo backend");
    // The health checks go to a separate port, served by a process we can kill while the
    // traffic port (echo on :7) stays up.
    let mut checker = Some(
        start_testsrv(
            topo.backend_ns(1),
            &[
                "http",
                "--listen",
                &format!("0.0.0.0:{CHECK_PORT}"),
                "--name",
                "chk",
            ],
        )
        .expect("checker"),
    );
    let checks = tcp_health(200, 2, 2, &format!("port = {CHECK_PORT}"));
    let backend = [("b1".to_string(), addr(topo.backend_addr(1), 7), "")];
    let cfg = service_toml("reset", vip(&topo, 7), "on_down = \"reset\"", &checks, &backend)
        + &service_toml("keep", vip(&topo, 8), "", &checks, &backend);
    let lb = start_lb(&topo, &cfg);
    lb.wait_status(Duration::from_secs(5), "first checks done", |st| {
        check(st, "reset", "b1")["last_result"] == "ok" && check(st, "keep", "b1")["last_result"] == "ok"
    });

    let (cns, src) = (topo.client_ns().name(), topo.client_addrs()[0]);
    let timeout = Duration::from_secs(3);
    let mut reset = connect_from(cns, src, vip(&topo, 7), timeout).expect("connect reset service");
    let mut keep = connect_from(cns, src, vip(&topo, 8), timeout).expect("connect keep service");
    echo_round(&mut reset, b"hello reset\n").expect("echo via reset service");
    echo_round(&mut keep, b"hello keep\n").expect("echo via keep service");
    let st = lb.status();
    assert_eq!(be(&st, "reset", "b1")["active_connections"], 1);
    assert_eq!(be(&st, "keep", "b1")["active_connections"], 1);

    checker.take().unwrap().stop().expect("stop checker");
    lb.wait_status(Duration::from_secs(5), "b1 down in both services", |st| {
        health(st, "reset", "b1") == "down" && health(st, "keep", "b1") == "down"
    });

    // keep (the default): the connection goes on working, also a while later.
    echo_round(&mut keep, b"still here\n").expect("keep: echo after the backend went down");
    thread::sleep(Duration::from_millis(500));
    echo_round(&mut keep, b"and still\n").expect("keep: echo 500 ms later");
    // reset: the proxy has dropped its side of the connection...
    let (st, _) = lb.wait_status(Duration::from_secs(2), "reset connection gone", |st| {
        be(st, "reset", "b1")["active_connections"] == 0
    });
    assert_eq!(be(&st, "keep", "b1")["active_connections"], 1);
    assert!(echo[0].is_running(), "the traffic port's echo server died");
    // ...and the client sees a reset (RST, ECONNRESET), not an orderly end of stream: a FIN
    // would let a client take a cut-short response for a complete one.
    let mut buf = [0u8; 16];
    match reset.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => panic!(
            "on_down = reset: the client got an orderly close (FIN, read returned EOF) instead of a \
             reset (RST); then write gives {:?}",
            reset.write(b"x")
        ),
        other => panic!("on_down = reset: expected ECONNRESET, read gave {other:?}"),
    }
    drop(keep);
}

// ---------------------------------------------------------------------------------------------
// 6. A drained backend is still checked
// ---------------------------------------------------------------------------------------------

#[test]
fn drained_backend_is_still_checked() {
    if !require_root("drained_backend_is_still_checked") {
        return;
    }
    let topo = Topology::new(&unique_prefix("hdrain"), 2, 1).expect("topology");
    let mut backends: Vec<Option<Child>> = start_http_backends(&topo, HTTP_PORT)
        .expect("http backends")
        .into_iter()
        .map(Some)
        .collect();
    let cfg = service_toml(
        "web",
        vip(&topo, 80),
        "",
        &tcp_health(200, 2, 2, ""),
        &[
            ("b1".into(), addr(topo.backend_addr(1), HTTP_PORT), ""),
            ("b2".into(), addr(topo.backend_addr(2), HTTP_PORT), ""),
        ],
    );
    let lb = start_lb(&topo, &cfg);
    lb.wait_status(Duration::from_secs(5), "first checks done", |st| {
        check(st, "web", "b1")["last_result"] == "ok"
    });
    lb.cli_ok(&["backend", "drain", "web", "b1"]);
    let st = lb.status();
    assert_eq!(be(&st, "web", "b1")["state"], "drain");
    assert_eq!(slots(&st, "web", "b1"), 0);
    let checks0 = check_u64(&st, "web", "b1", "checks");
    // Three more checks at a 200 ms interval (a loaded machine may stretch it: up to 3 s).
    let (st, _) = lb.wait_status(
        Duration::from_secs(3),
        "a drained backend is still checked",
        |st| check_u64(st, "web", "b1", "checks") >= checks0 + 3,
    );
    assert_eq!(health(&st, "web", "b1"), "up");

    backends[0].take().unwrap().stop().expect("stop b1");
    let (st, _) = lb.wait_status(Duration::from_secs(5), "drained b1 marked down", |st| {
        health(st, "web", "b1") == "down"
    });
    assert_eq!(be(&st, "web", "b1")["state"], "drain", "the admin state is kept");
    assert!(last_result(&st, "web", "b1").contains("connect failed"));
    backends[0] = Some(start_http(&topo, 1));
    let (st, _) = lb.wait_status(Duration::from_secs(5), "drained b1 up again", |st| {
        health(st, "web", "b1") == "up"
    });
    assert_eq!(
        slots(&st, "web", "b1"),
        0,
        "a drained backend stays out of the ring when it recovers"
    );
    assert_eq!(get(&topo, topo.client_addrs()[0], 80), "b2");
}
