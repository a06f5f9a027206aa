//! The rows of the table: what runs in the lb namespace for each, how it is configured, started,
//! checked and measured. Every row serves the same two services on the VIP 10.0.0.100 (HTTP on
//! :80 → bI:80, iperf3 on :5201 → bI:5201) over the same three backends, with source-IP
//! affinity where the load balancer has it.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use lb_tests::{Child, run_with_timeout};

use super::bed::{Bed, HTTP_PORT, IPERF_PORT, TempDir};
use super::measure::{self, CpuSample};
use super::report::RowResult;
use super::{BACKENDS, Plan, check_interrupted};

// ==== ADJUST HERE when the XDP datapath's config changes =========================================
/// Extra top-level TOML for the `lb-xdp` row's config, inserted after the top-level keys and before
/// `[control]`: the lb namespace's interfaces (client side `to-c`, backend sides `to-b1`..`to-b3`)
/// and a pin directory of this run's own (`{pid}` is replaced by the bench's PID), removed with
/// `lb cleanup` after every run so nothing is left behind. When lb's config refuses the table as
/// an unknown key, the row is retried without it, and the reason shown names both errors.
pub const XDP_EXTRA_TOML: &str = r#"[xdp]
interfaces = ["to-c", "to-b1", "to-b2", "to-b3"]
pin_path = "/sys/fs/bpf/lbbench-{pid}"
"#;
// =================================================================================================

/// What the `lb-xdp-native` row adds to [`XDP_EXTRA_TOML`] (which ends inside the `[xdp]` table):
/// the XDP hook, which `mode = "auto"` does not take on the bed's veths.
const XDP_NATIVE_TOML: &str = "mode = \"driver\"\n";

/// The stream module of Debian's nginx (package libnginx-mod-stream).
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// The nftables table the `nft-dnat` row creates in the lb namespace.
const NFT_TABLE: &str = "lbbench";

/// Affinity probes per client address and round.
const PROBES_PER_CLIENT: usize = 3;

/// How long a row may take to answer HTTP through the VIP after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RowKind {
    /// No load balancer: the client talks to backend 1 directly, routed through the lb namespace.
    None,
    /// `[xdp] mode` left at `auto`: on the bed's veths, the TC hook.
    LbXdp,
    /// [`RowKind::LbXdp`] with `[xdp] mode = "driver"`: the same datapath at the XDP hook.
    LbXdpNative,
    /// `forwarding = "dsr"` on a dsr bed ([`super::bed::Bed::new_dsr`]).
    LbXdpDsr,
    LbProxy,
    Haproxy,
    NginxStream,
    NftDnat,
}

impl RowKind {
    pub const ALL: [RowKind; 8] = [
        RowKind::None,
        RowKind::LbXdp,
        RowKind::LbXdpNative,
        RowKind::LbXdpDsr,
        RowKind::LbProxy,
        RowKind::Haproxy,
        RowKind::NginxStream,
        RowKind::NftDnat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RowKind::None => "none",
            RowKind::LbXdp => "lb-xdp",
            RowKind::LbXdpNative => "lb-xdp-native",
            RowKind::LbXdpDsr => "lb-xdp-dsr",
            RowKind::LbProxy => "lb-proxy",
            RowKind::Haproxy => "haproxy",
            RowKind::NginxStream => "nginx-stream",
            RowKind::NftDnat => "nft-dnat",
        }
    }

    /// What the row is, for the notes under the table.
    pub fn description(self) -> &'static str {
        match self {
            RowKind::None => {
                "no load balancer: client → backend b1 directly, routed by the lb namespace's own kernel forwarding (the reference for the ratios)"
            }
            RowKind::LbXdp => {
                "lb, datapath = \"xdp\" (eBPF full NAT), [xdp] mode = \"auto\" (on these veths: the program at TC ingress, a TCX link, the skb redirected without a copy, straight into the backend's or client's namespace: redirect_peer), health tcp, affinity 30m"
            }
            RowKind::LbXdpNative => {
                "lb-xdp with [xdp] mode = \"driver\": the same program at the XDP hook (veth's native XDP: every frame copied into a page before the program, GSO off on the peer)"
            }
            RowKind::LbXdpDsr => {
                "lb, datapath = \"xdp\", forwarding = \"dsr\", mode auto as lb-xdp (IPIP to the backends, which decapsulate with lb_decap and answer through their own route, advmss 1440), health tcp, affinity 30m"
            }
            RowKind::LbProxy => "lb, datapath = \"proxy\" (tokio user-space proxy), health tcp, affinity 30m",
            RowKind::Haproxy => "HAProxy mode tcp, balance source, hash-type consistent, check inter 1s",
            RowKind::NginxStream => {
                "nginx stream, hash $remote_addr consistent, worker_processes auto (passive health only)"
            }
            RowKind::NftDnat => {
                "nftables DNAT in the lb namespace, jhash ip saddr mod 3 (kernel NAT + conntrack)"
            }
        }
    }

    /// Forwarding happens in the kernel (no load-balancer process to measure).
    pub fn kernel(self) -> bool {
        matches!(
            self,
            RowKind::None | RowKind::NftDnat | RowKind::LbXdp | RowKind::LbXdpNative | RowKind::LbXdpDsr
        )
    }

    pub fn parse(s: &str) -> Result<RowKind, String> {
        RowKind::ALL
            .into_iter()
            .find(|r| r.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown row `{s}`; rows are {}",
                    RowKind::ALL.map(RowKind::name).join(", ")
                )
            })
    }
}

