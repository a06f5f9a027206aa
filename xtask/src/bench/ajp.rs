//! The AJP chain: wrk → Apache httpd → load balancer → three Tomcat 10, as these users deploy it.
//!
//! ```text
//! sudo -E cargo xtask bench --ajp                          # the AJP chain only, all four rows
//! sudo -E cargo xtask bench --ajp-rows ajp-balancer,ajp-haproxy --quick
//! ```
//!
//! One bed for the whole run: a [`Topology`] with three backend namespaces each running a Tomcat
//! (`jvmRoute` t1..t3, AJP on 10.1.I.2:8009, the test webapp of `lb_tests::tomcat`), and a web
//! namespace (10.2.0.2) hung off the lb namespace. The Tomcats start once and are warmed up once
//! (their JIT then serves every row alike); each row starts its load balancer in the lb namespace
//! and its Apache in the web namespace, and stops them afterwards. Rows interleave over rounds.
//!
//! Before the rows, the bench opens ten sessions on each Tomcat directly (raw AJP from the lb
//! namespace), and wrk's Lua script rotates those thirty `JSESSIONID` cookies, so the routes cover
//! all three Tomcats. Requests use `?session=existing`: a Tomcat looks the session up but never
//! creates one, so a row that sends a cookie to the wrong Tomcat costs no memory. Each Tomcat
//! counts the requests it served; the counts before and after wrk give the requests per Tomcat.
//!
//! Rows:
//! - `ajp-lb`: Apache mod_proxy_ajp → lb `datapath = "ajp"` (VIP:8009) → Tomcats;
//! - `ajp-balancer`: Apache mod_proxy_balancer straight to the Tomcats, `stickysession` (the
//!   anchor: what these users run today);
//! - `ajp-haproxy`: Apache mod_proxy_ajp → HAProxy `mode tcp`, `balance source` → Tomcats;
//! - `ajp-lb-proxy`: Apache mod_proxy_ajp → lb `datapath = "proxy"` → Tomcats.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lb_tests::ajp_client::{self, ForwardRequest};
use lb_tests::apache::{self, Apache, ApacheConf, Front};
use lb_tests::tomcat::{self, CatalinaBase, Tomcat, TomcatOptions};
use lb_tests::webtier::{Browser, WebTier};
use lb_tests::{Child, Topology, run_with_timeout};
use serde_json::{Value, json};

use super::bed::{Reaper, TempDir};
use super::measure::{self, Wrk};
use super::report::median;
use super::{Plan, check_interrupted};

/// Tomcats (t1..t3).
pub const TOMCATS: usize = 3;
const AJP_PORT: u16 = 8009;
const WEB_PORT: u16 = 80;
/// Sessions opened on each Tomcat before the rows; wrk rotates their cookies.
const SESSIONS_PER_TOMCAT: usize = 10;
/// Tomcat's AJP connector threads (the default 200 is far more than 2 cores use).
const TOMCAT_THREADS: u32 = 64;
const TOMCAT_START: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The webapp path wrk requests.
const PATH: &str = "/index.jsp?session=existing";

/// One row of the AJP chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AjpRow {
    Lb,
    Balancer,
    Haproxy,
    LbProxy,
}

impl AjpRow {
    pub const ALL: [AjpRow; 4] = [AjpRow::Lb, AjpRow::Balancer, AjpRow::Haproxy, AjpRow::LbProxy];

    pub fn name(self) -> &'static str {
        match self {
            AjpRow::Lb => "ajp-lb",
            AjpRow::Balancer => "ajp-balancer",
            AjpRow::Haproxy => "ajp-haproxy",
            AjpRow::LbProxy => "ajp-lb-proxy",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            AjpRow::Lb => {
                "Apache mod_proxy_ajp → lb `datapath = \"ajp\"` (per-request routing by session route, then browser address) → Tomcats"
            }
            AjpRow::Balancer => {
                "Apache mod_proxy_balancer straight to the Tomcats, stickysession=JSESSIONID|jsessionid, lbmethod byrequests (the anchor)"
            }
            AjpRow::Haproxy => {
                "Apache mod_proxy_ajp → HAProxy mode tcp, balance source, hash-type consistent → Tomcats"
            }
            AjpRow::LbProxy => {
                "Apache mod_proxy_ajp → lb `datapath = \"proxy\"` (connection-level source affinity) → Tomcats"
            }
        }
    }

    pub fn parse(s: &str) -> Result<AjpRow, String> {
        AjpRow::ALL
            .into_iter()
            .find(|r| r.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown AJP row `{s}`; rows are {}",
                    AjpRow::ALL.map(AjpRow::name).join(", ")
                )
            })
    }
}

