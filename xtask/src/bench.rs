//! `cargo xtask bench`: lb side by side with HAProxy, nginx stream, nftables DNAT and no load
//! balancer at all, as ratios to that limit; plus micro-benchmarks of lb itself.
//!
//! ```text
//! sudo -E cargo xtask bench                  # 3 interleaved rounds, all rows: the run to cite
//! sudo -E cargo xtask bench --quick          # one short round (smoke check), into bench/quick/
//! sudo -E cargo xtask bench --rows none,lb-proxy --pin --out /tmp/b
//! sudo -E cargo xtask bench --ajp            # only the AJP chain (Apache → lb → Tomcats)
//! sudo -E cargo xtask bench --cost           # only the kernel figures and cost growth
//! sudo -E cargo xtask bench --cost --quick   # the same in seconds (smoke mode)
//! sudo -E cargo xtask bench --churn --no-build --lb-bin /tmp/lb-a --out /tmp/a   # runtime changes only
//! sudo -E cargo xtask bench --ajp-rows ajp-balancer,ajp-haproxy --quick --no-build --lb-bin target/debug/lb
//! ```
//!
//! A tour:
//!
//! - [`bed`]: the test bed. A [`lb_tests::Topology`] (client namespace with 30 extra addresses,
//!   lb namespace holding the VIP 10.0.0.100, three backend namespaces routed through it), and in
//!   each backend an `iperf3 -s` and an nginx answering `bI\n`. Every veth end gets TX checksum
//!   offload off and GRO on (see `bed::nic_like`). Everything goes away on drop, including any
//!   process left in the namespaces. Each row of each round gets a fresh bed.
//! - [`rows`]: the contenders (`none`, `lb-xdp`, `lb-xdp-native`, `lb-proxy`, `haproxy`, `nginx-stream`,
//!   `nft-dnat`), each started and configured by the bench in the lb namespace and stopped on drop.
//!   The one place to adjust the XDP config is [`rows::XDP_EXTRA_TOML`].
//! - [`measure`]: iperf3 (`-J`), wrk (`--latency`, text), CPU from `/proc/PID/stat` and
//!   `/proc/stat`, RSS from `/proc/PID/status`, TCP counters (SYN retransmits, listen drops) from
//!   each namespace's /proc/net/netstat, affinity probes from every client address.
//! - [`report`]: medians and ranges over rounds, ratios to `none`, the markdown table, the SVG
//!   chart and `results.json`.
//! - [`micro`]: runs `lb-microbench` (`src/bench/microbench.rs`, built with `--features micro`:
//!   XDP ns/packet via BPF_PROG_TEST_RUN, XDP cost of runtime changes at 1,000 backends, Maglev
//!   build time, selection per operation, and the kernel figures of `precise.rs`: ns/packet from
//!   BPF_PROG_RUN's repeat loop through a restore + tail-call chain, live-frames Mpps on one CPU
//!   beside a trivial XDP_TX, ns/packet with 10, 10k and 1M live flows), [`churn`] (1,000 backends
//!   added at runtime one request each and as one batch, per-change time with the daemon's own
//!   split, proxy latency before, during and after) and measures the daemon's RSS with 1 and 1,000
//!   backends.
//! - [`scale`]: cost as the work grows: proxy RSS per idle connection (lb vs HAProxy, 10k
//!   connections or what the descriptor limit allows), daemon RSS with 10, 100 and 1,000 backends
//!   × 16 services, and the chart of these and the kernel figures at the foot of `results.svg`.
//!   `--cost` runs only these and the kernel figures, into cost.md, cost.svg and cost.json.
//!
//! - [`failover`]: `--failover`, a backend killed under a `Connection: close` load: errors and
//!   time to move for lb-proxy, lb-xdp and HAProxy (`observe layer4`, inter 500 ms). A full run
//!   (no `--rows`) runs it after the AJP chain, into results.md and `failover` in results.json;
//!   `--failover` or `--failover-rows` runs only it, `--no-failover` skips it.
//! - [`ajp`]: the AJP chain, wrk → Apache httpd → load balancer → three Tomcat 10 (lb
//!   `datapath = "ajp"`, Apache mod_proxy_balancer as the anchor, HAProxy, lb `datapath =
//!   "proxy"`), its own table in `results.md` and `ajp` in `results.json`. A full run (no `--rows`)
//!   runs it after the other rows; `--ajp` or `--ajp-rows` runs only it, `--no-ajp` skips it.
//!
//! Rounds interleave the rows (each round runs every row once, in a rotated order) so slow drift of
//! the machine hits all rows alike; each cell is the median over rounds with the range beside it.
//! `LB_BENCH_DEBUG=1` prints every namespace's changed TCP counters after each wrk run.

