//! Results: per-row values over rounds, medians and ranges, ratios to `none`, and the three
//! outputs (markdown table, SVG chart, JSON).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::micro::Micro;
use super::rows::RowKind;
use super::{BACKENDS, CLIENT_CPU, LB_CPU, Plan, probe_text};

/// Everything measured for one row, over all rounds (one value per successful round).
#[derive(Debug, Default)]
pub struct RowResult {
    /// Set when the row cannot run on this build (the reason, from lb's own error).
    pub unavailable: Option<String>,
    /// Forwarding in the kernel: no load-balancer process CPU/RSS.
    pub kernel: bool,
    pub iperf1: Vec<f64>,
    pub iperf4: Vec<f64>,
    pub ka_rps: Vec<f64>,
    pub ka_p99: Vec<f64>,
    pub close_rps: Vec<f64>,
    pub close_p99: Vec<f64>,
    /// New connections per second of a close loop of 4 connections (`wrk -t1 -c4`).
    pub close4_rps: Vec<f64>,
    /// The same close loop while a paced keep-alive background (`-t1 -c16`, 1 ms between a
    /// response and the next request) runs from the same client address.
    pub mixed_rps: Vec<f64>,
    /// That background's requests per second (about equal across rows when nothing starves it).
    pub mixed_ka_rps: Vec<f64>,
    pub cpu_ka: Vec<f64>,
    pub cpu_close: Vec<f64>,
    pub soft_ka: Vec<f64>,
    pub soft_close: Vec<f64>,
    pub rss: Vec<f64>,
    /// Backends each client address reached (over all rounds).
    pub reached: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// wrk's socket errors and non-2xx answers, per run that had any.
    pub wrk_errors: Vec<String>,
    /// Measurements that failed (with why).
    pub failures: Vec<String>,
    /// Other observations (lb's XDP counters), one per round.
    pub notes: Vec<String>,
}

impl RowResult {
    /// Most backends any single client address reached (1 with working affinity).
    pub fn max_backends_per_client(&self) -> Option<usize> {
        self.reached.values().map(BTreeSet::len).max()
    }

