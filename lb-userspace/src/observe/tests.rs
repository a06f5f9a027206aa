//! Fixtures and tests of the observability surfaces: sample snapshots (also used by the `lb stats`
//! and `lb top` tests), the Prometheus rendering, and the `/metrics` server driven in-process on
//! `127.0.0.1:0`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_common::counters::{XdpCounter, XdpCounters};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::{self, MAX_OPEN, READ_TIMEOUT};
use super::metrics::{Format, render};
use crate::config::{AdminState, DatapathKind, MetricsConfig, Protocol};
use crate::control::protocol::{BackendStatsView, ServiceStatsView, StatsView};
use crate::health::CheckStatus;
use crate::state::{Health, Transition, TransitionKind};

fn backend(name: &str) -> BackendStatsView {
    BackendStatsView {
        name: name.into(),
        address: "10.0.1.2:8080".into(),
        weight: 1,
        backup: false,
        state: AdminState::Active,
        health: Health::Up,
        ring_slots: 50,
        connections_active: 2,
        connections_total: 7,
        affinity_clients: 3,
        bytes_in: 1000,
        bytes_out: 20000,
        packets_in: None,
        packets_out: None,
        connect_failures: None,
        check: None,
        health_transitions: 0,
        state_transitions: 0,
        transitions: vec![],
    }
}

/// A proxy service `web` (b1 draining with checks, b2 a down backup) and an XDP service `fast`.
pub(crate) fn sample() -> StatsView {
    let mut b1 = backend("b1");
    b1.state = AdminState::Drain;
    b1.connect_failures = Some(3);
    let mut check = CheckStatus::default();
    (check.checks, check.failed_checks, check.last_latency_ms) = (10, 4, Some(1.5));
    b1.check = Some(check);
    b1.state_transitions = 1;
    b1.transitions = vec![Transition {
        unix_ms: 1_700_000_000_500,
        kind: TransitionKind::State,
        from: "active".into(),
        to: "drain".into(),
        reason: "operator uid 0".into(),
    }];
    let mut b2 = backend("b2");
    b2.backup = true;
    b2.health = Health::Down;
    b2.connect_failures = Some(0);
    b2.health_transitions = 1;
    let mut k1 = backend("k1");
    k1.packets_in = Some(11);
    k1.packets_out = Some(12);
    StatsView {
        version: "9.9.9".into(),
        uptime_secs: 5,
        start_time_unix: 1_700_000_000,
        taken_unix_ms: 1_700_000_005_000,
        xdp: Some(XdpCounters::from_named([
            ("packets", 100),
            ("passed", 10),
            ("forwarded", 85),
            ("dropped", 5),
            ("no_backend", 4),
            ("no_conntrack", 1),
            ("new_flows", 6),
        ])),
        proxy_workers: vec![3, 2],
        services: vec![
            ServiceStatsView {
                name: "web".into(),
                listen: "10.0.0.1:80".into(),
                protocol: Protocol::Tcp,
                datapath: DatapathKind::Proxy,
                affinity_entries: 4,
                on_backups: false,
                failed_connections: Some(2),
                ajp: None,
                backends: vec![b1, b2],
            },
            ServiceStatsView {
                name: "fast".into(),
                listen: "10.0.0.1:81".into(),
                protocol: Protocol::Tcp,
                datapath: DatapathKind::Xdp,
                affinity_entries: 9,
                on_backups: false,
                failed_connections: None,
                ajp: None,
                backends: vec![k1],
            },
            ServiceStatsView {
                name: "tomcat".into(),
                listen: "10.0.0.1:8009".into(),
                protocol: Protocol::Ajp,
                datapath: DatapathKind::Ajp,
                affinity_entries: 2,
                on_backups: false,
                failed_connections: None,
                ajp: Some(ajp_counters()),
                backends: vec![],
            },
        ],
    }
}

