//! Renders control responses as tables for people (`--json` prints them raw for scripts).

use crate::control::protocol::{ReloadView, StatusView, WhichView};

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
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
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

fn text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
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
            text(&s.protocol),
            text(&s.datapath),
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
                    text(&b.state),
                    text(&b.health),
                    b.weight.to_string(),
                    if b.backup {
                        "backup".into()
                    } else {
                        "primary".into()
                    },
                    b.ring_slots.to_string(),
                    b.active_connections.to_string(),
                    b.total_connections.to_string(),
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
                "FAILED",
                "IN",
                "OUT",
                "LAST CHECK",
            ],
            &rows,
        ));
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
                text(&s.protocol),
                text(&s.datapath),
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
    if view.applied.is_empty() {
        out.push_str("reloaded: nothing changed\n");
    }
    for a in &view.applied {
        out.push_str(&format!("applied: {a}\n"));
    }
    for p in &view.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
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
    fn bytes_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
