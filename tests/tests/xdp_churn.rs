//! Backend churn under load through an `xdp` service (issue 11): while wrk keeps connections
//! busy (keep-alive, then one connection per request), a loop drains, removes and adds again each
//! backend in turn. Open connections must survive every change: wrk sees no socket error, no
//! client connect fails, the lb namespace's stack sends no RST (a packet that missed the
//! program), and the program drops nothing but SYNs waiting for a SNAT port. A calibration step
//! shows the same measures do catch refused connects. `LB_CHURN_SECS` sets each run's length.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use lb_tests::{require_root, run_with_timeout};

fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(*before.get(k).unwrap_or(&0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn xdp_counters(bed: &Bed) -> BTreeMap<String, u64> {
    bed.lb.status()["xdp"]
        .as_object()
        .expect("xdp counters")
        .iter()
        .filter_map(|(k, v)| v.as_u64().map(|v| (k.clone(), v)))
        .collect()
}

/// wrk's report: (requests, socket errors line or "", non-2xx line or "").
fn wrk_report(text: &str) -> (u64, String, String) {
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}"));
    let line = |p: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(p))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    (requests, line("Socket errors:"), line("Non-2xx"))
}

/// Runs wrk (`args`) from the client namespace while a loop takes each backend of `web` in turn
/// through drain, remove and add again (the others keep taking clients); returns wrk's output
/// and the number of backends cycled.
fn under_churn(bed: &Bed, args: &[&str]) -> (String, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let pause = Duration::from_millis(
        std::env::var("LB_CHURN_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    let churn = std::env::var_os("LB_CHURN_OFF").is_none();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while churn && !stop.load(Ordering::Relaxed) {
                i = i % 4 + 1;
                let name = format!("b{i}");
                let address = format!("{}:{HTTP_PORT}", bed.topo.backend_addr(i));
                bed.lb.cli_ok(&["backend", "drain", "web", &name]);
                std::thread::sleep(pause);
                bed.lb.cli_ok(&["backend", "remove", "web", &name]);
                std::thread::sleep(pause);
                bed.lb
                    .cli_ok(&["backend", "add", "web", &address, "--name", &name]);
                std::thread::sleep(pause);
                cycles.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut full = vec!["-t2".to_string(), "--timeout".into(), "5s".into()];
        full.extend(args.iter().map(ToString::to_string));
        full.push(format!("http://{}/", bed.web()));
        let cmd = bed.topo.client_ns().command("wrk", &full);
        let out = run_with_timeout(cmd, Duration::from_secs(secs() + 30));
        stop.store(true, Ordering::Relaxed);
        out.expect("wrk")
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (text, cycles.load(Ordering::Relaxed))
}

/// Seconds of each wrk run (`LB_CHURN_SECS`, default 5).
fn secs() -> u64 {
    std::env::var("LB_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Counters that count forwarded packets, not drops: verdicts, and SYNs that took a half-open or
/// closed connection's SNAT port.
const NOT_DROPS: &[&str] = &[
    "forwarded",
    "new_flows",
    "packets",
    "passed",
    "half_open_reclaimed",
    "closed_reused",
];

/// Drop reasons that SNAT capacity explains (issue 16's business, not churn's).
const CAPACITY: &[&str] = &["dropped", "snat_exhausted"];

#[test]
fn xdp_connections_survive_add_drain_remove_churn() {
    if !require_root("xdp_connections_survive_add_drain_remove_churn") {
        return;
    }
    let pins = Pins::new(pin_dir("churn"));
    let bed = Bed::new("xchurn", 4, 0, |topo, socket| {
        xdp_config(topo, socket, &pins.0, 4, &[("web", 80, HTTP_PORT)], "")
    });
    prepare_peers(&bed.topo);
    let client = bed.topo.client_ns();
    client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    client.sysctl("net.ipv4.tcp_tw_reuse", "1").unwrap();
    for _ in 0..6 {
        bed.get(bed.topo.client_primary_addr());
    }
    let duration = format!("-d{}s", secs());
    for (what, args) in [
        ("keep-alive", vec!["-c32", &duration]),
        ("close", vec!["-c16", &duration, "-H", "Connection: close"]),
    ] {
        let (client_before, lb_before, xdp_before) = (
            tcp_counters(client),
            tcp_counters(bed.topo.lb_ns()),
            xdp_counters(&bed),
        );
        let (text, cycles) = under_churn(&bed, &args);
        let (requests, errors, non2xx) = wrk_report(&text);
        let client_moved = moved(&client_before, &tcp_counters(client));
        let lb_moved = moved(&lb_before, &tcp_counters(bed.topo.lb_ns()));
        let xdp_moved = moved(&xdp_before, &xdp_counters(&bed));
        eprintln!(
            "{what}: {requests} requests, {cycles} backends drained, removed and added again; \
             wrk: {errors:?} {non2xx:?}\n  client: {client_moved:?}\n  lb: {lb_moved:?}\n  xdp: {xdp_moved:?}"
        );
        assert!(cycles >= 4, "{what}: only {cycles} cycles");
        assert!(
            errors.is_empty(),
            "{what}: wrk saw socket errors: {errors}\n{text}"
        );
        assert!(non2xx.is_empty(), "{what}: {non2xx}\n{text}");
        // Nothing reached the lb's own stack to be reset (a SYN or segment the program passed).
        let rsts = lb_moved.get("TcpOutRsts").copied().unwrap_or(0);
        assert_eq!(rsts, 0, "{what}: the lb namespace sent RSTs: {lb_moved:?}");
        // The program dropped nothing for want of a flow or a backend; only SNAT capacity may
        // drop a SYN (the client then retransmits it, which is every retransmit it made).
        let drops: Vec<_> = xdp_moved
            .keys()
            .filter(|k| !NOT_DROPS.contains(&k.as_str()))
            .filter(|k| !CAPACITY.contains(&k.as_str()))
            .collect();
        assert!(
            drops.is_empty(),
            "{what}: the program dropped packets: {xdp_moved:?}"
        );
        let syn_retrans = client_moved.get("TcpExtTCPSynRetrans").copied().unwrap_or(0);
        let exhausted = xdp_moved.get("snat_exhausted").copied().unwrap_or(0);
        assert!(
            syn_retrans <= exhausted,
            "{what}: {syn_retrans} SYN retransmits, {exhausted} SYNs dropped for SNAT ports"
        );
        let failed = client_moved.get("TcpAttemptFails").copied().unwrap_or(0);
        assert_eq!(
            failed, 0,
            "{what}: the client's connects failed: {client_moved:?}"
        );
    }
    // Calibration: the same measures do see refused connects. For a moment new clients can only
    // reach a backend whose port refuses them: wrk counts each as a *write* error (it never
    // checks a connect's result; the refusal surfaces when it writes the request), and the
    // client's stack as a failed connect attempt.
    let client_before = tcp_counters(client);
    let dead = format!("{}:{}", bed.topo.backend_addr(4), HTTP_PORT + 1);
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            bed.lb.cli_ok(&["backend", "add", "web", &dead, "--name", "dead"]);
            for i in 1..=4 {
                bed.lb.cli_ok(&["backend", "disable", "web", &format!("b{i}")]);
            }
            std::thread::sleep(Duration::from_millis(150));
            for i in 1..=4 {
                bed.lb.cli_ok(&["backend", "enable", "web", &format!("b{i}")]);
            }
            bed.lb.cli_ok(&["backend", "remove", "web", "dead"]);
            stop.store(true, Ordering::Relaxed);
        });
        let url = format!("http://{}/", bed.web());
        // Long enough that the window (opened by five `lb` commands, each a process start) falls
        // inside wrk's run on a loaded machine too.
        let args = ["-t1", "-c4", "-d4s", "-H", "Connection: close", &url];
        run_with_timeout(client.command("wrk", &args), Duration::from_secs(30))
    });
    assert!(stop.load(Ordering::Relaxed));
    let text = String::from_utf8_lossy(&out.expect("wrk").stdout).into_owned();
    let (_, errors, _) = wrk_report(&text);
    let failed = moved(&client_before, &tcp_counters(client))
        .get("TcpAttemptFails")
        .copied()
        .unwrap_or(0);
    eprintln!("calibration: wrk {errors:?}, client failed connects +{failed}");
    assert!(
        errors.contains("write"),
        "refused connects not seen by wrk:\n{text}"
    );
    assert!(failed > 0, "refused connects not counted by the client's stack");
}
