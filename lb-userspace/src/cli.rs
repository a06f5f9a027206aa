//! Renders control responses as tables for people (`--json` prints them raw for scripts).

use lb_common::counters::{CounterKind, XdpCounter, XdpCounters};

use crate::config::enum_text;
use crate::control::protocol::{AffinityListView, ReloadView, ResetView, StatsView, StatusView, WhichView};

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(std::string::ToString::to_string).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A short duration: `45s`, `12m`, `3h`, `2d`.
pub fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// An optional counter: `-` where it means nothing for the datapath.
fn opt(n: Option<u64>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// How a counter is titled in tables: its name with spaces (`new flows`).
pub fn label(counter: XdpCounter) -> String {
    counter.name().replace('_', " ")
}

/// The XDP lines of `lb stats`: every counter but the reasons, then the reasons that counted.
fn xdp_counters(x: &XdpCounters) -> String {
    let totals: Vec<String> = x
        .iter()
        .filter(|(c, _)| !matches!(c.kind(), CounterKind::Reason | CounterKind::State))
        .map(|(c, n)| format!("{} {n}", label(c)))
        .collect();
    let mut out = format!("xdp: {}\n", totals.join("  "));
    // States (SYN cookies) when they are on.
    let states: Vec<String> = x
        .of_kind(CounterKind::State)
        .filter(|(_, n)| *n > 0)
        .map(|(c, _)| format!("{} on", label(c)))
        .collect();
    if !states.is_empty() {
        out.push_str(&format!("xdp state: {}\n", states.join("  ")));
    }
    let reasons: Vec<String> = x
        .of_kind(CounterKind::Reason)
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| format!("{} {n}", c.name()))
        .collect();
    if !reasons.is_empty() {
        out.push_str(&format!("xdp reasons: {}\n", reasons.join("  ")));
    }
    out
}

/// Most recent transitions listed per service by `lb stats`.
const STATS_TRANSITIONS: usize = 8;

/// `lb stats`: the counters of every backend, the XDP program's counters, recent transitions.
pub fn stats(view: &StatsView) -> String {
    let mut out = format!("lb {}  up {}\n", view.version, ago(view.uptime_secs));
    if let Some(x) = &view.xdp {
        out.push_str(&xdp_counters(x));
    }
    if !view.proxy_workers.is_empty() {
        let each: Vec<String> = view.proxy_workers.iter().map(u64::to_string).collect();
        out.push_str(&format!("proxy connections per worker: {}\n", each.join(" ")));
    }
    if view.services.is_empty() {
        out.push_str("no services\n");
    }
    for s in &view.services {
        out.push_str(&format!(
            "\nservice {}  listen {}  {}/{}  affinity {} clients{}{}\n",
            s.name,
            s.listen,
            enum_text(&s.protocol),
            enum_text(&s.datapath),
            s.affinity_entries,
            if s.on_backups { "  ON BACKUPS" } else { "" },
            s.failed_connections
                .map_or(String::new(), |n| format!("  failed clients {n}")),
        ));
        let rows: Vec<Vec<String>> = s
            .backends
            .iter()
            .map(|b| {
                let (checks, latency) = match &b.check {
                    Some(c) => (
                        format!("{}/{}", c.checks - c.failed_checks.min(c.checks), c.failed_checks),
                        c.last_latency_ms
                            .map_or(c.last_result.clone(), |ms| format!("{ms:.1}ms")),
                    ),
                    None => ("-".into(), "-".into()),
                };
                vec![
                    b.name.clone(),
                    enum_text(&b.state),
                    enum_text(&b.health),
                    b.connections_active.to_string(),
                    b.connections_total.to_string(),
                    bytes(b.bytes_in),
                    bytes(b.bytes_out),
                    opt(b.packets_in),
                    opt(b.packets_out),
                    opt(b.connect_failures),
                    checks,
                    format!("{}/{}", b.health_transitions, b.state_transitions),
                    latency,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "BACKEND",
                "STATE",
                "HEALTH",
                "ACTIVE",
                "TOTAL",
                "IN",
                "OUT",
                "PKTS IN",
                "PKTS OUT",
                "CONN FAIL",
                "CHECKS OK/FAIL",
                "TRANS H/S",
                "LAST CHECK",
            ],
            &rows,
        ));
        if let Some(a) = &s.ajp {
            out.push_str(&ajp_stats(a));
        }
        let mut recent: Vec<(&str, &crate::state::Transition)> = s
            .backends
            .iter()
            .flat_map(|b| b.transitions.iter().map(move |t| (b.name.as_str(), t)))
            .collect();
        recent.sort_by_key(|(_, t)| std::cmp::Reverse(t.unix_ms));
        if !recent.is_empty() {
            out.push_str("recent transitions:\n");
        }
        for (name, t) in recent.into_iter().take(STATS_TRANSITIONS) {
            out.push_str(&format!(
                "  {:>4} ago  {name}  {} {} → {}  ({})\n",
                ago(view.taken_unix_ms.saturating_sub(t.unix_ms) / 1000),
                t.kind.as_str(),
                t.from,
                t.to,
                t.reason
            ));
        }
    }
    out
}

