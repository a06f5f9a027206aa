//! Connection-per-request loops through an `xdp` service (issue 16): at 1, 4 and 64 concurrent
//! client connections, alone and beside a keep-alive load from the same client address, every
//! handshake must complete on the first SYN. Counted from the kernel, not timed: the client's
//! `TcpExtTCPSynRetrans` and the lb namespace's `TcpOutRsts` (a backend reply that missed the
//! program reaches the lb's own stack, which resets it) must not move over a run of ≥ 20,000
//! connections, and the program must count no `no_reply_flow` or `snat_exhausted` drop.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// The two hooks' runs one after the other: each loads the machine's two cores on its own.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
use lb_tests::{require_root, run_with_timeout};

/// Connections per close-loop run (one request each).
const CONNECTIONS: u64 = 20_000;
/// Upper bound of one close-loop run (made of 2-second wrk runs until [`CONNECTIONS`]).
const RUN_CAP_SECS: u64 = 60;

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    let get = |m: &BTreeMap<String, u64>| *m.get(key).unwrap_or_else(|| panic!("no counter {key}"));
    get(after).saturating_sub(get(before))
}

/// wrk's report: (requests, socket errors line or "").
fn wrk_report(text: &str) -> (u64, String) {
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}"));
    let errors = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
        .unwrap_or("")
        .trim()
        .to_string();
    (requests, errors)
}

/// wrk script pacing the keep-alive load.
struct Scripts {
    pace: std::path::PathBuf,
}

/// One close loop of `concurrency` connections, with the keep-alive load on or off; asserts the
/// counters above.
fn close_loop(bed: &Bed, scripts: &Scripts, concurrency: u32, keepalive: bool) {
    let url = format!("http://{}/", bed.web());
    let client = bed.topo.client_ns();
    let lb = bed.topo.lb_ns();
    // The keep-alive load: same client address, eight connections each sending a request every
    // millisecond (paced, so the close loop still gets a core of its own); killed by PID on drop.
    let _ka = keepalive.then(|| {
        let pace = scripts.pace.display().to_string();
        client
            .spawn(
                "wrk",
                &["-t1", "-c8", &format!("-d{RUN_CAP_SECS}s"), "-s", &pace, &url],
            )
            .expect("spawn keep-alive wrk")
    });
    if keepalive {
        std::thread::sleep(Duration::from_millis(300));
    }
    let (client_before, lb_before) = (tcp_counters(client), tcp_counters(lb));
    let (exhausted_before, no_reply_before) = (
        xdp_counter(bed, "snat_exhausted"),
        xdp_counter(bed, "no_reply_flow"),
    );
    // wrk runs for a duration: short runs until the loop has made enough connections.
    let started = Instant::now();
    let (mut requests, mut errors, mut text) = (0, Vec::new(), String::new());
    while requests < CONNECTIONS && started.elapsed() < Duration::from_secs(RUN_CAP_SECS) {
        let cmd = client.command(
            "wrk",
            &[
                "-t1".to_string(),
                format!("-c{concurrency}"),
                "-d2s".to_string(),
                "--timeout".to_string(),
                "5s".to_string(),
                "-H".to_string(),
                "Connection: close".to_string(),
                url.clone(),
            ],
        );
        let out = run_with_timeout(cmd, Duration::from_secs(20)).expect("close-loop wrk");
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (n, e) = wrk_report(&text);
        requests += n;
        if !e.is_empty() {
            errors.push(e);
        }
    }
    let errors = errors.join("; ");
    let (client_after, lb_after) = (tcp_counters(client), tcp_counters(lb));
    let what = format!("c={concurrency} keepalive={keepalive}");
    let syn_retrans = delta(&client_before, &client_after, "TcpExtTCPSynRetrans");
    let lb_rsts = delta(&lb_before, &lb_after, "TcpOutRsts");
    let exhausted = xdp_counter(bed, "snat_exhausted") - exhausted_before;
    let no_reply = xdp_counter(bed, "no_reply_flow") - no_reply_before;
    eprintln!(
        "{what}: {requests} connections in {:.1}s, client SYN retransmits +{syn_retrans}, lb RSTs +{lb_rsts}, \
         snat_exhausted +{exhausted}, no_reply_flow +{no_reply}, {errors}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        requests >= CONNECTIONS,
        "{what}: only {requests} connections:\n{text}"
    );
    assert_eq!(syn_retrans, 0, "{what}: client retransmitted SYNs\n{text}");
    assert_eq!(lb_rsts, 0, "{what}: the lb namespace's stack sent RSTs\n{text}");
    assert_eq!(exhausted, 0, "{what}: SYNs dropped for lack of a SNAT port");
    assert_eq!(no_reply, 0, "{what}: backend replies without a flow");
    assert!(
        errors.is_empty(),
        "{what}: wrk saw socket errors ({errors})\n{text}"
    );
}

fn xdp_close_loops_complete_every_handshake_on_the_first_syn(hook: Hook) {
    if !require_root("xdp_close_loops_complete_every_handshake_on_the_first_syn") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let pins = Pins::new(pin_dir(&hook.tag("hs")));
    // The default timeouts: the loops reach ~10k connections/s, often from one CPU, and every CPU
    // may use the whole SNAT range, so closed flows holding their port for closed_timeout (1 s)
    // leave plenty free.
    let bed = Bed::new(&hook.tag("xhs"), 3, 0, |topo, socket| {
        hook.config(xdp_config(topo, socket, &pins.0, 3, XDP_STD, ""))
    });
    prepare_peers(&bed.topo);
    // As the bench's client: many ports, TIME_WAIT ports reused (tcp_tw_reuse) as real clients do.
    let client = bed.topo.client_ns();
    client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    client.sysctl("net.ipv4.tcp_tw_reuse", "1").unwrap();
    // A connection through each backend first: health checks and neighbours settled.
    for _ in 0..6 {
        bed.get(bed.topo.client_primary_addr());
    }
    let dir = TempDir::new("xhs-wrk");
    let scripts = Scripts {
        pace: dir.path().join("pace.lua"),
    };
    std::fs::write(&scripts.pace, "function delay()\n  return 1\nend\n").expect("write wrk script");
    for keepalive in [false, true] {
        for concurrency in [1, 4, 64] {
            close_loop(&bed, &scripts, concurrency, keepalive);
        }
    }
}

lb_tests::per_hook!(xdp_close_loops_complete_every_handshake_on_the_first_syn);