/// What the rounds of one row measured.
#[derive(Clone, Debug, Default)]
pub struct AjpResult {
    pub rps: Vec<f64>,
    pub p99_ms: Vec<f64>,
    /// Requests served by t1..t3 in each round.
    pub per_tomcat: Vec<[u64; TOMCATS]>,
    pub wrk_errors: Vec<String>,
    pub failures: Vec<String>,
    /// The row cannot run with this lb (e.g. before `datapath = "ajp"` exists).
    pub unavailable: Option<String>,
}

/// The AJP chain's results, for the report.
pub struct AjpReport {
    pub rows: BTreeMap<AjpRow, AjpResult>,
    pub order: Vec<AjpRow>,
    pub rounds: usize,
    pub wrk_secs: u32,
    pub connections: u32,
}

/// The bed: namespaces, the Tomcats, and the temp directory. Field order is drop order.
struct AjpBed {
    tomcats: Vec<(Tomcat, CatalinaBase)>,
    _reaper: Reaper,
    web: WebTier,
    topo: Topology,
    dir: TempDir,
}

impl AjpBed {
    fn new(prefix: &str) -> Result<AjpBed> {
        tomcat::check_installed().map_err(|e| anyhow!(e))?;
        apache::check_installed().map_err(|e| anyhow!(e))?;
        let dir = TempDir::try_in(&std::env::temp_dir(), &format!("{prefix}.d"))?;
        let topo = Topology::new(prefix, TOMCATS, 0)
            .with_context(|| format!("creating the network namespaces {prefix}-*"))?;
        let web = WebTier::attach(&topo).context("creating the web namespace")?;
        let mut names = topo.namespace_names();
        names.push(web.ns().name().to_string());
        let mut bed = AjpBed {
            tomcats: Vec::new(),
            _reaper: Reaper::new(names),
            web,
            topo,
            dir,
        };
        for ns in [bed.topo.client_ns(), bed.topo.lb_ns(), bed.web.ns()] {
            for (k, v) in [
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.core.somaxconn", "8192"),
            ] {
                let _ = ns.sysctl(k, v);
            }
        }
        let t = Instant::now();
        for i in 1..=TOMCATS {
            let opts = TomcatOptions::app(&route(i)).with_threads(TOMCAT_THREADS);
            let base = CatalinaBase::with_options(
                &format!("bench-t{i}"),
                bed.topo.backend_addr(i),
                AJP_PORT,
                &opts,
            )?;
            let tc = Tomcat::start(bed.topo.backend_ns(i), &base)?;
            bed.tomcats.push((tc, base));
        }
        let lb_ns = bed.topo.lb_ns().name().to_string();
        for (tc, base) in &mut bed.tomcats {
            tc.wait_cping(&lb_ns, TOMCAT_START)
                .map_err(|e| anyhow!("{e}\n--- catalina log ---\n{}", base.log_tail(20)))?;
        }
        eprintln!(
            "bench: ajp: three Tomcats answer CPing after {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(bed)
    }

    fn tomcat_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.topo.backend_addr(i).into(), AJP_PORT)
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip().into(), AJP_PORT)
    }

    fn web_url(&self) -> SocketAddr {
        SocketAddr::new(self.web.addr().into(), WEB_PORT)
    }

    /// A raw AJP GET to Tomcat `i` from the lb namespace; the response body.
    fn direct(&self, i: usize, uri: &str) -> Result<String> {
        let req = ForwardRequest::get(uri, "10.0.0.2");
        let r = ajp_client::exchange_from(
            self.topo.lb_ns().name(),
            Ipv4Addr::UNSPECIFIED,
            self.tomcat_addr(i),
            &req,
            Duration::from_secs(10),
        )
        .with_context(|| format!("AJP GET {uri} to t{i}"))?;
        if r.status != 200 {
            bail!("AJP GET {uri} to t{i}: status {} {}", r.status, r.text());
        }
        Ok(r.text())
    }

    /// `SESSIONS_PER_TOMCAT` new sessions on every Tomcat: their `JSESSIONID=…` cookies.
    fn open_sessions(&self) -> Result<Vec<String>> {
        let mut cookies = Vec::new();
        for i in 1..=TOMCATS {
            for _ in 0..SESSIONS_PER_TOMCAT {
                let body = self.direct(i, "/index.jsp")?;
                let sid = field(&body, "session").context("no session= line")?;
                if !sid.ends_with(&format!(".{}", route(i))) {
                    bail!("t{i} opened session {sid}: jvmRoute not applied");
                }
                cookies.push(format!("JSESSIONID={sid}"));
            }
        }
        Ok(cookies)
    }

    /// Requests each Tomcat has served so far (the counting request itself excluded).
    fn counts(&self) -> Result<[u64; TOMCATS]> {
        let mut c = [0; TOMCATS];
        for (i, slot) in c.iter_mut().enumerate() {
            let body = self.direct(i + 1, "/index.jsp?session=none")?;
            let n: u64 = field(&body, "count")
                .and_then(|v| v.parse().ok())
                .context("no count= line")?;
            *slot = n;
        }
        Ok(c)
    }
}