/// The AJP datapath's request counters of one service (part of `lb stats`).
fn ajp_stats(a: &crate::datapath::ajp::AjpServiceCounters) -> String {
    let mut out = format!(
        "ajp: refused secret {}  attribute {}  shutdown {}  503 sent {}  cpings answered {}  protocol errors {}\n",
        a.refused_secret,
        a.refused_attribute,
        a.refused_shutdown,
        a.unavailable_503,
        a.cpings_answered,
        a.protocol_errors
    );
    let rows: Vec<Vec<String>> = a
        .backends
        .values()
        .map(|b| {
            let mean = if b.latency.count > 0 {
                format!("{:.1}ms", b.latency.sum_seconds * 1000.0 / b.latency.count as f64)
            } else {
                "-".into()
            };
            vec![
                b.name.clone(),
                b.route.clone(),
                b.requests.to_string(),
                b.in_flight.to_string(),
                format!(
                    "{}/{}/{}/{}/{}",
                    b.responses_1xx, b.responses_2xx, b.responses_3xx, b.responses_4xx, b.responses_5xx
                ),
                format!("{}/{}", b.pool_idle, b.pool_busy),
                b.route_hits.to_string(),
                b.address_hits.to_string(),
                b.route_failovers.to_string(),
                b.retries.to_string(),
                mean,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "BACKEND",
            "ROUTE",
            "REQUESTS",
            "IN FLIGHT",
            "1XX/2XX/3XX/4XX/5XX",
            "POOL IDLE/BUSY",
            "ROUTE HITS",
            "ADDR HITS",
            "ROUTE FAILOVER",
            "RETRIES",
            "MEAN LATENCY",
        ],
        &rows,
    ));
    out
}

/// `lb affinity list`: one row per client, most recent first.
pub fn affinity(view: &AffinityListView) -> String {
    let rows: Vec<Vec<String>> = view
        .entries
        .iter()
        .map(|e| {
            vec![
                e.client.clone(),
                e.backend.clone(),
                e.address.clone(),
                e.home.clone().unwrap_or_else(|| "-".into()),
                format!("{}s", e.idle_secs),
            ]
        })
        .collect();
    let mut out = format!(
        "service {}  {} clients with affinity{}\n",
        view.service,
        view.total,
        if (view.entries.len() as u64) < view.total {
            format!(" ({} shown; --limit shows more)", view.entries.len())
        } else {
            String::new()
        }
    );
    if !rows.is_empty() {
        out.push_str(&table(
            &["CLIENT", "BACKEND", "ADDRESS", "FAILED OVER FROM", "IDLE"],
            &rows,
        ));
    }
    out
}

/// `lb status`: one block per service, one row per backend.
pub fn status(view: &StatusView) -> String {
    let mut out = format!(
        "lb {}  up {}s  config {}\n",
        view.version,
        view.uptime_secs,
        view.config.as_deref().unwrap_or("-")
    );
    if view.services.is_empty() {
        out.push_str("no services\n");
    }
    for s in &view.services {
        out.push_str(&format!(
            "\nservice {}  listen {}  {}/{}  affinity {}s ({} clients){}{}\n",
            s.name,
            s.listen,
            enum_text(&s.protocol),
            datapath_text(s),
            s.affinity_timeout_secs,
            s.affinity_entries,
            if s.on_backups { "  ON BACKUPS" } else { "" },
            if s.failed_connections > 0 {
                format!("  failed {}", s.failed_connections)
            } else {
                String::new()
            },
        ));
        let rows: Vec<Vec<String>> = s
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.name.clone(),
                    b.address.clone(),
                    if b.drained {
                        "drain (drained)".to_string()
                    } else {
                        enum_text(&b.state)
                    },
                    enum_text(&b.health),
                    b.weight.to_string(),
                    if b.backup {
                        "backup".into()
                    } else {
                        "primary".into()
                    },
                    b.ring_slots.to_string(),
                    b.active_connections.to_string(),
                    b.total_connections.to_string(),
                    b.affinity_clients.to_string(),
                    b.connect_failures.to_string(),
                    bytes(b.bytes_in),
                    bytes(b.bytes_out),
                    match &b.check {
                        Some(c) => format!(
                            "{} {} ({}↑ {}↓, {}s in state)",
                            c.last_result,
                            c.last_latency_ms.map_or(String::new(), |ms| format!("{ms:.1}ms")),
                            c.consecutive_ok,
                            c.consecutive_failed,
                            c.since_secs
                        ),
                        None => "-".into(),
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "BACKEND",
                "ADDRESS",
                "STATE",
                "HEALTH",
                "WEIGHT",
                "ROLE",
                "SLOTS",
                "ACTIVE",
                "TOTAL",
                "AFFINITY",
                "FAILED",
                "IN",
                "OUT",
                "LAST CHECK",
            ],
            &rows,
        ));
        if let Some(a) = &s.ajp {
            out.push_str(&ajp_stats(a));
        }
    }
    out
}

