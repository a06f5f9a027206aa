//! [`Daemon`]: `lb run -c <config>` in a test namespace with its config file and control socket in
//! a [`TempDir`], started and waited for until the control socket answers; then requests, status
//! polling, the `lb` CLI against it, its log, a restart with the same config, and stop (on drop).

use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Child, Netns, TempDir, lb_bin, run_with_timeout};

/// How long the `lb` CLI may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `lb run` may take to answer on its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How `lb run` enters the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enter {
    /// `ip netns exec`: network namespace and a private mount namespace.
    Namespace,
    /// `nsenter --net` only: the daemon sees the host's /sys/fs/bpf, so its pins outlive it.
    NetOnly,
}

/// Sends `bytes` (one request line, or anything) on a fresh control connection and reads one
/// response line.
pub fn raw_request(socket: &Path, bytes: &[u8]) -> io::Result<Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&stream).write_all(bytes)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))
}

/// `status.services[name=service]`.
pub fn service_of<'a>(st: &'a Value, service: &str) -> &'a Value {
    st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .unwrap_or_else(|| panic!("service {service} missing from status: {st}"))
}

/// `status.services[name=service].backends[name=backend]`, if present.
pub fn backend_of<'a>(st: &'a Value, service: &str, backend: &str) -> Option<&'a Value> {
    service_of(st, service)["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == backend))
}

/// A running `lb run`. Field order is drop order: the daemon (stopped by [`Child`]'s drop)
/// before its directory. Declare it after the namespaces it runs in.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub dir: TempDir,
    pub enter: Enter,
}

impl Daemon {
    /// Writes `config(socket path)` to `lb.toml` in a fresh temp dir and spawns
    /// `lb run -c lb.toml ARGS…` in `ns`, without waiting for it.
    pub fn spawn(
        ns: &Netns,
        enter: Enter,
        tag: &str,
        args: &[&str],
        config: impl FnOnce(&Path) -> String,
    ) -> Daemon {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("lb.sock");
        let cfg = dir.path().join("lb.toml");
        std::fs::write(&cfg, config(&socket)).unwrap_or_else(|e| panic!("writing {}: {e}", cfg.display()));
        let child = Daemon::launch(ns, enter, &cfg, args);
        Daemon {
            child,
            socket,
            config: cfg,
            dir,
            enter,
        }
    }

    fn launch(ns: &Netns, enter: Enter, cfg: &Path, extra: &[&str]) -> Child {
        let mut args = vec!["run", "-c", cfg.to_str().expect("UTF-8 temp path")];
        args.extend_from_slice(extra);
        let cmd = match enter {
            Enter::Namespace => ns.command(lb_bin(), &args),
            Enter::NetOnly => ns.command_net_only(lb_bin(), &args),
        };
        Child::spawn(cmd).expect("spawn lb run")
    }

    /// [`Daemon::spawn`] with `nsenter --net` (pins outlive the daemon), then waits until the
    /// control socket answers.
    pub fn start(ns: &Netns, tag: &str, config: impl FnOnce(&Path) -> String) -> Daemon {
        Daemon::start_in(ns, Enter::NetOnly, tag, config)
    }

    /// [`Daemon::spawn`] entering `ns` as `enter` says, then waits until the control socket
    /// answers.
    pub fn start_in(ns: &Netns, enter: Enter, tag: &str, config: impl FnOnce(&Path) -> String) -> Daemon {
        let mut d = Daemon::spawn(ns, enter, tag, &[], config);
        d.wait_ready(START_TIMEOUT);
        d
    }

    /// Starts `lb run` again with the same (possibly edited) config file after the previous one
    /// stopped; returns once it answers.
    pub fn run_again(&mut self, ns: &Netns) {
        self.child = Daemon::launch(ns, self.enter, &self.config, &[]);
        self.wait_ready(START_TIMEOUT);
    }

