//! `lb top`: a live view of every backend over the control socket, refreshed every `--interval`.
//!
//! A worker thread asks the daemon for `stats` each interval and hands the answers to the screen
//! loop, so a slow daemon never stops the keyboard: `q`, `Esc` or `Ctrl-C` quit at once. Rates
//! (connections, bytes and packets per second) come from the difference between the last two
//! answers. [`frame`] turns snapshots into lines (pure, unit-tested); [`run`] owns the terminal:
//! raw mode and the alternate screen, restored on every way out, panics included.

use crate::config::enum_text;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::style::{Attribute, Print, SetAttribute};
use crossterm::terminal::{self, ClearType};
use crossterm::{cursor, execute, queue};

use lb_common::counters::{CounterKind, XdpCounter, XdpCounters};

use crate::cli::{ago, bytes, label};
use crate::control::client::{self, ClientError};
use crate::control::protocol::{BackendStatsView, Query, Request, StatsView};

/// Shortest and longest `--interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// How often the screen loop looks at the keyboard and for new answers.
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("lb top needs a terminal; use `lb stats` (or `lb stats --json`) in scripts")]
    NotATerminal,
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("the daemon sent unreadable stats: {0}")]
    Decode(#[from] serde_json::Error),
}

/// One `stats` answer and when it arrived.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub stats: StatsView,
}

/// A screen line; `emphasis` lines are drawn in reverse video.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    pub emphasis: bool,
}

impl Line {
    fn plain(text: String) -> Line {
        Line {
            text,
            emphasis: false,
        }
    }
}

/// Asks the daemon for its counters.
pub fn fetch(socket: &Path) -> Result<StatsView, TopError> {
    let response = client::call(socket, &Request::Query(Query::Stats {}))?;
    if !response.ok {
        return Err(TopError::Daemon(response.error.unwrap_or_default()));
    }
    Ok(serde_json::from_value(response.result.unwrap_or_default())?)
}

/// Per-second change of a counter between two samples; `None` without a previous value, or when
/// the counter went backwards (the backend was removed and added again).
fn rate(prev: Option<u64>, cur: u64, secs: f64) -> Option<f64> {
    let p = prev?;
    (cur >= p && secs > 0.0).then(|| (cur - p) as f64 / secs)
}

fn per_sec(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1}k", v / 1000.0),
        Some(v) if v >= 100.0 || v == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn bytes_per_sec(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{}/s", bytes(v.round() as u64)))
}

/// Cuts `s` to `max` characters, marking the cut with `…`.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Rates of one backend against its previous sample.
struct Rates {
    conns: Option<f64>,
    bytes_in: Option<f64>,
    bytes_out: Option<f64>,
    packets: Option<f64>,
}

fn rates(prev: Option<&BackendStatsView>, cur: &BackendStatsView, secs: f64) -> Rates {
    let packets = match (cur.packets_in, cur.packets_out) {
        (Some(i), Some(o)) => rate(
            prev.and_then(|p| Some(p.packets_in? + p.packets_out?)),
            i + o,
            secs,
        ),
        _ => None,
    };
    Rates {
        conns: rate(prev.map(|p| p.connections_total), cur.connections_total, secs),
        bytes_in: rate(prev.map(|p| p.bytes_in), cur.bytes_in, secs),
        bytes_out: rate(prev.map(|p| p.bytes_out), cur.bytes_out, secs),
        packets,
    }
}

fn sum(mut values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.try_fold(0.0, |acc, v| Some(acc + v?))
}

const HEADER: [&str; 10] = [
    "SERVICE / BACKEND",
    "STATE",
    "HEALTH",
    "ACTIVE",
    "CONN/s",
    "IN/s",
    "OUT/s",
    "PKT|REQ/s",
    "LAST CHECK",
    "LAST CHANGE",
];