/// `lb service list`.
pub fn services(view: &StatusView) -> String {
    let rows: Vec<Vec<String>> = view
        .services
        .iter()
        .map(|s| {
            let up = s.backends.iter().filter(|b| b.ring_slots > 0).count();
            vec![
                s.name.clone(),
                s.listen.clone(),
                enum_text(&s.protocol),
                datapath_text(s),
                format!("{up}/{}", s.backends.len()),
                s.affinity_entries.to_string(),
            ]
        })
        .collect();
    table(
        &["SERVICE", "LISTEN", "PROTOCOL", "DATAPATH", "IN RING", "CLIENTS"],
        &rows,
    )
}

/// `lb which`.
/// `lb backend disable --reset`.
pub fn reset(view: &ResetView) -> String {
    format!(
        "ok: backend {} of {} in maintenance, {} open connection{} reset\n",
        view.backend,
        view.service,
        view.connections,
        if view.connections == 1 { "" } else { "s" }
    )
}

pub fn which(view: &WhichView) -> String {
    match &view.backend {
        Some(b) => format!(
            "{} → {} ({}) by {}: {}\n",
            view.client,
            b,
            view.address.as_deref().unwrap_or("-"),
            view.reason,
            view.detail
        ),
        None => format!("{} → no backend: {}\n", view.client, view.detail),
    }
}

/// `lb reload`.
pub fn reload(view: &ReloadView) -> String {
    let mut out = String::new();
    if view.applied.is_empty() && view.problems.is_empty() {
        out.push_str("reloaded: nothing changed\n");
    }
    for a in &view.applied {
        out.push_str(&format!("applied: {a}\n"));
    }
    for p in &view.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    for r in &view.restart {
        out.push_str(&format!("restart needed: {r}\n"));
    }
    out
}

/// The datapath as `lb status` and `lb service list` show it: `xdp`, or `xdp dsr` with
/// `forwarding = "dsr"`.
fn datapath_text(s: &crate::control::protocol::ServiceView) -> String {
    match s.forwarding {
        crate::config::Forwarding::Nat => enum_text(&s.datapath),
        crate::config::Forwarding::Dsr => format!("{} dsr", enum_text(&s.datapath)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["long".into(), "x".into()], vec!["s".into(), "yy".into()]],
        );
        assert_eq!(t, "A     BB\nlong  x\ns     yy\n");
    }

    #[test]
    fn stats_table_shows_counters_and_transitions() {
        let view = crate::observe::tests::sample();
        let out = stats(&view);
        assert!(out.starts_with("lb 9.9.9  up 5s\n"), "{out}");
        assert!(
            out.contains("xdp: packets 100  forwarded 85  passed 10  dropped 5  new flows 6\n"),
            "{out}"
        );
        assert!(
            out.contains("xdp reasons: no_backend 4  no_conntrack 1\n"),
            "{out}"
        );
        assert!(out.contains("proxy connections per worker: 3 2\n"), "{out}");
        assert!(
            !out.contains("xdp state"),
            "SYN cookies off: no state line\n{out}"
        );
        let mut on = crate::observe::tests::sample();
        if let Some(x) = on.xdp.as_mut() {
            x.set(lb_common::counters::XdpCounter::SynCookies, 1);
        }
        assert!(
            stats(&on).contains("xdp state: syn cookies on\n"),
            "{}",
            stats(&on)
        );
        assert!(
            out.contains("service web  listen 10.0.0.1:80  tcp/proxy  affinity 4 clients  failed clients 2")
        );
        let b1 = out.lines().find(|l| l.starts_with("b1 ")).unwrap();
        let cells: Vec<&str> = b1.split("  ").filter(|c| !c.is_empty()).map(str::trim).collect();
        assert_eq!(
            cells,
            [
                "b1", "drain", "up", "2", "7", "1000 B", "19.5 KiB", "-", "-", "3", "6/4", "0/1", "1.5ms"
            ]
        );
        let k1 = out.lines().find(|l| l.starts_with("k1 ")).unwrap();
        assert!(k1.contains(" 11 ") && k1.contains(" 12 "), "{k1}");
        assert!(
            out.contains("b1  state active → drain  (operator uid 0)"),
            "{out}"
        );
        assert!(
            out.contains("ajp: refused secret 1  attribute 2  shutdown 3  503 sent 5  cpings answered 4  protocol errors 6\n"),
            "{out}"
        );
        let t1 = out.lines().find(|l| l.starts_with("t1 ")).unwrap();
        let cells: Vec<&str> = t1.split("  ").filter(|c| !c.is_empty()).map(str::trim).collect();
        assert_eq!(
            cells,
            [
                "t1",
                "t1",
                "10",
                "1",
                "0/8/0/0/1",
                "2/1",
                "7",
                "3",
                "1",
                "2",
                "10014.3ms"
            ]
        );
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3600), "3h");
        assert_eq!(ago(5 * 86_400), "5d");
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
