//! The status page: a [`StatsView`] (the snapshot `lb stats` shows) as one HTML page with inline
//! CSS and script and no external assets, served at `/` of the `[metrics]` listener, and as JSON
//! at `/status.json`.
//!
//! The page is rendered here, every text escaped by [`escape`]. Its script polls `/status.json`
//! and `/` every [`REFRESH_SECS`] seconds: it swaps in the new page body and fills the rate cells
//! (connections, bytes per second) from the difference of the last two JSON snapshots. Without
//! script, a `<noscript>` refresh reloads the page. Nothing on the page changes state: the server
//! answers only `GET` and `HEAD`.

use std::fmt::Write as _;

use crate::config::{Protocol, enum_text};
use crate::control::protocol::{BackendStatsView, ServiceStatsView, StatsView};
use crate::state::{Health, Transition, TransitionKind};

/// Seconds between two refreshes of the page.
pub const REFRESH_SECS: u32 = 2;
/// Most transitions listed under "Recent transitions" (newest first).
pub const MAX_TRANSITIONS_SHOWN: usize = 50;

/// `text` with `&`, `<`, `>`, `"` and `'` replaced by character references: safe inside element
/// text and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The snapshot as the JSON of `/status.json` (the same document as `lb stats --json`).
pub fn json(view: &StatsView) -> Result<String, serde_json::Error> {
    serde_json::to_string(view)
}

/// The whole page for a snapshot.
pub fn page(view: &StatsView) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>lb status</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript>\
         <style>{STYLE}</style></head><body>\n"
    );
    h.push_str(&content(view));
    let _ = write!(
        h,
        "<script>const REFRESH_MS = {};{SCRIPT}</script>\n</body></html>\n",
        REFRESH_SECS * 1000
    );
    h
}

/// The part of the page the script replaces on each refresh (`<main id="content">`).
pub fn content(view: &StatsView) -> String {
    let mut h = String::new();
    let _ = writeln!(
        h,
        "<main id=\"content\"><header><h1>lb status</h1><p class=\"meta\">lb {} · up {} · snapshot {} · \
         <span id=\"refreshed\">refreshes every {REFRESH_SECS}s</span> · read-only: changes go through the control socket (<code>lb backend drain</code>, <code>lb backend weight</code>, …)</p></header>",
        escape(&view.version),
        duration_text(view.uptime_secs),
        escape(&utc_text(view.taken_unix_ms)),
    );
    if view.services.is_empty() {
        h.push_str("<p class=\"empty\">No services.</p>\n");
    }
    for s in &view.services {
        service(&mut h, s);
    }
    transitions(&mut h, view);
    h.push_str("</main>\n");
    h
}

fn service(h: &mut String, s: &ServiceStatsView) {
    let name = escape(&s.name);
    let _ = write!(
        h,
        "<section class=\"service\" id=\"service-{name}\" data-service=\"{name}\"><h2>{name}</h2>\
         <dl><dt>listen</dt><dd>{}</dd><dt>protocol</dt><dd>{}</dd><dt>datapath</dt><dd>{}</dd>\
         <dt>clients with affinity</dt><dd class=\"affinity\">{}</dd>\
         <dt>on backups</dt><dd class=\"{}\">{}</dd>",
        escape(&s.listen),
        escape(&enum_text(&s.protocol)),
        escape(&enum_text(&s.datapath)),
        s.affinity_entries,
        if s.on_backups { "warn" } else { "ok" },
        if s.on_backups {
            "yes: no primary takes new clients"
        } else {
            "no"
        },
    );
    if let Some(n) = s.failed_connections {
        let _ = write!(h, "<dt>clients failed (no backend reachable)</dt><dd>{n}</dd>");
    }
    if let Some(a) = &s.ajp {
        let _ = write!(
            h,
            "<dt>AJP 503 sent (no backend)</dt><dd class=\"ajp\">{}</dd><dt>AJP refused</dt><dd class=\"ajp\">secret {}, attribute {}, shutdown {}</dd>\
             <dt>AJP protocol errors</dt><dd class=\"ajp\">{}</dd><dt>CPings answered</dt><dd class=\"ajp\">{}</dd>",
            a.unavailable_503,
            a.refused_secret,
            a.refused_attribute,
            a.refused_shutdown,
            a.protocol_errors,
            a.cpings_answered,
        );
    }
    h.push_str("</dl>\n");
    let ajp = s.protocol == Protocol::Ajp || s.ajp.is_some();
    let ring_total: u64 = s.backends.iter().map(|b| b.ring_slots).sum();
    h.push_str(
        "<table class=\"backends\"><thead><tr><th>backend</th><th>state</th><th>health</th><th>role</th>\
         <th>weight</th><th>ring share</th><th>active conns</th><th>affinity</th><th>total conns</th><th>conns/s</th>\
         <th>bytes in/s</th><th>bytes out/s</th><th>bytes in / out</th>",
    );
    if ajp {
        h.push_str("<th>AJP requests</th><th>AJP statuses</th>");
    }
    h.push_str("</tr></thead><tbody>\n");
    for b in &s.backends {
        backend(h, s, b, ring_total, ajp);
    }
    h.push_str("</tbody></table></section>\n");
}