/// Why a row did not start.
enum StartError {
    /// The row cannot run on this build (lb-xdp before the XDP datapath exists): skipped from now on.
    Unavailable(String),
    /// Something went wrong; recorded, and retried next round.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Failed(e)
    }
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::Failed(e.into())
    }
}

/// `nft delete table` in the lb namespace on drop.
struct NftTable<'a> {
    bed: &'a Bed,
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self
            .bed
            .topo
            .lb_ns()
            .exec(&["nft", "delete", "table", "ip", NFT_TABLE]);
    }
}

/// `lb cleanup -c CONFIG` on drop (after lb stopped): removes the XDP pins of the run, both as
/// `ip netns exec` sees /sys/fs/bpf (a private mount) and in the host's mount namespace.
struct LbCleanup<'a> {
    bed: &'a Bed,
    lb: PathBuf,
    config: PathBuf,
    /// `net.ipv4.ip_local_reserved_ports` of the lb namespace before lb reserved its SNAT ports:
    /// restored, so the rows after this one get the same ephemeral ports as the rows before it.
    reserved_ports: Option<String>,
}

impl Drop for LbCleanup<'_> {
    fn drop(&mut self) {
        if let Some(v) = &self.reserved_ports {
            let _ = self.bed.topo.lb_ns().sysctl(
                "net.ipv4.ip_local_reserved_ports",
                if v.is_empty() { "\n" } else { v },
            );
        }
        let cfg = self.config.display().to_string();
        let lb = self.lb.display().to_string();
        let _ = self
            .bed
            .topo
            .lb_ns()
            .exec(&[lb.as_str(), "cleanup", "-c", cfg.as_str()]);
        let _ = std::process::Command::new(&self.lb)
            .args(["cleanup", "-c", cfg.as_str()])
            .output();
    }
}

/// A started row. Drop order: processes, lb's XDP pins, the nft table, then the config directory.
pub(super) struct Running<'a> {
    procs: Vec<Child>,
    /// lb's control socket (lb rows): its status is noted after the run.
    pub(super) control: Option<(PathBuf, PathBuf)>,
    _cleanup: Option<LbCleanup<'a>>,
    _nft: Option<NftTable<'a>>,
    pub(super) web: SocketAddrV4,
    iperf: SocketAddrV4,
    _dir: Option<TempDir>,
}

impl Running<'_> {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::pid).collect()
    }

    /// Stops the processes; a non-zero exit other than by our SIGTERM is reported.
    pub(super) fn stop(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &mut self.procs {
            if let Ok(Some(st)) = c.try_wait() {
                problems.push(format!(
                    "{} exited during the run ({st}): {}",
                    c.description(),
                    tail(&c.stderr_text(), 3)
                ));
            }
            let _ = c.stop();
        }
        problems
    }
}

