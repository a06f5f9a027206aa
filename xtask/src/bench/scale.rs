//! Cost as the work grows, measured by `cargo xtask bench` itself: proxy RSS per idle connection
//! (lb `proxy` against HAProxy at the same load) and the daemon's RSS with 10, 100 and 1,000
//! backends in each of 16 services; plus the chart of these and of `lb-microbench`'s kernel
//! figures (XDP ns/packet as flows grow, live-frames Mpps) for `results.svg`.
//!
//! Idle connections: in a namespace of its own (loopback only), the bench holds N client
//! connections to the load balancer, which connects each to a backend socket that never accepts
//! (the kernel completes the handshakes into its accept queue, so the backend needs no
//! descriptor per connection); the balancer's established connections toward it are counted with `ss`. N is 10,000 unless the descriptor limit is lower: the balancer
//! needs two per connection, so N = (hard RLIMIT_NOFILE − 400) / 2 at most.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{Child, Netns, in_netns};
use nix::libc;

use super::bed::{Reaper, TempDir};
use super::measure::rss_mib;
use super::micro::{Entry, Micro};
use super::report::shorten;

const LISTEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 9000);

/// Who holds the connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    LbProxy,
    Haproxy,
}

impl Holder {
    fn name(self) -> &'static str {
        match self {
            Holder::LbProxy => "lb proxy",
            Holder::Haproxy => "HAProxy",
        }
    }
}

/// How many idle connections fit the descriptor limit (at most 10,000); raises the soft limit to
/// the hard one (children inherit it).
fn connections(quick: bool) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
        lim.rlim_max
    } else {
        1024
    };
    let fit = (hard.saturating_sub(400) / 2) as usize;
    let want = if quick { 2000 } else { 10_000 };
    want.min(fit)
}

/// Entries: RSS per idle connection for lb proxy and HAProxy (median over rounds, KiB).
pub fn idle_connections(lb: &Path, quick: bool) -> Vec<Entry> {
    let n = connections(quick);
    let rounds = if quick { 1 } else { 3 };
    let mut samples: Vec<(Holder, Result<Vec<f64>, String>)> = vec![
        (Holder::LbProxy, Ok(Vec::new())),
        (Holder::Haproxy, Ok(Vec::new())),
    ];
    if super::which("haproxy").is_none() {
        samples[1].1 = Err("haproxy is not installed (`cargo xtask setup`)".into());
    }
    for _ in 0..rounds {
        for (holder, res) in &mut samples {
            if let Ok(v) = res {
                match per_connection(*holder, lb, n) {
                    Ok(kib) => v.push(kib),
                    Err(e) => *res = Err(e),
                }
            }
        }
    }
    samples
        .into_iter()
        .map(|(holder, res)| Entry {
            name: format!("{} RSS per idle connection, {n} concurrent connections", holder.name()),
            result: res.map(|v| {
                let (m, lo, hi) = spread(&v);
                (
                    m,
                    "KiB".to_string(),
                    format!(
                        "(RSS with {n} open − RSS before) / {n}, each connection proxied to a backend; median of {} round(s), range {lo:.1}–{hi:.1}",
                        v.len()
                    ),
                )
            }),
        })
        .collect()
}

fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    };
    (m, s[0], s[n - 1])
}

fn lb_config(dir: &Path, n: usize) -> String {
    format!(
        "log_level = \"warn\"\nshutdown_timeout = \"0s\"\n\n[control]\nsocket = \"{}\"\n\n\
         [[service]]\nname = \"idle\"\nlisten = \"{LISTEN}\"\ndatapath = \"proxy\"\nmax_connections = {}\n\n\
         [service.health]\nkind = \"none\"\n\n[[service.backend]]\nname = \"b1\"\naddress = \"{BACKEND}\"\n",
        dir.join("lb.sock").display(),
        n + 100
    )
}

fn haproxy_config(n: usize) -> String {
    format!(
        "global\n  maxconn {}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n\n\
         frontend idle\n  bind {LISTEN}\n  default_backend b\n\nbackend b\n  server b1 {BACKEND}\n",
        n + 100
    )
}