/// The XDP line: every counter but the reasons per second, then the reasons that moved.
fn xdp_rates(x: &XdpCounters, prev: Option<&XdpCounters>, secs: f64) -> String {
    let r = |c| rate(prev.map(|p| p.get(c)), x.get(c), secs);
    let totals: Vec<String> = XdpCounter::ALL
        .into_iter()
        .filter(|c| !matches!(c.kind(), CounterKind::Reason | CounterKind::State))
        .map(|c| format!("{} {}/s", label(c), per_sec(r(c))))
        .collect();
    let states: String = x
        .of_kind(CounterKind::State)
        .filter(|(_, n)| *n > 0)
        .fold(String::new(), |acc, (c, _)| acc + "  " + &label(c) + " on");
    let mut reasons: Vec<String> = x
        .of_kind(CounterKind::Reason)
        .filter_map(|(c, _)| {
            r(c).filter(|v| *v > 0.0)
                .map(|v| format!("{} {}/s", c.name(), per_sec(Some(v))))
        })
        .collect();
    if reasons.is_empty() {
        reasons.push("none".into());
    }
    format!(
        "xdp  {}{states}  reasons: {}",
        totals.join("  "),
        reasons.join(", ")
    )
}

/// The screen for the latest sample `cur` (rates against `prev`), with `error` when the last
/// request failed.
pub fn frame(
    socket: &str,
    interval: Duration,
    cur: &Sample,
    prev: Option<&Sample>,
    error: Option<&str>,
) -> Vec<Line> {
    let stats = &cur.stats;
    let secs = prev.map_or(0.0, |p| cur.at.saturating_duration_since(p.at).as_secs_f64());
    let mut lines = vec![Line::plain(format!(
        "lb top  {socket}  lb {}  up {}  every {}  q: quit",
        stats.version,
        ago(stats.uptime_secs),
        fmt_interval(interval)
    ))];
    if let Some(x) = &stats.xdp {
        lines.push(Line::plain(xdp_rates(
            x,
            prev.and_then(|p| p.stats.xdp.as_ref()),
            secs,
        )));
    }
    if let Some(e) = error {
        lines.push(Line {
            text: format!("! {e} (showing the last answer)"),
            emphasis: true,
        });
    }
    lines.push(Line::plain(String::new()));

    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in &stats.services {
        let prev_s = prev.and_then(|p| p.stats.services.iter().find(|o| o.name == s.name));
        let all: Vec<Rates> = s
            .backends
            .iter()
            .map(|b| {
                let pb = prev_s.and_then(|ps| ps.backends.iter().find(|o| o.name == b.name));
                rates(pb, b, secs)
            })
            .collect();
        let xdp = s.backends.iter().any(|b| b.packets_in.is_some());
        // AJP services: requests per second per backend, in the packets column.
        let requests = |name: &str, stats: &crate::control::protocol::ServiceStatsView| {
            stats
                .ajp
                .as_ref()
                .and_then(|a| a.backends.values().find(|b| b.name == name))
                .map(|b| b.requests)
        };
        let reqs: Vec<Option<f64>> = s
            .backends
            .iter()
            .map(|b| {
                let cur = requests(&b.name, s)?;
                rate(prev_s.and_then(|ps| requests(&b.name, ps)), cur, secs)
            })
            .collect();
        rows.push(vec![
            format!(
                "{} {} {}/{}{}",
                s.name,
                s.listen,
                enum_text(&s.protocol),
                enum_text(&s.datapath),
                if s.on_backups { " ON BACKUPS" } else { "" }
            ),
            String::new(),
            format!(
                "{}/{} up",
                s.backends.iter().filter(|b| enum_text(&b.health) == "up").count(),
                s.backends.len()
            ),
            s.backends
                .iter()
                .map(|b| b.connections_active)
                .sum::<u64>()
                .to_string(),
            per_sec(sum(all.iter().map(|r| r.conns))),
            bytes_per_sec(sum(all.iter().map(|r| r.bytes_in))),
            bytes_per_sec(sum(all.iter().map(|r| r.bytes_out))),
            if xdp {
                per_sec(sum(all.iter().map(|r| r.packets)))
            } else if s.ajp.is_some() {
                per_sec(sum(reqs.iter().copied()))
            } else {
                "-".into()
            },
            format!("affinity {}", s.affinity_entries),
            String::new(),
        ]);
        for ((b, r), req) in s.backends.iter().zip(&all).zip(&reqs) {
            let check = match &b.check {
                None => "-".to_string(),
                Some(c) => match c.last_latency_ms {
                    Some(ms) => format!("{ms:.1}ms"),
                    None => clip(&c.last_result, 28),
                },
            };
            let change = b.transitions.last().map_or("-".to_string(), |t| {
                format!(
                    "{} {} ago",
                    t.to,
                    ago(stats.taken_unix_ms.saturating_sub(t.unix_ms) / 1000)
                )
            });
            rows.push(vec![
                format!("  {}{}", b.name, if b.backup { " (backup)" } else { "" }),
                enum_text(&b.state),
                enum_text(&b.health),
                b.connections_active.to_string(),
                per_sec(r.conns),
                bytes_per_sec(r.bytes_in),
                bytes_per_sec(r.bytes_out),
                if s.ajp.is_some() {
                    per_sec(*req)
                } else {
                    per_sec(r.packets)
                },
                check,
                change,
            ]);
        }
    }
    if stats.services.is_empty() {
        lines.push(Line::plain("no services".into()));
        return lines;
    }
    let table = crate::cli::table(&HEADER, &rows);
    for (i, l) in table.lines().enumerate() {
        lines.push(Line {
            text: l.to_string(),
            emphasis: i == 0,
        });
    }
    lines
}