/// The last `n` non-empty lines of `text`, joined with " / ", without terminal colour codes.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    strip_ansi(&lines[lines.len().saturating_sub(n)..].join(" / "))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The error lines of an lb run or check-config (`error: …`, or tracing ERROR lines), else its tail.
fn lb_error(stderr: &str) -> String {
    let clean = strip_ansi(stderr);
    let errors: Vec<&str> = clean
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("error") || l.contains("ERROR"))
        .collect();
    if errors.is_empty() {
        tail(&clean, 2)
    } else {
        errors.join(" / ")
    }
}

/// Starts `row`, measures it once (one round) into `res`, stops it. Only an interruption is an
/// error; failures are recorded in `res`.
pub fn run_once(bed: &Bed, row: RowKind, plan: &Plan, lb: &Path, res: &mut RowResult) -> Result<()> {
    res.kernel = row.kernel();
    let running = match start(bed, row, plan, lb) {
        Ok(r) => r,
        Err(StartError::Unavailable(why)) => {
            eprintln!("bench:   {} unavailable: {why}", row.name());
            res.unavailable = Some(why);
            return Ok(());
        }
        Err(StartError::Failed(e)) => {
            eprintln!("bench:   {} failed to start: {e:#}", row.name());
            res.failures.push(format!("start: {e:#}"));
            return Ok(());
        }
    };
    let pids = running.pids();

    for (streams, out) in [(1, &mut res.iperf1), (4, &mut res.iperf4)] {
        check_interrupted()?;
        match iperf_retrying(bed, plan, running.iperf, streams, &mut res.notes) {
            Ok(g) => out.push(g),
            Err(e) => res.failures.push(format!("iperf3 -P {streams}: {e:#}")),
        }
    }

    // Where dropped SYNs would show: client and lb (SYN retransmits), lb and backends (listen drops).
    let topo = &bed.topo;
    let syn_side = [topo.client_ns(), topo.lb_ns()];
    let mut listen_side = vec![topo.lb_ns()];
    for i in 1..=BACKENDS {
        listen_side.push(topo.backend_ns(i));
    }
    for close in [false, true] {
        check_interrupted()?;
        let (syn_before, listen_before) = (measure::tcp_ext(&syn_side), measure::tcp_ext(&listen_side));
        let debug = std::env::var_os("LB_BENCH_DEBUG").is_some();
        let all: Vec<&lb_tests::Netns> = std::iter::once(topo.client_ns())
            .chain(listen_side.iter().copied())
            .collect();
        let per_ns_before: Vec<_> = if debug {
            all.iter().map(|n| measure::tcp_ext(&[n])).collect()
        } else {
            Vec::new()
        };
        let before = CpuSample::take(&pids);
        match measure::wrk(bed, plan, running.web, close) {
            Ok(w) => {
                let (cpu, soft) = CpuSample::take(&pids).since(&before);
                let (rps, p99, cpus, softs) = if close {
                    (
                        &mut res.close_rps,
                        &mut res.close_p99,
                        &mut res.cpu_close,
                        &mut res.soft_close,
                    )
                } else {
                    (
                        &mut res.ka_rps,
                        &mut res.ka_p99,
                        &mut res.cpu_ka,
                        &mut res.soft_ka,
                    )
                };
                rps.push(w.requests_per_sec);
                p99.push(w.p99_ms);
                if !row.kernel() {
                    cpus.push(cpu);
                }
                softs.push(soft);
                if debug {
                    for (n, b) in all.iter().zip(&per_ns_before) {
                        let a = measure::tcp_ext(&[n]);
                        let changed: Vec<String> = a
                            .keys()
                            .filter_map(|k| {
                                let d = measure::delta(b, &a, k);
                                (d > 0).then(|| format!("{k} {d}"))
                            })
                            .collect();
                        eprintln!(
                            "bench:   debug: {} wrk {}: {}: {}",
                            row.name(),
                            if close { "close" } else { "keep-alive" },
                            n.name(),
                            changed.join(", ")
                        );
                    }
                }
                let mut errs = w.error_text();
                let syn = measure::delta(&syn_before, &measure::tcp_ext(&syn_side), "TCPSynRetrans");
                let drops = measure::delta(&listen_before, &measure::tcp_ext(&listen_side), "ListenDrops");
                for (n, what) in [(syn, "SYN retransmits"), (drops, "listen drops")] {
                    if n > 0 {
                        if !errs.is_empty() {
                            errs.push_str(", ");
                        }
                        errs.push_str(&format!("{what} {n}"));
                    }
                }
                if !errs.is_empty() {
                    res.wrk_errors
                        .push(format!("{}: {errs}", if close { "close" } else { "keep-alive" }));
                }
            }
            Err(e) => res.failures.push(format!(
                "wrk {}: {e:#}",
                if close { "close" } else { "keep-alive" }
            )),
        }
    }
    close_loops(bed, plan, running.web, res, &syn_side)?;
    if !row.kernel() {
        match measure::rss_mib(&pids) {
            Some(r) => res.rss.push(r),
            None => res.failures.push("RSS: process gone".to_string()),
        }
    }

    check_interrupted()?;
    let (reached, errors) = measure::affinity(bed, running.web, PROBES_PER_CLIENT);
    for (c, set) in reached {
        res.reached.entry(c).or_default().extend(set);
    }
    if !errors.is_empty() {
        res.failures.push(format!(
            "affinity probes: {} of {} failed, e.g. {}",
            errors.len(),
            bed.topo.client_addrs().len() * PROBES_PER_CLIENT,
            errors[0]
        ));
    }
    if let Some(note) = running
        .control
        .as_ref()
        .and_then(|(lb, socket)| lb_counters(lb, socket))
    {
        res.notes.push(note);
    }
    res.failures.extend(running.stop());
    Ok(())
}