/// The balancer's established connections toward the backend.
fn backend_connections(ns: &Netns) -> usize {
    ns.exec_ok(&[
        "ss",
        "-Htn",
        "state",
        "established",
        &format!("dport = :{}", BACKEND.port()),
    ])
    .map_or(0, |out| out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// One round for one holder: KiB of RSS per idle connection.
fn per_connection(holder: Holder, lb: &Path, n: usize) -> Result<f64, String> {
    let name = format!("lbb-{}-i", std::process::id());
    let dir = TempDir::try_in(&std::env::temp_dir(), &format!("{name}.d")).map_err(|e| format!("{e:#}"))?;
    let ns = Netns::new(&name).map_err(|e| e.to_string())?;
    let _reaper = Reaper::new(vec![name.clone()]);
    ns.exec_ok(&["sysctl", "-qw", "net.core.somaxconn=65535"])
        .map_err(|e| e.to_string())?;
    // The backend: listening, never accepting.
    let backend = in_netns(&name, || -> Result<std::net::TcpListener, String> {
        let l = std::net::TcpListener::bind(BACKEND).map_err(|e| format!("bind {BACKEND}: {e}"))?;
        // A queue long enough for every connection (std listens with 128).
        // SAFETY: listen(2) on a socket we own.
        if unsafe { libc::listen(l.as_raw_fd(), 65535) } != 0 {
            return Err(format!("listen: {}", std::io::Error::last_os_error()));
        }
        Ok(l)
    })
    .map_err(|e| e.to_string())??;
    let mut child = match holder {
        Holder::LbProxy => {
            let cfg = dir.path().join("lb.toml");
            fs::write(&cfg, lb_config(dir.path(), n)).map_err(|e| e.to_string())?;
            let cfg = cfg.display().to_string();
            let mut c = ns.command(lb, &["run", "-c", cfg.as_str()]);
            c.env("NO_COLOR", "1");
            Child::spawn(c).map_err(|e| e.to_string())?
        }
        Holder::Haproxy => {
            let cfg = dir.path().join("haproxy.cfg");
            fs::write(&cfg, haproxy_config(n)).map_err(|e| e.to_string())?;
            let cfg = cfg.display().to_string();
            let bin = super::which("haproxy").ok_or("haproxy is not installed")?;
            Child::spawn(ns.command(&bin, &["-db", "-f", cfg.as_str()])).map_err(|e| e.to_string())?
        }
    };
    let result = (|| -> Result<f64, String> {
        // Until it accepts; then 20 connections opened and closed (first-use allocations), settle.
        // They stay half-closed in the balancer (the backend never answers their FIN), within the
        // limits set n + 100.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{} exited ({st}): {}",
                    holder.name(),
                    shorten(&child.stderr_text(), 300)
                ));
            }
            if in_netns(&name, || {
                TcpStream::connect_timeout(&LISTEN.into(), Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not accept on {LISTEN} within 15 s",
                    holder.name()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        let warm: Vec<TcpStream> = in_netns(&name, || {
            (0..20).filter_map(|_| TcpStream::connect(LISTEN).ok()).collect()
        })
        .map_err(|e| e.to_string())?;
        drop(warm);
        thread::sleep(Duration::from_millis(1500));
        let before = rss_mib(&[child.pid()]).ok_or("the balancer exited")?;
        let held: Vec<TcpStream> = in_netns(&name, || -> Result<Vec<TcpStream>, String> {
            (0..n)
                .map(|i| TcpStream::connect(LISTEN).map_err(|e| format!("connection {i} of {n}: {e}")))
                .collect()
        })
        .map_err(|e| e.to_string())??;
        let deadline = Instant::now() + Duration::from_secs(30);
        while backend_connections(&ns) < n {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: {} of {n} connections reached the backend within 30 s",
                    holder.name(),
                    backend_connections(&ns)
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
        thread::sleep(Duration::from_secs(1));
        let after = rss_mib(&[child.pid()]).ok_or("the balancer exited")?;
        drop(held);
        Ok((after - before) * 1024.0 / n as f64)
    })();
    let _ = child.stop();
    drop(backend);
    result
}

/// Entries: the daemon's RSS with `n` backends in each of 16 proxy services.
pub fn daemon_services(lb: &Path) -> Vec<Entry> {
    [10usize, 100, 1000]
        .into_iter()
        .map(|n| Entry {
            name: format!("lb daemon RSS, 16 proxy services × {n} backends, health none"),
            result: super::micro::daemon_rss(lb, 16, n).map(|mib| {
                (
                    mib,
                    "MiB".to_string(),
                    format!(
                        "VmRSS 1 s after start; {} backends in all; ring_size 100003",
                        16 * n
                    ),
                )
            }),
        })
        .collect()
}

// ---- The chart -----------------------------------------------------------------------------------

/// A panel's bars: (label, value) by entry-name prefix (names as `lb-microbench` and this module
/// write them).
fn find(micro: &Micro, prefix: &str) -> Option<f64> {
    micro
        .entries
        .iter()
        .find(|e| e.name.starts_with(prefix))
        .and_then(|e| e.result.as_ref().ok().map(|r| r.0))
}

/// A panel: title, unit, bars (label, value, colour).
type Panel<'a> = (String, &'a str, Vec<(String, Option<f64>, &'a str)>);

/// The "cost as the work grows" panels for results.svg, starting at `y0`: (SVG elements, height).
pub fn chart(micro: &Micro, y0: f64, width: f64) -> (String, f64) {
    let panels: Vec<Panel> = vec![
        (
            "XDP ns/packet, established, as live flows grow".into(),
            "ns",
            ["10", "10k", "100k", "1M"]
                .iter()
                .filter_map(|l| {
                    let prefix = format!("XDP precise: established client → backend with {l} live flows");
                    micro
                        .entries
                        .iter()
                        .any(|e| e.name == prefix)
                        .then(|| (format!("{l} flows"), find(micro, &prefix), "#4e79a7"))
                })
                .collect(),
        ),
        (
            "Mpps on one CPU, live frames (Katran: 5.2 per core)".into(),
            "Mpps",
            vec![
                (
                    "lb".into(),
                    find(micro, "XDP live frames, one CPU: lb"),
                    "#4e79a7",
                ),
                (
                    "XDP_TX (chain)".into(),
                    find(micro, "XDP live frames, one CPU: trivial XDP_TX, through"),
                    "#bab0ac",
                ),
                (
                    "XDP_TX".into(),
                    find(micro, "XDP live frames, one CPU: trivial XDP_TX, plain"),
                    "#bab0ac",
                ),
                ("Katran".into(), Some(5.2), "#e15759"),
            ],
        ),
        (
            "RSS per idle proxied connection".into(),
            "KiB",
            vec![
                (
                    "lb proxy".into(),
                    find(micro, "lb proxy RSS per idle connection"),
                    "#4e79a7",
                ),
                (
                    "HAProxy".into(),
                    find(micro, "HAProxy RSS per idle connection"),
                    "#f28e2b",
                ),
            ],
        ),
        (
            "Daemon RSS, 16 services × N backends".into(),
            "MiB",
            [10, 100, 1000]
                .iter()
                .map(|n| {
                    (
                        format!("N = {n}"),
                        find(micro, &format!("lb daemon RSS, 16 proxy services × {n} backends")),
                        "#59a14f",
                    )
                })
                .collect(),
        ),
    ];
    let mut s = String::new();
    let cols = 2.0;
    let pw = (width - 40.0) / cols;
    let ph = 150.0;
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" font-size="14" font-weight="bold">Cost as the work grows (see the micro-benchmark table)</text>"#,
        y0 + 20.0
    );
    for (i, (title, unit, bars)) in panels.iter().enumerate() {
        let px = 20.0 + (i % 2) as f64 * pw;
        let py = y0 + 36.0 + (i / 2) as f64 * (ph + 20.0);
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" font-weight="bold">{} ({unit})</text>"#,
            py + 12.0,
            super::report::xml_escape(title)
        );
        let max = bars.iter().filter_map(|b| b.1).fold(0.0f64, f64::max);
        let bw = (pw - 40.0) / bars.len().max(1) as f64;
        let base = py + ph - 20.0;
        let top = py + 34.0;
        for (j, (label, v, color)) in bars.iter().enumerate() {
            let bx = px + 10.0 + j as f64 * bw;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                bx + bw * 0.4,
                base + 14.0,
                super::report::xml_escape(label)
            );
            match v {
                Some(v) if max > 0.0 => {
                    let h = (base - top) * v / max;
                    let _ = writeln!(
                        s,
                        r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                        base - h,
                        bw * 0.8,
                        bx + bw * 0.4,
                        base - h - 3.0,
                        short_num(*v)
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#888">n/a</text>"##,
                        bx + bw * 0.4,
                        base - 3.0
                    );
                }
            }
        }
    }
    (s, 36.0 + 2.0 * (ph + 20.0) + 10.0)
}

fn short_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