mod ajp;
mod bed;
mod churn;
mod failover;
mod measure;
mod micro;
mod report;
mod rows;
mod scale;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use bed::Bed;
use report::RowResult;
use rows::RowKind;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// One short round (1 s iperf3, 2 s wrk) for smoke checks. Not the run to cite.
    #[arg(long)]
    quick: bool,
    /// Rounds (default 3; 1 with --quick). Every round runs every row once.
    #[arg(long)]
    rounds: Option<usize>,
    /// Rows to run, comma-separated: none, lb-xdp, lb-xdp-native, lb-xdp-dsr, lb-proxy, haproxy, nginx-stream, nft-dnat
    /// (default: all).
    #[arg(long, value_delimiter = ',', value_parser = RowKind::parse)]
    rows: Vec<RowKind>,
    /// Pin the client tools (wrk, iperf3 -c) to CPU 0 and the load balancer's processes to CPU 1
    /// with taskset. Off by default.
    #[arg(long)]
    pin: bool,
    /// Where results.md, results.svg and results.json go (default: <workspace>/bench, or
    /// <workspace>/bench/quick with --quick, which git ignores).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not build anything; use the binaries that exist (target/release/lb or --lb-bin).
    #[arg(long)]
    no_build: bool,
    /// The lb binary to benchmark (default: target/release/lb).
    #[arg(long)]
    lb_bin: Option<PathBuf>,
    /// Skip the micro-benchmarks.
    #[arg(long)]
    no_micro: bool,
    /// Run only the AJP chain (wrk → Apache → load balancer → three Tomcats), all its rows.
    #[arg(long)]
    ajp: bool,
    /// Run only these rows of the AJP chain, comma-separated: ajp-lb, ajp-balancer, ajp-haproxy,
    /// ajp-lb-proxy.
    #[arg(long, value_delimiter = ',', value_parser = ajp::AjpRow::parse)]
    ajp_rows: Vec<ajp::AjpRow>,
    /// Skip the AJP chain in a full run.
    #[arg(long)]
    no_ajp: bool,
    /// Run only the failover measurement (a backend killed under a `Connection: close` load),
    /// rows lb-proxy, lb-xdp, haproxy; writes failover.md and failover.json.
    #[arg(long)]
    failover: bool,
    /// Run only these rows of the failover measurement, comma-separated (lb-proxy, lb-xdp,
    /// haproxy).
    #[arg(long, value_delimiter = ',', value_parser = RowKind::parse)]
    failover_rows: Vec<RowKind>,
    /// Skip the failover measurement in a full run.
    #[arg(long)]
    no_failover: bool,
    /// Run only the kernel figures (XDP ns/packet, live-frames Mpps, growing flows), the Maglev
    /// rebuild and the cost-growth measurements (idle connections, daemon RSS); writes cost.md,
    /// cost.svg and cost.json. With --quick: the smoke mode (seconds).
    #[arg(long)]
    cost: bool,
    /// Run only the runtime-change measurement (add-backend, add-backends and drain/enable at
    /// 1,000 backends, with and without a state file); writes churn.md.
    #[arg(long)]
    churn: bool,
    /// The lb-microbench binary to run (default: the one built, or target/release/lb-microbench
    /// with --no-build).
    #[arg(long)]
    microbench: Option<PathBuf>,
}

/// Durations and sizes of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub iperf_secs: u32,
    pub wrk_secs: u32,
    pub wrk_threads: u32,
    pub wrk_connections: u32,
    pub pin: bool,
    pub rows: Vec<RowKind>,
}

