//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics` answers with the counters of
//! [`Engine::stats`] in the text exposition format.
//!
//! - [`render`]: a [`StatsView`] snapshot → exposition text, through a `prometheus-client` registry
//!   built for that snapshot. `text/plain; version=0.0.4` by default; OpenMetrics 1.0 when the
//!   scraper's `Accept` header asks for it ([`Format::from_accept`]).
//! - [`bind`] and [`run`]: a tiny HTTP/1.1 server on tokio. One request per connection, at most
//!   [`MAX_CONNECTIONS`] at once, [`READ_TIMEOUT`] to send the request and [`WRITE_TIMEOUT`] to
//!   take the answer. Snapshots are taken on the blocking pool, one at a time, so a scrape never
//!   stalls the proxy's tasks or the control socket.
//!
//! Labels are `service` and `backend` (the backend's name), plus one naming the series of a
//! family (`state`, `result`, `kind`, `reason`, `verdict`). Names are the same for both datapaths
//! where the meaning is: packets exist only for XDP backends, connect failures only for proxy
//! backends.

use crate::config::enum_text;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::{encode, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{AdminState, MetricsConfig};
use crate::control::protocol::StatsView;
use crate::engine::Engine;
use crate::state::{Health, TransitionKind};

/// Most metrics connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head accepted, in bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {listen} for [metrics]: {source}; is another program using that address?")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Which text format to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: counters' HELP and TYPE lines carry the `_total` name.
    Text,
    /// OpenMetrics 1.0 text: counter families are named without `_total`; ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists it (as Prometheus does), else the 0.0.4 text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.to_ascii_lowercase().contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

type Labels = Vec<(&'static str, String)>;
type GaugeF64 = Gauge<f64, AtomicU64>;

/// A registry being filled from one snapshot; remembers which families are counters. Help texts
/// are written without a final period: the registry adds one.
struct Builder {
    registry: Registry,
    counters: Vec<&'static str>,
}

impl Builder {
    fn counter(&mut self, name: &'static str, help: &str) -> Family<Labels, Counter> {
        let family = Family::<Labels, Counter>::default();
        self.registry.register(name, help, family.clone());
        self.counters.push(name);
        family
    }

    /// A counter without labels (a family with an empty label set would print `name{}`).
    fn single_counter(&mut self, name: &'static str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry.register(name, help, counter.clone());
        self.counters.push(name);
        counter
    }

    fn single_gauge(&mut self, name: &'static str, help: &str) -> Gauge {
        let gauge = Gauge::default();
        self.registry.register(name, help, gauge.clone());
        gauge
    }

    fn gauge(&mut self, name: &'static str, help: &str) -> Family<Labels, Gauge> {
        let family = Family::<Labels, Gauge>::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn gauge_f64(&mut self, name: &'static str, help: &str) -> Family<Labels, GaugeF64> {
        let family = Family::<Labels, GaugeF64>::default();
        self.registry.register(name, help, family.clone());
        family
    }
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// XDP global counters that are verdicts (each packet gets one; they sum to all packets seen).
const XDP_VERDICTS: [&str; 3] = ["passed", "forwarded", "dropped"];
/// XDP global counter of all packets seen (the sum of the verdicts, so not exported twice).
const XDP_ALL_PACKETS: &str = "packets";
/// XDP global counter of connections set up.
const XDP_NEW_FLOWS: &str = "new_flows";

/// The exposition text of `stats` in `format`.
pub fn render(stats: &StatsView, format: Format) -> Result<String, MetricsError> {
    let mut b = Builder {
        registry: Registry::default(),
        counters: Vec::new(),
    };
    let up = b.single_gauge("lb_up", "1 while the lb daemon answers scrapes");
    let build = b.gauge("lb_build_info", "Version of the lb daemon, as a label; always 1");
    let start = b.single_gauge("lb_start_time_seconds", "Unix time the lb daemon started");
    let svc_info = b.gauge(
        "lb_service_info",
        "Settings of a service as labels (listen, protocol, datapath); always 1",
    );
    let svc_affinity = b.gauge(
        "lb_service_affinity_entries",
        "Clients of the service with a live affinity (sticky session) entry",
    );
    let svc_backups = b.gauge(
        "lb_service_on_backups",
        "1 while the service sends new clients to its backups because no primary takes them",
    );
    let svc_failed = b.counter(
        "lb_service_failed_connections",
        "Proxy: client connections closed because no backend could be reached",
    );
    let be_info = b.gauge(
        "lb_backend_info",
        "Address and role (primary or backup) of a backend as labels; always 1",
    );
    let be_up = b.gauge(
        "lb_backend_up",
        "1 when the health checks say the backend is up (always 1 without checks), else 0",
    );
    let be_state = b.gauge(
        "lb_backend_state",
        "Operator state of the backend: 1 for its current state (active, drain, maintenance), 0 for the others",
    );
    let be_weight = b.gauge("lb_backend_weight", "Weight of the backend (0..=256)");
    let be_slots = b.gauge(
        "lb_backend_ring_slots",
        "Maglev ring slots of the backend: its share of new clients",
    );
    let be_active = b.gauge(
        "lb_backend_connections_active",
        "Open connections to the backend (XDP: tracked connections neither closed nor expired)",
    );
    let be_total = b.counter(
        "lb_backend_connections",
        "Connections set up to the backend (XDP: new flows)",
    );
    let be_bytes_in = b.counter(
        "lb_backend_bytes_in",
        "Bytes from clients to the backend: payload relayed (proxy) or frames forwarded (XDP)",
    );
    let be_bytes_out = b.counter(
        "lb_backend_bytes_out",
        "Bytes from the backend to clients: payload relayed (proxy) or frames forwarded (XDP)",
    );
    let be_packets_in = b.counter(
        "lb_backend_packets_in",
        "XDP: packets forwarded from clients to the backend",
    );
    let be_packets_out = b.counter(
        "lb_backend_packets_out",
        "XDP: packets forwarded from the backend to clients",
    );
    let be_connect_failures = b.counter(
        "lb_backend_connect_failures",
        "Proxy: connects to the backend that failed or timed out (the client then tries the next backend)",
    );
    let be_checks = b.counter(
        "lb_backend_checks",
        "Health checks of the backend by result (ok, failed)",
    );
    let be_latency = b.gauge_f64(
        "lb_backend_check_latency_seconds",
        "Latency of the backend's last health check, when it succeeded",
    );
    let be_transitions = b.counter(
        "lb_backend_transitions",
        "Transitions of the backend by kind: health (up/down) and state (operator: active/drain/maintenance)",
    );
    let be_last_transition = b.gauge_f64(
        "lb_backend_last_transition_timestamp_seconds",
        "Unix time of the backend's last health or state transition",
    );
    let xdp_packets = b.counter(
        "lb_xdp_packets",
        "XDP: packets by the reason for their verdict (drops such as no_backend, no_conntrack, snat_exhausted, no_reply_flow, fib_failed; passes such as fragment, no_neigh, malformed)",
    );
    let xdp_verdicts = b.counter(
        "lb_xdp_verdicts",
        "XDP: packets by verdict (passed, forwarded, dropped); they sum to all packets the program saw",
    );
    let xdp_new_flows = b.single_counter("lb_xdp_new_flows", "XDP: connections set up by the kernel");

    up.set(1);
    build
        .get_or_create(&vec![("version", stats.version.clone())])
        .set(1);
    start.set(gauge_i64(stats.start_time_unix));
    for s in &stats.services {
        let service = || vec![("service", s.name.clone())];
        svc_info
            .get_or_create(&vec![
                ("service", s.name.clone()),
                ("listen", s.listen.clone()),
                ("protocol", enum_text(&s.protocol)),
                ("datapath", enum_text(&s.datapath)),
            ])
            .set(1);
        svc_affinity
            .get_or_create(&service())
            .set(gauge_i64(s.affinity_entries));
        svc_backups.get_or_create(&service()).set(i64::from(s.on_backups));
        if let Some(n) = s.failed_connections {
            svc_failed.get_or_create(&service()).inc_by(n);
        }
        for be in &s.backends {
            let labels = || vec![("service", s.name.clone()), ("backend", be.name.clone())];
            let with = |key: &'static str, value: &str| {
                let mut l = labels();
                l.push((key, value.to_string()));
                l
            };
            let role = if be.backup { "backup" } else { "primary" };
            let mut info = labels();
            info.push(("address", be.address.clone()));
            info.push(("role", role.to_string()));
            be_info.get_or_create(&info).set(1);
            be_up
                .get_or_create(&labels())
                .set(i64::from(be.health == Health::Up));
            for state in [AdminState::Active, AdminState::Drain, AdminState::Maintenance] {
                be_state
                    .get_or_create(&with("state", &enum_text(&state)))
                    .set(i64::from(be.state == state));
            }
            be_weight.get_or_create(&labels()).set(i64::from(be.weight));
            be_slots.get_or_create(&labels()).set(gauge_i64(be.ring_slots));
            be_active
                .get_or_create(&labels())
                .set(gauge_i64(be.connections_active));
            be_total.get_or_create(&labels()).inc_by(be.connections_total);
            be_bytes_in.get_or_create(&labels()).inc_by(be.bytes_in);
            be_bytes_out.get_or_create(&labels()).inc_by(be.bytes_out);
            if let Some(n) = be.packets_in {
                be_packets_in.get_or_create(&labels()).inc_by(n);
            }
            if let Some(n) = be.packets_out {
                be_packets_out.get_or_create(&labels()).inc_by(n);
            }
            if let Some(n) = be.connect_failures {
                be_connect_failures.get_or_create(&labels()).inc_by(n);
            }
            if let Some(c) = &be.check {
                let ok = c.checks.saturating_sub(c.failed_checks);
                be_checks.get_or_create(&with("result", "ok")).inc_by(ok);
                be_checks
                    .get_or_create(&with("result", "failed"))
                    .inc_by(c.failed_checks);
                if let Some(ms) = c.last_latency_ms {
                    be_latency.get_or_create(&labels()).set(ms / 1000.0);
                }
            }
            for (kind, n) in [
                (TransitionKind::Health, be.health_transitions),
                (TransitionKind::State, be.state_transitions),
            ] {
                be_transitions
                    .get_or_create(&with("kind", kind.as_str()))
                    .inc_by(n);
            }
            if let Some(t) = be.transitions.last() {
                be_last_transition
                    .get_or_create(&labels())
                    .set(t.unix_ms as f64 / 1000.0);
            }
        }
    }
    for (name, n) in stats.xdp.iter().flatten() {
        let name = name.as_str();
        if name == XDP_ALL_PACKETS {
            continue;
        } else if name == XDP_NEW_FLOWS {
            xdp_new_flows.inc_by(*n);
        } else if XDP_VERDICTS.contains(&name) {
            xdp_verdicts
                .get_or_create(&vec![("verdict", name.to_string())])
                .inc_by(*n);
        } else {
            xdp_packets
                .get_or_create(&vec![("reason", name.to_string())])
                .inc_by(*n);
        }
    }

    let mut out = String::new();
    match format {
        Format::OpenMetrics => encode(&mut out, &b.registry)?,
        Format::Text => {
            encode_registry(&mut out, &b.registry)?;
            out = counters_named_total(&out, &b.counters);
        }
    }
    Ok(out)
}

/// The Prometheus 0.0.4 text format names a counter's HELP and TYPE lines like its samples
/// (`lb_backend_connections_total`); OpenMetrics, which the encoder writes, names the family
/// without `_total`. Everything else is the same in both formats.
fn counters_named_total(open_metrics: &str, counters: &[&str]) -> String {
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then_some((p, name, tail))
        });
        match descriptor {
            Some((prefix, name, tail)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A snapshot with one of everything: a checked proxy backend with a transition, an XDP backend,
/// and XDP counters of each kind. Families without series print nothing, so this is what shows
/// every family.
fn exemplar() -> StatsView {
    use crate::control::protocol::{BackendStatsView, ServiceStatsView};
    let mut checked = crate::health::CheckStatus::default();
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
        bytes_in: 0,
        bytes_out: 0,
        packets_in: xdp.then_some(0),
        packets_out: xdp.then_some(0),
        connect_failures: (!xdp).then_some(0),
        check: Some(checked.clone()),
        health_transitions: 0,
        state_transitions: 1,
        transitions: vec![crate::state::Transition {
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
        protocol: crate::config::Protocol::Tcp,
        datapath,
        affinity_entries: 0,
        on_backups: false,
        failed_connections: Some(0),
        backends: vec![b],
    };
    StatsView {
        version: String::new(),
        uptime_secs: 0,
        start_time_unix: 0,
        taken_unix_ms: 0,
        xdp: Some(
            [XDP_ALL_PACKETS, XDP_NEW_FLOWS, XDP_VERDICTS[0], "no_backend"]
                .into_iter()
                .map(|k| (k.to_string(), 0))
                .collect(),
        ),
        services: vec![
            service("p", crate::config::DatapathKind::Proxy, backend("a", false)),
            service("x", crate::config::DatapathKind::Xdp, backend("b", true)),
        ],
    }
}

/// Every metric name the endpoint exports (as sample names: counters end in `_total`).
pub fn metric_names() -> Vec<String> {
    render(&exemplar(), Format::Text)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// Binds the metrics listener (SO_REUSEADDR, so a restart does not wait for TIME_WAIT).
pub fn bind(config: &MetricsConfig) -> Result<TcpListener, MetricsError> {
    let listen = config.listen;
    let err = |source| MetricsError::Bind { listen, source };
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(listen).map_err(err)?;
    socket.listen(128).map_err(err)
}

/// Serves `GET /metrics` until `shutdown`.
pub async fn run(listener: TcpListener, engine: Arc<Engine>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "metrics endpoint listening (GET /metrics)");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // One snapshot at a time: scrapes queue here instead of piling up on the blocking pool.
    let snapshot = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (engine, snapshot) = (engine.clone(), snapshot.clone());
        tokio::spawn(async move {
            serve(stream, peer, &engine, &snapshot).await;
            drop(permit);
        });
    }
}

/// A parsed request head: what [`respond`] needs.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub accept: Option<String>,
}

/// Parses `METHOD TARGET HTTP/1.x` and the headers; `None` when it is not an HTTP/1 request.
pub fn parse_head(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.trim().to_string());
    Some(RequestHead {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or_default().to_string(),
        accept,
    })
}

/// What a request gets: `GET` (or `HEAD`) `/metrics` → the metrics; anything else → 404.
pub enum Route {
    Metrics { format: Format, head_only: bool },
    NotFound,
}

pub fn route(head: &RequestHead) -> Route {
    match (head.method.as_str(), head.path.as_str()) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics {
            format: Format::from_accept(head.accept.as_deref()),
            head_only: head.method == "HEAD",
        },
        _ => Route::NotFound,
    }
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

/// Reads up to the end of the request head (an empty line).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before the end of the request");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err("request head too long");
        }
    }
}

