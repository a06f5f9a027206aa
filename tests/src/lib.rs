//! `lb_tests`: the network-namespace harness behind `lb`'s end-to-end tests and `lb-demo`.
//!
//! A tour:
//!
//! - [`netns`]: [`Netns`] (an `ip netns` namespace deleted on drop) and [`in_netns`], which runs a
//!   closure on a thread that has joined a namespace, so a test in the root namespace can open
//!   sockets *inside* a test namespace without spawning processes.
//! - [`child`]: [`Child`], a spawned process that is terminated (SIGTERM, then SIGKILL after a
//!   grace period) on drop, with its stdout/stderr captured and a wait for a `ready` line.
//! - [`topology`]: [`Topology`], the standard client / load balancer / backends layout
//!   (`<prefix>-c`, `<prefix>-lb`, `<prefix>-b1..bN`) wired with veth pairs.
//! - [`client`]: client-side helpers: [`connect_from`] (bind a source IP in a namespace),
//!   [`http_get_from`], [`HttpConn`] (keep-alive requests), [`ajp_cping`].
//! - [`servers`]: starting `lb-testsrv` backends ([`start_http_backends`], [`start_echo_backends`],
//!   [`start_ajp_backend`]).
//! - [`daemon`]: [`Daemon`], `lb run` with a config and control socket in a [`TempDir`], waited
//!   for until it answers; requests, status polling, the CLI, log tail, restart and stop.
//! - [`ecmp`]: [`ecmp::Ecmp`], two lb nodes behind a router doing ECMP over routes learnt with
//!   BGP, each node and the router running a [`ecmp::Bird`] (BIRD 2); backends on a shared LAN,
//!   set up for NAT or, with [`ecmp::Forwarding::Dsr`], for `forwarding = "dsr"` (replies bypass
//!   the nodes; [`decap::attach_decap`] decapsulates on the backends).
//! - [`tempdir`]: [`TempDir`] (the `tempfile` crate's, mode 0755, named after the test).
//! - [`packet`]: Ethernet/IPv4/TCP and ARP frame builder and parser (checksums by
//!   `lb_common::csum`) for the XDP fixtures, the eBPF unit tests and the micro-benchmarks.
//! - [`synflood`]: [`synflood::SynFlood`], a spoofed SYN generator (AF_PACKET raw frames from
//!   random addresses of a test range) for the SYN-flood test.
//! - [`kernel_maps`]: a read-only dump of a daemon's pinned XDP maps, to compare before and after.
//! - [`fixture`]: the BPF_PROG_TEST_RUN fixture namespace (veth links, VIP, permanent neighbours)
//!   where `bpf_fib_lookup` gets real answers.
//! - [`tomcat`]: a real Tomcat 10 (private `CATALINA_BASE`, AJP connector, optional `jvmRoute`,
//!   secret and a session-printing JSP); [`apache`]: a real Apache httpd in front (mod_proxy_ajp,
//!   mod_proxy_balancer or mod_jk); [`webtier`]: the web namespace between client and lb, and
//!   [`webtier::Browser`], an HTTP client with a session cookie; [`ajp_client`]: a raw AJP 1.3
//!   client (Forward Request with any attributes, Shutdown, CPing).
//! - `src/bin/testsrv.rs`: the `lb-testsrv` backend binary (http / echo / ajp modes);
//!   `src/bin/demo.rs`: `lb-demo`, the sticky-session and drain walk-through.
//!
//! Rules the harness keeps: traffic stays inside the test namespaces (or loopback); namespace names
//! carry a per-test prefix (use [`unique_prefix`]); namespaces and processes are cleaned up on drop,
//! also when a test panics. Declare the [`Topology`] *before* the [`Child`]ren that run in it so the
//! processes are stopped before the namespaces are deleted (locals drop in reverse order).
//! Tests needing root call [`require_root`] first and return early when it says no.

pub mod ajp_client;
pub mod apache;
pub mod child;
pub mod client;
pub mod daemon;
pub mod decap;
pub mod ecmp;
pub mod fixture;
pub mod kernel_maps;
pub mod loops;
pub mod netns;
pub mod packet;
pub mod pins;
pub mod servers;
pub mod synflood;
pub mod tempdir;
pub mod tomcat;
pub mod topology;
pub mod webtier;

use std::io::Write;
use std::path::PathBuf;

pub use child::{Child, run_with_timeout};
pub use client::{
    HttpConn, HttpResponse, ajp_cping, ajp_cping_from, connect_from, http_get_from, http_request_from,
};
pub use daemon::{Daemon, Enter};
pub use netns::{Netns, in_netns};
pub use pins::{PinDir, Pins};
pub use servers::{AjpMode, start_ajp_backend, start_echo_backends, start_http_backends};
pub use tempdir::TempDir;
pub use topology::Topology;

/// AJP 1.3 CPing as sent by a web server to the container.
pub const AJP_CPING: [u8; 5] = [0x12, 0x34, 0x00, 0x01, 0x0A];
/// AJP 1.3 CPong as the container answers.
pub const AJP_CPONG: [u8; 5] = [0x41, 0x42, 0x00, 0x01, 0x09];

/// True when running as root. Otherwise prints `SKIP: <test_name> needs root` straight to the
/// process's stderr (not through the test harness's output capture, so the skip is visible).
pub fn require_root(test_name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let _ = writeln!(std::io::stderr(), "SKIP: {test_name} needs root");
    false
}

/// A namespace-name prefix unique to this test and process: `lbt-<short>-<pid>`.
/// Keep `short` brief (≤ 8 chars); the namespace names derived from it are `<prefix>-lb` etc.
pub fn unique_prefix(short: &str) -> String {
    format!("lbt-{short}-{}", std::process::id())
}

/// The workspace root (`tests/..`).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

fn target_debug_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir.join("debug")
            } else {
                workspace_dir().join(dir).join("debug")
            }
        }
        None => workspace_dir().join("target").join("debug"),
    }
}

fn locate(env_var: &str, file: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(p) => PathBuf::from(p),
        None => target_debug_dir().join(file),
    };
    assert!(
        path.is_file(),
        "{file} binary not found at {} (set {env_var} to override); run `cargo xtask build` first",
        path.display()
    );
    path
}

/// The `lb` binary: `$LB_BIN`, else `<workspace>/target/debug/lb`. Panics with a hint if missing.
pub fn lb_bin() -> PathBuf {
    locate("LB_BIN", "lb")
}

/// The `lb-testsrv` binary: `$LB_TESTSRV`, else `<workspace>/target/debug/lb-testsrv`.
/// Panics with a hint if missing.
pub fn testsrv_bin() -> PathBuf {
    locate("LB_TESTSRV", "lb-testsrv")
}

/// For each `fn name(hook: Hook)` of the calling module, the tests `name::xdp` and `name::tc`: the
/// same test run with the XDP datapath's program at the XDP hook and at TC ingress. `Hook` is the
/// caller's own (an enum with `Xdp` and `Tc`, in scope where the macro is used).
#[macro_export]
macro_rules! per_hook {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn xdp() {
                    super::$name(super::Hook::Xdp)
                }
                #[test]
                fn tc() {
                    super::$name(super::Hook::Tc)
                }
            }
        )+
    };
}