    /// Client addresses per backend (a client that reached several backends counts for each).
    pub fn spread(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for set in self.reached.values() {
            for b in set {
                *m.entry(b.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().min_by(f64::total_cmp)?;
    let max = v.iter().copied().max_by(f64::total_cmp)?;
    Some((min, max))
}

/// A number with a sensible number of decimals for its size.
fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        // Thousands separated by a thin space would confuse parsers; keep digits plain.
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `median (min–max)`, or `median` for one value, or `failed`.
fn stat_cell(v: &[f64]) -> String {
    match (median(v), range(v)) {
        (Some(m), Some((lo, hi))) if v.len() > 1 => format!("{} ({}–{})", num(m), num(lo), num(hi)),
        (Some(m), _) => num(m),
        _ => "failed".to_string(),
    }
}

/// [`stat_cell`] plus the ratio of the median to `base`'s median (`0.52×`).
fn ratio_cell(v: &[f64], base: Option<&[f64]>) -> String {
    let mut s = stat_cell(v);
    if let (Some(m), Some(b)) = (median(v), base.and_then(median))
        && b > 0.0
    {
        let _ = write!(s, " **{:.2}×**", m / b);
    }
    s
}

/// Machine and peer versions for the header.
#[derive(Debug, Clone)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub haproxy: String,
    pub nginx: String,
    pub iperf3: String,
    pub wrk: String,
    pub lb_rev: String,
    pub lb_bin: String,
}

fn first_line(s: Option<String>) -> String {
    s.and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

impl Environment {
    pub fn collect(root: &Path, lb: &Path, _plan: &Plan) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
            .map_or_else(|| "unknown".to_string(), |(_, m)| m.trim().to_string());
        let root_s = root.display().to_string();
        let rev = probe_text("git", &["-C", &root_s, "rev-parse", "--short=12", "HEAD"]);
        let dirty = probe_text(
            "git",
            &["-C", &root_s, "status", "--porcelain", "--untracked-files=no"],
        )
        .is_some_and(|s| !s.is_empty());
        Environment {
            date: first_line(probe_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string()),
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            haproxy: first_line(probe_text("haproxy", &["-v"])),
            nginx: first_line(probe_text("nginx", &["-v"])),
            iperf3: first_line(probe_text("iperf3", &["--version"])),
            // wrk has no version flag; `wrk -v` prints the version line and then usage.
            wrk: first_line(probe_text("wrk", &["-v"])),
            lb_rev: match rev {
                Some(r) if dirty => format!("{r} (with uncommitted changes)"),
                Some(r) => r,
                None => "unknown".to_string(),
            },
            lb_bin: lb.display().to_string(),
        }
    }
}

/// The whole result set.
pub struct Report {
    pub env: Environment,
    pub plan: Plan,
    pub rows: BTreeMap<RowKind, RowResult>,
    pub micro: Micro,
    pub elapsed: Duration,
}

/// Column headers of the main table, in order.
pub const COLUMNS: [&str; 16] = [
    "row",
    "iperf3 1 stream, Gbit/s",
    "iperf3 4 streams, Gbit/s",
    "keep-alive req/s",
    "keep-alive p99, ms",
    "new conn/s (Connection: close)",
    "close p99, ms",
    "new conn/s, 4 connections",
    "new conn/s, 4 connections beside paced keep-alive",
    "req/s of the paced keep-alive (beside the 4)",
    "LB CPU, % of a core (keep-alive / close)",
    "softirq, % of a core (keep-alive / close)",
    "LB RSS, MiB",
    "backends per client IP",
    "spread over client IPs",
    "errors",
];

impl Report {
    fn base(&self) -> Option<&RowResult> {
        self.rows.get(&RowKind::None).filter(|r| r.unavailable.is_none())
    }

    /// The cells of one row, in [`COLUMNS`] order.
    pub fn cells(&self, kind: RowKind, r: &RowResult) -> Vec<String> {
        let mut cells = vec![format!("`{}`", kind.name())];
        if let Some(why) = &r.unavailable {
            cells.push(format!("unavailable: {}", md_escape(&shorten(why, 300))));
            cells.extend(std::iter::repeat_n("—".to_string(), COLUMNS.len() - 2));
            return cells;
        }
        let base = self.base();
        cells.push(ratio_cell(&r.iperf1, base.map(|b| b.iperf1.as_slice())));
        cells.push(ratio_cell(&r.iperf4, base.map(|b| b.iperf4.as_slice())));
        cells.push(ratio_cell(&r.ka_rps, base.map(|b| b.ka_rps.as_slice())));
        cells.push(stat_cell(&r.ka_p99));
        cells.push(ratio_cell(&r.close_rps, base.map(|b| b.close_rps.as_slice())));
        cells.push(stat_cell(&r.close_p99));
        cells.push(ratio_cell(&r.close4_rps, base.map(|b| b.close4_rps.as_slice())));
        cells.push(ratio_cell(&r.mixed_rps, base.map(|b| b.mixed_rps.as_slice())));
        cells.push(ratio_cell(
            &r.mixed_ka_rps,
            base.map(|b| b.mixed_ka_rps.as_slice()),
        ));
        cells.push(if r.kernel {
            "kernel (see softirq)".to_string()
        } else {
            format!("{} / {}", pct(&r.cpu_ka), pct(&r.cpu_close))
        });
        cells.push(format!("{} / {}", pct(&r.soft_ka), pct(&r.soft_close)));
        cells.push(if r.kernel {
            "kernel".to_string()
        } else {
            stat_cell(&r.rss)
        });
        cells.push(match r.max_backends_per_client() {
            Some(n) => n.to_string(),
            None => "failed".to_string(),
        });
        let spread = r.spread();
        cells.push(if spread.is_empty() {
            "failed".to_string()
        } else {
            format!(
                "{} of {BACKENDS} ({}; {} clients)",
                spread.len(),
                spread
                    .iter()
                    .map(|(b, n)| format!("{b}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.reached.len()
            )
        });
        let mut errs = Vec::new();
        if !r.wrk_errors.is_empty() {
            errs.push(format!("wrk {}", r.wrk_errors.join("; ")));
        }
        if !r.failures.is_empty() {
            errs.push(format!("{} failed step(s), see notes", r.failures.len()));
        }
        cells.push(if errs.is_empty() {
            "0".to_string()
        } else {
            md_escape(&errs.join("; "))
        });
        cells
    }

    pub fn markdown(&self) -> String {
        let e = &self.env;
        let p = &self.plan;
        let mut s = String::new();
        let _ = writeln!(s, "# lb benchmark\n");
        if p.quick {
            let _ = writeln!(
                s,
                "> **Quick run** (`--quick`: one short round) for smoke checks — not numbers to cite.\n"
            );
        }
        let _ = writeln!(s, "- date: {}", e.date);
        let _ = writeln!(s, "- kernel: {}; CPUs: {} ({})", e.kernel, e.cpus, e.cpu_model);
        let _ = writeln!(s, "- lb: git {} ({})", e.lb_rev, e.lb_bin);
        let _ = writeln!(s, "- peers: {}; {}; {}; {}", e.haproxy, e.nginx, e.iperf3, e.wrk);
        let _ = writeln!(
            s,
            "- run: {} round(s), rows interleaved (rotated order per round); iperf3 {} s per run; wrk {} s per run (`-t{} -c{} --timeout 2s --latency`); {:.0} s in all",
            p.rounds,
            p.iperf_secs,
            p.wrk_secs,
            p.wrk_threads,
            p.wrk_connections,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "- pinning: {}",
            if p.pin {
                format!(
                    "on (`--pin`): client tools on CPU {CLIENT_CPU}, load-balancer processes on CPU {LB_CPU} (taskset); backends and kernel work unpinned"
                )
            } else {
                "off (everything floats over all CPUs; `--pin` pins client and load balancer apart)"
                    .to_string()
            }
        );
        let _ = writeln!(
            s,
            "- topology (fresh for every row of every round): network namespaces joined by veth pairs: client (10.0.0.2 + 30 addresses 10.0.0.10–39) → lb namespace (VIP 10.0.0.100) → 3 backends (10.1.I.2) routed back through it; each backend runs `iperf3 -s` and nginx (2 workers) answering `bI\\n`; {}\n",
            super::bed::NIC_NOTE
        );

        let _ = writeln!(s, "## Load balancers side by side\n");
        let _ = writeln!(s, "| {} |", COLUMNS.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(COLUMNS.len()));
        for (kind, r) in &self.rows {
            let _ = writeln!(s, "| {} |", self.cells(*kind, r).join(" | "));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "How to read it:\n");
        let _ = writeln!(
            s,
            "- Each cell is the median over rounds with the range (min–max) in parentheses when there was more than one round; **N×** is the ratio of the median to the `none` row's median (1.00× = as fast as no load balancer)."
        );
        let _ = writeln!(
            s,
            "- iperf3: `iperf3 -c VIP -p 5201 -J` (`-P 4` for 4 streams), receiver-side throughput. wrk: `GET /` from the client's primary address to VIP:80 (one source address, so one backend), keep-alive, and with `Connection: close` on every request (each request is a new TCP connection: new connections per second). \"4 connections\": one wrk thread with 4 connections (`-t1 -c4`), alone and beside a steady keep-alive background from the same address: 16 connections (`-t1 -c16`), each pausing 1 ms between a response and its next request (wrk's Lua `delay`), so every row carries the same background and the close loop's rate compares datapaths (unpaced, the background took whatever CPU the close loop left). The background's own rate is the next column; it is about equal across rows when nothing starves it."
        );
        let _ = writeln!(
            s,
            "- LB CPU: utime+stime of the load balancer's process and its children (/proc/PID/stat) during each wrk run, in % of one core (100 = one core busy). Kernel rows (`none`, `nft-dnat`, `lb-xdp`, `lb-xdp-native`, `lb-xdp-dsr`) have no such process: their forwarding runs in softirq context."
        );
        let _ = writeln!(
            s,
            "- softirq: the softirq column of /proc/stat summed over all CPUs during each wrk run, in % of one core. Machine-wide: besides the forwarding it includes the client's and the backends' network stacks, so compare rows with each other rather than reading it as the load balancer's own cost."
        );
        let _ = writeln!(
            s,
            "- LB RSS: VmRSS of the load balancer's processes (summed over nginx master and workers) after the wrk runs."
        );
        let _ = writeln!(
            s,
            "- Affinity: every client address (10.0.0.10–39) makes 3 short `GET /` on new connections per round; nginx on backend I answers `bI`. \"backends per client IP\" is the most backends any one address reached over all rounds (1 = sticky); \"spread\" counts the client addresses per backend. `none` sends everything to b1 by design."
        );
        let _ = writeln!(
            s,
            "- errors: wrk socket errors (connect/read/write/timeout) and non-2xx answers, plus SYN retransmits (client and lb namespaces; a retransmitted SYN costs its connection 1 s, which wrk's latency does not show) and listen-queue drops (lb and backend namespaces) during the wrk runs; failed steps are listed below."
        );
        let _ = writeln!(s, "\nRows:\n");
        for kind in self.rows.keys() {
            let _ = writeln!(s, "- `{}`: {}", kind.name(), kind.description());
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .flat_map(|(k, r)| {
                let mut v: Vec<String> = r
                    .failures
                    .iter()
                    .map(|f| format!("- `{}`: {f}", k.name()))
                    .collect();
                v.extend(r.notes.iter().map(|n| format!("- `{}`: {n}", k.name())));
                if let Some(why) = &r.unavailable {
                    v.push(format!("- `{}` unavailable: {why}", k.name()));
                }
                v
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "\nNotes (failures, unavailable rows, lb's kernel counters):\n");
            for n in notes {
                let _ = writeln!(s, "{n}");
            }
        }
        let _ = writeln!(s, "\n![throughput relative to no load balancer](results.svg)\n");
        s.push_str(&self.micro.markdown());
        s
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|(k, r)| {
                json!({
                    "row": k.name(),
                    "unavailable": r.unavailable,
                    "kernel": r.kernel,
                    "cells": self.cells(*k, r),
                    "iperf1_gbps": r.iperf1,
                    "iperf4_gbps": r.iperf4,
                    "keepalive_rps": r.ka_rps,
                    "keepalive_p99_ms": r.ka_p99,
                    "close_rps": r.close_rps,
                    "close_p99_ms": r.close_p99,
                    "close4_rps": r.close4_rps,
                    "mixed_close4_rps": r.mixed_rps,
                    "mixed_keepalive_rps": r.mixed_ka_rps,
                    "cpu_keepalive_pct": r.cpu_ka,
                    "cpu_close_pct": r.cpu_close,
                    "softirq_keepalive_pct": r.soft_ka,
                    "softirq_close_pct": r.soft_close,
                    "rss_mib": r.rss,
                    "max_backends_per_client": r.max_backends_per_client(),
                    "spread": r.spread(),
                    "clients": r.reached.len(),
                    "reached": r.reached.iter().map(|(c, s)| (c.to_string(), s.iter().cloned().collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
                    "wrk_errors": r.wrk_errors,
                    "failures": r.failures,
                    "notes": r.notes,
                })
            })
            .collect();
        json!({
            "date": self.env.date,
            "kernel": self.env.kernel,
            "cpus": self.env.cpus,
            "cpu_model": self.env.cpu_model,
            "lb_rev": self.env.lb_rev,
            "peers": {"haproxy": self.env.haproxy, "nginx": self.env.nginx, "iperf3": self.env.iperf3, "wrk": self.env.wrk},
            "quick": self.plan.quick,
            "rounds": self.plan.rounds,
            "pin": self.plan.pin,
            "iperf_secs": self.plan.iperf_secs,
            "wrk_secs": self.plan.wrk_secs,
            "columns": COLUMNS,
            "rows": rows,
            "micro": self.micro.json(),
        })
    }

    /// Grouped horizontal bars: per row, the four throughput figures as % of the `none` row.
    pub fn svg(&self) -> String {
        const METRICS: [(&str, &str); 4] = [
            ("iperf3 1 stream", "#4e79a7"),
            ("iperf3 4 streams", "#59a14f"),
            ("keep-alive req/s", "#f28e2b"),
            ("new conn/s", "#e15759"),
        ];
        let pick = |r: &RowResult| -> [Option<f64>; 4] {
            [
                median(&r.iperf1),
                median(&r.iperf4),
                median(&r.ka_rps),
                median(&r.close_rps),
            ]
        };
        let width = 900.0;
        let left = 130.0;
        let right = 60.0;
        let bar_h = 12.0;
        let group_h = bar_h * 4.0 + 14.0;
        let top = 70.0;
        let rows: Vec<(&RowKind, &RowResult)> = self.rows.iter().collect();
        let chart_y = top + group_h * rows.len() as f64 + 40.0;
        let (cost_chart, chart_h) = super::scale::chart(&self.micro, chart_y, width);
        let height = chart_y + chart_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let title = format!(
            "Throughput relative to no load balancer (median of {} round(s){}), {}",
            self.plan.rounds,
            if self.plan.quick { ", QUICK RUN" } else { "" },
            self.env.date
        );
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14" font-weight="bold">{}</text>"#,
            xml_escape(&title)
        );
        let Some(base) = self.base() else {
            let _ = writeln!(
                s,
                r#"<text x="{left}" y="50">No `none` row in this run: nothing to compare with.</text>"#
            );
            s.push_str(&cost_chart);
            s.push_str("</svg>\n");
            return s;
        };
        let base_v = pick(base);
        // Scale: at least 0..100 %, more if a row beats the limit.
        let mut max_pct: f64 = 100.0;
        for (_, r) in &rows {
            for (v, b) in pick(r).iter().zip(&base_v) {
                if let (Some(v), Some(b)) = (v, b)
                    && *b > 0.0
                {
                    max_pct = max_pct.max(v / b * 100.0);
                }
            }
        }
        let max_pct = (max_pct / 25.0).ceil() * 25.0;
        let plot_w = width - left - right;
        let x = |pct: f64| left + plot_w * pct / max_pct;
        // Legend.
        for (i, (name, color)) in METRICS.iter().enumerate() {
            let lx = left + i as f64 * 170.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="34" width="12" height="12" fill="{color}"/><text x="{}" y="44">{name}</text>"#,
                lx + 16.0
            );
        }
        // Grid.
        let mut g = 0.0;
        while g <= max_pct + 1e-9 {
            let gx = x(g);
            let _ = writeln!(
                s,
                r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="{}" stroke-width="1"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{g:.0}%</text>"##,
                chart_y - 30.0,
                if (g - 100.0).abs() < 1e-9 { "#333" } else { "#ddd" },
                chart_y - 15.0
            );
            g += 25.0;
        }
        for (i, (kind, r)) in rows.iter().enumerate() {
            let gy = top + i as f64 * group_h + 6.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-weight="bold">{}</text>"#,
                left - 8.0,
                gy + bar_h * 2.0 + 4.0,
                kind.name()
            );
            if let Some(why) = &r.unavailable {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" fill="#888">unavailable: {}</text>"##,
                    left + 4.0,
                    gy + bar_h * 2.0 + 4.0,
                    xml_escape(&shorten(why, 110))
                );
                continue;
            }
            for (j, (v, b)) in pick(r).iter().zip(&base_v).enumerate() {
                let by = gy + j as f64 * bar_h;
                match (v, b) {
                    (Some(v), Some(b)) if *b > 0.0 => {
                        let pct = v / b * 100.0;
                        let _ = writeln!(
                            s,
                            r#"<rect x="{left}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {} ({pct:.0}% of none)</title></rect><text x="{:.1}" y="{:.1}" font-size="10">{pct:.0}%</text>"#,
                            (x(pct) - left).max(0.5),
                            bar_h - 2.0,
                            METRICS[j].1,
                            kind.name(),
                            METRICS[j].0,
                            num(*v),
                            x(pct) + 3.0,
                            by + bar_h - 3.0
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#888">{}: failed</text>"##,
                            left + 4.0,
                            by + bar_h - 3.0,
                            METRICS[j].0
                        );
                    }
                }
            }
        }
        s.push_str(&cost_chart);
        s.push_str("</svg>\n");
        s
    }
}

fn pct(v: &[f64]) -> String {
    match median(v) {
        Some(m) => format!("{m:.0}%"),
        None => "failed".to_string(),
    }
}

/// At most `n` characters, with an ellipsis when cut.
pub fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// Keeps a text inside one markdown table cell.
pub fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_cells() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(stat_cell(&[1.5]), "1.500");
        assert_eq!(stat_cell(&[10.0, 12.0, 11.0]), "11.00 (10.00–12.00)");
        assert_eq!(stat_cell(&[]), "failed");
        assert_eq!(ratio_cell(&[5.0], Some(&[10.0])), "5.000 **0.50×**");
        assert_eq!(ratio_cell(&[25000.0], None), "25000");
    }

    #[test]
    fn spread_and_affinity() {
        let mut r = RowResult::default();
        r.reached
            .insert(Ipv4Addr::new(10, 0, 0, 10), ["b1".to_string()].into());
        r.reached
            .insert(Ipv4Addr::new(10, 0, 0, 11), ["b2".to_string()].into());
        r.reached.insert(
            Ipv4Addr::new(10, 0, 0, 12),
            ["b2".to_string(), "b3".to_string()].into(),
        );
        assert_eq!(r.max_backends_per_client(), Some(2));
        assert_eq!(r.spread().len(), 3);
        assert_eq!(r.spread()["b2"], 2);
    }

    #[test]
    fn escaping() {
        assert_eq!(md_escape("a|b\nc"), "a\\|b c");
        assert_eq!(xml_escape("<a&\">"), "&lt;a&amp;&quot;&gt;");
        assert_eq!(shorten("abcdef", 3), "abc…");
    }
}