fn find_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = head.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    engine: &Arc<Engine>,
    snapshot: &tokio::sync::Mutex<()>,
) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => {
            debug!(%peer, why, "metrics request refused");
            let r = response("400 Bad Request", "text/plain", "bad request\n", false);
            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&r)).await;
            return;
        }
        Err(_) => {
            debug!(%peer, "metrics request timed out");
            return;
        }
    };
    let answer = match parse_head(&head).map(|h| route(&h)) {
        None => response("400 Bad Request", "text/plain", "bad request\n", false),
        Some(Route::NotFound) => response(
            "404 Not Found",
            "text/plain",
            "not found; the metrics are at /metrics\n",
            false,
        ),
        Some(Route::Metrics { format, head_only }) => {
            let rendered = {
                let _one = snapshot.lock().await;
                let engine = engine.clone();
                tokio::task::spawn_blocking(move || render(&engine.stats(), format)).await
            };
            match rendered {
                Ok(Ok(body)) => response("200 OK", format.content_type(), &body, head_only),
                Ok(Err(e)) => {
                    warn!(error = %e, "metrics rendering failed");
                    response(
                        "500 Internal Server Error",
                        "text/plain",
                        "rendering failed\n",
                        false,
                    )
                }
                Err(e) => {
                    warn!(error = %e, "metrics snapshot failed");
                    response(
                        "500 Internal Server Error",
                        "text/plain",
                        "snapshot failed\n",
                        false,
                    )
                }
            }
        }
    };
    if let Ok(Ok(())) = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer)).await {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DatapathKind, Protocol};
    use crate::control::protocol::{BackendStatsView, ServiceStatsView};
    use crate::health::CheckStatus;
    use crate::state::Transition;

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
            xdp: Some(
                [
                    ("packets", 100),
                    ("passed", 10),
                    ("forwarded", 85),
                    ("dropped", 5),
                    ("no_backend", 4),
                    ("no_conntrack", 1),
                    ("new_flows", 6),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
            services: vec![
                ServiceStatsView {
                    name: "web".into(),
                    listen: "10.0.0.1:80".into(),
                    protocol: Protocol::Tcp,
                    datapath: DatapathKind::Proxy,
                    affinity_entries: 4,
                    on_backups: false,
                    failed_connections: Some(2),
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
                    backends: vec![k1],
                },
            ],
        }
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
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
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(help.contains(name), "TYPE before HELP: {line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                types.insert(name.to_string(), kind.to_string());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(types.contains_key(name), "sample without TYPE: {line}");
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
    fn requests_are_routed() {
        let h = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\n").unwrap();
        assert_eq!(
            h,
            RequestHead {
                method: "GET".into(),
                path: "/metrics".into(),
                accept: Some("text/plain".into())
            }
        );
        assert!(matches!(
            route(&h),
            Route::Metrics {
                format: Format::Text,
                head_only: false
            }
        ));
        let h = parse_head(b"HEAD /metrics HTTP/1.0\n").unwrap();
        assert!(matches!(route(&h), Route::Metrics { head_only: true, .. }));
        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /metrics HTTP/1.1\r\n",
            b"GET /metricsx HTTP/1.1\r\n",
        ] {
            assert!(matches!(route(&parse_head(other).unwrap()), Route::NotFound));
        }
        for bad in [
            &b"GET /metrics\r\n"[..],
            b"\xff\xfe",
            b"GET /metrics SPDY/3\r\n",
            b"",
        ] {
            assert!(parse_head(bad).is_none(), "{bad:?}");
        }
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
        assert_eq!(find_end(b"GET / HTTP/1.1\nA: b\n\n"), Some(19));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn grafana_dashboard_uses_only_exported_metrics() {
        let text = include_str!("../../examples/grafana-dashboard.json");
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
}
