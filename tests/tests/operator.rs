//! What an operator's host needs from the `lb` command: client commands that find the daemon
//! (`-c FILE`, `$LB_SOCKET`, an empty `$LB_SOCKET` ignored), a closed stdout ending a command
//! quietly, `lb cleanup` putting back the sysctls the XDP datapath changed, and `lb run` speaking
//! systemd's notify protocol (readiness, watchdog, stopping).

mod common;

use std::process::{Command, Stdio};

use common::*;
use lb_tests::{TempDir, Topology, lb_bin, require_root, unique_prefix};

/// `lb ARGS…` with `$LB_SOCKET` as given (None: unset).
fn lb(args: &[&str], lb_socket: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(lb_bin());
    cmd.args(args);
    match lb_socket {
        Some(v) => cmd.env("LB_SOCKET", v),
        None => cmd.env_remove("LB_SOCKET"),
    };
    cmd.output().expect("run lb")
}

fn proxy_bed(tag: &str) -> Bed {
    Bed::new(tag, 1, 1, |topo, socket| {
        config_toml(socket, "", "", &std_services(topo, 1, false))
    })
}

#[test]
fn client_commands_find_the_daemon_from_the_config_or_lb_socket() {
    if !require_root("client_commands_find_the_daemon_from_the_config_or_lb_socket") {
        return;
    }
    let bed = proxy_bed("find");
    let cfg = bed.lb.config.to_str().unwrap();
    let socket = bed.lb.socket.to_str().unwrap();

    // -c FILE: the file's [control] socket, before or after the subcommand's own arguments.
    for args in [
        &["status", "-c", cfg][..],
        &["backend", "list", "web", "-c", cfg][..],
        &["which", "-c", cfg, "web", "10.0.0.1"][..],
    ] {
        let out = lb(args, None);
        assert!(
            out.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = lb(&["status", "-c", cfg], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("service web"));
    // -c wins over $LB_SOCKET.
    let out = lb(&["status", "-c", cfg, "--json"], Some("/nonexistent/lb.sock"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);

    // $LB_SOCKET alone.
    let out = lb(&["status"], Some(socket));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // An empty $LB_SOCKET is ignored (not a usage error): the next places are tried and the
    // error says which socket was tried and where it came from.
    let out = lb(&["status"], Some(""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect to the control socket"), "{err}");
    assert!(
        err.contains("(the default)") || err.contains("(from /etc/lb/lb.toml)"),
        "{err}"
    );
    // With --socket, an empty $LB_SOCKET does not matter either.
    let out = lb(&["status", "--socket", socket], Some(""));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A config that names another socket: the error names that socket and the file.
    let other = bed.lb.dir.path().join("other.toml");
    std::fs::write(&other, "[control]\nsocket = \"/nonexistent/other.sock\"\n").unwrap();
    let out = lb(&["stats", "-c", other.to_str().unwrap()], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/other.sock") && err.contains("other.toml"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    if !require_root("a_closed_stdout_ends_a_command_quietly") {
        return;
    }
    let bed = proxy_bed("pipe");
    let cfg = bed.lb.config.to_str().unwrap();
    for args in [&["status", "--json", "-c", cfg][..], &["stats", "-c", cfg][..]] {
        let mut child = Command::new(lb_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lb");
        // Close the read end before lb writes: its write fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "lb {args:?}: {} {err}", out.status);
        assert!(err.is_empty(), "lb {args:?} wrote to stderr: {err}");
    }
}

#[test]
fn cleanup_restores_the_sysctls_lb_changed() {
    if !require_root("cleanup_restores_the_sysctls_lb_changed") {
        return;
    }
    let pins = Pins::new(pin_dir("sysctl"));
    let topo = Topology::new(&unique_prefix("sysctl"), 1, 1).expect("topology");
    let ns = topo.lb_ns();
    // The host's own values, all different from what the XDP datapath sets.
    let before = [
        ("net.ipv4.conf.to-c.accept_local", "0"),
        ("net.ipv4.conf.to-b1.accept_local", "0"),
        ("net.ipv4.conf.to-b1.forwarding", "0"),
        ("net.ipv4.ip_local_reserved_ports", "5000-5001"),
    ];
    for (k, v) in before {
        ns.sysctl(k, v).unwrap();
    }
    let mut lb = Lb::start(ns, "sysctl", |socket| {
        xdp_config(&topo, socket, &pins.0, 1, &[("web", 80, HTTP_PORT)], "")
    });
    let get = |k: &str| ns.sysctl_get(k).unwrap();
    assert_eq!(get("net.ipv4.conf.to-c.accept_local"), "1");
    assert_eq!(get("net.ipv4.conf.to-b1.forwarding"), "1");
    assert_eq!(get("net.ipv4.ip_local_reserved_ports"), "5000-5001,10000-29999");

    // A restart adopts the pins; the record keeps the host's values, not lb's own.
    lb.child.stop().unwrap();
    lb.run_again(ns);
    lb.child.stop().unwrap();

    let cfg = lb.config.to_str().unwrap().to_string();
    let out = ns
        .command_net_only(lb_bin(), &["cleanup", "-c", cfg.as_str()])
        .output()
        .expect("lb cleanup");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lb cleanup: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (k, v) in before {
        assert_eq!(get(k), v, "{k} after lb cleanup:\n{text}");
        assert!(text.contains(&format!("restored {k} = {v}")), "{text}");
    }
    // to-c forwarding was already on (ip_forward = 1): lb did not change it, so nothing to restore.
    assert!(!text.contains("to-c.forwarding"), "{text}");
    assert!(!pins.0.exists(), "pins left behind");
    let record = format!(
        "/run/lb/sysctl/{}.json",
        pins.0.display().to_string().replace('/', "%2F")
    );
    assert!(
        !std::path::Path::new(&record).exists(),
        "sysctl record {record} left behind"
    );
    // A second cleanup finds nothing to do.
    let out = ns
        .command_net_only(lb_bin(), &["cleanup", "-c", cfg.as_str()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("restored"));
}

/// Datagrams received on `rx` until `done` holds for them or `timeout` passes.
fn notifications(
    rx: &std::os::unix::net::UnixDatagram,
    timeout: std::time::Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) && std::time::Instant::now() < deadline {
        if let Ok(n) = rx.recv(&mut buf) {
            got.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
        }
    }
    got
}

#[test]
fn lb_run_tells_systemd_it_is_ready_pings_the_watchdog_and_says_it_stops() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    // A notify socket as systemd's (Type=notify, WatchdogSec=): no root or namespace needed.
    let dir = TempDir::new("notify");
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let socket = dir.path().join("lb.sock");
    let cfg = dir.path().join("lb.toml");
    std::fs::write(
        &cfg,
        format!(
            "shutdown_timeout = \"1s\"\n[control]\nsocket = \"{}\"\n",
            socket.display()
        ),
    )
    .unwrap();
    // systemd names the watched process in WATCHDOG_PID: the shell's pid, which exec gives lb.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run -c \"$1\"")
        .arg(lb_bin())
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000");
    let mut lb = lb_tests::Child::spawn(cmd).expect("spawn lb run");

    let got = notifications(&rx, Duration::from_secs(10), |g| g.iter().any(|l| l == "READY=1"));
    assert!(
        got.iter().any(|l| l == "READY=1"),
        "no READY=1: {got:?}\n{}",
        lb.stderr_text()
    );
    // Ready means the control socket answers.
    let out = self::lb(&["status", "--socket", socket.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // WatchdogSec=200ms: pinged every 100ms from the main loop.
    let pings = notifications(&rx, Duration::from_secs(5), |g| {
        g.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
    });
    assert!(
        pings.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3,
        "watchdog pings: {pings:?}"
    );
    lb.stop().unwrap();
    let rest = notifications(&rx, Duration::from_secs(2), |g| {
        g.iter().any(|l| l == "STOPPING=1")
    });
    assert!(rest.iter().any(|l| l == "STOPPING=1"), "{rest:?}");

    // Without NOTIFY_SOCKET nothing is sent and lb runs as before.
    drop(rx);
    let mut cmd = Command::new(lb_bin());
    cmd.arg("run").arg("-c").arg(&cfg).env_remove("NOTIFY_SOCKET");
    assert!(!socket.exists(), "the first lb removed its socket");
    let mut plain = lb_tests::Child::spawn(cmd).expect("spawn lb run");
    // SIGTERM the moment the socket appears (as a service manager may): lb's handler is in place
    // before the socket, so it shuts down cleanly (exit 0) instead of dying by the signal.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", plain.stderr_text());
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = plain.stop().unwrap();
    assert!(status.success(), "{status}\n{}", plain.stderr_text());
}
