//! Runtime changes at 1,000 backends: a proxy service grows from 1 to 1,000 backends through the
//! control socket, one `add-backend` request each and then as one `add-backends` request, while a
//! client measures the proxy's connection latency before, during and after. Also drain/enable of
//! one backend at 1,000 backends, and the same growth and drain/enable with a `state_file`
//! (written after changes). Measured, never asserted.
//!
//! Everything runs in a namespace of its own (loopback only): the daemon, an HTTP responder on
//! 0.0.0.0:9000 (so every backend 127.1.x.y:9000 reaches it) and the client. Per-change time is
//! the control request's round trip as the client sees it; the daemon's own split (state with the
//! Maglev rebuild, datapath, rest) comes from its `applied` log lines.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{Child, Netns, run_with_timeout};
use serde_json::{Value, json};

use super::bed::{Reaper, TempDir};
use super::micro::Entry;
use super::report::shorten;

const BACKENDS: usize = 1000;
/// Drain/enable pairs of one backend at 1,000 backends (400 changes: a p99 of 400 samples).
const SET_STATE_PAIRS: usize = 200;
const LISTEN: &str = "127.0.0.1:8080";

/// The address of backend `i` (all reach the responder on 0.0.0.0:9000).
fn address(i: usize) -> String {
    format!("127.1.{}.{}:9000", i / 250, i % 250 + 1)
}

fn config(dir: &Path, state_file: bool) -> String {
    let mut c = String::new();
    if state_file {
        let _ = writeln!(c, "state_file = \"{}\"", dir.join("state.json").display());
    }
    let _ = write!(
        c,
        "log_level = \"info\"\nring_size = 100003\nshutdown_timeout = \"0s\"\n\n[control]\nsocket = \"{}\"\n\n\
         [[service]]\nname = \"big\"\nlisten = \"{LISTEN}\"\ndatapath = \"proxy\"\n\n[service.health]\nkind = \"none\"\n\n\
         [[service.backend]]\nname = \"b0\"\naddress = \"{}\"\n",
        dir.join("lb.sock").display(),
        address(0)
    );
    c
}

/// Quantiles of a list of milliseconds: (median, p99, max, count).
fn quantiles(mut v: Vec<f64>) -> Option<(f64, f64, f64, usize)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99), v[v.len() - 1], v.len()))
}

/// One control connection, kept open for many requests.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(socket: &Path) -> Result<Control, String> {
        let s = UnixStream::connect(socket).map_err(|e| format!("control socket: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Control {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends one request; its round trip in ms.
    fn request(&mut self, request: &Value) -> Result<f64, String> {
        let started = Instant::now();
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer).map_err(|e| e.to_string())?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        let v: Value = serde_json::from_str(&answer).map_err(|e| format!("{e}: {answer}"))?;
        if v["ok"] != true {
            return Err(format!("{request} refused: {}", v["error"]));
        }
        Ok(took)
    }
}

/// The daemon in its namespace, the responder, and a client timing connections.
struct Bed {
    ns: Netns,
    dir: TempDir,
    daemon: Child,
    _reaper: Reaper,
}

