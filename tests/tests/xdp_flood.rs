//! A spoofed SYN flood against an `xdp` service (issue 11, item 3): for 30 seconds a generator in
//! the client namespace ([`lb_tests::synflood`]) sends SYNs to the VIP as fast as it can, from
//! random addresses of 10.99.0.0/16 and random ports, while legitimate clients keep opening new
//! connections (>= 99% must succeed) and an established connection keeps echoing (it must never
//! fail). `[xdp] syn_cookies` is left at its default, "auto": the flood's half-open flows fill the
//! SNAT ports, half-open flows start giving their ports up, and lb switches SYN cookies on, after
//! which spoofed SYNs keep no state at all. Afterwards new connections work at once.

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The two hooks' runs one after the other: each loads the machine's two cores on its own.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
use lb_tests::synflood::{FloodSpec, SynFlood};
use lb_tests::{connect_from, http_get_from, require_root};

const FLOOD: Duration = Duration::from_secs(30);
/// Spoofed sources: routed from the lb namespace back to the client namespace (which drops the
/// backends' SYN-ACKs: the addresses are not its own).
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
const SPOOFED_COUNT: u32 = 1 << 16;

/// One new connection with one request: Ok(backend) or the error text.
fn one_get(bed: &Bed, src: Ipv4Addr) -> Result<String, String> {
    http_get_from(bed.topo.client_ns().name(), src, bed.web(), "/")
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

fn xdp_syn_flood_spares_legitimate_and_established_connections(hook: Hook) {
    if !require_root("xdp_syn_flood_spares_legitimate_and_established_connections") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let pins = Pins::new(pin_dir(&hook.tag("flood")));
    let bed = Bed::new(&hook.tag("xfl"), 3, 8, |topo, socket| {
        // Sized for a flood, as the README advises: SNAT ports × backends ≥ the flood's SYN rate
        // × 1 s (a half-open flow keeps its port that long), conntrack for two entries each.
        hook.config(xdp_config(topo, socket, &pins.0, 3, XDP_STD, ""))
            .replace(
                "[xdp]\n",
                "[xdp]\nsnat_ports = \"10000-59999\"\nconntrack_entries = 1048576\n",
            )
    });
    prepare_peers(&bed.topo);
    let clients = bed.topo.client_addrs();
    // Health checks settled and every backend's neighbour known.
    let deadline = Instant::now() + Duration::from_secs(5);
    while clients.iter().take(6).any(|&c| one_get(&bed, c).is_err()) {
        assert!(
            Instant::now() < deadline,
            "service never answered:\n{}",
            bed.lb.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lb = bed.topo.lb_ns();
    lb.ip(&[
        "route",
        "add",
        "10.99.0.0/16",
        "via",
        &bed.topo.client_primary_addr().to_string(),
    ])
    .expect("route the spoofed range");

    // The established connection, open before the flood.
    let mut established = connect_from(
        bed.topo.client_ns().name(),
        clients[0],
        bed.echo(),
        Duration::from_secs(5),
    )
    .expect("echo connection");
    echo_roundtrip(&mut established, b"before the flood");

    let spec = FloodSpec {
        netns: bed.topo.client_ns().name().to_string(),
        interface: bed.topo.peer_if().to_string(),
        src_mac: mac(bed.topo.client_ns(), bed.topo.peer_if()),
        dst_mac: mac(lb, bed.topo.lb_client_if()),
        base: SPOOFED,
        count: SPOOFED_COUNT,
        target: std::net::SocketAddrV4::new(bed.topo.vip(), WEB_VIP_PORT),
    };
    assert_eq!(
        xdp_counter(&bed, "syn_cookies"),
        0,
        "\"auto\" starts with cookies off"
    );
    let reclaimed_before = xdp_counter(&bed, "half_open_reclaimed");
    let flood = SynFlood::start(spec).expect("start the SYN flood");
    let started = Instant::now();
    // Legitimate clients: new connections one after another from clients[1..] for the whole flood.
    let done = AtomicBool::new(false);
    let (ok, failed, echoes) = std::thread::scope(|s| {
        let legit = s.spawn(|| {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = 0;
            while started.elapsed() < FLOOD {
                let src = clients[1 + i % (clients.len() - 1)];
                i += 1;
                match one_get(&bed, src) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{src} at {:.1}s: {e}", started.elapsed().as_secs_f64())),
                }
            }
            done.store(true, Ordering::Relaxed);
            (ok, failed)
        });
        // The established connection keeps working, a round trip every 500 ms.
        let mut echoes = 0;
        while !done.load(Ordering::Relaxed) {
            echo_roundtrip(&mut established, format!("during the flood {echoes}").as_bytes());
            echoes += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        let (ok, failed) = legit.join().expect("legitimate client thread");
        (ok, failed, echoes)
    });
    let cookies_on_at_end = xdp_counter(&bed, "syn_cookies");
    let report = flood.stop().expect("flood thread");
    let reclaimed = xdp_counter(&bed, "half_open_reclaimed") - reclaimed_before;
    let total = ok + failed.len() as u64;
    eprintln!(
        "SYN flood: {} spoofed SYNs in {:.1}s ({:.0}/s); legitimate connections {ok}/{total} succeeded; \
         {echoes} echoes on the established connection; half-open ports reclaimed {reclaimed}; \
         snat_exhausted {}; new_flows {}; no_conntrack {}; no_reply_flow {}; rst_sent {}; \
         rst_limited {}; closed_reused {}; cookies_sent {}; cookie_valid {}; cookie_invalid {}; \
         cookie_syn_resent {}; cookies on at the end {cookies_on_at_end}; failures: {:?}",
        report.frames,
        report.elapsed.as_secs_f64(),
        report.rate(),
        xdp_counter(&bed, "snat_exhausted"),
        xdp_counter(&bed, "new_flows"),
        xdp_counter(&bed, "no_conntrack"),
        xdp_counter(&bed, "no_reply_flow"),
        xdp_counter(&bed, "rst_sent"),
        xdp_counter(&bed, "rst_limited"),
        xdp_counter(&bed, "closed_reused"),
        xdp_counter(&bed, "cookies_sent"),
        xdp_counter(&bed, "cookie_valid"),
        xdp_counter(&bed, "cookie_invalid"),
        xdp_counter(&bed, "cookie_syn_resent"),
        failed.iter().take(10).collect::<Vec<_>>(),
    );
    let cookies = xdp_counter(&bed, "cookies_sent");
    assert!(
        cookies_on_at_end == 1 && cookies > report.frames / 2,
        "\"auto\" did not switch SYN cookies on for the flood (on at the end: {cookies_on_at_end}; \
         {cookies} cookies for {} SYNs; {reclaimed} half-open ports reclaimed)",
        report.frames
    );
    assert!(total >= 30, "only {total} legitimate connections tried");
    assert!(
        ok * 100 >= total * 99,
        "only {ok} of {total} legitimate connections succeeded during the flood: {failed:?}"
    );
    assert!(echoes >= 10, "established connection exercised {echoes} times");

    // Recovery: new connections work at once, and the established one is untouched.
    for (i, &c) in clients.iter().cycle().skip(1).take(20).enumerate() {
        one_get(&bed, c).unwrap_or_else(|e| panic!("connection {i} after the flood failed: {e}"));
    }
    echo_roundtrip(&mut established, &random_bytes(64 << 10, 11));
    close_echo(established);
}

lb_tests::per_hook!(xdp_syn_flood_spares_legitimate_and_established_connections);
