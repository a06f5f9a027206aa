//! Micro-benchmarks of lb itself: runs `lb-microbench` (see `microbench.rs`), measures runtime
//! changes at 1,000 backends (`churn`) and the daemon's memory with 1 and with 1,000 backends.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{Child, Netns, run_with_timeout};
use serde_json::{Value, json};

use super::bed::{Reaper, TempDir};
use super::measure::rss_mib;
use super::report::{md_escape, shorten};

/// One micro-benchmark result.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub result: Result<(f64, String, String), String>,
}

/// All micro-benchmark results.
#[derive(Debug, Default)]
pub struct Micro {
    pub entries: Vec<Entry>,
    pub skipped: Option<String>,
}

impl Micro {
    pub fn skipped(why: &str) -> Micro {
        Micro {
            entries: Vec::new(),
            skipped: Some(why.to_string()),
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("## Micro-benchmarks of lb\n\n");
        if let Some(why) = &self.skipped {
            let _ = writeln!(s, "{why}");
            return s;
        }
        s.push_str("| benchmark | result | how |\n|---|---|---|\n");
        for e in &self.entries {
            let (result, how) = match &e.result {
                Ok((v, unit, detail)) => (format!("{} {unit}", fmt_value(*v)), detail.clone()),
                Err(why) => (format!("unavailable: {}", shorten(why, 200)), String::new()),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                md_escape(&e.name),
                md_escape(&result),
                md_escape(&how)
            );
        }
        s.push_str(
            "\n\"XDP precise\" rows: BPF_PROG_RUN's own average over its repeat loop, each run \
             starting from a fresh copy of a valid frame (a restore program tail-calls lb), minus \
             the restore program's own cost measured the same way. \"XDP live frames\" rows: \
             BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on one pinned CPU, the verdict carried \
             out (redirect into a veth whose far end drops and counts each frame). Other XDP \
             figures are BPF_PROG_TEST_RUN's own per-run average (kernel clock, no driver, no \
             memory traffic of a real NIC); they bound the program's cost, not the datapath's \
             throughput. Selection figures include the `Choice` the balancer returns (it clones the \
             backend name).\n",
        );
        s
    }

    pub fn json(&self) -> Value {
        json!({
            "skipped": self.skipped,
            "entries": self.entries.iter().map(|e| match &e.result {
                Ok((v, unit, detail)) => json!({"name": e.name, "value": v, "unit": unit, "detail": detail}),
                Err(why) => json!({"name": e.name, "unavailable": why}),
            }).collect::<Vec<_>>(),
        })
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Runs `lb-microbench` (when built) and the memory measurements; `kernel_only`: only the kernel
/// figures, the Maglev rebuild and the cost-growth measurements (`--cost`).
pub fn run(microbench: Option<&Path>, lb: &Path, quick: bool, kernel_only: bool) -> Micro {
    let mut m = Micro::default();
    eprintln!("bench: micro-benchmarks");
    match microbench {
        Some(bin) => {
            let mut cmd = Command::new(bin);
            if quick {
                cmd.arg("--quick");
            }
            if kernel_only {
                cmd.arg("--kernel");
            }
            match run_with_timeout(cmd, Duration::from_secs(300)) {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    for line in text.lines().filter(|l| l.starts_with('{')) {
                        if let Ok(v) = serde_json::from_str::<Value>(line) {
                            m.entries.push(entry(&v));
                        }
                    }
                    if !out.status.success() || m.entries.is_empty() {
                        m.entries.push(Entry {
                            name: "lb-microbench".to_string(),
                            result: Err(format!(
                                "exited {}: {}",
                                out.status,
                                shorten(String::from_utf8_lossy(&out.stderr).trim(), 300)
                            )),
                        });
                    }
                }
                Err(e) => m.entries.push(Entry {
                    name: "lb-microbench".to_string(),
                    result: Err(e.to_string()),
                }),
            }
        }
        None => m.entries.push(Entry {
            name: "XDP ns/packet, Maglev build, selection (lb-microbench)".to_string(),
            result: Err(
                "lb-microbench is not built: `cargo xtask bench` builds it unless --no-build or --no-micro \
                 (by hand: cargo build --release -p xtask --features micro --bin lb-microbench)"
                    .to_string(),
            ),
        }),
    }
    if !kernel_only {
        m.entries.extend(super::churn::run(lb, quick));
    }
    eprintln!("bench: idle connections (lb proxy, HAProxy) and daemon RSS with 16 services");
    m.entries.extend(super::scale::idle_connections(lb, quick));
    m.entries.extend(super::scale::daemon_services(lb));
    if kernel_only {
        return m;
    }
    for n in [1usize, 1000] {
        m.entries.push(Entry {
            name: format!("lb daemon RSS, one proxy service with {n} backend(s), health none"),
            result: daemon_rss(lb, 1, n).map(|mib| {
                (
                    mib,
                    "MiB".to_string(),
                    "VmRSS 1 s after start; ring_size 100003 (> 100 × 1000 backends)".to_string(),
                )
            }),
        });
    }
    m
}

fn entry(v: &Value) -> Entry {
    let name = v["name"].as_str().unwrap_or("?").to_string();
    let result = match (v["value"].as_f64(), v["unavailable"].as_str()) {
        (Some(x), _) => Ok((
            x,
            v["unit"].as_str().unwrap_or("").to_string(),
            v["detail"].as_str().unwrap_or("").to_string(),
        )),
        (None, Some(why)) => Err(why.to_string()),
        (None, None) => Err(format!("unreadable result {v}")),
    };
    Entry { name, result }
}

/// Config of `services` proxy services on 127.0.0.1:8080.. with `n` backends each on loopback
/// addresses (127.1.x.y), health checks off (nothing is ever sent to them).
fn rss_config(dir: &Path, services: usize, n: usize) -> String {
    let mut c = format!(
        "log_level = \"warn\"\nring_size = 100003\nshutdown_timeout = \"0s\"\n\n[control]\nsocket = \"{}\"\n",
        dir.join("lb.sock").display()
    );
    for s in 0..services {
        let _ = write!(
            c,
            "\n[[service]]\nname = \"big{s}\"\nlisten = \"127.0.0.1:{}\"\ndatapath = \"proxy\"\n\n[service.health]\nkind = \"none\"\n",
            8080 + s
        );
        for i in 0..n {
            let _ = write!(
                c,
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"127.1.{}.{}:80\"\n",
                i / 250,
                i % 250 + 1
            );
        }
    }
    c
}

/// Starts `lb run` with `services` × `n` backends in a namespace of its own (loopback only), reads
/// its VmRSS once its control socket answers, and stops it.
pub fn daemon_rss(lb: &Path, services: usize, n: usize) -> Result<f64, String> {
    let name = format!("lbb-{}-m", std::process::id());
    let dir = TempDir::try_in(&std::env::temp_dir(), &format!("{name}.d")).map_err(|e| format!("{e:#}"))?;
    let cfg = dir.path().join("lb.toml");
    fs::write(&cfg, rss_config(dir.path(), services, n)).map_err(|e| e.to_string())?;
    let ns = Netns::new(&name).map_err(|e| e.to_string())?;
    let _reaper = Reaper::new(vec![name.clone()]);
    let cfg_s = cfg.display().to_string();
    let mut child = Child::spawn({
        let mut c = ns.command(lb, &["run", "-c", cfg_s.as_str()]);
        c.env("NO_COLOR", "1");
        c
    })
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let socket = dir.path().join("lb.sock").display().to_string();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "lb run exited ({st}): {}",
                shorten(&child.stderr_text(), 300)
            ));
        }
        let mut status = Command::new(lb);
        status.args(["--socket", socket.as_str(), "status"]);
        if run_with_timeout(status, Duration::from_secs(5)).is_ok_and(|o| o.status.success()) {
            break;
        }
        if Instant::now() >= deadline {
            return Err("lb's control socket did not answer within 30 s".to_string());
        }
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_secs(1));
    let rss = rss_mib(&[child.pid()]).ok_or_else(|| "lb exited before its RSS was read".to_string());
    let _ = child.stop();
    rss
}