    /// Waits until `status` on the control socket succeeds; panics with the config and log if
    /// the daemon exits or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for lb run") {
                let config = std::fs::read_to_string(&self.config).unwrap_or_default();
                panic!(
                    "lb run exited early ({st})\n--- config ---\n{config}\n--- log ---\n{}",
                    self.log()
                );
            }
            if self.try_status().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "lb did not answer on {} within {timeout:?}\n--- log ---\n{}",
                self.socket.display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after the grace period).
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        self.child.stop()
    }

    /// One request line on a fresh control connection; the response.
    pub fn request(&self, bytes: &[u8]) -> io::Result<Value> {
        raw_request(&self.socket, bytes)
    }

    /// `{"cmd":"status"}` over the control socket; the `result` object.
    pub fn try_status(&self) -> Result<Value, String> {
        let v = self
            .request(b"{\"cmd\":\"status\"}\n")
            .map_err(|e| e.to_string())?;
        if v["ok"] != Value::Bool(true) {
            return Err(format!("status refused: {v}"));
        }
        Ok(v["result"].clone())
    }

    /// [`Daemon::try_status`], which must succeed.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("lb status failed: {e}\n--- log ---\n{}", self.log_tail(60)))
    }

    /// Polls the status every 10 ms until `pred` holds; returns that status and when it was
    /// fetched. Panics after `timeout` with the last status and the log's tail.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            let at = Instant::now();
            if pred(&st) {
                return (st, at);
            }
            assert!(
                at < deadline,
                "timed out after {timeout:?} waiting for: {what}\n--- status ---\n{}\n--- log ---\n{}",
                serde_json::to_string_pretty(&st).unwrap_or_default(),
                self.log_tail(60)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.child.stderr_text()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.child.stderr_lines();
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// Panics with the log unless the daemon is still running.
    pub fn assert_running(&mut self) {
        assert!(
            self.child.is_running(),
            "lb daemon exited\n--- log ---\n{}",
            self.log()
        );
    }

    /// `lb --socket S ARGS…` (root namespace), whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(lb_bin());
        cmd.arg("--socket").arg(&self.socket).args(args);
        run_with_timeout(cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("lb {args:?}: {e}"))
    }

    /// `lb ARGS…`, which must exit 0; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lb {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `lb --json ARGS…`, which must succeed; the `result` object.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let text = self.cli_ok(&full);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("lb {full:?}: {e}: {text}"));
        assert_eq!(v["ok"], true, "lb {full:?}: {v}");
        v["result"].clone()
    }

    /// The status entry of backend `name` in `service` (None when absent).
    pub fn backend(&self, service: &str, name: &str) -> Option<Value> {
        backend_of(&self.status(), service, name).cloned()
    }

    /// Backend names of `service` in status.
    pub fn backend_names(&self, service: &str) -> Vec<String> {
        let st = self.status();
        service_of(&st, service)["backends"]
            .as_array()
            .expect("backends array")
            .iter()
            .map(|b| b["name"].as_str().expect("backend name").to_string())
            .collect()
    }

    /// The health transitions of `service/backend` from `lb stats`: (unix ms, to, reason).
    pub fn health_transitions(&self, service: &str, backend: &str) -> Vec<(u64, String, String)> {
        let stats = self.request(b"{\"cmd\":\"stats\"}\n").expect("stats");
        let be = backend_of(&stats["result"], service, backend)
            .unwrap_or_else(|| panic!("no {service}/{backend}: {stats}"));
        be["transitions"]
            .as_array()
            .expect("transitions")
            .iter()
            .filter(|t| t["kind"] == "health")
            .map(|t| {
                (
                    t["unix_ms"].as_u64().unwrap(),
                    t["to"].as_str().unwrap().to_string(),
                    t["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// `lb which SERVICE IP --json`: (backend or None, reason).
    pub fn which(&self, service: &str, ip: Ipv4Addr) -> (Option<String>, String) {
        let r = self.json(&["which", service, &ip.to_string()]);
        (
            r["backend"].as_str().map(String::from),
            r["reason"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// The one backend of `service` with an open connection (panics unless exactly one has).
    pub fn only_active_backend(&self, service: &str) -> String {
        let st = self.status();
        let svc = service_of(&st, service);
        let active: Vec<String> = svc["backends"]
            .as_array()
            .expect("backends array")
            .iter()
            .filter(|b| b["active_connections"].as_u64().unwrap_or(0) > 0)
            .map(|b| b["name"].as_str().expect("backend name").to_string())
            .collect();
        assert_eq!(
            active.len(),
            1,
            "expected one backend of {service} with an open connection: {svc}"
        );
        active[0].clone()
    }
}