fn ajp_counters() -> crate::datapath::ajp::AjpServiceCounters {
    let latency = crate::datapath::ajp::counters::Latency::default();
    latency.observe(Duration::from_millis(3));
    latency.observe(Duration::from_millis(40));
    latency.observe(Duration::from_secs(30));
    let mut a = crate::datapath::ajp::AjpServiceCounters {
        refused_secret: 1,
        refused_attribute: 2,
        refused_shutdown: 3,
        cpings_answered: 4,
        unavailable_503: 5,
        protocol_errors: 6,
        abandoned: 7,
        request_timeouts: 8,
        idle_closed: 9,
        ..Default::default()
    };
    a.backends.insert(
        0,
        crate::datapath::ajp::AjpBackendCounters {
            name: "t1".into(),
            route: "t1".into(),
            requests: 10,
            responses_2xx: 8,
            responses_5xx: 1,
            in_flight: 1,
            pool_idle: 2,
            pool_busy: 1,
            route_hits: 7,
            address_hits: 3,
            route_failovers: 1,
            retries: 2,
            reply_timeouts: 11,
            latency: latency.snapshot(),
            ..Default::default()
        },
    );
    a
}

#[test]
fn ajp_counters_and_latency_histogram() {
    let t = render(&sample(), Format::Text).unwrap();
    for line in [
        "# TYPE lb_ajp_refused_total counter",
        "lb_ajp_refused_total{service=\"tomcat\",reason=\"secret\"} 1",
        "lb_ajp_refused_total{service=\"tomcat\",reason=\"shutdown\"} 3",
        "lb_ajp_cpings_answered_total{service=\"tomcat\"} 4",
        "lb_ajp_unavailable_total{service=\"tomcat\"} 5",
        "lb_ajp_protocol_errors_total{service=\"tomcat\"} 6",
        "lb_ajp_backend_requests_total{service=\"tomcat\",backend=\"t1\"} 10",
        "lb_ajp_backend_responses_total{service=\"tomcat\",backend=\"t1\",class=\"2xx\"} 8",
        "lb_ajp_backend_responses_total{service=\"tomcat\",backend=\"t1\",class=\"5xx\"} 1",
        "lb_ajp_backend_requests_in_flight{service=\"tomcat\",backend=\"t1\"} 1",
        "lb_ajp_backend_pool_connections{service=\"tomcat\",backend=\"t1\",state=\"idle\"} 2",
        "lb_ajp_backend_routed_total{service=\"tomcat\",backend=\"t1\",by=\"route\"} 7",
        "lb_ajp_backend_routed_total{service=\"tomcat\",backend=\"t1\",by=\"address\"} 3",
        "lb_ajp_backend_route_failovers_total{service=\"tomcat\",backend=\"t1\"} 1",
        "lb_ajp_backend_retries_total{service=\"tomcat\",backend=\"t1\"} 2",
        "lb_ajp_backend_reply_timeouts_total{service=\"tomcat\",backend=\"t1\"} 11",
        "lb_ajp_web_connections_closed_total{service=\"tomcat\",reason=\"abandoned\"} 7",
        "lb_ajp_web_connections_closed_total{service=\"tomcat\",reason=\"request_timeout\"} 8",
        "lb_ajp_web_connections_closed_total{service=\"tomcat\",reason=\"idle\"} 9",
        "# TYPE lb_ajp_backend_request_duration_seconds histogram",
        "lb_ajp_backend_request_duration_seconds_bucket{le=\"0.0025\",service=\"tomcat\",backend=\"t1\"} 0",
        "lb_ajp_backend_request_duration_seconds_bucket{le=\"0.005\",service=\"tomcat\",backend=\"t1\"} 1",
        "lb_ajp_backend_request_duration_seconds_bucket{le=\"0.05\",service=\"tomcat\",backend=\"t1\"} 2",
        "lb_ajp_backend_request_duration_seconds_bucket{le=\"10.0\",service=\"tomcat\",backend=\"t1\"} 2",
        "lb_ajp_backend_request_duration_seconds_bucket{le=\"+Inf\",service=\"tomcat\",backend=\"t1\"} 3",
        "lb_ajp_backend_request_duration_seconds_count{service=\"tomcat\",backend=\"t1\"} 3",
    ] {
        has(&t, line);
    }
    assert!(
        t.contains("lb_ajp_backend_request_duration_seconds_sum{service=\"tomcat\",backend=\"t1\"} 30.043"),
        "{t}"
    );
    // Other datapaths have no AJP series.
    lacks(&t, "lb_ajp_backend_requests_total{service=\"web\"");
}

fn has(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
}

/// `text` contains `part` (the status page's HTML is not line-oriented).
fn shows(text: &str, part: &str) {
    assert!(text.contains(part), "missing {part:?} in:\n{text}");
}

