//! `cargo xtask bench --failover`: a backend killed under load. A wrk `Connection: close` load
//! (2 threads, 16 connections) and a probe loop of sequential new connections run from the
//! client's primary address (so source-IP affinity puts them all on one backend); 2 s in, that
//! backend's nginx is SIGKILLed (its port refuses at once). Per row and round:
//!
//! - errors: wrk's (connect, read, write, timeout, non-2xx) plus the probe loop's failed requests;
//! - time to move: from the kill until the probe loop is served by another backend for good (the
//!   end of the first good request after the last failed one);
//! - the longest gap without a good probe answer;
//! - for lb rows, when and why lb marked the backend down (its transition log).
//!
//! Rows: `lb-proxy` and `lb-xdp` (checks every 500 ms, fall 2, passive health `observe =
//! "layer4"`, error_limit 3) and `haproxy` (`check inter 500ms fall 2 observe layer4 error-limit 3
//! on-error mark-down`). Each run gets a fresh bed. Written to `failover.md` and `failover.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use lb_tests::run_with_timeout;
use serde_json::{Value, json};

use super::bed::Bed;
use super::measure;
use super::report::median;
use super::rows::{self, Checks, RowKind};
use super::{BACKENDS, CLIENTS, Plan, check_interrupted};

/// The rows the failover measurement knows.
pub const ROWS: [RowKind; 3] = [RowKind::LbProxy, RowKind::LbXdp, RowKind::Haproxy];

/// When the backend is killed after the load starts.
const KILL_AFTER: Duration = Duration::from_secs(2);

/// One row's runs.
#[derive(Debug, Default)]
pub struct FailoverResult {
    pub errors: Vec<f64>,
    pub move_ms: Vec<f64>,
    pub gap_ms: Vec<f64>,
    /// Time from the kill to lb's down transition, and its reason (lb rows).
    pub down_ms: Vec<f64>,
    pub reasons: Vec<String>,
    pub details: Vec<String>,
    pub failures: Vec<String>,
    pub unavailable: Option<String>,
}