fn backend(h: &mut String, s: &ServiceStatsView, b: &BackendStatsView, ring_total: u64, ajp: bool) {
    let name = escape(&b.name);
    let state = escape(&enum_text(&b.state));
    // Draining with nothing left on it: safe to take down.
    let drained =
        b.state == crate::config::AdminState::Drain && b.connections_active == 0 && b.affinity_clients == 0;
    let health = escape(&enum_text(&b.health));
    let key = |field: &str| escape(&format!("{}/{}/{field}", s.name, b.name));
    let share = if ring_total == 0 {
        "0%".to_string()
    } else {
        format!("{:.1}%", b.ring_slots as f64 * 100.0 / ring_total as f64)
    };
    let _ = write!(
        h,
        "<tr class=\"backend state-{state} health-{health}\" data-backend=\"{name}\">\
         <td class=\"name\">{name}<br><small>{}</small></td>\
         <td class=\"state\">{state}{}</td><td class=\"health\"><b>{health}</b>{}</td>\
         <td class=\"role\">{}</td><td class=\"num\">{}</td><td class=\"num\">{share}</td>\
         <td class=\"num\">{}</td><td class=\"num affinity\">{}</td><td class=\"num\">{}</td>\
         <td class=\"num rate\" data-rate=\"{}\">…</td><td class=\"num rate\" data-rate=\"{}\">…</td>\
         <td class=\"num rate\" data-rate=\"{}\">…</td><td class=\"num\">{} / {}</td>",
        escape(&b.address),
        if drained {
            " <small class=\"ok\">(drained)</small>"
        } else {
            ""
        },
        health_detail(b),
        if b.backup { "backup" } else { "primary" },
        b.weight,
        b.connections_active,
        b.affinity_clients,
        b.connections_total,
        key("connections_total"),
        key("bytes_in"),
        key("bytes_out"),
        bytes_text(b.bytes_in),
        bytes_text(b.bytes_out),
    );
    if ajp {
        h.push_str(&ajp_cells(s, b));
    }
    h.push_str("</tr>\n");
}

/// The AJP cells of a backend (requests with their rate, responses by status class), from the
/// AJP datapath's counters; services of the other datapaths forward AJP as plain TCP and count no
/// requests.
fn ajp_cells(s: &ServiceStatsView, b: &BackendStatsView) -> String {
    let Some(counters) = &s.ajp else {
        return format!(
            "<td class=\"na\" colspan=\"2\">not counted: the {} datapath forwards AJP as TCP (use datapath = \"ajp\")</td>",
            escape(&enum_text(&s.datapath))
        );
    };
    let Some(c) = counters.backends.values().find(|c| c.name == b.name) else {
        return "<td class=\"na\" colspan=\"2\">no requests yet</td>".to_string();
    };
    format!(
        "<td class=\"num ajp-requests\">{}<br><small><span class=\"rate\" data-rate=\"{}\">…</span>/s, {} in flight</small></td>\
         <td class=\"ajp-statuses\">2xx {} · 3xx {}<br>4xx {} · 5xx {}<br><small>1xx {}</small></td>",
        c.requests,
        escape(&format!("{}/{}/ajp_requests", s.name, b.name)),
        c.in_flight,
        c.responses_2xx,
        c.responses_3xx,
        c.responses_4xx,
        c.responses_5xx,
        c.responses_1xx,
    )
}

/// Last check result, latency and age of the health, after the health word.
fn health_detail(b: &BackendStatsView) -> String {
    let Some(c) = &b.check else {
        return "<br><small>no checks (health.kind = none)</small>".to_string();
    };
    let latency = c
        .last_latency_ms
        .map(|ms| format!(" in {ms:.1} ms"))
        .unwrap_or_default();
    format!(
        "<br><small class=\"check\">last check: {}{latency}<br>{} checks, {} failed · {} for {}</small>",
        escape(&c.last_result),
        c.checks,
        c.failed_checks,
        escape(&enum_text(&b.health)),
        duration_text(c.since_secs),
    )
}