impl Bed {
    fn start(lb: &Path, tag: &str, state_file: bool) -> Result<Bed, String> {
        let name = format!("lbb-{}-{tag}", std::process::id());
        let dir =
            TempDir::try_in(&std::env::temp_dir(), &format!("{name}.d")).map_err(|e| format!("{e:#}"))?;
        let cfg = dir.path().join("lb.toml");
        std::fs::write(&cfg, config(dir.path(), state_file)).map_err(|e| e.to_string())?;
        let ns = Netns::new(&name).map_err(|e| e.to_string())?;
        let reaper = Reaper::new(vec![name.clone()]);
        ns.ip(&["link", "set", "lo", "up"]).map_err(|e| e.to_string())?;
        let cfg_s = cfg.display().to_string();
        let mut daemon = Child::spawn({
            let mut c = ns.command(lb, &["run", "-c", cfg_s.as_str()]);
            c.env("NO_COLOR", "1");
            // Drain and enable log their `applied` line at debug.
            c.env("LB_LOG", "info,lb::engine=debug");
            c
        })
        .map_err(|e| e.to_string())?;
        let socket = dir.path().join("lb.sock").display().to_string();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = daemon.try_wait() {
                return Err(format!(
                    "lb run exited ({st}): {}",
                    shorten(&daemon.stderr_text(), 300)
                ));
            }
            let mut status = std::process::Command::new(lb);
            status.args(["--socket", socket.as_str(), "status"]);
            if run_with_timeout(status, Duration::from_secs(5)).is_ok_and(|o| o.status.success()) {
                break;
            }
            if Instant::now() >= deadline {
                return Err("lb's control socket did not answer within 15 s".to_string());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Bed {
            ns,
            dir,
            daemon,
            _reaper: reaper,
        })
    }

    fn control(&self) -> Result<Control, String> {
        Control::connect(&self.dir.path().join("lb.sock"))
    }