/// One request of the probe loop.
struct Probe {
    start: Instant,
    end: Instant,
    result: Result<String, String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs every row `plan.rounds` times (interleaved); each run on a fresh bed.
pub fn run(plan: &Plan, lb: &Path, rows: &[RowKind]) -> Result<BTreeMap<RowKind, FailoverResult>> {
    let prefix = format!("lbf-{}", std::process::id());
    let mut results: BTreeMap<RowKind, FailoverResult> =
        rows.iter().map(|r| (*r, FailoverResult::default())).collect();
    for round in 0..plan.rounds {
        for k in 0..rows.len() {
            check_interrupted()?;
            let row = rows[(k + round) % rows.len()];
            let res = results.get_mut(&row).expect("every row has a result");
            if res.unavailable.is_some() {
                continue;
            }
            let bed = Bed::new(&prefix, BACKENDS, CLIENTS)?;
            eprintln!(
                "bench: failover round {}/{}: {}",
                round + 1,
                plan.rounds,
                row.name()
            );
            if let Err(e) = once(&bed, row, plan, lb, res) {
                eprintln!("bench:   {} failover failed: {e:#}", row.name());
                res.failures.push(format!("{e:#}"));
            }
            check_interrupted()?;
        }
    }
    Ok(results)
}

fn once(bed: &Bed, row: RowKind, plan: &Plan, lb: &Path, res: &mut FailoverResult) -> Result<()> {
    let running = match rows::start_with(bed, row, plan, lb, Checks::Failover) {
        Ok(r) => r,
        Err(e) => {
            let (why, unavailable) = e.explain();
            if unavailable {
                eprintln!("bench:   {} unavailable: {why}", row.name());
                res.unavailable = Some(why);
                return Ok(());
            }
            anyhow::bail!("start: {why}");
        }
    };
    let web = SocketAddr::V4(running.web);
    let src = bed.topo.client_primary_addr();
    let victim_name = bed.get(src, web).context("first request through the VIP")?;
    let victim: usize = victim_name
        .trim_start_matches('b')
        .parse()
        .with_context(|| format!("backend answered {victim_name:?}"))?;
    let secs = if plan.quick { 4 } else { 6 };
    let args = [
        "-t2".to_string(),
        "-c16".to_string(),
        format!("-d{secs}s"),
        "--timeout".to_string(),
        "2s".to_string(),
        "--latency".to_string(),
        "-H".to_string(),
        "Connection: close".to_string(),
        format!("http://{web}/"),
    ];
    let wrk_cmd = bed.client_command(plan.pin, "wrk", &args);
    let stop = AtomicBool::new(false);
    let (probes, kill_at, kill_ms, out) = thread::scope(|s| -> Result<_> {
        let wrk = s.spawn(move || run_with_timeout(wrk_cmd, Duration::from_secs(secs + 10)));
        let probe = s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let result = bed.get(src, web).map_err(|e| e.to_string());
                out.push(Probe {
                    start,
                    end: Instant::now(),
                    result,
                });
                thread::sleep(Duration::from_millis(2));
            }
            out
        });
        thread::sleep(KILL_AFTER);
        let kill_at = Instant::now();
        let kill_ms = unix_ms();
        let killed = bed.kill_http(victim);
        thread::sleep(Duration::from_secs(secs).saturating_sub(KILL_AFTER));
        stop.store(true, Ordering::Relaxed);
        let probes = probe.join().map_err(|_| anyhow::anyhow!("probe loop panicked"))?;
        let out = wrk
            .join()
            .map_err(|_| anyhow::anyhow!("wrk thread panicked"))?
            .context("wrk did not finish")?;
        killed?;
        Ok((probes, kill_at, kill_ms, out))
    })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let w = measure::parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))?;

    let bad = |p: &Probe| p.result.is_err() || p.result.as_deref() == Ok(victim_name.as_str());
    let after: Vec<&Probe> = probes.iter().filter(|p| p.end >= kill_at).collect();
    let probe_errors = probes.iter().filter(|p| p.result.is_err()).count();
    let last_bad = after.iter().filter(|p| bad(p)).map(|p| p.end).max();
    let moved = after
        .iter()
        .filter(|p| !bad(p) && last_bad.is_none_or(|b| p.start >= b))
        .map(|p| p.end)
        .min()
        .context("the probe loop was never served by another backend after the kill")?;
    let move_ms = (moved - kill_at).as_secs_f64() * 1000.0;
    let mut gap = Duration::ZERO;
    let mut last_good = probes
        .iter()
        .filter(|p| p.end < kill_at && p.result.is_ok())
        .map(|p| p.end)
        .max()
        .unwrap_or(kill_at);
    let mut good: Vec<Instant> = after.iter().filter(|p| p.result.is_ok()).map(|p| p.end).collect();
    good.sort();
    for end in good {
        if end >= last_good {
            gap = gap.max(end - last_good);
            last_good = end;
        }
    }
    let wrk_errors = w.connect_errors + w.read_errors + w.write_errors + w.timeouts + w.non_2xx;
    let errors = wrk_errors + probe_errors as u64;
    res.errors.push(errors as f64);
    res.move_ms.push(move_ms);
    res.gap_ms.push(gap.as_secs_f64() * 1000.0);
    let mut detail = format!(
        "killed {victim_name}: moved {move_ms:.0} ms, gap {:.0} ms, wrk {:.0} req/s ({}), probes {} ({probe_errors} failed)",
        gap.as_secs_f64() * 1000.0,
        w.requests_per_sec,
        if w.error_text().is_empty() {
            "no errors".to_string()
        } else {
            w.error_text()
        },
        probes.len()
    );
    if let Some((lb_bin, socket)) = &running.control
        && let Some((at, reason)) = down_transition(lb_bin, socket, &victim_name)
    {
        let ms = at as f64 - kill_ms as f64;
        res.down_ms.push(ms);
        let _ = write!(detail, "; lb marked it down after {ms:.0} ms ({reason})");
        res.reasons.push(reason);
    }
    eprintln!("bench:   {}: {detail}", row.name());
    res.details.push(detail);
    res.failures.extend(running.stop());
    Ok(())
}