fn transitions(h: &mut String, view: &StatsView) {
    let mut all: Vec<(&str, &str, &Transition)> = view
        .services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .flat_map(move |b| b.transitions.iter().map(move |t| (&*s.name, &*b.name, t)))
        })
        .collect();
    all.sort_by_key(|t| std::cmp::Reverse(t.2.unix_ms));
    h.push_str("<section id=\"transitions\"><h2>Recent transitions</h2>\n");
    if all.is_empty() {
        h.push_str("<p class=\"empty\">None since the start.</p></section>\n");
        return;
    }
    h.push_str(
        "<table class=\"transitions\"><thead><tr><th>time (UTC)</th><th>service</th><th>backend</th><th>what</th>\
         <th>from → to</th><th>reason</th></tr></thead><tbody>\n",
    );
    for (service, backend, t) in all.into_iter().take(MAX_TRANSITIONS_SHOWN) {
        let kind = match t.kind {
            TransitionKind::Health => "health",
            TransitionKind::State => "state",
        };
        let down = t.kind == TransitionKind::Health && t.to == enum_text(&Health::Down);
        let _ = writeln!(
            h,
            "<tr class=\"transition{}\" data-backend=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{kind}</td>\
             <td>{} → {}</td><td class=\"reason\">{}</td></tr>",
            if down { " down" } else { "" },
            escape(backend),
            escape(&utc_text(t.unix_ms)),
            escape(service),
            escape(backend),
            escape(&t.from),
            escape(&t.to),
            escape(&t.reason),
        );
    }
    h.push_str("</tbody></table></section>\n");
}

/// `1d 2h`, `3h 4m`, `5m 6s`, `7s`.
fn duration_text(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `3.2 MiB`.
fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc_text(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}\
h1{font-size:1.5em;margin:0}h2{font-size:1.2em;margin:1.2em 0 .4em}\
.meta{color:#666;margin:.2em 0 1em}small{color:#666}\
dl{display:flex;flex-wrap:wrap;align-items:baseline;margin:.2em 0 .5em}dt{color:#555;margin-right:.4em}dt:after{content:\":\"}dd{margin:0 1.6em 0 0}\
table{border-collapse:collapse;background:#fff;margin-bottom:1em}\
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#eee}\
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
.health-up .health b{color:#1a7f37}.health-down .health b,.health-down .name{color:#c62828}\
.health-down{background:#fdecea}.state-drain{background:#fff8e1}.state-maintenance{background:#eceff1}\
.state-drain .state,.state-maintenance .state{font-weight:bold}\
tr.transition.down td{color:#c62828}.warn{color:#c62828;font-weight:bold}.na,.empty{color:#888}\
code{background:#eee;padding:0 .2em}td.health{min-width:14em}.ajp-statuses{white-space:nowrap}";

const SCRIPT: &str = r#"
(function () {
  "use strict";
  var previous = null, rates = {};
  function fmt(v, bytes) {
    if (!bytes) return v.toFixed(1);
    var u = ["B/s", "KiB/s", "MiB/s", "GiB/s"], i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return v.toFixed(1) + " " + u[i];
  }
  function measure(now) {
    if (!previous) return;
    var dt = (now.taken_unix_ms - previous.taken_unix_ms) / 1000;
    if (dt <= 0) return;
    var before = values(previous), after = values(now);
    rates = {};
    Object.keys(after).forEach(function (k) {
      var bytes = /\/bytes_(in|out)$/.test(k);
      rates[k] = k in before ? fmt(Math.max(0, after[k] - before[k]) / dt, bytes) : "…";
    });
  }
  // Every counter a rate is shown for, by "service/backend/field".
  function values(snapshot) {
    var v = {};
    snapshot.services.forEach(function (s) {
      s.backends.forEach(function (b) {
        ["connections_total", "bytes_in", "bytes_out"].forEach(function (f) {
          v[s.name + "/" + b.name + "/" + f] = b[f];
        });
      });
      if (s.ajp) {
        Object.keys(s.ajp.backends).forEach(function (id) {
          var a = s.ajp.backends[id];
          v[s.name + "/" + a.name + "/ajp_requests"] = a.requests;
        });
      }
    });
    return v;
  }
  function fill() {
    document.querySelectorAll("[data-rate]").forEach(function (td) {
      var r = rates[td.getAttribute("data-rate")];
      if (r !== undefined) td.textContent = r;
    });
  }
  async function refresh() {
    try {
      var json = await (await fetch("status.json", { cache: "no-store" })).json();
      var html = await (await fetch("./", { cache: "no-store" })).text();
      measure(json);
      previous = json;
      var next = new DOMParser().parseFromString(html, "text/html").getElementById("content");
      var here = document.getElementById("content");
      if (next && here) here.replaceWith(document.importNode(next, true));
      fill();
      document.getElementById("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString();
    } catch (e) {
      var r = document.getElementById("refreshed");
      if (r) r.textContent = "refresh failed: " + e;
    }
  }
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_replaces_every_special_character() {
        assert_eq!(
            escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain-name_1.2"), "plain-name_1.2");
    }

    #[test]
    fn utc_text_matches_known_dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc_text(1_798_761_599_000), "2026-12-31 23:59:59");
    }

    #[test]
    fn durations_and_bytes_read_well() {
        assert_eq!(duration_text(59), "59s");
        assert_eq!(duration_text(61), "1m 1s");
        assert_eq!(duration_text(3 * 3600 + 120), "3h 2m");
        assert_eq!(duration_text(2 * 86400 + 3600), "2d 1h");
        assert_eq!(bytes_text(1023), "1023 B");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(bytes_text(3 * 1024 * 1024), "3.0 MiB");
    }
}