fn lacks(text: &str, prefix: &str) {
    assert!(
        !text.lines().any(|l| l.starts_with(prefix)),
        "unexpected {prefix:?} in:\n{text}"
    );
}

#[test]
fn text_format_names_labels_help_and_type() {
    let t = render(&sample(), Format::Text).unwrap();
    has(&t, "# TYPE lb_backend_connections_total counter");
    has(
        &t,
        "# HELP lb_backend_connections_total Connections set up to the backend (XDP: new flows).",
    );
    has(&t, "# TYPE lb_backend_connections_active gauge");
    has(&t, "lb_up 1");
    has(&t, "lb_build_info{version=\"9.9.9\"} 1");
    has(&t, "lb_start_time_seconds 1700000000");
    has(&t, "lb_proxy_worker_connections{worker=\"0\"} 3");
    has(&t, "lb_proxy_worker_connections{worker=\"1\"} 2");
    has(
        &t,
        "lb_backend_connections_total{service=\"web\",backend=\"b1\"} 7",
    );
    has(
        &t,
        "lb_backend_connections_active{service=\"fast\",backend=\"k1\"} 2",
    );
    has(
        &t,
        "lb_backend_affinity_clients{service=\"fast\",backend=\"k1\"} 3",
    );
    has(
        &t,
        "lb_backend_bytes_in_total{service=\"web\",backend=\"b1\"} 1000",
    );
    has(
        &t,
        "lb_backend_bytes_out_total{service=\"fast\",backend=\"k1\"} 20000",
    );
    // Packets only for XDP backends, connect failures only for proxy backends.
    has(
        &t,
        "lb_backend_packets_in_total{service=\"fast\",backend=\"k1\"} 11",
    );
    has(
        &t,
        "lb_backend_packets_out_total{service=\"fast\",backend=\"k1\"} 12",
    );
    lacks(&t, "lb_backend_packets_in_total{service=\"web\"");
    has(
        &t,
        "lb_backend_connect_failures_total{service=\"web\",backend=\"b1\"} 3",
    );
    lacks(&t, "lb_backend_connect_failures_total{service=\"fast\"");
    has(&t, "lb_service_failed_connections_total{service=\"web\"} 2");
    has(&t, "lb_service_affinity_entries{service=\"fast\"} 9");
    has(
        &t,
        "lb_service_info{service=\"fast\",listen=\"10.0.0.1:81\",protocol=\"tcp\",datapath=\"xdp\"} 1",
    );
    has(&t, "lb_backend_up{service=\"web\",backend=\"b1\"} 1");
    has(&t, "lb_backend_up{service=\"web\",backend=\"b2\"} 0");
    has(
        &t,
        "lb_backend_state{service=\"web\",backend=\"b1\",state=\"drain\"} 1",
    );
    has(
        &t,
        "lb_backend_state{service=\"web\",backend=\"b1\",state=\"active\"} 0",
    );
    has(
        &t,
        "lb_backend_info{service=\"web\",backend=\"b2\",address=\"10.0.1.2:8080\",role=\"backup\"} 1",
    );
    has(
        &t,
        "lb_backend_checks_total{service=\"web\",backend=\"b1\",result=\"ok\"} 6",
    );
    has(
        &t,
        "lb_backend_checks_total{service=\"web\",backend=\"b1\",result=\"failed\"} 4",
    );
    lacks(&t, "lb_backend_checks_total{service=\"fast\"");
    has(
        &t,
        "lb_backend_check_latency_seconds{service=\"web\",backend=\"b1\"} 0.0015",
    );
    has(
        &t,
        "lb_backend_transitions_total{service=\"web\",backend=\"b1\",kind=\"state\"} 1",
    );
    has(
        &t,
        "lb_backend_transitions_total{service=\"web\",backend=\"b2\",kind=\"health\"} 1",
    );
    has(
        &t,
        "lb_backend_last_transition_timestamp_seconds{service=\"web\",backend=\"b1\"} 1700000000.5",
    );
    has(&t, "lb_xdp_packets_total{reason=\"no_backend\"} 4");
    has(&t, "lb_xdp_verdicts_total{verdict=\"dropped\"} 5");
    has(&t, "lb_xdp_new_flows_total 6");
    lacks(&t, "lb_xdp_packets_total{reason=\"packets\"");
    lacks(&t, "lb_xdp_packets_total{reason=\"forwarded\"");
    lacks(&t, "# EOF");
    lacks(&t, "# UNIT");
}