/// Keep-alive connections of the steady background load beside the close loop, and the pause
/// (ms) each takes between a response and its next request (wrk's Lua `delay`).
const BACKGROUND_CONNECTIONS: u32 = 16;
const BACKGROUND_DELAY_MS: u32 = 1;

/// Connection-per-request loops of 4 connections (one wrk thread, as one client would open them):
/// alone, then beside a steady keep-alive background from the same client address (mixed traffic,
/// where a datapath that mishandles reused client ports stalls handshakes). The background is
/// paced (each of its connections pauses [`BACKGROUND_DELAY_MS`] between requests), so every row
/// carries the same amount of it and the close loop's rate compares datapaths: an unpaced one
/// took whatever CPU the close loop left, and the close loop's rate swung with how the two split
/// the CPUs. Its own rate is recorded too (equal across rows when nothing starves it). SYN
/// retransmits in the client and lb namespaces are reported as errors.
fn close_loops(
    bed: &Bed,
    plan: &Plan,
    web: SocketAddrV4,
    res: &mut RowResult,
    syn_side: &[&lb_tests::Netns],
) -> Result<()> {
    // The keep-alive load starts half a second before the close loop and ends half a second after.
    let around = Plan {
        wrk_secs: plan.wrk_secs + 1,
        ..plan.clone()
    };
    let paced = bed.dir.path().join("paced.lua");
    fs::write(
        &paced,
        format!("function delay()\n  return {BACKGROUND_DELAY_MS}\nend\n"),
    )
    .with_context(|| format!("writing {}", paced.display()))?;
    for mixed in [false, true] {
        check_interrupted()?;
        let what = if mixed {
            "close x4 + paced keep-alive"
        } else {
            "close x4"
        };
        let syn_before = measure::tcp_ext(syn_side);
        let (result, keepalive) = thread::scope(|scope| {
            let keepalive = mixed.then(|| {
                let load = scope.spawn(|| {
                    measure::wrk_with(bed, &around, web, 1, BACKGROUND_CONNECTIONS, false, Some(&paced))
                });
                thread::sleep(Duration::from_millis(500));
                load
            });
            let result = measure::wrk_with(bed, plan, web, 1, 4, true, None);
            (result, keepalive.map(thread::ScopedJoinHandle::join))
        });
        match keepalive {
            Some(Ok(Ok(w))) => res.mixed_ka_rps.push(w.requests_per_sec),
            Some(Ok(Err(e))) => res.failures.push(format!("wrk {what}: keep-alive load: {e:#}")),
            Some(Err(_)) => res
                .failures
                .push(format!("wrk {what}: keep-alive load: its thread panicked")),
            None => {}
        }
        match result {
            Ok(w) => {
                if mixed {
                    res.mixed_rps.push(w.requests_per_sec);
                } else {
                    res.close4_rps.push(w.requests_per_sec);
                }
                let mut errs = w.error_text();
                let syn = measure::delta(&syn_before, &measure::tcp_ext(syn_side), "TCPSynRetrans");
                if syn > 0 {
                    if !errs.is_empty() {
                        errs.push_str(", ");
                    }
                    errs.push_str(&format!("SYN retransmits {syn}"));
                }
                if !errs.is_empty() {
                    res.wrk_errors.push(format!("{what}: {errs}"));
                }
            }
            Err(e) => res.failures.push(format!("wrk {what}: {e:#}")),
        }
    }
    Ok(())
}

