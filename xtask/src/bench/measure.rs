//! The measurements: iperf3 and wrk runs from the client namespace, CPU and memory of a process
//! tree from /proc, softirq time from /proc/stat, and affinity probes from every client address.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::run_with_timeout;
use serde_json::Value;

use super::Plan;
use super::bed::Bed;

/// How long a client tool may run beyond its planned duration before it is stopped.
const SLACK: Duration = Duration::from_secs(20);

/// `iperf3 -c TARGET -P streams -t secs -J` from the client namespace; received Gbit/s.
pub fn iperf(bed: &Bed, plan: &Plan, target: SocketAddrV4, streams: u32) -> Result<f64> {
    let args = [
        "-c".to_string(),
        target.ip().to_string(),
        "-p".to_string(),
        target.port().to_string(),
        "-P".to_string(),
        streams.to_string(),
        "-t".to_string(),
        plan.iperf_secs.to_string(),
        "-J".to_string(),
        "--connect-timeout".to_string(),
        "3000".to_string(),
    ];
    let cmd = bed.client_command(plan.pin, "iperf3", &args);
    let out = run_with_timeout(cmd, Duration::from_secs(plan.iperf_secs.into()) + SLACK)
        .context("iperf3 -c did not finish")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 -J output is not JSON ({}): {}{}",
            out.status,
            text.chars().take(300).collect::<String>(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    parse_iperf(&v)
}

/// Receiver-side throughput of an `iperf3 -J` report, in Gbit/s.
pub fn parse_iperf(v: &Value) -> Result<f64> {
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 -J report without end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wrk {
    pub requests_per_sec: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub non_2xx: u64,
}

impl Wrk {
    /// "connect 1, read 2, non-2xx 3" (empty when clean).
    pub fn error_text(&self) -> String {
        [
            ("connect", self.connect_errors),
            ("read", self.read_errors),
            ("write", self.write_errors),
            ("timeout", self.timeouts),
            ("non-2xx", self.non_2xx),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// `wrk --latency` against `target` from the client namespace (its primary address), keep-alive
/// or with `Connection: close` on every request.
pub fn wrk(bed: &Bed, plan: &Plan, target: SocketAddrV4, close: bool) -> Result<Wrk> {
    wrk_with(
        bed,
        plan,
        target,
        plan.wrk_threads,
        plan.wrk_connections,
        close,
        None,
    )
}

/// Like [`wrk`] with `threads` threads and `connections` connections, and wrk's Lua `script`.
pub fn wrk_with(
    bed: &Bed,
    plan: &Plan,
    target: SocketAddrV4,
    threads: u32,
    connections: u32,
    close: bool,
    script: Option<&Path>,
) -> Result<Wrk> {
    let mut args = vec![
        format!("-t{threads}"),
        format!("-c{connections}"),
        format!("-d{}s", plan.wrk_secs),
        "--timeout".to_string(),
        "2s".to_string(),
        "--latency".to_string(),
    ];
    if close {
        args.push("-H".to_string());
        args.push("Connection: close".to_string());
    }
    if let Some(script) = script {
        args.push("-s".to_string());
        args.push(script.display().to_string());
    }
    args.push(format!("http://{target}/"));
    let cmd = bed.client_command(plan.pin, "wrk", &args);
    let out = run_with_timeout(cmd, Duration::from_secs(plan.wrk_secs.into()) + SLACK)
        .context("wrk did not finish")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
}

/// A wrk duration such as `812.00us`, `1.23ms`, `2.00s`, `1.00m`, in milliseconds.
fn wrk_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(n * factor)
}

/// Parses wrk 4's text report (with `--latency`).
pub fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut rps = None;
    let mut p99 = None;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("Requests/sec:") {
            rps = rest.trim().parse::<f64>().ok();
        } else if let Some(rest) = l.strip_prefix("99%") {
            p99 = wrk_duration_ms(rest);
        } else if let Some(rest) = l.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(k), Some(n)) = (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) else {
                    continue;
                };
                match k {
                    "connect" => w.connect_errors = n,
                    "read" => w.read_errors = n,
                    "write" => w.write_errors = n,
                    "timeout" => w.timeouts = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = rest.trim().parse().unwrap_or(0);
        } else if l.contains(" requests in ") {
            w.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    w.requests_per_sec = rps.context("no `Requests/sec:` line")?;
    w.p99_ms = p99.context("no `99%` line in the latency distribution (was --latency given?)")?;
    Ok(w)
}

/// Clock ticks per second of /proc times (`sysconf(_SC_CLK_TCK)`, normally 100).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime)` of a process from /proc/PID/stat.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ppid(4) … utime(14) stime(15), i.e. indices 0, 1, …, 11, 12.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `roots` and all their descendants (by scanning /proc for parent PIDs).
pub fn process_tree(roots: &[u32]) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some((ppid, _)) = stat_of(pid)
            {
                parent.push((pid, ppid));
            }
        }
    }
    let mut tree: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        for &(child, pp) in &parent {
            if pp == p && !tree.contains(&child) {
                tree.push(child);
            }
        }
        i += 1;
    }
    tree
}

/// Total softirq time of all CPUs from /proc/stat, in ticks.
fn softirq_ticks() -> u64 {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("cpu "))?;
            // cpu user nice system idle iowait irq softirq …
            line.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// CPU counters at one instant.