fn route(i: usize) -> String {
    format!("t{i}")
}

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// wrk's Lua script: rotate `cookies` over the requests (each thread from its own offset).
pub fn lua_script(cookies: &[String]) -> String {
    let mut s = String::from(
        "-- wrk script written by cargo xtask bench: rotate session cookies of every Tomcat\n\
         local cookies = {\n",
    );
    for c in cookies {
        let _ = writeln!(s, "  \"{c}\",");
    }
    let _ = write!(
        s,
        "}}\nlocal n = #cookies\nlocal i = 0\nlocal counter = 0\n\
         function setup(thread)\n  counter = counter + 1\n  thread:set(\"offset\", counter * 7)\nend\n\
         function init(args)\n  i = (offset or 0) % n\nend\n\
         function request()\n  i = i % n + 1\n  \
         return wrk.format(\"GET\", \"{PATH}\", {{ [\"Cookie\"] = cookies[i] }})\nend\n"
    );
    s
}

/// A started row: the load balancer (if any) and Apache. Field order is drop order.
struct Running {
    apache: Apache,
    procs: Vec<Child>,
    _dir: TempDir,
}

fn lb_config(bed: &AjpBed, dir: &Path, datapath: &str) -> String {
    let mut c = format!(
        "# lb config written by cargo xtask bench (AJP chain)\nlog_level = \"warn\"\nshutdown_timeout = \"1s\"\n\n\
         [control]\nsocket = \"{}\"\n\n[[service]]\nname = \"app\"\nlisten = \"{}\"\nprotocol = \"ajp\"\n\
         datapath = \"{datapath}\"\naffinity_timeout = \"30m\"\nmax_connections = 8000\n\n\
         [service.health]\ninterval = \"1s\"\n",
        dir.join("lb.sock").display(),
        bed.vip()
    );
    if datapath == "ajp" {
        c.push_str("\n[service.ajp]\npool_size = 128\n");
    }
    for i in 1..=TOMCATS {
        let _ = write!(
            c,
            "\n[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            route(i),
            bed.tomcat_addr(i)
        );
    }
    c
}

fn haproxy_config(bed: &AjpBed) -> String {
    let mut c = format!(
        "# HAProxy config written by cargo xtask bench (AJP chain)\nglobal\n    maxconn 8000\n\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 300s\n    timeout server 300s\n\n\
         frontend ajp\n    bind {}\n    default_backend tomcats\n\nbackend tomcats\n    balance source\n    \
         hash-type consistent\n",
        bed.vip()
    );
    for i in 1..=TOMCATS {
        let _ = writeln!(c, "    server {} {} check inter 1s", route(i), bed.tomcat_addr(i));
    }
    c
}