/// lb's XDP counters (`lb --json status`, key `xdp`), the non-zero ones, as one note.
fn lb_counters(lb: &Path, socket: &Path) -> Option<String> {
    let mut cmd = std::process::Command::new(lb);
    cmd.arg("--socket").arg(socket).args(["--json", "status"]);
    let out = run_with_timeout(cmd, Duration::from_secs(10)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let xdp = v["result"]["xdp"].as_object()?;
    let counters: Vec<String> = xdp
        .iter()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    Some(format!("kernel counters after the run: {}", counters.join(", ")))
}

/// iperf3 again (up to 7 times) when the server is still busy with the previous test (1 s
/// apart), or the VIP's iperf3 service does not forward yet right after the start (0.3 s apart;
/// the readiness check only covers the HTTP service).
fn iperf_retrying(
    bed: &Bed,
    plan: &Plan,
    target: SocketAddrV4,
    streams: u32,
    notes: &mut Vec<String>,
) -> Result<f64> {
    let mut last = None;
    let mut garbled = false;
    for _ in 0..8 {
        match measure::iperf(bed, plan, target, streams) {
            Ok(g) => return Ok(g),
            Err(e) => {
                let text = format!("{e:#}");
                let wait = if text.contains("busy") {
                    Duration::from_secs(1)
                } else if text.contains("unable to connect") {
                    Duration::from_millis(300)
                } else if text.contains("unknown control message") && !garbled {
                    // Seen now and then through lb-xdp and not yet explained: retried once, and
                    // reported in the row's notes so the figure never hides it.
                    garbled = true;
                    notes.push(format!("iperf3 -P {streams}: retried once after: {text}"));
                    Duration::from_secs(1)
                } else {
                    return Err(e);
                };
                last = Some(e);
                thread::sleep(wait);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("iperf3 failed")))
}

fn vip_web(bed: &Bed) -> SocketAddrV4 {
    SocketAddrV4::new(bed.topo.vip(), HTTP_PORT)
}

fn vip_iperf(bed: &Bed) -> SocketAddrV4 {
    SocketAddrV4::new(bed.topo.vip(), IPERF_PORT)
}

/// How the rows check their backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Checks {
    /// The throughput rows: checks every second.
    Bench,
    /// The failover measurement: checks every 500 ms, fall 2, and passive health (lb's default
    /// `observe = "layer4"`; HAProxy `observe layer4 error-limit 3 on-error mark-down`).
    Failover,
}

fn start<'a>(bed: &'a Bed, row: RowKind, plan: &Plan, lb: &Path) -> Result<Running<'a>, StartError> {
    start_with(bed, row, plan, lb, Checks::Bench).map_err(|e| e.0)
}

/// Why a row did not start, for the failover measurement.
pub(super) struct NotStarted(StartError);

impl NotStarted {
    /// The reason, and whether the row cannot run on this build at all.
    pub(super) fn explain(self) -> (String, bool) {
        match self.0 {
            StartError::Unavailable(why) => (why, true),
            StartError::Failed(e) => (format!("{e:#}"), false),
        }
    }
}

/// Starts `row` with the given checks (`Checks::Failover` for the failover measurement).
pub(super) fn start_with<'a>(
    bed: &'a Bed,
    row: RowKind,
    plan: &Plan,
    lb: &Path,
    checks: Checks,
) -> Result<Running<'a>, NotStarted> {
    start_row(bed, row, plan, lb, checks).map_err(NotStarted)
}

