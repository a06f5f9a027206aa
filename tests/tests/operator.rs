//! What an operator's host needs from the `lb` command: client commands that find the daemon
//! (`-c FILE`, `$LB_SOCKET`, an empty `$LB_SOCKET` ignored), a closed stdout ending a command
//! quietly, and `lb cleanup` putting back the sysctls the XDP datapath changed.

mod common;

use std::process::{Command, Stdio};

use common::*;
use lb_tests::{Topology, lb_bin, require_root, unique_prefix};

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
    let pins = Pins(pin_dir("sysctl"));
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