fn fmt_interval(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `--interval`: a duration as in the config file (`"1s"`, `"500ms"`) or plain seconds (`"2"`).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(s)
        .or_else(|| s.parse::<u64>().ok().map(Duration::from_secs))
        .ok_or_else(|| format!("`{s}` is not an interval; use e.g. 1s, 500ms or 2"))?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err(format!("interval `{s}` is out of range; allowed 100ms..=1h"));
    }
    Ok(d)
}

/// Raw mode and the alternate screen while alive; the terminal is restored on drop.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    let _ = execute!(
        std::io::stdout(),
        SetAttribute(Attribute::Reset),
        cursor::Show,
        terminal::LeaveAlternateScreen
    );
    let _ = terminal::disable_raw_mode();
}

fn draw(lines: &[Line]) -> std::io::Result<()> {
    let (width, height) = terminal::size().unwrap_or((80, 24));
    let mut out = std::io::stdout().lock();
    queue!(out, cursor::MoveTo(0, 0))?;
    for (i, line) in lines.iter().take(height as usize).enumerate() {
        queue!(out, cursor::MoveTo(0, i as u16))?;
        if line.emphasis {
            queue!(out, SetAttribute(Attribute::Reverse))?;
        }
        queue!(out, Print(clip(&line.text, width as usize)))?;
        if line.emphasis {
            queue!(out, SetAttribute(Attribute::Reset))?;
        }
        queue!(out, terminal::Clear(ClearType::UntilNewLine))?;
    }
    queue!(
        out,
        cursor::MoveTo(0, lines.len().min(height as usize) as u16),
        terminal::Clear(ClearType::FromCursorDown)
    )?;
    out.flush()
}