fn start_row<'a>(
    bed: &'a Bed,
    row: RowKind,
    plan: &Plan,
    lb: &Path,
    checks: Checks,
) -> Result<Running<'a>, StartError> {
    match row {
        RowKind::None => Ok(Running {
            procs: Vec::new(),
            control: None,
            _cleanup: None,
            _nft: None,
            web: bed.backend_http(1),
            iperf: bed.backend_iperf(1),
            _dir: None,
        }),
        RowKind::LbProxy => start_lb(bed, plan, lb, "proxy", "", "", checks),
        RowKind::LbXdpDsr => start_lb(bed, plan, lb, "xdp", XDP_EXTRA_TOML, DSR_SERVICE_TOML, checks),
        RowKind::LbXdpNative => {
            let extra = format!("{XDP_EXTRA_TOML}{XDP_NATIVE_TOML}");
            start_lb(bed, plan, lb, "xdp", &extra, "", checks)
        }
        RowKind::LbXdp => match start_lb(bed, plan, lb, "xdp", XDP_EXTRA_TOML, "", checks) {
            Err(StartError::Unavailable(why)) if why.contains("unknown key `xdp`") => {
                match start_lb(bed, plan, lb, "xdp", "", "", checks) {
                    Err(StartError::Unavailable(why2)) => Err(StartError::Unavailable(format!(
                        "{why2} (with XDP_EXTRA_TOML: {why})"
                    ))),
                    other => other,
                }
            }
            other => other,
        },
        RowKind::Haproxy => start_haproxy(bed, plan, checks),
        RowKind::NginxStream => start_nginx_stream(bed, plan),
        RowKind::NftDnat => start_nft(bed),
    }
}

/// Waits until HTTP answers through the VIP; fails when a process exits first.
fn await_ready(bed: &Bed, procs: &mut [Child], what: &str) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for c in procs.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                // Let the stderr reader catch up with the last lines.
                thread::sleep(Duration::from_millis(100));
                return Err(format!("{what} exited ({st}): {}", lb_error(&c.stderr_text())));
            }
        }
        match bed.get(bed.topo.client_primary_addr(), SocketAddr::V4(vip_web(bed))) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let logs: Vec<String> = procs.iter().map(|c| tail(&c.stderr_text(), 3)).collect();
                return Err(format!(
                    "{what} started but HTTP via the VIP did not answer within {READY_TIMEOUT:?}: {e}; log: {}",
                    logs.join(" | ")
                ));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// What the `lb-xdp-dsr` row adds to every service table.
const DSR_SERVICE_TOML: &str = "forwarding = \"dsr\"\n";

fn lb_config(
    bed: &Bed,
    dir: &Path,
    datapath: &str,
    extra: &str,
    service_extra: &str,
    checks: Checks,
) -> String {
    let health = match checks {
        Checks::Bench => "interval = \"1s\"",
        // error_limit 3 is the default; written out so the row says what it measures.
        Checks::Failover => {
            "interval = \"500ms\"\ntimeout = \"400ms\"\nfall = 2\nobserve = \"layer4\"\nerror_limit = 3"
        }
    };
    // LB_BENCH_SPLICE picks the proxy's relay mode (`splice`), to compare them; unset, the default.
    let splice = match std::env::var("LB_BENCH_SPLICE") {
        Ok(mode) if datapath == "proxy" => format!("splice = \"{mode}\"\n"),
        _ => String::new(),
    };
    let mut c = String::new();
    c.push_str("# lb config written by cargo xtask bench\nlog_level = \"warn\"\nseed = 0\nshutdown_timeout = \"1s\"\n\n");
    c.push_str(&extra.replace("{pid}", &std::process::id().to_string()));
    let _ = write!(c, "\n[control]\nsocket = \"{}\"\n", dir.join("lb.sock").display());
    for (name, port) in [("web", HTTP_PORT), ("iperf", IPERF_PORT)] {
        let _ = write!(
            c,
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{vip}:{port}\"\ndatapath = \"{datapath}\"\n\
             affinity_timeout = \"30m\"\nmax_connections = 8000\n{service_extra}{splice}\n[service.health]\nkind = \"tcp\"\n\
             {health}\nport = {HTTP_PORT}\n",
            vip = bed.topo.vip()
        );
        for i in 1..=BACKENDS {
            let _ = write!(
                c,
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{port}\"\n",
                bed.topo.backend_addr(i)
            );
        }
    }
    c
}