/// Why a row did not start: unavailable with this lb (skipped from now on) or a failure.
enum StartError {
    Unavailable(String),
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for StartError {
    fn from(e: E) -> Self {
        StartError::Failed(e.into())
    }
}

fn start(bed: &AjpBed, row: AjpRow, plan: &Plan, lb: &Path) -> Result<Running, StartError> {
    let dir = TempDir::try_in(bed.dir.path(), row.name())?;
    let mut procs = Vec::new();
    let front = match row {
        AjpRow::Balancer => Front::Balancer {
            members: (1..=TOMCATS).map(|i| (route(i), bed.tomcat_addr(i))).collect(),
            secret: None,
        },
        AjpRow::Lb | AjpRow::LbProxy => {
            let datapath = if row == AjpRow::Lb { "ajp" } else { "proxy" };
            let cfg = dir.path().join("lb.toml");
            fs::write(&cfg, lb_config(bed, dir.path(), datapath))?;
            let mut check = std::process::Command::new(lb);
            check.arg("check-config").arg(&cfg).env("NO_COLOR", "1");
            let out = run_with_timeout(check, Duration::from_secs(10))?;
            if !out.status.success() {
                let why = format!("lb check-config: {}", String::from_utf8_lossy(&out.stderr).trim());
                return Err(StartError::Unavailable(why));
            }
            let cmd = super::bed::pinned(
                bed.topo.lb_ns(),
                plan.pin.then_some(super::LB_CPU),
                lb,
                &["run", "-c", &cfg.display().to_string()],
            );
            procs.push(Child::spawn(cmd)?);
            Front::ProxyAjp {
                target: bed.vip(),
                secret: None,
                ping: false,
            }
        }
        AjpRow::Haproxy => {
            let cfg = dir.path().join("haproxy.cfg");
            fs::write(&cfg, haproxy_config(bed))?;
            let cmd = super::bed::pinned(
                bed.topo.lb_ns(),
                plan.pin.then_some(super::LB_CPU),
                "haproxy",
                &["-db", "-f", &cfg.display().to_string()],
            );
            procs.push(Child::spawn(cmd)?);
            Front::ProxyAjp {
                target: bed.vip(),
                secret: None,
                ping: false,
            }
        }
    };
    let mut conf = ApacheConf::new(bed.web_url(), front);
    conf.processes = 2;
    conf.threads = 64;
    let apache = Apache::start(bed.web.ns(), &format!("bench-{}", row.name()), &conf)?;
    let mut running = Running {
        apache,
        procs,
        _dir: dir,
    };
    // Ready when a browser request goes through the whole chain.
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut browser = Browser::new(
        bed.topo.client_ns().name(),
        bed.topo.client_primary_addr(),
        bed.web_url(),
    );
    loop {
        for c in &mut running.procs {
            if let Ok(Some(st)) = c.try_wait() {
                thread::sleep(Duration::from_millis(100));
                return Err(StartError::Failed(anyhow!(
                    "{} exited ({st}): {}",
                    c.description(),
                    c.stderr_text().lines().last().unwrap_or("")
                )));
            }
        }
        match browser.get("/index.jsp?session=none") {
            Ok(p) if p.status == 200 && p.route().starts_with('t') => return Ok(running),
            other => {
                if Instant::now() >= deadline {
                    let what = match other {
                        Ok(p) => format!("status {} {}", p.status, p.body.trim()),
                        Err(e) => e.to_string(),
                    };
                    return Err(StartError::Failed(anyhow!(
                        "the chain did not answer within {READY_TIMEOUT:?}: {what}; apache: {}",
                        running.apache.error_log().lines().last().unwrap_or("")
                    )));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `wrk --latency -s SCRIPT` against Apache from the client namespace.
fn wrk(bed: &AjpBed, plan: &Plan, script: &Path, secs: u32) -> Result<Wrk> {
    let args = vec![
        format!("-t{}", plan.wrk_threads),
        format!("-c{}", plan.wrk_connections),
        format!("-d{secs}s"),
        "--timeout".to_string(),
        "3s".to_string(),
        "--latency".to_string(),
        "-s".to_string(),
        script.display().to_string(),
        format!("http://{}/", bed.web_url()),
    ];
    let cmd = super::bed::pinned(
        bed.topo.client_ns(),
        plan.pin.then_some(super::CLIENT_CPU),
        "wrk",
        &args,
    );
    let out =
        run_with_timeout(cmd, Duration::from_secs(u64::from(secs) + 15)).context("wrk did not finish")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    measure::parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
}

fn run_row(
    bed: &AjpBed,
    row: AjpRow,
    plan: &Plan,
    lb: &Path,
    script: &Path,
    res: &mut AjpResult,
) -> Result<()> {
    let mut running = match start(bed, row, plan, lb) {
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
    check_interrupted()?;
    // A short warm-up of this chain's pools, then the measured run.
    if let Err(e) = wrk(bed, plan, script, 1) {
        res.failures.push(format!("warm-up: {e:#}"));
    }
    let before = bed.counts()?;
    match wrk(bed, plan, script, plan.wrk_secs) {
        Ok(w) => {
            let after = bed.counts()?;
            let mut per = [0; TOMCATS];
            for k in 0..TOMCATS {
                // The count request of `before` is included in `after`.
                per[k] = after[k].saturating_sub(before[k]).saturating_sub(1);
            }
            res.rps.push(w.requests_per_sec);
            res.p99_ms.push(w.p99_ms);
            res.per_tomcat.push(per);
            let errs = w.error_text();
            if !errs.is_empty() {
                res.wrk_errors.push(errs);
            }
            eprintln!(
                "bench:   {}: {:.0} req/s, p99 {:.2} ms, per Tomcat {per:?}",
                row.name(),
                w.requests_per_sec,
                w.p99_ms
            );
        }
        Err(e) => res.failures.push(format!("wrk: {e:#}")),
    }
    for c in &mut running.procs {
        if let Ok(Some(st)) = c.try_wait() {
            res.failures
                .push(format!("{} exited during the run ({st})", c.description()));
        }
        let _ = c.stop();
    }
    if !running.apache.is_running() {
        res.failures.push("Apache exited during the run".to_string());
    }
    drop(running);
    Ok(())
}

/// Runs the AJP chain: `rows` interleaved over `plan.rounds` rounds on one bed.
pub fn run(plan: &Plan, lb: &Path, rows: &[AjpRow]) -> Result<AjpReport> {
    let prefix = format!("lbba-{}", std::process::id());
    let t = Instant::now();
    let bed = AjpBed::new(&prefix)?;
    let cookies = bed.open_sessions()?;
    let script = bed.dir.path().join("sessions.lua");
    fs::write(&script, lua_script(&cookies))?;
    eprintln!(
        "bench: ajp: bed up in {:.1} s; {} sessions opened ({} per Tomcat)",
        t.elapsed().as_secs_f64(),
        cookies.len(),
        SESSIONS_PER_TOMCAT
    );
    // Warm the Tomcats (JIT, webapp) once through the anchor chain, so every row meets them alike.
    {
        let warm = start(&bed, AjpRow::Balancer, plan, lb).map_err(|e| match e {
            StartError::Unavailable(w) => anyhow!(w),
            StartError::Failed(e) => e,
        })?;
        let secs = if plan.quick { 3 } else { 8 };
        wrk(&bed, plan, &script, secs).context("warm-up")?;
        drop(warm);
    }
    let mut results: BTreeMap<AjpRow, AjpResult> = rows.iter().map(|r| (*r, AjpResult::default())).collect();
    for round in 0..plan.rounds {
        for k in 0..rows.len() {
            check_interrupted()?;
            let row = rows[(k + round) % rows.len()];
            let res = results.get_mut(&row).expect("every row has a result");
            if res.unavailable.is_some() {
                continue;
            }
            eprintln!("bench: ajp round {}/{}: {}", round + 1, plan.rounds, row.name());
            run_row(&bed, row, plan, lb, &script, res)?;
        }
    }
    Ok(AjpReport {
        rows: results,
        order: rows.to_vec(),
        rounds: plan.rounds,
        wrk_secs: plan.wrk_secs,
        connections: plan.wrk_connections,
    })
}

fn range(v: &[f64], digits: usize) -> String {
    let Some(m) = median(v) else {
        return "–".to_string();
    };
    if v.len() < 2 {
        return format!("{m:.digits$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

impl AjpResult {
    /// Requests per Tomcat summed over rounds, and each one's share.
    fn spread(&self) -> ([u64; TOMCATS], [f64; TOMCATS]) {
        let mut sum = [0u64; TOMCATS];
        for p in &self.per_tomcat {
            for k in 0..TOMCATS {
                sum[k] += p[k];
            }
        }
        let total: u64 = sum.iter().sum();
        let mut share = [0.0; TOMCATS];
        if total > 0 {
            for k in 0..TOMCATS {
                share[k] = sum[k] as f64 / total as f64;
            }
        }
        (sum, share)
    }
}

impl AjpReport {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## AJP chain: wrk → Apache httpd → load balancer → three Tomcat 10\n\n\
             wrk -t2 -c{} for {} s per round, keep-alive, rotating {} session cookies ({} per Tomcat); \
             {} round(s), median (range). Requests per Tomcat are counted by the Tomcats (summed over \
             rounds, share in parentheses).\n",
            self.connections,
            self.wrk_secs,
            SESSIONS_PER_TOMCAT * TOMCATS,
            SESSIONS_PER_TOMCAT,
            self.rounds
        );
        let anchor = self.rows.get(&AjpRow::Balancer).and_then(|r| median(&r.rps));
        let _ = writeln!(s, "| row | req/s | × anchor | p99 ms | t1 | t2 | t3 | errors |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for row in &self.order {
            let r = &self.rows[row];
            if let Some(why) = &r.unavailable {
                let _ = writeln!(
                    s,
                    "| {} | unavailable: {} | | | | | | |",
                    row.name(),
                    why.replace('|', "\\|")
                );
                continue;
            }
            let ratio = match (median(&r.rps), anchor) {
                (Some(x), Some(a)) if a > 0.0 => format!("{:.2}", x / a),
                _ => "–".to_string(),
            };
            let (sum, share) = r.spread();
            let cells: Vec<String> = (0..TOMCATS)
                .map(|k| format!("{} ({:.0}%)", sum[k], share[k] * 100.0))
                .collect();
            let mut errors: Vec<String> = r.wrk_errors.clone();
            errors.extend(r.failures.iter().cloned());
            let _ = writeln!(
                s,
                "| {} | {} | {ratio} | {} | {} | {} | {} | {} |",
                row.name(),
                range(&r.rps, 0),
                range(&r.p99_ms, 2),
                cells[0],
                cells[1],
                cells[2],
                if errors.is_empty() {
                    "none".to_string()
                } else {
                    errors.join("; ").replace('|', "\\|").replace('\n', " ")
                }
            );
        }
        let _ = writeln!(s);
        for row in &self.order {
            let _ = writeln!(s, "- `{}`: {}", row.name(), row.description());
        }
        s
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .order
            .iter()
            .map(|row| {
                let r = &self.rows[row];
                json!({
                    "row": row.name(),
                    "description": row.description(),
                    "unavailable": r.unavailable,
                    "requests_per_sec": r.rps,
                    "p99_ms": r.p99_ms,
                    "requests_per_tomcat": r.per_tomcat,
                    "wrk_errors": r.wrk_errors,
                    "failures": r.failures,
                })
            })
            .collect();
        json!({ "rounds": self.rounds, "wrk_secs": self.wrk_secs, "connections": self.connections, "rows": rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_round_trip() {
        for r in AjpRow::ALL {
            assert_eq!(AjpRow::parse(r.name()), Ok(r));
        }
        assert!(AjpRow::parse("ajp").unwrap_err().contains("ajp-lb, ajp-balancer"));
    }

    #[test]
    fn lua_rotates_every_cookie() {
        let s = lua_script(&["JSESSIONID=a.t1".into(), "JSESSIONID=b.t2".into()]);
        assert!(s.contains("\"JSESSIONID=a.t1\",\n  \"JSESSIONID=b.t2\","), "{s}");
        assert!(s.contains("function request()"));
        assert!(s.contains(PATH));
    }
}
