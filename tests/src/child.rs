//! [`Child`]: a spawned process with captured output, stopped by PID on drop.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Default time to wait for a `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default grace between SIGTERM and SIGKILL when stopping a child.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    eof: bool,
}

#[derive(Default)]
struct Stream {
    state: Mutex<Captured>,
    cond: Condvar,
}

impl Stream {
    fn pump(self: Arc<Self>, pipe: impl Read + Send + 'static) {
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        self.state.lock().unwrap().lines.push(line);
                        self.cond.notify_all();
                    }
                }
            }
            self.state.lock().unwrap().eof = true;
            self.cond.notify_all();
        });
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Wait until the pipe reached EOF (or `timeout`); true on EOF.
    fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        while !st.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.cond.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }
}

/// Run `cmd` to completion with captured output, but give up after `timeout`: the process is then
/// stopped (SIGTERM, SIGKILL) and a `TimedOut` error carries what it printed so far.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> io::Result<Output> {
    let mut child = Child::spawn(cmd)?;
    match child.wait_timeout(timeout)? {
        Some(status) => {
            // The pipes may still hold the last lines; let the readers finish.
            child.stdout.wait_eof(Duration::from_secs(2));
            child.stderr.wait_eof(Duration::from_secs(2));
            let join = |lines: Vec<String>| {
                let mut s = lines.join("\n");
                if !s.is_empty() {
                    s.push('\n');
                }
                s.into_bytes()
            };
            Ok(Output {
                status,
                stdout: join(child.stdout_lines()),
                stderr: join(child.stderr_lines()),
            })
        }
        None => {
            let _ = child.stop();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    child.desc,
                    child.stdout_lines().join("\n"),
                    child.stderr_text()
                ),
            ))
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
///
/// Its stdout and stderr are read by background threads and kept line by line, so a test can wait
/// for a line ([`Child::wait_for_line`]) and show the logs when something goes wrong
/// ([`Child::stderr_text`]).
pub struct Child {
    inner: std::process::Child,
    desc: String,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.pid())
            .field("cmd", &self.desc)
            .finish()
    }
}

impl Child {
    /// Spawn `cmd` with stdin from /dev/null and stdout/stderr captured.
    pub fn spawn(mut cmd: Command) -> io::Result<Child> {
        let desc = format!("{cmd:?}");
        let mut inner = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {desc}: {e}")))?;
        let stdout = Arc::new(Stream::default());
        let stderr = Arc::new(Stream::default());
        stdout.clone().pump(inner.stdout.take().expect("piped stdout"));
        stderr.clone().pump(inner.stderr.take().expect("piped stderr"));
        Ok(Child {
            inner,
            desc,
            stdout,
            stderr,
            grace: STOP_GRACE,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// The command line this child was started with (for messages).
    pub fn description(&self) -> &str {
        &self.desc
    }

    /// Set the SIGTERM → SIGKILL grace used by [`Child::stop`] and drop.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Wait until stdout has a line equal to `ready` (surrounding whitespace ignored).
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        self.wait_for_line(|l| l.trim() == "ready", timeout).map(|_| ())
    }

    /// Wait until a stdout line satisfies `pred` (lines already printed count) and return it.
    /// Fails on timeout or if stdout closes first, with the exit status and stderr in the message.
    pub fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.state.lock().unwrap();
        let mut checked = 0;
        loop {
            if let Some(l) = state.lines[checked..].iter().find(|l| pred(l)) {
                return Ok(l.clone());
            }
            checked = state.lines.len();
            let now = Instant::now();
            if state.eof || now >= deadline {
                let eof = state.eof;
                drop(state);
                let why = if eof {
                    // Give the exit status a moment to become available.
                    let t = Instant::now();
                    let mut st = None;
                    while st.is_none() && t.elapsed() < Duration::from_millis(500) {
                        st = self.try_wait()?;
                        if st.is_none() {
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                    match st {
                        Some(s) => format!("exited ({s}) before printing the expected line"),
                        None => "closed stdout before printing the expected line".to_string(),
                    }
                } else {
                    format!("did not print the expected line within {timeout:?}")
                };
                return Err(io::Error::new(
                    if eof {
                        io::ErrorKind::UnexpectedEof
                    } else {
                        io::ErrorKind::TimedOut
                    },
                    format!(
                        "{} (pid {}) {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.desc,
                        self.pid(),
                        self.stdout_lines().join("\n"),
                        self.stderr_text()
                    ),
                ));
            }
            state = self.stdout.cond.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// All stdout lines captured so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// All stderr lines captured so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// Captured stderr as one string.
    pub fn stderr_text(&self) -> String {
        self.stderr.lines().join("\n")
    }

    /// The exit status if the process has exited (does not block).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.inner.try_wait()?;
        }
        Ok(self.status)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Send `sig` to the process (by its PID). No-op once it has exited and been reaped.
    pub fn signal(&mut self, sig: Signal) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), sig).map_err(io::Error::from)
    }

    /// Wait up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                // The pipes are read by threads: let them reach the end, so what the process
                // wrote before exiting is all there.
                self.stdout.wait_eof(Duration::from_secs(2));
                self.stderr.wait_eof(Duration::from_secs(2));
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the process: SIGTERM, wait up to the grace period, then SIGKILL. Returns its exit
    /// status (a SIGTERM-ed process that exits cleanly reports success).
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(s) = self.wait_timeout(self.grace)? {
            return Ok(s);
        }
        let _ = writeln!(
            io::stderr(),
            "lb_tests: {} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.desc,
            self.pid(),
            self.grace
        );
        self.signal(Signal::SIGKILL)?;
        let s = self.inner.wait()?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