#[derive(Clone, Debug)]
pub struct CpuSample {
    at: Instant,
    /// utime+stime of each process in the tree (so processes that appear later count from zero).
    procs: BTreeMap<u32, u64>,
    softirq: u64,
}

impl CpuSample {
    pub fn take(roots: &[u32]) -> CpuSample {
        let procs = process_tree(roots)
            .into_iter()
            .filter_map(|p| stat_of(p).map(|(_, t)| (p, t)))
            .collect();
        CpuSample {
            at: Instant::now(),
            procs,
            softirq: softirq_ticks(),
        }
    }

    /// (process tree CPU, all-CPU softirq) since `earlier`, both in % of one core.
    pub fn since(&self, earlier: &CpuSample) -> (f64, f64) {
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        let hz = clock_ticks();
        let proc_ticks: u64 = self
            .procs
            .iter()
            .map(|(pid, t)| t.saturating_sub(earlier.procs.get(pid).copied().unwrap_or(0)))
            .sum();
        let soft = self.softirq.saturating_sub(earlier.softirq);
        (
            proc_ticks as f64 / hz / secs * 100.0,
            soft as f64 / hz / secs * 100.0,
        )
    }
}

/// `TcpExt` counters of /proc/net/netstat (TCPSynRetrans, ListenDrops, …) summed over the
/// `namespaces` (read from a thread inside each: /proc/thread-self/net is per namespace).
pub fn tcp_ext(namespaces: &[&lb_tests::Netns]) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for ns in namespaces {
        let Ok(Ok(text)) = ns.run(|| fs::read_to_string("/proc/thread-self/net/netstat")) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [keys, values] = pair else { continue };
            if !keys.starts_with("TcpExt:") {
                continue;
            }
            for (k, v) in keys.split_whitespace().zip(values.split_whitespace()).skip(1) {
                if let Ok(v) = v.parse::<u64>() {
                    *sum.entry(k.to_string()).or_insert(0) += v;
                }
            }
        }
    }
    sum
}

/// `after - before` for `key`.
pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    after
        .get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(key).copied().unwrap_or(0))
}

/// Resident memory of `roots` and their descendants (sum of VmRSS), in MiB.
pub fn rss_mib(roots: &[u32]) -> Option<f64> {
    let mut kib = 0u64;
    let mut any = false;
    for pid in process_tree(roots) {
        let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(v) = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        {
            kib += v;
            any = true;
        }
    }
    any.then(|| kib as f64 / 1024.0)
}

/// Which backends each client address reached: `per_client` short GETs from every client address
/// (bound as source) on fresh connections, reading the backend's name from the body.
pub fn affinity(
    bed: &Bed,
    target: SocketAddrV4,
    per_client: usize,
) -> (BTreeMap<Ipv4Addr, BTreeSet<String>>, Vec<String>) {
    let mut reached: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    let mut errors = Vec::new();
    for c in bed.topo.client_addrs() {
        for _ in 0..per_client {
            match bed.get(c, SocketAddr::V4(target)) {
                Ok(body) => {
                    reached.entry(c).or_default().insert(body);
                }
                Err(e) => errors.push(format!("GET from {c}: {e}")),
            }
        }
    }
    (reached, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://10.0.0.100:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.53ms    2.01ms  30.12ms   91.23%
    Req/Sec    12.34k     1.20k   14.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.50ms
     90%    3.20ms
     99%   10.25ms
  49152 requests in 2.00s, 7.12MB read
  Socket errors: connect 0, read 17, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  24576.00
Transfer/sec:      3.56MB
";

    #[test]
    fn parses_wrk_report() {
        let w = parse_wrk(WRK).unwrap();
        assert_eq!(w.requests_per_sec, 24576.0);
        assert!((w.p99_ms - 10.25).abs() < 1e-9);
        assert_eq!(w.requests, 49152);
        assert_eq!(
            (w.connect_errors, w.read_errors, w.write_errors, w.timeouts),
            (0, 17, 0, 2)
        );
        assert_eq!(w.non_2xx, 5);
        assert_eq!(w.error_text(), "read 17, timeout 2, non-2xx 5");
    }

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_duration_ms("812.00us"), Some(0.812));
        assert_eq!(wrk_duration_ms("2.00s"), Some(2000.0));
        assert_eq!(wrk_duration_ms("1.00m"), Some(60000.0));
        assert_eq!(wrk_duration_ms("x"), None);
    }

    #[test]
    fn wrk_without_latency_is_an_error() {
        assert!(parse_wrk("Requests/sec: 5.0\n").is_err());
    }

    #[test]
    fn parses_iperf_json() {
        let v: Value = serde_json::from_str(r#"{"end":{"sum_received":{"bits_per_second":9.5e9}}}"#).unwrap();
        assert!((parse_iperf(&v).unwrap() - 9.5).abs() < 1e-9);
        let e: Value = serde_json::from_str(r#"{"error":"unable to connect"}"#).unwrap();
        assert!(
            parse_iperf(&e)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
    }

    #[test]
    fn own_process_has_stat_and_rss() {
        let me = std::process::id();
        assert!(stat_of(me).is_some());
        assert!(rss_mib(&[me]).unwrap() > 0.0);
        assert!(process_tree(&[me]).contains(&me));
    }
}