fn start_lb<'a>(
    bed: &'a Bed,
    plan: &Plan,
    lb: &Path,
    datapath: &str,
    extra: &str,
    service_extra: &str,
    checks: Checks,
) -> Result<Running<'a>, StartError> {
    let xdp = datapath == "xdp";
    let dir = TempDir::try_in(bed.dir.path(), &format!("lb-{datapath}"))?;
    let cfg = dir.path().join("lb.toml");
    fs::write(
        &cfg,
        lb_config(bed, dir.path(), datapath, extra, service_extra, checks),
    )?;
    let mut check = std::process::Command::new(lb);
    check.arg("check-config").arg(&cfg).env("NO_COLOR", "1");
    let out = run_with_timeout(check, Duration::from_secs(10))?;
    if !out.status.success() {
        let why = format!(
            "lb check-config: {}",
            lb_error(&String::from_utf8_lossy(&out.stderr))
        );
        return Err(if xdp {
            StartError::Unavailable(why)
        } else {
            StartError::Failed(anyhow!(why))
        });
    }
    // Declared before the process, so it runs after lb stopped (locals drop in reverse order).
    let cleanup = xdp.then(|| LbCleanup {
        bed,
        lb: lb.to_path_buf(),
        config: cfg.clone(),
        reserved_ports: bed
            .topo
            .lb_ns()
            .sysctl_get("net.ipv4.ip_local_reserved_ports")
            .ok(),
    });
    let mut cmd = bed.lb_command(plan.pin, lb, &["run", "-c", &cfg.display().to_string()]);
    cmd.env("NO_COLOR", "1");
    let child = Child::spawn(cmd)?;
    let mut procs = vec![child];
    if let Err(why) = await_ready(bed, &mut procs, "lb run") {
        let exited = procs[0].try_wait().ok().flatten().is_some();
        return Err(if xdp && exited {
            StartError::Unavailable(why)
        } else {
            StartError::Failed(anyhow!(why))
        });
    }
    Ok(Running {
        procs,
        control: Some((lb.to_path_buf(), dir.path().join("lb.sock"))),
        _cleanup: cleanup,
        _nft: None,
        web: vip_web(bed),
        iperf: vip_iperf(bed),
        _dir: Some(dir),
    })
}

fn start_haproxy<'a>(bed: &'a Bed, plan: &Plan, checks: Checks) -> Result<Running<'a>, StartError> {
    let check = match checks {
        Checks::Bench => "inter 1s",
        Checks::Failover => "inter 500ms fall 2 observe layer4 error-limit 3 on-error mark-down",
    };
    let dir = TempDir::try_in(bed.dir.path(), "haproxy")?;
    let mut c = String::from(
        "# HAProxy config written by cargo xtask bench\nglobal\n    maxconn 8000\n\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 60s\n    timeout server 60s\n",
    );
    for (name, port) in [("web", HTTP_PORT), ("iperf", IPERF_PORT)] {
        let _ = write!(
            c,
            "\nfrontend {name}\n    bind {}:{port}\n    default_backend {name}\n\nbackend {name}\n    \
             balance source\n    hash-type consistent\n",
            bed.topo.vip()
        );
        for i in 1..=BACKENDS {
            let _ = writeln!(
                c,
                "    server b{i} {}:{port} check port {HTTP_PORT} {check}",
                bed.topo.backend_addr(i)
            );
        }
    }
    let cfg = dir.path().join("haproxy.cfg");
    fs::write(&cfg, c)?;
    let cmd = bed.lb_command(plan.pin, "haproxy", &["-db", "-f", &cfg.display().to_string()]);
    let mut procs = vec![Child::spawn(cmd)?];
    await_ready(bed, &mut procs, "haproxy").map_err(|e| StartError::Failed(anyhow!(e)))?;
    Ok(Running {
        procs,
        control: None,
        _cleanup: None,
        _nft: None,
        web: vip_web(bed),
        iperf: vip_iperf(bed),
        _dir: Some(dir),
    })
}

