//! Failed and refused XDP starts (issue 11 item 5): an unknown interface is named before anything
//! is made; a start that fails after attaching removes its maps and links; a start killed after
//! pinning its maps leaves a half-made pin directory that the next
//! start recognises and rebuilds; a second daemon on the same `pin_path` is refused before it makes
//! a map; a start that fails at attach removes every pin it made. None of them disturbs the
//! running daemon.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use lb_tests::{
    Child, Daemon, Netns, Topology, lb_bin, require_root, start_echo_backends, start_http_backends,
    unique_prefix,
};
use nix::sys::signal::Signal;

/// The sysctl record lb keeps beside a pin directory (named as lb's `host::record_path`).
fn sysctl_record(pins: &Path) -> PathBuf {
    let name = pins.display().to_string().replace('%', "%25").replace('/', "%2F");
    PathBuf::from(format!("/run/lb/sysctl/{name}.json"))
}

fn pin_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|l| {
            l.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes a pin directory (not held by [`Pins`]: a test holds one `Pins` at a time) on drop.
struct ExtraPins(PathBuf);

impl Drop for ExtraPins {
    fn drop(&mut self) {
        for e in pin_entries(&self.0) {
            let _ = std::fs::remove_file(self.0.join(e));
        }
        let _ = std::fs::remove_dir(&self.0);
        let _ = std::fs::remove_file(sysctl_record(&self.0));
    }
}

/// Spawns `lb run` with `config` and waits for it to exit on its own: (success, log).
fn failed_start(ns: &Netns, tag: &str, config: impl FnOnce(&Path) -> String) -> (bool, String) {
    let mut d = Daemon::spawn(ns, Enter::NetOnly, tag, &[], config);
    let status = d
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("wait for lb run");
    let log = d.log();
    let status = status.unwrap_or_else(|| panic!("lb run did not exit\n--- log ---\n{log}"));
    eprintln!("--- {tag}: {status} ---\n{log}");
    (status.success(), log)
}

#[test]
fn xdp_start_names_an_unknown_interface_and_leaves_nothing() {
    if !require_root("xdp_start_names_an_unknown_interface_and_leaves_nothing") {
        return;
    }
    let pins = Pins::new(pin_dir("noif"));
    let ns = Netns::new(&unique_prefix("xnoif")).expect("namespace");
    let (ok, log) = failed_start(&ns, "xnoif", |socket| {
        format!(
            "shutdown_timeout = \"1s\"\n[control]\nsocket = \"{}\"\n\n[xdp]\ninterfaces = [\"lo\", \"nosuchif\"]\npin_path = \"{}\"\n\
             \n[[service]]\nname = \"web\"\nlisten = \"10.99.0.1:80\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"none\"\n\
             \n[[service.backend]]\nname = \"b1\"\naddress = \"10.99.1.2:8080\"\n",
            socket.display(),
            pins.0.display()
        )
    });
    assert!(!ok, "lb run with an unknown interface must fail\n{log}");
    assert!(
        log.contains("interface nosuchif does not exist"),
        "the error names the interface:\n{log}"
    );
    assert!(
        !log.contains("forwarding"),
        "no sysctl is touched before the interfaces are checked:\n{log}"
    );
    assert!(
        !pins.0.exists(),
        "no pin directory left: {:?}",
        pin_entries(&pins.0)
    );
    assert!(!sysctl_record(&pins.0).exists(), "no sysctl record left");
}

/// The test's config: both standard services over backend 1, pinned at `pins`.
fn config<'a>(topo: &'a Topology, pins: &'a Path) -> impl FnOnce(&Path) -> String + 'a {
    move |socket| xdp_config(topo, socket, pins, 1, XDP_STD, "")
}

/// Whether process `pid` is stopped (state `T` in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

#[test]
fn xdp_killed_start_is_rebuilt_and_conflicting_starts_leave_no_pins() {
    if !require_root("xdp_killed_start_is_rebuilt_and_conflicting_starts_leave_no_pins") {
        return;
    }
    let pins = Pins::new(pin_dir("kill"));
    let other = ExtraPins(pin_dir("kill-other"));
    let topo = Topology::new(&unique_prefix("xkill"), 1, 0).expect("topology");
    let mut servers = start_http_backends(&topo, HTTP_PORT).expect("http backends");
    servers.extend(start_echo_backends(&topo, ECHO_PORT).expect("echo backends"));
    prepare_peers(&topo);

    // 0. A start that fails after attaching (a backend the lb namespace has no route to, found
    //    while the services are applied): its maps and links go, so the program is detached.
    let (ok, log) = failed_start(topo.lb_ns(), "xkill-route", |socket| {
        config(&topo, &other.0)(socket).replace(&topo.backend_addr(1).to_string(), "10.50.0.1")
    });
    assert!(!ok, "a backend without a route fails the start\n{log}");
    assert!(
        log.contains("XDP program attached"),
        "it failed after attaching:\n{log}"
    );
    assert!(
        !other.0.exists(),
        "the failed start removed its pins: {:?}",
        pin_entries(&other.0)
    );
    let link = topo.lb_ns().exec_ok(&["ip", "link", "show", "to-c"]).unwrap();
    assert!(!link.contains("xdp"), "the program was detached:\n{link}");

    // 1. A start killed right after pinning its maps (stopped there by LB_TEST_STOP_AT, then
    //    SIGKILL): the maps stay pinned but were never configured. One pin is removed as well, as
    //    if the kill came in the middle of pinning.
    let dir = lb_tests::TempDir::new("xkill-killed");
    let socket = dir.path().join("lb.sock");
    let cfg = dir.path().join("lb.toml");
    std::fs::write(&cfg, config(&topo, &pins.0)(&socket)).unwrap();
    let mut cmd = topo
        .lb_ns()
        .command_net_only(lb_bin(), &["run", "-c", cfg.to_str().unwrap()]);
    cmd.env("LB_TEST_STOP_AT", "maps");
    let mut killed = Child::spawn(cmd).expect("spawn lb run");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stopped(killed.pid()) {
        assert!(
            killed.is_running() && Instant::now() < deadline,
            "lb run never reached its stop point\n{}",
            killed.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    killed.signal(Signal::SIGKILL).unwrap();
    killed
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("killed lb run reaped");
    let half = pin_entries(&pins.0);
    assert!(
        half.contains("lb_config") && half.contains("lb_conntrack"),
        "the killed start pinned its maps: {half:?}"
    );
    assert!(
        !half.iter().any(|p| p.starts_with("link_")),
        "killed before attaching: {half:?}"
    );
    std::fs::remove_file(pins.0.join("lb_affinity")).unwrap();

    // 2. The next start recognises the half-made directory and rebuilds it; it forwards.
    let lb = Lb::start(topo.lb_ns(), "xkill", config(&topo, &pins.0));
    let bed = Bed { lb, servers, topo };
    wait_checked(&bed, "web");
    wait_checked(&bed, "echo");
    assert!(
        bed.lb.log().contains("half-made"),
        "the rebuild is logged:\n{}",
        bed.lb.log()
    );
    assert_eq!(
        bed.get(bed.topo.client_primary_addr()),
        "b1",
        "forwards after the rebuild"
    );
    let running = pin_entries(&pins.0);
    assert!(
        running.contains("lb_affinity") && running.iter().any(|p| p.starts_with("link_")),
        "a complete pin directory: {running:?}"
    );

    // 3. A second daemon on the same pin_path is refused before it makes anything.
    let (ok, log) = failed_start(bed.topo.lb_ns(), "xkill-same", config(&bed.topo, &pins.0));
    assert!(!ok, "a second daemon on one pin_path must fail\n{log}");
    assert!(
        log.contains("another lb is running with [xdp] pin_path"),
        "a clear refusal:\n{log}"
    );
    assert!(
        !log.contains("XDP program attached"),
        "refused before attaching:\n{log}"
    );
    assert_eq!(
        pin_entries(&pins.0),
        running,
        "the running daemon's pins untouched"
    );

    // `lb cleanup` is refused too while the daemon runs on the pins.
    let out = bed
        .topo
        .lb_ns()
        .command_net_only(lb_bin(), &["cleanup", "-c", bed.lb.config.to_str().unwrap()])
        .output()
        .expect("lb cleanup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "lb cleanup under a running daemon must fail"
    );
    assert!(err.contains("an lb is running with [xdp] pin_path"), "{err}");
    assert_eq!(pin_entries(&pins.0), running, "lb cleanup removed nothing");

    // 4. A daemon on its own pin_path whose attach fails (the interfaces already run lb's
    //    program): it leaves no pins, no directory, no sysctl record.
    let (ok, log) = failed_start(bed.topo.lb_ns(), "xkill-other", config(&bed.topo, &other.0));
    assert!(!ok, "attaching over a running program must fail\n{log}");
    assert!(log.contains("cannot attach XDP"), "the attach error:\n{log}");
    assert!(
        !other.0.exists(),
        "the failed start removed its pins: {:?}",
        pin_entries(&other.0)
    );
    assert!(!sysctl_record(&other.0).exists(), "no sysctl record left");

    // The first daemon never noticed.
    assert_eq!(pin_entries(&pins.0), running);
    assert_eq!(bed.get(bed.topo.client_primary_addr()), "b1");
    let mut bed = bed;
    bed.lb.assert_running();
}

/// `[xdp] mode` left at `auto`: on loopback (not a veth, no native XDP) the program
/// attaches at XDP (skb mode, after driver mode was refused); once a veth end is among the
/// interfaces, the whole datapath runs at TC ingress (TCX links on both), and the log names the
/// veth.
#[test]
fn xdp_auto_takes_xdp_on_other_interfaces_and_tc_once_a_veth_is_among_them() {
    if !require_root("xdp_auto_takes_xdp_on_other_interfaces_and_tc_once_a_veth_is_among_them") {
        return;
    }
    let ns = Netns::new(&unique_prefix("xauto")).expect("namespace");
    for cmd in [
        &[
            "ip", "link", "add", "vauto0", "type", "veth", "peer", "name", "vauto1",
        ][..],
        &["ip", "link", "set", "lo", "up"],
        &["ip", "addr", "add", "10.99.1.1/24", "dev", "vauto0"],
        &["ip", "link", "set", "vauto0", "up"],
        &["ip", "link", "set", "vauto1", "up"],
    ] {
        ns.exec_ok(cmd).expect("set up the interfaces");
    }
    for (interfaces, tc) in [(&["lo"][..], false), (&["lo", "vauto0"], true)] {
        let pins = Pins::new(pin_dir(if tc { "autotc" } else { "autox" }));
        let list: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
        let mut lb = Daemon::start(&ns, "xauto", |socket| {
            format!(
                "shutdown_timeout = \"1s\"\n[control]\nsocket = \"{}\"\n\n[xdp]\ninterfaces = [{}]\npin_path = \"{}\"\n\
                 \n[[service]]\nname = \"web\"\nlisten = \"10.99.0.1:80\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"none\"\n\
                 \n[[service.backend]]\nname = \"b1\"\naddress = \"10.99.1.2:8080\"\n",
                socket.display(),
                list.join(", "),
                pins.0.display()
            )
        });
        let log = lb.log();
        let lo = ns.exec_ok(&["ip", "link", "show", "lo"]).unwrap();
        let tcx = tcx_ingress_programs(&ns, "lo");
        if tc {
            assert!(
                log.contains("[xdp] mode auto: the TC hook") && log.contains("vauto0"),
                "TC, and the veth named:\n{log}"
            );
            for interface in interfaces {
                assert_eq!(
                    tcx_ingress_programs(&ns, interface),
                    ["lb_tc"],
                    "{interface}: lb_tc at TC ingress"
                );
            }
            assert!(!lo.contains("xdp"), "no XDP program beside it:\n{lo}");
        } else {
            assert!(!log.contains("the TC hook"), "XDP on loopback:\n{log}");
            assert!(lo.contains("xdpgeneric"), "XDP in skb mode on lo:\n{lo}");
            assert!(tcx.is_empty(), "nothing at TC ingress: {tcx:?}");
        }
        lb.stop().expect("stop lb");
    }
}