#[test]
fn every_sample_has_help_and_type_of_its_own_name() {
    let t = render(&sample(), Format::Text).unwrap();
    let mut help = std::collections::HashSet::new();
    let mut types = std::collections::HashMap::new();
    let mut samples = 0;
    for line in t.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').unwrap();
            assert!(!doc.is_empty() && help.insert(name.to_string()), "{line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(help.contains(name), "TYPE before HELP: {line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            types.insert(name.to_string(), kind.to_string());
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            // Histogram samples carry a suffix after the family's name.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample without TYPE: {line}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            samples += 1;
        }
    }
    assert!(samples > 40, "{t}");
}

#[test]
fn openmetrics_format_names_counter_families_without_total() {
    let t = render(&sample(), Format::OpenMetrics).unwrap();
    has(&t, "# TYPE lb_backend_connections counter");
    has(
        &t,
        "lb_backend_connections_total{service=\"web\",backend=\"b1\"} 7",
    );
    has(&t, "# TYPE lb_backend_up gauge");
    assert!(t.ends_with("# EOF\n"), "{t}");
}

#[test]
fn metric_names_list_every_family() {
    let names = metric_names();
    for want in [
        "lb_up",
        "lb_build_info",
        "lb_backend_connections_active",
        "lb_backend_connections_total",
        "lb_backend_bytes_in_total",
        "lb_backend_bytes_out_total",
        "lb_backend_packets_in_total",
        "lb_backend_packets_out_total",
        "lb_backend_connect_failures_total",
        "lb_backend_up",
        "lb_backend_state",
        "lb_backend_check_latency_seconds",
        "lb_backend_checks_total",
        "lb_backend_transitions_total",
        "lb_service_affinity_entries",
        "lb_backend_affinity_clients",
        "lb_xdp_packets_total",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[test]
fn accept_header_picks_the_format() {
    assert_eq!(Format::from_accept(None), Format::Text);
    assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
    assert_eq!(
        Format::from_accept(Some(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
        )),
        Format::OpenMetrics
    );
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let text = include_str!("../../../examples/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 5, "too few queries: {exprs:?}");
    let names = metric_names();
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let idents = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|t| t.starts_with("lb_"));
        for ident in idents {
            assert!(
                names.iter().any(|n| n == ident),
                "dashboard query `{expr}` uses {ident}, which /metrics does not export"
            );
            used.insert(ident.to_string());
        }
    }
    for want in [
        "lb_backend_up",
        "lb_backend_connections_active",
        "lb_backend_bytes_in_total",
        "lb_backend_check_latency_seconds",
        "lb_xdp_packets_total",
    ] {
        assert!(used.contains(want), "dashboard has no panel on {want}");
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A snapshot with one of everything: a checked proxy backend with a transition, an XDP backend,
/// and XDP counters of each kind. Families without series print nothing, so this is what shows
/// every family.
fn exemplar() -> StatsView {
    let mut checked = CheckStatus::default();
    checked.last_latency_ms = Some(1.0);
    let backend = |name: &str, xdp: bool| BackendStatsView {
        name: name.into(),
        address: "192.0.2.1:80".into(),
        weight: 1,
        backup: false,
        state: AdminState::Active,
        health: Health::Up,
        ring_slots: 1,
        connections_active: 0,
        connections_total: 0,
        affinity_clients: 0,
        bytes_in: 0,
        bytes_out: 0,
        packets_in: xdp.then_some(0),
        packets_out: xdp.then_some(0),
        connect_failures: (!xdp).then_some(0),
        check: Some(checked.clone()),
        health_transitions: 0,
        state_transitions: 1,
        transitions: vec![Transition {
            unix_ms: 0,
            kind: TransitionKind::State,
            from: "active".into(),
            to: "drain".into(),
            reason: String::new(),
        }],
    };
    let service = |name: &str, datapath, b| ServiceStatsView {
        name: name.into(),
        listen: "192.0.2.100:80".into(),
        protocol: Protocol::Tcp,
        datapath,
        affinity_entries: 0,
        on_backups: false,
        failed_connections: Some(0),
        ajp: None,
        backends: vec![b],
    };
    StatsView {
        version: String::new(),
        uptime_secs: 0,
        start_time_unix: 0,
        taken_unix_ms: 0,
        xdp: Some(XdpCounters::default()),
        proxy_workers: vec![],
        services: vec![
            service("p", DatapathKind::Proxy, backend("a", false)),
            service("x", DatapathKind::Xdp, backend("b", true)),
        ],
    }
}

/// Every metric name the endpoint exports (as sample names: counters end in `_total`).
fn metric_names() -> Vec<String> {
    render(&exemplar(), Format::Text)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn every_xdp_counter_but_all_packets_is_exported_under_its_name() {
    let mut x = XdpCounters::default();
    for (i, c) in XdpCounter::ALL.into_iter().enumerate() {
        x.set(c, 1000 + i as u64);
    }
    let mut stats = sample();
    stats.xdp = Some(x);
    let t = render(&stats, Format::Text).unwrap();
    for (c, n) in x.iter() {
        let line = match c.kind() {
            lb_common::counters::CounterKind::All => {
                lacks(&t, &format!("lb_xdp_packets_total{{reason=\"{}\"}}", c.name()));
                continue;
            }
            lb_common::counters::CounterKind::Verdict => {
                format!("lb_xdp_verdicts_total{{verdict=\"{}\"}} {n}", c.name())
            }
            lb_common::counters::CounterKind::Reason => {
                format!("lb_xdp_packets_total{{reason=\"{}\"}} {n}", c.name())
            }
            lb_common::counters::CounterKind::Flows => format!("lb_xdp_{}_total {n}", c.name()),
            lb_common::counters::CounterKind::State => format!("lb_xdp_{} {n}", c.name()),
        };
        has(&t, &line);
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP server, in-process on 127.0.0.1:0.

/// A `/metrics` server on a free loopback port answering with [`sample`]; stops when dropped.
struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn server() -> Server {
    server_with(Arc::new(sample))
}

/// A `/metrics` server answering with `snapshot`.
fn server_with(snapshot: http::Snapshot) -> Server {
    let listener = http::bind(&MetricsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
    })
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(http::serve(listener, snapshot, shutdown.clone()));
    Server { addr, shutdown }
}

/// Sends `request` raw and reads until the server closes: status line, lower-case headers, body.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (String, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("the server closes after one answer")
        .unwrap_or_else(|e| panic!("{request:?}: {e}"));
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn get_metrics_answers_the_text_format_and_closes() {
    let srv = server();
    let (status, headers, body) = exchange(srv.addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some(super::metrics::TEXT_CONTENT_TYPE)
    );
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(header(&headers, "connection"), Some("close"));
    let sorted = |t: &str| {
        let mut lines: Vec<String> = t.lines().map(String::from).collect();
        lines.sort();
        lines
    };
    // Series of a family come in no fixed order.
    assert_eq!(sorted(&body), sorted(&render(&sample(), Format::Text).unwrap()));

    let (status, _, body) = exchange(srv.addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    has(&body, "lb_up 1");
}

#[tokio::test]
async fn accept_asks_for_openmetrics_and_head_gets_no_body() {
    let srv = server();
    let (status, headers, body) = exchange(
        srv.addr,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some(super::metrics::OPENMETRICS_CONTENT_TYPE)
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    let (status, headers, body) = exchange(srv.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some(super::metrics::TEXT_CONTENT_TYPE)
    );
    assert_eq!(body, "");
}

#[tokio::test]
async fn other_paths_and_methods_get_404() {
    let srv = server();
    for request in [
        &b"GET /nothing HTTP/1.1\r\n\r\n"[..],
        b"GET /metricsx HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"DELETE /metrics HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"PUT /status.json HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"DELETE / HTTP/1.1\r\n\r\n",
    ] {
        let (status, _, body) = exchange(srv.addr, request).await;
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{request:?}");
        assert!(
            body.starts_with("not found; the metrics are at /metrics, the status page at /"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn the_status_page_shows_the_snapshot_as_html() {
    let srv = server();
    for path in ["/", "/index.html"] {
        let (status, headers, body) = exchange(
            srv.addr,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(body, super::status::page(&sample()), "{path}");
    }
    let (_, _, body) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    // No external assets: nothing is loaded from elsewhere.
    for external in ["src=", "href=", "@import", "url("] {
        assert!(!body.contains(external), "page refers to an asset: {external}");
    }
    for shown in [
        "id=\"service-web\"",
        "10.0.0.1:80",
        "id=\"service-fast\"",
        "<td class=\"role\">backup</td>",
        // b1 is drained, b2 down.
        "<tr class=\"backend state-drain health-up\" data-backend=\"b1\">",
        "<tr class=\"backend state-active health-down\" data-backend=\"b2\">",
        "last check: not checked yet in 1.5 ms",
        "10 checks, 4 failed",
        // The transition, its time and its reason.
        "2023-11-14 22:13:20",
        "active → drain",
        "operator uid 0",
        // Rates are cells the script fills.
        "data-rate=\"web/b1/connections_total\"",
        "setInterval(refresh, REFRESH_MS)",
    ] {
        shows(&body, shown);
    }
    let (status, headers, body) = exchange(srv.addr, b"HEAD / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(body, "");
}

#[tokio::test]
async fn status_json_is_the_stats_snapshot() {
    let srv = server();
    let (status, headers, body) = exchange(srv.addr, b"GET /status.json HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let back: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(back, serde_json::to_value(sample()).unwrap());
}

#[test]
fn the_status_page_escapes_what_it_shows() {
    let mut view = sample();
    view.services[0].backends[0].transitions[0].reason = "<script>alert('x')</script> & \"more\"".into();
    view.services[0].listen = "<b>".into();
    let page = super::status::page(&view);
    assert!(!page.contains("<script>alert"), "unescaped reason");
    shows(
        &page,
        "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;",
    );
    shows(&page, "<dd>&lt;b&gt;</dd>");
}

#[test]
fn ajp_services_show_requests_and_statuses() {
    let mut view = sample();
    // The AJP datapath's service gets the AJP columns, filled from its counters by backend name.
    view.services[2].backends = vec![backend("t1")];
    let page = super::status::page(&view);
    assert_eq!(
        page.matches("<th>AJP requests</th><th>AJP statuses</th>").count(),
        1,
        "only the ajp service"
    );
    shows(
        &page,
        "<td class=\"num ajp-requests\">10<br><small><span class=\"rate\" data-rate=\"tomcat/t1/ajp_requests\">…</span>/s, 1 in flight</small></td>",
    );
    shows(
        &page,
        "<td class=\"ajp-statuses\">2xx 8 · 3xx 0<br>4xx 0 · 5xx 1<br><small>1xx 0</small></td>",
    );
    shows(
        &page,
        "<dt>AJP 503 sent (no backend)</dt><dd class=\"ajp\">5</dd><dt>AJP refused</dt><dd class=\"ajp\">secret 1, attribute 2, shutdown 3</dd><dt>AJP protocol errors</dt><dd class=\"ajp\">6</dd><dt>CPings answered</dt><dd class=\"ajp\">4</dd>",
    );
    // An ajp-protocol service on the proxy datapath says why it has no request counts.
    view.services[0].protocol = Protocol::Ajp;
    let page = super::status::page(&view);
    assert_eq!(page.matches("<th>AJP requests</th>").count(), 2);
    shows(
        &page,
        "not counted: the proxy datapath forwards AJP as TCP (use datapath = \"ajp\")",
    );
}

#[tokio::test]
async fn requests_that_are_not_http1_get_400() {
    let srv = server();
    for request in [
        &b"GET /metrics SPDY/3\r\n\r\n"[..],
        b"\xff\xfe\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let (status, _, _) = exchange(srv.addr, request).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{request:?}");
    }
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_read_timeout_without_an_answer() {
    let srv = server();
    let start = Instant::now();
    let (status, _, _) = exchange(srv.addr, b"GET /metr").await;
    assert_eq!(status, "");
    assert!(start.elapsed() >= READ_TIMEOUT, "{:?}", start.elapsed());
}

/// Fails clearly when this process may not hold `n` descriptors (both ends of a test's sockets).
fn room_for_descriptors(n: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        soft >= n,
        "this test needs {n} open files; raise `ulimit -n` (now {soft})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_are_served_while_a_thousand_idle_connections_are_open() {
    room_for_descriptors(2 * 1000 + 64);
    let srv = server();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    for round in 0..5 {
        let scrape = tokio::time::timeout(
            Duration::from_secs(20),
            exchange(srv.addr, b"GET /metrics HTTP/1.1\r\n\r\n"),
        );
        let (status, _, body) = scrape
            .await
            .unwrap_or_else(|_| panic!("scrape {round} not answered beside 1000 idle connections"));
        assert_eq!(status, "HTTP/1.1 200 OK", "scrape {round}");
        assert!(body.contains("lb_up 1"), "scrape {round}: {body}");
        // An idle connection that has sent part of its request is no exception.
        let newest = idle.len() - 1 - round;
        idle[newest].write_all(b"GET /metr").await.unwrap();
    }
    // The server held at most MAX_OPEN of them: the oldest idle ones were closed to make room.
    let mut closed = 0;
    for s in &mut idle[..1000 - MAX_OPEN] {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(n)) => panic!("an idle connection got an answer: {:?}", &buf[..n]),
            Err(_) => {}
        }
    }
    assert_eq!(closed, 1000 - MAX_OPEN, "idle connections closed to make room");
}

#[tokio::test]
async fn a_request_sent_is_never_closed_to_make_room() {
    room_for_descriptors(2 * (MAX_OPEN as u64 + 64));
    // Snapshots take a second: the first request is still being answered during the flood.
    let srv = server_with(Arc::new(|| {
        std::thread::sleep(Duration::from_secs(1));
        sample()
    }));
    // The oldest connection has sent its request; the next sends its head slowly (the first
    // line now, the end after the flood).
    let mut sent = TcpStream::connect(srv.addr).await.unwrap();
    sent.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut idle = Vec::new();
    for _ in 0..MAX_OPEN + 8 {
        idle.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sent.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200 OK"),
        "the busy connection was closed: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // The slow one had not completed its head: it was the oldest idle one, so it was closed.
    slow.write_all(b"\r\n").await.ok();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(
        !rest.starts_with(b"HTTP/1.1 200"),
        "the oldest idle connection was kept"
    );
}

#[tokio::test]
async fn bind_errors_hint_only_what_fits_their_cause() {
    let srv = server();
    let in_use = http::bind(&MetricsConfig { listen: srv.addr })
        .unwrap_err()
        .to_string();
    assert!(in_use.contains("another program"), "{in_use}");
    // A documentation address no interface has (nothing is sent: the bind fails at once).
    let listen = "192.0.2.1:9100".parse().unwrap();
    let absent = http::bind(&MetricsConfig { listen }).unwrap_err().to_string();
    assert!(
        absent.contains("no interface of this host has that address"),
        "{absent}"
    );
    assert!(!absent.contains("another program"), "{absent}");
    assert_eq!(
        absent.matches("Cannot assign requested address").count(),
        1,
        "{absent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_busy_limit_wait_their_turn() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Each snapshot takes a while, so requests pile up beyond MAX_BUSY.
    let taken = Arc::new(AtomicUsize::new(0));
    let snapshot: http::Snapshot = {
        let taken = taken.clone();
        Arc::new(move || {
            std::thread::sleep(Duration::from_millis(20));
            taken.fetch_add(1, Ordering::Relaxed);
            sample()
        })
    };
    let srv = server_with(snapshot);
    let n = http::MAX_BUSY * 2;
    let scrapes: Vec<_> = (0..n)
        .map(|_| tokio::spawn(exchange(srv.addr, b"GET /metrics HTTP/1.1\r\n\r\n")))
        .collect();
    for s in scrapes {
        let (status, _, _) = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("a request beyond the busy limit was answered")
            .unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    assert_eq!(taken.load(Ordering::Relaxed), n);
}

#[test]
fn the_status_page_marks_a_draining_backend_drained_once_nothing_is_left() {
    // b1 of the sample drains with 2 open connections and 3 clients with affinity.
    let mut view = sample();
    let drained = |view: &StatsView| {
        let page = super::status::content(view);
        let row = page
            .lines()
            .find(|l| l.contains("data-backend=\"b1\""))
            .unwrap()
            .to_string();
        assert!(row.contains("<td class=\"num affinity\">"), "{row}");
        row.contains("(drained)")
    };
    assert!(!drained(&view));
    view.services[0].backends[0].connections_active = 0;
    assert!(!drained(&view), "clients with affinity are left");
    view.services[0].backends[0].affinity_clients = 0;
    assert!(drained(&view));
    view.services[0].backends[0].state = AdminState::Active;
    assert!(!drained(&view), "only a draining backend is drained");
}