fn start_nginx_stream<'a>(bed: &'a Bed, plan: &Plan) -> Result<Running<'a>, StartError> {
    let dir = TempDir::try_in(bed.dir.path(), "nginx-stream")?;
    let d = dir.path().display().to_string();
    let mut c = format!(
        "# nginx stream config written by cargo xtask bench\nload_module {NGINX_STREAM_MODULE};\n\
         daemon off;\nmaster_process on;\nworker_processes auto;\nuser root;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nworker_rlimit_nofile 20000;\n\
         events {{ worker_connections 8192; }}\n\nstream {{\n"
    );
    for (name, port) in [("web", HTTP_PORT), ("iperf", IPERF_PORT)] {
        let _ = writeln!(c, "    upstream {name} {{\n        hash $remote_addr consistent;");
        for i in 1..=BACKENDS {
            let _ = writeln!(c, "        server {}:{port};", bed.topo.backend_addr(i));
        }
        let _ = writeln!(
            c,
            "    }}\n    server {{\n        listen {}:{port} backlog=4096;\n        proxy_pass {name};\n    }}",
            bed.topo.vip()
        );
    }
    c.push_str("}\n");
    let cfg = dir.path().join("nginx.conf");
    fs::write(&cfg, c)?;
    let cmd = bed.lb_command(
        plan.pin,
        "nginx",
        &[
            "-c",
            &cfg.display().to_string(),
            "-p",
            &d,
            "-e",
            &format!("{d}/error.log"),
        ],
    );
    let mut procs = vec![Child::spawn(cmd)?];
    if let Err(e) = await_ready(bed, &mut procs, "nginx (stream)") {
        let log = fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
        return Err(StartError::Failed(anyhow!("{e}; error.log: {}", tail(&log, 3))));
    }
    Ok(Running {
        procs,
        control: None,
        _cleanup: None,
        _nft: None,
        web: vip_web(bed),
        iperf: vip_iperf(bed),
        _dir: Some(dir),
    })
}

fn start_nft(bed: &Bed) -> Result<Running<'_>, StartError> {
    let map: Vec<String> = (1..=BACKENDS)
        .map(|i| format!("{} : {}", i - 1, bed.topo.backend_addr(i)))
        .collect();
    let rules = format!(
        "table ip {NFT_TABLE} {{\n    chain prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n        \
         ip daddr {vip} tcp dport {{ {HTTP_PORT}, {IPERF_PORT} }} dnat to jhash ip saddr mod {BACKENDS} map {{ {map} }}\n    }}\n}}\n",
        vip = bed.topo.vip(),
        map = map.join(", ")
    );
    let dir = TempDir::try_in(bed.dir.path(), "nft")?;
    let file = dir.path().join("lbbench.nft");
    fs::write(&file, rules)?;
    // The guard exists before the table, so a half-applied ruleset is removed as well.
    let guard = NftTable { bed };
    let ns = bed.topo.lb_ns();
    let out = ns.exec(&["nft", "-f", &file.display().to_string()])?;
    if !out.status.success() {
        return Err(StartError::Failed(anyhow!(
            "nft -f {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // Short TIME_WAIT in conntrack so the Connection: close runs do not fill the table.
    let _ = ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1");
    await_ready(bed, &mut [], "nft DNAT").map_err(|e| StartError::Failed(anyhow!(e)))?;
    Ok(Running {
        procs: Vec::new(),
        control: None,
        _cleanup: None,
        _nft: Some(guard),
        web: vip_web(bed),
        iperf: vip_iperf(bed),
        _dir: Some(dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_round_trip() {
        for r in RowKind::ALL {
            assert_eq!(RowKind::parse(r.name()), Ok(r));
        }
        assert!(
            RowKind::parse("ipvs")
                .unwrap_err()
                .contains("rows are none, lb-xdp")
        );
    }

    #[test]
    fn lb_error_picks_error_lines() {
        let s = "\u{1b}[2m2025\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m boom\nnoise\nerror: service `web` asks for xdp\n";
        assert_eq!(lb_error(s), "2025 ERROR boom / error: service `web` asks for xdp");
        assert_eq!(lb_error("a\nb\nc\n"), "b / c");
    }
}