/// Asks for `stats` every `interval` and sends each answer (or error) with its arrival time, until
/// the screen loop hangs up.
fn poller(socket: PathBuf, interval: Duration, tx: mpsc::Sender<(Instant, Result<StatsView, String>)>) {
    loop {
        let started = Instant::now();
        let answer = fetch(&socket).map_err(|e| e.to_string());
        if tx.send((Instant::now(), answer)).is_err() {
            return;
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// Whether `event` asks to quit: `q`, `Esc` or `Ctrl-C` (raw mode turns Ctrl-C into a key).
fn quits(event: &Event) -> bool {
    match event {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

/// Runs the live view until the user quits.
pub fn run(socket: &Path, interval: Duration) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    // The first answer before taking over the terminal: a daemon that is not there is an error.
    let mut cur = Sample {
        at: Instant::now(),
        stats: fetch(socket)?,
    };
    let mut prev: Option<Sample> = None;
    let mut error: Option<String> = None;
    let (tx, rx) = mpsc::channel();
    {
        let socket = socket.to_path_buf();
        std::thread::Builder::new()
            .name("lb-top-poller".into())
            .spawn(move || {
                std::thread::sleep(interval);
                poller(socket, interval, tx);
            })?;
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        hook(info);
    }));
    let _screen = Screen::enter()?;
    let label = socket.display().to_string();
    let mut dirty = true;
    loop {
        if dirty {
            draw(&frame(&label, interval, &cur, prev.as_ref(), error.as_deref()))?;
            dirty = false;
        }
        if event::poll(TICK)? {
            let e = event::read()?;
            if quits(&e) {
                return Ok(());
            }
            dirty = matches!(e, Event::Resize(..));
        }
        while let Ok((at, answer)) = rx.try_recv() {
            match answer {
                Ok(stats) => {
                    prev = Some(std::mem::replace(&mut cur, Sample { at, stats }));
                    error = None;
                }
                Err(e) => error = Some(e),
            }
            dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, f: impl Fn(&mut StatsView)) -> Sample {
        let mut stats = crate::observe::tests::sample();
        f(&mut stats);
        Sample { at, stats }
    }

    fn row<'a>(lines: &'a [Line], start: &str) -> Vec<&'a str> {
        let line = lines
            .iter()
            .find(|l| l.text.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?}: {lines:#?}"));
        line.text
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn ajp_services_show_requests_per_second() {
        let with_t1 = |s: &mut StatsView, requests: u64| {
            let mut t1 = s.services[0].backends[0].clone();
            t1.name = "t1".into();
            let tomcat = &mut s.services[2];
            tomcat.backends = vec![t1];
            tomcat
                .ajp
                .as_mut()
                .unwrap()
                .backends
                .get_mut(&0)
                .unwrap()
                .requests = requests;
        };
        let t0 = Instant::now();
        let a = sample(t0, |s| with_t1(s, 10));
        let b = sample(t0 + Duration::from_secs(2), |s| with_t1(s, 30));
        let lines = frame("/run/lb/lb.sock", Duration::from_secs(1), &b, Some(&a), None);
        assert_eq!(row(&lines, "  t1")[7], "10.0", "{lines:#?}");
        assert_eq!(row(&lines, "tomcat")[6], "10.0", "{lines:#?}");
    }

    #[test]
    fn rates_come_from_two_samples() {
        let t0 = Instant::now();
        let a = sample(t0, |_| {});
        let b = sample(t0 + Duration::from_secs(2), |s| {
            let b1 = &mut s.services[0].backends[0];
            b1.connections_total += 10;
            b1.bytes_in += 4096;
            b1.bytes_out += 2 * 1024 * 1024;
            let k1 = &mut s.services[1].backends[0];
            k1.packets_in = Some(11 + 300);
            k1.packets_out = Some(12 + 100);
            let x = s.xdp.as_mut().unwrap();
            x.set(XdpCounter::NoBackend, x.get(XdpCounter::NoBackend) + 6);
        });
        let lines = frame("/run/lb/lb.sock", Duration::from_secs(1), &b, Some(&a), None);
        assert!(
            lines[0]
                .text
                .starts_with("lb top  /run/lb/lb.sock  lb 9.9.9  up 5s  every 1s")
        );
        assert_eq!(
            lines[1].text,
            "xdp  packets 0/s  forwarded 0/s  passed 0/s  dropped 0/s  new flows 0/s  reasons: no_backend 3.0/s"
        );
        let header = lines.iter().find(|l| l.emphasis).unwrap();
        assert!(header.text.starts_with("SERVICE / BACKEND"));
        assert_eq!(
            row(&lines, "  b1"),
            [
                "b1",
                "drain",
                "up",
                "2",
                "5.0",
                "2.0 KiB/s",
                "1.0 MiB/s",
                "-",
                "1.5ms",
                "drain 4s ago"
            ]
        );
        assert_eq!(
            row(&lines, "  b2"),
            [
                "b2 (backup)",
                "active",
                "down",
                "2",
                "0",
                "0 B/s",
                "0 B/s",
                "-",
                "-",
                "-"
            ]
        );
        assert_eq!(row(&lines, "  k1")[7], "200");
        let web = row(&lines, "web ");
        assert_eq!(web[1], "1/2 up");
        assert_eq!(web[3], "5.0");
    }

    #[test]
    fn first_sample_and_errors_show_without_rates() {
        let a = sample(Instant::now(), |_| {});
        let lines = frame("s", Duration::from_millis(500), &a, None, Some("cannot connect"));
        assert!(lines[0].text.contains("every 500ms"));
        assert!(
            lines
                .iter()
                .any(|l| l.emphasis && l.text.starts_with("! cannot connect"))
        );
        assert_eq!(row(&lines, "  b1")[4], "-");
    }

    #[test]
    fn counters_going_backwards_show_no_rate() {
        assert_eq!(rate(Some(10), 4, 1.0), None);
        assert_eq!(rate(None, 4, 1.0), None);
        assert_eq!(rate(Some(4), 10, 2.0), Some(3.0));
    }

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("fast").is_err());
    }

    #[test]
    fn quit_keys() {
        use crossterm::event::KeyEvent;
        let key = |code, modifiers| Event::Key(KeyEvent::new(code, modifiers));
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&Event::Resize(80, 24)));
    }
}