/// lb's first down transition of `web/backend`: (unix ms, reason).
fn down_transition(lb: &Path, socket: &Path, backend: &str) -> Option<(u64, String)> {
    let mut cmd = std::process::Command::new(lb);
    cmd.arg("--socket").arg(socket).args(["--json", "stats"]);
    let out = run_with_timeout(cmd, Duration::from_secs(10)).ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let services = v["result"]["services"].as_array()?;
    let web = services.iter().find(|s| s["name"] == "web")?;
    let be = web["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == backend)?;
    be["transitions"]
        .as_array()?
        .iter()
        .find(|t| t["kind"] == "health" && t["to"] == "down")
        .map(|t| {
            (
                t["unix_ms"].as_u64().unwrap_or(0),
                t["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

fn cell(v: &[f64]) -> String {
    match (
        median(v),
        v.iter().copied().reduce(f64::min),
        v.iter().copied().reduce(f64::max),
    ) {
        (Some(m), Some(lo), Some(hi)) if v.len() > 1 => format!("{m:.0} ({lo:.0}–{hi:.0})"),
        (Some(m), _, _) => format!("{m:.0}"),
        _ => "–".to_string(),
    }
}

/// The failover table and the notes under it.
pub fn markdown(plan: &Plan, results: &BTreeMap<RowKind, FailoverResult>) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Failover: a backend killed under a `Connection: close` load\n\n\
         wrk -t2 -c16 `Connection: close` plus a probe loop of new connections, all from one client \
         address (so affinity puts them on one backend), which is SIGKILLed {} s in. Median over {} \
         round(s), range in brackets.\n",
        KILL_AFTER.as_secs(),
        plan.rounds
    );
    md.push_str("| row | errors | time to move (ms) | longest gap (ms) | marked down after (ms) | by |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    for (row, r) in results {
        if let Some(why) = &r.unavailable {
            let _ = writeln!(md, "| {} | unavailable: {} | | | | |", row.name(), why);
            continue;
        }
        let mut by: Vec<&str> = r
            .reasons
            .iter()
            .map(|s| s.split(':').next().unwrap_or_default())
            .collect();
        by.sort_unstable();
        by.dedup();
        let by = if by.is_empty() {
            "–".to_string()
        } else {
            by.join(", ")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            row.name(),
            cell(&r.errors),
            cell(&r.move_ms),
            cell(&r.gap_ms),
            cell(&r.down_ms),
            by
        );
    }
    md.push_str(
        "\nlb rows: checks every 500 ms, fall 2, passive health `observe = \"layer4\"`, error_limit 3 \
         (the proxy reports its connects; the XDP datapath reports the handshakes the kernel counts, polled \
         every 10 ms, and the kernel sends no SYN to a backend that has just refused one). \
         haproxy: `check inter 500ms fall 2 observe layer4 error-limit 3 on-error mark-down`.\n\n",
    );
    for (row, r) in results {
        for d in &r.details {
            let _ = writeln!(md, "- {}: {d}", row.name());
        }
        for f in &r.failures {
            let _ = writeln!(md, "- {}: problem: {f}", row.name());
        }
    }
    md
}

pub fn json(results: &BTreeMap<RowKind, FailoverResult>) -> Value {
    let rows: serde_json::Map<String, Value> = results
        .iter()
        .map(|(row, r)| {
            (
                row.name().to_string(),
                json!({
                    "errors": r.errors,
                    "move_ms": r.move_ms,
                    "gap_ms": r.gap_ms,
                    "down_ms": r.down_ms,
                    "reasons": r.reasons,
                    "details": r.details,
                    "failures": r.failures,
                    "unavailable": r.unavailable,
                }),
            )
        })
        .collect();
    Value::Object(rows)
}