/// Extra client addresses in the client namespace (10.0.0.10 ..= 10.0.0.39).
pub const CLIENTS: usize = 30;
/// Backends (10.1.I.2, I = 1..=3).
pub const BACKENDS: usize = 3;
/// CPU the client tools run on with `--pin`.
pub const CLIENT_CPU: u32 = 0;
/// CPU the load balancer's processes run on with `--pin`.
pub const LB_CPU: u32 = 1;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag; the bench stops at the next step and its drop guards clean up.
fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Fails once SIGINT/SIGTERM arrived, so `?` unwinds through the drop guards.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Paths of the binaries the bench runs.
struct Bins {
    lb: PathBuf,
    microbench: Option<PathBuf>,
    root: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "cargo xtask bench needs root (network namespaces, nftables, XDP); run it as root, \
             e.g. `sudo -E cargo xtask bench`"
        );
    }
    if args.ajp || !args.ajp_rows.is_empty() {
        return run_ajp_only(&args);
    }
    if args.failover || !args.failover_rows.is_empty() {
        return run_failover_only(&args);
    }
    if args.cost {
        return run_cost_only(&args);
    }
    if args.churn {
        return run_churn_only(&args);
    }
    let rows = if args.rows.is_empty() {
        RowKind::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for r in &args.rows {
            if !v.contains(r) {
                v.push(*r);
            }
        }
        v
    };
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let plan = Plan {
        quick: args.quick,
        rounds,
        iperf_secs: if args.quick { 1 } else { 3 },
        wrk_secs: if args.quick { 2 } else { 5 },
        wrk_threads: 2,
        wrk_connections: 32,
        pin: args.pin,
        rows,
    };
    check_tools(&plan)?;
    let bins = binaries(&args)?;
    let out = output_dir(args.out.as_deref(), &bins.root, plan.quick)?;
    install_signal_handlers();

    let started = Instant::now();
    let env = report::Environment::collect(&bins.root, &bins.lb, &plan);
    eprintln!(
        "bench: {} round(s) of {}; iperf3 {} s, wrk {} s (-t{} -c{}); pinning {}",
        plan.rounds,
        plan.rows.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
        plan.iperf_secs,
        plan.wrk_secs,
        plan.wrk_threads,
        plan.wrk_connections,
        if plan.pin { "on" } else { "off" }
    );

    let results = run_rows(&plan, &bins.lb)?;
    check_interrupted()?;

    // The AJP chain, in a full run (no row selection) unless --no-ajp.
    let ajp_report = if args.rows.is_empty() && !args.no_ajp {
        match check_ajp_tools(&ajp::AjpRow::ALL).and_then(|()| ajp::run(&plan, &bins.lb, &ajp::AjpRow::ALL)) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("bench: the AJP chain failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    check_interrupted()?;

    // The failover measurement, in a full run (no row selection) unless --no-failover.
    let failover_report = if args.rows.is_empty() && !args.no_failover {
        let fplan = Plan {
            rows: failover::ROWS.to_vec(),
            ..plan.clone()
        };
        match check_tools(&fplan).and_then(|()| failover::run(&fplan, &bins.lb, &failover::ROWS)) {
            Ok(r) => Some((fplan, r)),
            Err(e) => {
                eprintln!("bench: the failover measurement failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    check_interrupted()?;

    let micro = if args.no_micro {
        micro::Micro::skipped("skipped (--no-micro)")
    } else {
        micro::run(bins.microbench.as_deref(), &bins.lb, plan.quick, false)
    };
    check_interrupted()?;

    let report = report::Report {
        env,
        plan: plan.clone(),
        rows: results,
        micro,
        elapsed: started.elapsed(),
    };
    let mut md = report.markdown();
    let mut json = report.json();
    if let Some(a) = &ajp_report {
        md.push('\n');
        md.push_str(&a.markdown());
        json["ajp"] = a.json();
    }
    if let Some((fplan, f)) = &failover_report {
        md.push('\n');
        md.push_str(&failover::markdown(fplan, f));
        json["failover"] = failover::json(f);
    }
    println!("{md}");
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let svg_path = out.join("results.svg");
    std::fs::write(&svg_path, report.svg()).with_context(|| format!("writing {}", svg_path.display()))?;
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "bench: done in {:.0} s; wrote {}, {} and {}",
        report.elapsed.as_secs_f64(),
        md_path.display(),
        svg_path.display(),
        json_path.display()
    );
    if plan.quick {
        eprintln!("bench: --quick results are for smoke checks; run without --quick for numbers to cite");
    }
    Ok(())
}

/// Where a run writes: `--out`, else `bench/` (`bench/quick/` for `--quick`) in the workspace;
/// created if missing.
fn output_dir(out: Option<&Path>, root: &Path, quick: bool) -> Result<PathBuf> {
    let out = out.map_or_else(
        || {
            let bench = root.join("bench");
            if quick { bench.join("quick") } else { bench }
        },
        Path::to_path_buf,
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

/// `--churn`: only the runtime changes at 1,000 backends; writes `churn.md` into the output
/// directory.
fn run_churn_only(args: &BenchArgs) -> Result<()> {
    let bins = binaries(&BenchArgs {
        no_micro: true,
        ..args.clone()
    })?;
    let out = output_dir(args.out.as_deref(), &bins.root, args.quick)?;
    install_signal_handlers();
    let started = Instant::now();
    let m = micro::Micro {
        entries: churn::run(&bins.lb, args.quick),
        skipped: None,
    };
    let md = m.markdown();
    println!("{md}");
    let path = out.join("churn.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "bench: runtime changes done in {:.0} s; wrote {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// `--cost`: only the kernel figures and the cost-growth measurements; writes `cost.md`,
/// `cost.svg` and `cost.json` into the output directory.
fn run_cost_only(args: &BenchArgs) -> Result<()> {
    let bins = binaries(args)?;
    let out = output_dir(args.out.as_deref(), &bins.root, args.quick)?;
    install_signal_handlers();
    let started = Instant::now();
    let m = micro::run(bins.microbench.as_deref(), &bins.lb, args.quick, true);
    let md = m.markdown();
    println!("{md}");
    let width = 900.0;
    let (panel, h) = scale::chart(&m, 0.0, width);
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{h}\" viewBox=\"0 0 {width} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{panel}</svg>\n"
    );
    for (name, text) in [
        ("cost.md", md),
        ("cost.svg", svg),
        ("cost.json", serde_json::to_string_pretty(&m.json())?),
    ] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "bench: kernel figures and cost growth done in {:.0} s; wrote cost.md, cost.svg and cost.json in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

/// `--ajp` / `--ajp-rows`: only the AJP chain; writes `ajp.md` and `ajp.json` into the output
/// directory.
fn run_ajp_only(args: &BenchArgs) -> Result<()> {
    let rows = if args.ajp_rows.is_empty() {
        ajp::AjpRow::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for r in &args.ajp_rows {
            if !v.contains(r) {
                v.push(*r);
            }
        }
        v
    };
    let plan = Plan {
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        iperf_secs: 0,
        wrk_secs: if args.quick { 3 } else { 10 },
        wrk_threads: 2,
        wrk_connections: 32,
        pin: args.pin,
        rows: Vec::new(),
    };
    check_ajp_tools(&rows)?;
    if plan.pin && which("taskset").is_none() {
        bail!("missing tools: taskset; run `cargo xtask setup`");
    }
    let needs_lb = rows
        .iter()
        .any(|r| matches!(r, ajp::AjpRow::Lb | ajp::AjpRow::LbProxy));
    let bins = if needs_lb {
        binaries(&BenchArgs {
            no_micro: true,
            ..args.clone()
        })?
    } else {
        // No lb row: nothing to build; the path is never run.
        Bins {
            lb: args.lb_bin.clone().unwrap_or_default(),
            microbench: None,
            root: Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .context("xtask lives inside the workspace")?
                .to_path_buf(),
        }
    };
    let out = output_dir(args.out.as_deref(), &bins.root, plan.quick)?;
    install_signal_handlers();
    let started = Instant::now();
    eprintln!(
        "bench: AJP chain, {} round(s) of {}; wrk {} s (-t{} -c{})",
        plan.rounds,
        rows.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
        plan.wrk_secs,
        plan.wrk_threads,
        plan.wrk_connections
    );
    let report = ajp::run(&plan, &bins.lb, &rows)?;
    let md = report.markdown();
    println!("{md}");
    let md_path = out.join("ajp.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = out.join("ajp.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report.json())?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "bench: AJP chain done in {:.0} s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

/// `--failover` / `--failover-rows`: only the failover measurement; writes `failover.md` and
/// `failover.json` into the output directory.
fn run_failover_only(args: &BenchArgs) -> Result<()> {
    let mut rows = Vec::new();
    for r in if args.failover_rows.is_empty() {
        &failover::ROWS[..]
    } else {
        &args.failover_rows[..]
    } {
        if !failover::ROWS.contains(r) {
            bail!(
                "the failover measurement has rows {}, not {}",
                failover::ROWS.map(RowKind::name).join(", "),
                r.name()
            );
        }
        if !rows.contains(r) {
            rows.push(*r);
        }
    }
    let plan = Plan {
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        iperf_secs: 0,
        wrk_secs: 0,
        wrk_threads: 2,
        wrk_connections: 16,
        pin: args.pin,
        rows: rows.clone(),
    };
    check_tools(&plan)?;
    let bins = binaries(&BenchArgs {
        no_micro: true,
        ..args.clone()
    })?;
    let out = output_dir(args.out.as_deref(), &bins.root, plan.quick)?;
    install_signal_handlers();
    let started = Instant::now();
    let results = failover::run(&plan, &bins.lb, &rows)?;
    let md = failover::markdown(&plan, &results);
    println!("{md}");
    let md_path = out.join("failover.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = out.join("failover.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&failover::json(&results))?,
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "bench: failover done in {:.0} s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

/// The AJP chain's tools: wrk, Apache (with its modules), Tomcat and java, HAProxy for its row.
fn check_ajp_tools(rows: &[ajp::AjpRow]) -> Result<()> {
    let mut missing: Vec<String> = ["ip", "wrk"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .map(String::from)
        .collect();
    if rows.contains(&ajp::AjpRow::Haproxy) && which("haproxy").is_none() {
        missing.push("haproxy".to_string());
    }
    if let Err(e) = lb_tests::apache::check_installed() {
        missing.push(e);
    }
    if let Err(e) = lb_tests::tomcat::check_installed() {
        missing.push(e);
    }
    if !missing.is_empty() {
        bail!(
            "missing for the AJP chain: {}; run `cargo xtask setup`",
            missing.join("; ")
        );
    }
    Ok(())
}

/// The eBPF object whose `lb_decap` the dsr bed's backends run: `LB_EBPF_OBJECT`, else the one
/// `cargo xtask build` leaves in the workspace.
fn dsr_object() -> Result<PathBuf, String> {
    let object = match std::env::var_os("LB_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => crate::Workspace::locate()
            .map_err(|e| format!("no workspace to find the eBPF object in: {e:#}"))?
            .root
            .join("lb-ebpf/target/bpfel-unknown-none/release/lb-ebpf"),
    };
    if object.is_file() {
        Ok(object)
    } else {
        Err(format!(
            "the backends decapsulate with lb_decap from the eBPF object, and {} does not exist (run cargo xtask build or set LB_EBPF_OBJECT)",
            object.display()
        ))
    }
}

/// Runs every row once per round (rotated order), each on a fresh test bed: no row inherits
/// another's TIME_WAIT sockets, conntrack entries, neighbour entries or sysctls. (TIME_WAIT left on
/// a backend by a proxy row, for instance, makes the backend refuse the SYNs of a NAT row that
/// reuses those source ports with other TCP timestamps: PAWS.)
fn run_rows(plan: &Plan, lb: &Path) -> Result<BTreeMap<RowKind, RowResult>> {
    let prefix = format!("lbb-{}", std::process::id());
    let mut results: BTreeMap<RowKind, RowResult> =
        plan.rows.iter().map(|r| (*r, RowResult::default())).collect();
    for round in 0..plan.rounds {
        let n = plan.rows.len();
        for k in 0..n {
            check_interrupted()?;
            let row = plan.rows[(k + round) % n];
            let res = results.get_mut(&row).expect("every row has a result");
            if res.unavailable.is_some() {
                continue;
            }
            let t = Instant::now();
            let mut bed = if row == RowKind::LbXdpDsr {
                match dsr_object() {
                    Ok(object) => Bed::new_dsr(&prefix, BACKENDS, CLIENTS, &object)?,
                    Err(why) => {
                        eprintln!("bench:   {} unavailable: {why}", row.name());
                        res.unavailable = Some(why);
                        continue;
                    }
                }
            } else {
                Bed::new(&prefix, BACKENDS, CLIENTS)?
            };
            eprintln!(
                "bench: round {}/{}: {} (test bed up in {:.1} s)",
                round + 1,
                plan.rounds,
                row.name(),
                t.elapsed().as_secs_f64()
            );
            rows::run_once(&bed, row, plan, lb, res)?;
            let dead = bed.dead_servers();
            if !dead.is_empty() {
                bail!(
                    "backend servers exited during the {} row: {}",
                    row.name(),
                    dead.join("; ")
                );
            }
            drop(bed);
            eprintln!(
                "bench:   {} done in {:.1} s",
                row.name(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(results)
}

/// The peers must be installed; `cargo xtask setup` installs them.
fn check_tools(plan: &Plan) -> Result<()> {
    let mut needed = vec!["ip", "iperf3", "wrk", "nginx"];
    if plan.rows.contains(&RowKind::Haproxy) {
        needed.push("haproxy");
    }
    if plan.rows.contains(&RowKind::NftDnat) {
        needed.push("nft");
    }
    if plan.pin {
        needed.push("taskset");
    }
    let missing: Vec<&str> = needed.into_iter().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() {
        bail!("missing tools: {}; run `cargo xtask setup`", missing.join(", "));
    }
    if plan.rows.contains(&RowKind::NginxStream) && !Path::new(rows::NGINX_STREAM_MODULE).is_file() {
        bail!(
            "{} is missing (Debian package libnginx-mod-stream); run `cargo xtask setup`",
            rows::NGINX_STREAM_MODULE
        );
    }
    Ok(())
}

/// A program's path in `$PATH` (plus the sbin directories root normally has).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Builds lb (release) and lb-microbench unless `--no-build`, then finds the binaries.
fn binaries(args: &BenchArgs) -> Result<Bins> {
    if args.no_build {
        // Next to the running xtask (target/{debug,release}/xtask) is the target directory.
        let target = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf));
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask lives inside the workspace")?
            .to_path_buf();
        let target = target.unwrap_or_else(|| root.join("target"));
        let lb = args.lb_bin.clone().unwrap_or_else(|| target.join("release/lb"));
        if !lb.is_file() {
            bail!(
                "{} does not exist; build it (`cargo xtask build --release`), pass --lb-bin, or drop --no-build",
                lb.display()
            );
        }
        let micro = args
            .microbench
            .clone()
            .unwrap_or_else(|| target.join("release/lb-microbench"));
        return Ok(Bins {
            lb: absolute(&lb),
            microbench: micro.is_file().then_some(micro),
            root,
        });
    }
    let ws = crate::Workspace::locate()?;
    let built = ws.build(true)?;
    let mut microbench = args.microbench.clone();
    if !args.no_micro && microbench.is_none() {
        let t = Instant::now();
        let status = ws
            .cargo()
            .env("LB_EBPF_OBJECT", &built.object)
            .args([
                "build",
                "--release",
                "-p",
                "xtask",
                "--features",
                "micro",
                "--bin",
                "lb-microbench",
            ])
            .status()?;
        if status.success() {
            eprintln!("xtask: lb-microbench built in {:.1}s", t.elapsed().as_secs_f64());
            microbench = Some(ws.target.join("release/lb-microbench"));
        } else {
            eprintln!("bench: building lb-microbench failed ({status}); micro-benchmarks will say so");
        }
    }
    let lb = args.lb_bin.clone().unwrap_or(built.lb);
    Ok(Bins {
        lb: absolute(&lb),
        microbench,
        root: ws.root,
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Output of a short command (trimmed stdout, else stderr), or `None` when it cannot run.
pub fn probe_text(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    Some(text.trim().to_string())
}
