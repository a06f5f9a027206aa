//! Named network namespaces (`ip netns`), deleted on drop, and [`in_netns`] to run code inside one.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;

use crate::child::Child;

/// Where `ip netns` keeps its bind-mounted namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of the namespace handle for `name` (`/run/netns/<name>`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// True when `ip netns` knows a namespace called `name`.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Run `f` on a fresh thread that has joined the network namespace `name` (via `setns(2)` on
/// `/run/netns/<name>`; `CLONE_NEWNET` affects only the calling thread) and return its result.
///
/// Sockets created inside `f` stay in that namespace for their whole life, so returning a
/// `TcpStream` and using it from the calling thread is fine. A panic inside `f` is propagated.
pub fn in_netns<T, F>(name: &str, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns = File::open(netns_path(name)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot open namespace {name} ({}): {e}",
                netns_path(name).display()
            ),
        )
    })?;
    thread::scope(|s| {
        let handle = s.spawn(move || -> io::Result<T> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("setns into {name}: {e}")))?;
            drop(ns);
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Run a command and turn a non-zero exit into an error carrying its stderr.
pub(crate) fn check_output(what: &str, out: Output) -> io::Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `ip <args>` in the root namespace; error (with stderr) unless it exits 0.
pub(crate) fn ip(args: &[&str]) -> io::Result<Output> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output()?;
    check_output(&format!("ip {}", args.join(" ")), out)
}

/// A named network namespace created with `ip netns add` and deleted with `ip netns delete` on drop.
///
/// Processes still running inside keep the (now anonymous) namespace alive; stop them first by
/// dropping their [`Child`] before the `Netns`.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create the namespace `name` (deleting a stale one of the same name first, e.g. left over by
    /// a crashed run) and bring its `lo` up.
    pub fn new(name: &str) -> io::Result<Netns> {
        if name.is_empty() || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad namespace name {name:?}"),
            ));
        }
        if netns_exists(name) {
            let _ = ip(&["netns", "delete", name]);
        }
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` running `program args…` inside the namespace (`ip netns exec NAME program …`).
    /// `ip netns exec` execs the program directly, so a spawned child's PID is the program's PID.
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns")
            .arg("exec")
            .arg(&self.name)
            .arg(program)
            .args(args);
        cmd
    }

    /// Like [`Netns::command`] but entering only the network namespace (`nsenter --net`), not the
    /// private mount namespace `ip netns exec` sets up: the program sees the host's /sys/fs/bpf,
    /// so BPF objects it pins outlive it (as under systemd).
    pub fn command_net_only<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns_path(&self.name).display()))
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    /// Run `args[0] args[1..]` inside the namespace, wait, and return its output (whatever the exit
    /// status). `args` must not be empty.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> io::Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "exec: empty command"))?;
        self.command(program, rest).stdin(Stdio::null()).output()
    }

    /// Like [`Netns::exec`] but a non-zero exit is an error; returns stdout as text.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> io::Result<String> {
        let what = format!(
            "ip netns exec {} {}",
            self.name,
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = check_output(&what, self.exec(args)?)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Spawn `program args…` inside the namespace as a [`Child`] (stdout/stderr captured, killed
    /// on drop). Use [`Child::wait_ready`] to wait for its `ready` line.
    pub fn spawn<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> io::Result<Child> {
        Child::spawn(self.command(program, args))
    }

    /// `ip -n NAME <args>`; error (with stderr) unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Run several `ip` commands in one process: `ip -n NAME -batch -` (one command per line,
    /// without the leading `ip`). Stops at the first failing line.
    pub fn ip_batch(&self, lines: &[String]) -> io::Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            for l in lines {
                writeln!(stdin, "{l}")?;
            }
        }
        let out = child.wait_with_output()?;
        check_output(
            &format!("ip -n {} -batch - ({} commands)", self.name, lines.len()),
            out,
        )
        .map(|_| ())
    }

    /// Write a sysctl (`net.ipv4.ip_forward` style key) inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        in_netns(&self.name, move || std::fs::write(&path, value.as_bytes()))?
            .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key} in {}: {e}", self.name)))
    }

    /// Read a sysctl inside this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> io::Result<String> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let v = in_netns(&self.name, move || std::fs::read_to_string(&path))??;
        Ok(v.trim().to_string())
    }

    /// Run `f` on a thread inside this namespace (see [`in_netns`]).
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> io::Result<T> {
        in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            let _ = writeln!(io::stderr(), "lb_tests: deleting namespace {}: {e}", self.name);
        }
    }
}