    /// The daemon's [`Applied`] µs of its `applied` log lines, the first `from` left out.
    fn applied(&self, from: usize) -> Vec<Applied> {
        let field = |line: &str, key: &str| -> Option<f64> {
            let at = line.find(&format!("{key}="))? + key.len() + 1;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        self.daemon
            .stderr_lines()
            .iter()
            .chain(self.daemon.stdout_lines().iter())
            .filter(|l| l.contains(" applied"))
            .filter_map(|l| {
                Some(Applied {
                    stage: field(l, "stage_us")?,
                    datapath: field(l, "datapath_us")?,
                    total: field(l, "total_us")?,
                    cpu: field(l, "cpu_us")?,
                })
            })
            .skip(from)
            .collect()
    }

    /// How many `applied` lines the daemon has logged so far.
    fn log_len(&self) -> usize {
        self.applied(0).len()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.daemon.stop();
    }
}

/// Connection latencies (ms) by phase: before, during and after the changes.
#[derive(Default)]
struct Latencies {
    phases: [Vec<f64>; 3],
    failures: [usize; 3],
}

/// Runs `changes` while a client connects through the proxy in a loop (one connection at a
/// time: connect, request, read to the end), `settle` before and after.
fn with_client<T>(
    bed: &Bed,
    settle: Duration,
    changes: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Latencies), String> {
    let phase = std::sync::atomic::AtomicUsize::new(0);
    // The client stops first, then the responder (so no connection is left without an answer).
    let (stop, stop_client) = (AtomicBool::new(false), AtomicBool::new(false));
    // The responder: every backend address reaches it; answers each request and closes.
    let listener = bed
        .ns
        .run(|| TcpListener::bind("0.0.0.0:9000"))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("responder on 0.0.0.0:9000: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        thread::spawn(move || {
                            c.set_nonblocking(false).ok();
                            c.set_read_timeout(Some(Duration::from_secs(5))).ok();
                            let mut buf = [0u8; 1024];
                            let mut got = Vec::new();
                            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                                match c.read(&mut buf) {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => got.extend_from_slice(&buf[..n]),
                                }
                            }
                            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                            let _ = c.shutdown(Shutdown::Write);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        let client = s.spawn(|| {
            bed.ns.run(|| {
                let mut lat = Latencies::default();
                while !stop_client.load(Ordering::Relaxed) {
                    let p = phase.load(Ordering::Relaxed).min(2);
                    let started = Instant::now();
                    let ok = (|| -> std::io::Result<bool> {
                        let mut c =
                            TcpStream::connect_timeout(&LISTEN.parse().unwrap(), Duration::from_secs(2))?;
                        c.set_read_timeout(Some(Duration::from_secs(2)))?;
                        c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                        let mut body = Vec::new();
                        c.read_to_end(&mut body)?;
                        Ok(body.ends_with(b"ok\n"))
                    })();
                    match ok {
                        Ok(true) => lat.phases[p].push(started.elapsed().as_secs_f64() * 1e3),
                        _ => {
                            lat.failures[p] += 1;
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                lat
            })
        });
        thread::sleep(settle);
        phase.store(1, Ordering::Relaxed);
        let result = changes();
        phase.store(2, Ordering::Relaxed);
        thread::sleep(settle);
        stop_client.store(true, Ordering::Relaxed);
        let lat = client.join();
        stop.store(true, Ordering::Relaxed);
        let lat = lat
            .map_err(|_| "the client thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((result?, lat))
    })
}

fn ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn latency_entries(what: &str, lat: &Latencies) -> Vec<Entry> {
    ["before", "during", "after"]
        .iter()
        .enumerate()
        .map(|(i, phase)| Entry {
            name: format!("proxy connection latency {phase} {what}"),
            result: quantiles(lat.phases[i].clone())
                .map(|(p50, p99, max, n)| {
                    (
                        p50,
                        "ms".to_string(),
                        format!(
                            "median of {n} sequential connections (connect, request, response to the end); p99 {} ms, max {} ms; {} failed",
                            ms(p99),
                            ms(max),
                            lat.failures[i]
                        ),
                    )
                })
                .ok_or_else(|| format!("no connection succeeded ({} failed)", lat.failures[i])),
        })
        .collect()
}

/// One `applied` line of the daemon, µs: the new state (Maglev rebuild included), the datapath,
/// the whole change (wall time), and the CPU time the change took on its thread.
struct Applied {
    stage: f64,
    datapath: f64,
    total: f64,
    cpu: f64,
}

/// The daemon's split of its `applied` lines, for the detail column.
fn split(applied: &[Applied]) -> String {
    let q = |f: fn(&Applied) -> f64| {
        quantiles(applied.iter().map(|a| f(a) / 1e3).collect()).map_or("?".into(), |(m, p99, _, _)| {
            format!("{} (p99 {})", ms(m), ms(p99))
        })
    };
    format!(
        "daemon's own ms, median: state incl. Maglev rebuild {}, datapath {}, whole change {}, CPU time of the change {}",
        q(|a| a.stage),
        q(|a| a.datapath),
        q(|a| a.total),
        q(|a| a.cpu)
    )
}

/// 999 `add-backend` requests (1 → 1,000 backends), then [`SET_STATE_PAIRS`] drain/enable pairs
/// of one backend (50 with `--quick`).
fn one_by_one(lb: &Path, state_file: bool, quick: bool) -> Result<Vec<Entry>, String> {
    let bed = Bed::start(lb, if state_file { "cs" } else { "c1" }, state_file)?;
    let settle = Duration::from_millis(if quick { 500 } else { 2000 });
    let from = bed.log_len();
    let (took, lat) = with_client(&bed, settle, || {
        let mut control = bed.control()?;
        let mut took = Vec::with_capacity(BACKENDS);
        for i in 1..BACKENDS {
            took.push(control.request(&json!({"cmd":"add-backend","service":"big","address":address(i)}))?);
        }
        Ok(took)
    })?;
    let adds = bed.applied(from);
    let with = if state_file { ", state_file on" } else { "" };
    let mut out = Vec::new();
    let (first, last) = (took[..100].to_vec(), took[took.len() - 100..].to_vec());
    let row = |name: String, v: Vec<f64>, detail: String| Entry {
        name,
        result: quantiles(v)
            .map(|(p50, p99, max, n)| {
                (
                    p50,
                    "ms".to_string(),
                    format!("median of {n}; p99 {} ms, max {} ms; {detail}", ms(p99), ms(max)),
                )
            })
            .ok_or_else(|| "no request".to_string()),
    };
    out.push(row(
        format!("runtime add-backend, backends 2..=100 (one request each{with})"),
        first,
        "control round trip".into(),
    ));
    out.push(row(
        format!("runtime add-backend, backends 901..=1000 (one request each{with})"),
        last,
        format!(
            "control round trip; {}",
            split(&adds[adds.len().saturating_sub(100)..])
        ),
    ));
    if !state_file {
        out.extend(latency_entries("999 single adds", &lat));
    }
    let mut control = bed.control()?;
    let from = bed.log_len();
    let mut pairs = Vec::new();
    for _ in 0..if quick { 50 } else { SET_STATE_PAIRS } {
        for state in ["drain", "active"] {
            pairs.push(
                control.request(
                    &json!({"cmd":"set-state","service":"big","backend":address(500),"state":state}),
                )?,
            );
        }
    }
    out.push(row(
        format!("runtime set-state (drain, enable) of one backend at 1,000 backends{with}"),
        pairs,
        format!(
            "control round trip (after the first pair each change takes back the ring it had before: no Maglev build); {}",
            split(&bed.applied(from))
        ),
    ));
    // Every change a ring never built before: 100 backends drained one after another, then
    // enabled in the same order.
    let from = bed.log_len();
    let mut fresh = Vec::new();
    for state in ["drain", "active"] {
        for i in 100..200 {
            fresh.push(
                control.request(
                    &json!({"cmd":"set-state","service":"big","backend":address(i),"state":state}),
                )?,
            );
        }
    }
    out.push(row(
        format!(
            "runtime set-state at 1,000 backends, each change a new ring (100 drains, 100 enables){with}"
        ),
        fresh,
        format!("control round trip; {}", split(&bed.applied(from))),
    ));
    Ok(out)
}

/// One `add-backends` request with 999 backends (1 → 1,000), on a fresh daemon each round (5,
/// or 2 with `--quick`), so the connections made while a batch applies add up to a sample.
fn batch(lb: &Path, quick: bool) -> Result<Vec<Entry>, String> {
    let settle = Duration::from_millis(if quick { 500 } else { 1000 });
    let rounds = if quick { 2 } else { 5 };
    let (mut took, mut applied, mut lat) = (Vec::new(), Vec::new(), Latencies::default());
    for round in 0..rounds {
        let bed = Bed::start(lb, &format!("cb{round}"), false)?;
        let from = bed.log_len();
        let (t, l) = with_client(&bed, settle, || {
            let mut control = bed.control()?;
            let list: Vec<Value> = (1..BACKENDS).map(|i| json!({"address": address(i)})).collect();
            control.request(&json!({"cmd":"add-backends","service":"big","backends":list}))
        })?;
        took.push(t);
        applied.extend(bed.applied(from));
        for p in 0..3 {
            lat.phases[p].extend(&l.phases[p]);
            lat.failures[p] += l.failures[p];
        }
    }
    let (median, _, max, n) = quantiles(took.clone()).ok_or("no batch ran")?;
    let min = took.iter().copied().fold(f64::INFINITY, f64::min);
    let mut out = vec![Entry {
        name: "runtime add-backends, 999 backends in one request (1 → 1,000)".into(),
        result: Ok((
            median,
            "ms".into(),
            format!(
                "control round trip (request parsing included), median of {n} rounds on fresh daemons, range {} to {} ms; {}",
                ms(min),
                ms(max),
                split(&applied)
            ),
        )),
    }];
    out.extend(latency_entries("one 999-backend batch", &lat));
    Ok(out)
}

/// Every measurement of this module (an entry saying why, where one could not run).
pub fn run(lb: &Path, quick: bool) -> Vec<Entry> {
    eprintln!("bench: runtime changes at 1,000 backends");
    let mut out = Vec::new();
    let mut each = |what: &str, r: Result<Vec<Entry>, String>| match r {
        Ok(v) => out.extend(v),
        Err(e) => out.push(Entry {
            name: what.to_string(),
            result: Err(e),
        }),
    };
    each("runtime add-backend × 999", one_by_one(lb, false, quick));
    each("runtime add-backends (batch of 999)", batch(lb, quick));
    each(
        "runtime add-backend × 999 with state_file",
        one_by_one(lb, true, quick),
    );
    out
}
