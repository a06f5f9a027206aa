//! Prometheus exposition of a [`StatsView`] snapshot, through a `prometheus-client` registry built
//! for that snapshot: `text/plain; version=0.0.4` by default, OpenMetrics 1.0 when the scraper's
//! `Accept` header asks for it ([`Format::from_accept`]).
//!
//! Labels are `service` and `backend` (the backend's name), plus one naming the series of a family
//! (`state`, `result`, `kind`, `reason`, `verdict`). Names are the same for both datapaths where
//! the meaning is: packets exist only for XDP backends, connect failures only for proxy backends.
//! The XDP families follow the counter taxonomy of [`lb_common::counters`].

use std::sync::atomic::AtomicU64;

use lb_common::counters::{CounterKind, XdpCounter, XdpCounters};
use prometheus_client::encoding::text::{encode, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::{AdminState, enum_text};
use crate::control::protocol::{BackendStatsView, ServiceStatsView, StatsView};
use crate::state::{Health, TransitionKind};

use super::metrics_ajp::AjpFamilies;

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
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

/// The exposition text of `stats` in `format`.
pub fn render(stats: &StatsView, format: Format) -> Result<String, MetricsError> {
    let mut b = Builder::default();
    let daemon = DaemonFamilies::new(&mut b);
    let services = ServiceFamilies::new(&mut b);
    let backends = BackendFamilies::new(&mut b);
    let xdp = XdpFamilies::new(&mut b);
    let ajp = AjpFamilies::new(&mut b);

    daemon.record(stats);
    for s in &stats.services {
        services.record(s);
        if let Some(a) = &s.ajp {
            ajp.record(&s.name, a);
        }
        for be in &s.backends {
            backends.record(&s.name, be);
        }
    }
    if let Some(x) = &stats.xdp {
        xdp.record(x);
    }
    b.encode(format)
}

pub(super) type Labels = Vec<(&'static str, String)>;
type GaugeF64 = Gauge<f64, AtomicU64>;

/// A registry being filled from one snapshot; remembers which families are counters. Help texts
/// are written without a final period: the registry adds one.
#[derive(Default)]
pub(super) struct Builder {
    registry: Registry,
    counters: Vec<String>,
}

impl Builder {
    pub(super) fn counter(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        let family = Family::<Labels, Counter>::default();
        self.registry.register(name, help, family.clone());
        self.counters.push(name.to_string());
        family
    }

    /// A counter without labels (a family with an empty label set would print `name{}`).
    fn single_counter(&mut self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry.register(name, help, counter.clone());
        self.counters.push(name.to_string());
        counter
    }

    fn single_gauge(&mut self, name: &str, help: &str) -> Gauge {
        let gauge = Gauge::default();
        self.registry.register(name, help, gauge.clone());
        gauge
    }

    pub(super) fn gauge(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let family = Family::<Labels, Gauge>::default();
        self.registry.register(name, help, family.clone());
        family
    }

    /// A family of any other metric type (not a counter).
    pub(super) fn register_family<M>(&mut self, name: &str, help: &str) -> Family<Labels, M>
    where
        M: prometheus_client::metrics::TypedMetric
            + prometheus_client::encoding::EncodeMetric
            + Default
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let family = Family::<Labels, M>::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn gauge_f64(&mut self, name: &str, help: &str) -> Family<Labels, GaugeF64> {
        let family = Family::<Labels, GaugeF64>::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn encode(&self, format: Format) -> Result<String, MetricsError> {
        let mut out = String::new();
        match format {
            Format::OpenMetrics => encode(&mut out, &self.registry)?,
            Format::Text => {
                encode_registry(&mut out, &self.registry)?;
                out = counters_named_total(&out, &self.counters);
            }
        }
        Ok(out)
    }
}

pub(super) fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The Prometheus 0.0.4 text format names a counter's HELP and TYPE lines like its samples
/// (`lb_backend_connections_total`); OpenMetrics, which the encoder writes, names the family
/// without `_total`. Everything else is the same in both formats.
fn counters_named_total(open_metrics: &str, counters: &[String]) -> String {
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.iter().any(|c| c == name).then_some((p, name, tail))
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

/// The daemon itself: up, version, start time.
struct DaemonFamilies {
    up: Gauge,
    build: Family<Labels, Gauge>,
    start: Gauge,
    workers: Family<Labels, Gauge>,
}

impl DaemonFamilies {
    fn new(b: &mut Builder) -> Self {
        DaemonFamilies {
            up: b.single_gauge("lb_up", "1 while the lb daemon answers scrapes"),
            build: b.gauge("lb_build_info", "Version of the lb daemon, as a label; always 1"),
            start: b.single_gauge("lb_start_time_seconds", "Unix time the lb daemon started"),
            workers: b.gauge(
                "lb_proxy_worker_connections",
                "Proxy: connections each worker thread (one per CPU) serves, of every proxy service",
            ),
        }
    }

    fn record(&self, stats: &StatsView) {
        self.up.set(1);
        self.build
            .get_or_create(&vec![("version", stats.version.clone())])
            .set(1);
        self.start.set(gauge_i64(stats.start_time_unix));
        for (i, &n) in stats.proxy_workers.iter().enumerate() {
            self.workers
                .get_or_create(&vec![("worker", i.to_string())])
                .set(gauge_i64(n));
        }
    }
}

struct ServiceFamilies {
    info: Family<Labels, Gauge>,
    affinity: Family<Labels, Gauge>,
    on_backups: Family<Labels, Gauge>,
    failed: Family<Labels, Counter>,
}

impl ServiceFamilies {
    fn new(b: &mut Builder) -> Self {
        ServiceFamilies {
            info: b.gauge(
                "lb_service_info",
                "Settings of a service as labels (listen, protocol, datapath); always 1",
            ),
            affinity: b.gauge(
                "lb_service_affinity_entries",
                "Clients of the service with a live affinity (sticky session) entry",
            ),
            on_backups: b.gauge(
                "lb_service_on_backups",
                "1 while the service sends new clients to its backups because no primary takes them",
            ),
            failed: b.counter(
                "lb_service_failed_connections",
                "Proxy: client connections closed because no backend could be reached",
            ),
        }
    }

    fn record(&self, s: &ServiceStatsView) {
        let service = || vec![("service", s.name.clone())];
        self.info
            .get_or_create(&vec![
                ("service", s.name.clone()),
                ("listen", s.listen.clone()),
                ("protocol", enum_text(&s.protocol)),
                ("datapath", enum_text(&s.datapath)),
            ])
            .set(1);
        self.affinity
            .get_or_create(&service())
            .set(gauge_i64(s.affinity_entries));
        self.on_backups
            .get_or_create(&service())
            .set(i64::from(s.on_backups));
        if let Some(n) = s.failed_connections {
            self.failed.get_or_create(&service()).inc_by(n);
        }
    }
}

struct BackendFamilies {
    info: Family<Labels, Gauge>,
    up: Family<Labels, Gauge>,
    state: Family<Labels, Gauge>,
    weight: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
    active: Family<Labels, Gauge>,
    affinity: Family<Labels, Gauge>,
    total: Family<Labels, Counter>,
    bytes_in: Family<Labels, Counter>,
    bytes_out: Family<Labels, Counter>,
    packets_in: Family<Labels, Counter>,
    packets_out: Family<Labels, Counter>,
    connect_failures: Family<Labels, Counter>,
    checks: Family<Labels, Counter>,
    latency: Family<Labels, GaugeF64>,
    transitions: Family<Labels, Counter>,
    last_transition: Family<Labels, GaugeF64>,
}

impl BackendFamilies {
    fn new(b: &mut Builder) -> Self {
        BackendFamilies {
            info: b.gauge(
                "lb_backend_info",
                "Address and role (primary or backup) of a backend as labels; always 1",
            ),
            up: b.gauge(
                "lb_backend_up",
                "1 when the health checks say the backend is up (always 1 without checks), else 0",
            ),
            state: b.gauge(
                "lb_backend_state",
                "Operator state of the backend: 1 for its current state (active, drain, maintenance), 0 for the others",
            ),
            weight: b.gauge("lb_backend_weight", "Weight of the backend (0..=256)"),
            slots: b.gauge(
                "lb_backend_ring_slots",
                "Maglev ring slots of the backend: its share of new clients",
            ),
            active: b.gauge(
                "lb_backend_connections_active",
                "Open connections to the backend (XDP: tracked connections neither closed nor expired)",
            ),
            affinity: b.gauge(
                "lb_backend_affinity_clients",
                "Clients with a live affinity (sticky session) entry to the backend",
            ),
            total: b.counter(
                "lb_backend_connections",
                "Connections set up to the backend (XDP: new flows)",
            ),
            bytes_in: b.counter(
                "lb_backend_bytes_in",
                "Bytes from clients to the backend: payload relayed (proxy) or frames forwarded (XDP)",
            ),
            bytes_out: b.counter(
                "lb_backend_bytes_out",
                "Bytes from the backend to clients: payload relayed (proxy) or frames forwarded (XDP)",
            ),
            packets_in: b.counter(
                "lb_backend_packets_in",
                "XDP: packets forwarded from clients to the backend",
            ),
            packets_out: b.counter(
                "lb_backend_packets_out",
                "XDP: packets forwarded from the backend to clients",
            ),
            connect_failures: b.counter(
                "lb_backend_connect_failures",
                "Proxy: connects to the backend that failed or timed out (the client then tries the next backend)",
            ),
            checks: b.counter(
                "lb_backend_checks",
                "Health checks of the backend by result (ok, failed)",
            ),
            latency: b.gauge_f64(
                "lb_backend_check_latency_seconds",
                "Latency of the backend's last health check, when it succeeded",
            ),
            transitions: b.counter(
                "lb_backend_transitions",
                "Transitions of the backend by kind: health (up/down) and state (operator: active/drain/maintenance)",
            ),
            last_transition: b.gauge_f64(
                "lb_backend_last_transition_timestamp_seconds",
                "Unix time of the backend's last health or state transition",
            ),
        }
    }

    fn record(&self, service: &str, be: &BackendStatsView) {
        let labels = || vec![("service", service.to_string()), ("backend", be.name.clone())];
        let mut info = labels();
        info.push(("address", be.address.clone()));
        info.push(("role", if be.backup { "backup" } else { "primary" }.to_string()));
        self.info.get_or_create(&info).set(1);
        self.up
            .get_or_create(&labels())
            .set(i64::from(be.health == Health::Up));
        for state in [AdminState::Active, AdminState::Drain, AdminState::Maintenance] {
            self.state
                .get_or_create(&with(labels(), "state", &enum_text(&state)))
                .set(i64::from(be.state == state));
        }
        self.weight.get_or_create(&labels()).set(i64::from(be.weight));
        self.slots.get_or_create(&labels()).set(gauge_i64(be.ring_slots));
        self.active
            .get_or_create(&labels())
            .set(gauge_i64(be.connections_active));
        self.affinity
            .get_or_create(&labels())
            .set(gauge_i64(be.affinity_clients));
        self.total.get_or_create(&labels()).inc_by(be.connections_total);
        self.bytes_in.get_or_create(&labels()).inc_by(be.bytes_in);
        self.bytes_out.get_or_create(&labels()).inc_by(be.bytes_out);
        for (family, n) in [
            (&self.packets_in, be.packets_in),
            (&self.packets_out, be.packets_out),
            (&self.connect_failures, be.connect_failures),
        ] {
            if let Some(n) = n {
                family.get_or_create(&labels()).inc_by(n);
            }
        }
        self.record_checks(labels(), be);
        self.record_transitions(labels(), be);
    }

    fn record_checks(&self, labels: Labels, be: &BackendStatsView) {
        let Some(c) = &be.check else { return };
        let ok = c.checks.saturating_sub(c.failed_checks);
        for (result, n) in [("ok", ok), ("failed", c.failed_checks)] {
            self.checks
                .get_or_create(&with(labels.clone(), "result", result))
                .inc_by(n);
        }
        if let Some(ms) = c.last_latency_ms {
            self.latency.get_or_create(&labels).set(ms / 1000.0);
        }
    }

    fn record_transitions(&self, labels: Labels, be: &BackendStatsView) {
        for (kind, n) in [
            (TransitionKind::Health, be.health_transitions),
            (TransitionKind::State, be.state_transitions),
        ] {
            self.transitions
                .get_or_create(&with(labels.clone(), "kind", kind.as_str()))
                .inc_by(n);
        }
        if let Some(t) = be.transitions.last() {
            self.last_transition
                .get_or_create(&labels)
                .set(t.unix_ms as f64 / 1000.0);
        }
    }
}

/// `labels` and one more.
pub(super) fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_string()));
    labels
}

/// The XDP program's global counters, by [`CounterKind`]: verdicts and reasons as the series of
/// one family each, every other counter (new flows) a family of its own. All packets are the
/// sum of the verdicts, so not exported twice.
struct XdpFamilies {
    verdicts: Family<Labels, Counter>,
    reasons: Family<Labels, Counter>,
    single: Vec<(XdpCounter, Counter)>,
    states: Vec<(XdpCounter, Gauge)>,
}

impl XdpFamilies {
    fn new(b: &mut Builder) -> Self {
        let names = |kind| -> Vec<&str> {
            XdpCounter::ALL
                .into_iter()
                .filter(|c| c.kind() == kind)
                .map(XdpCounter::name)
                .collect()
        };
        let reasons = b.counter(
            "lb_xdp_packets",
            &format!(
                "XDP: packets by the reason for their verdict ({})",
                names(CounterKind::Reason).join(", ")
            ),
        );
        let verdicts = b.counter(
            "lb_xdp_verdicts",
            &format!(
                "XDP: packets by verdict ({}); they sum to all packets the program saw",
                names(CounterKind::Verdict).join(", ")
            ),
        );
        let single = XdpCounter::ALL
            .into_iter()
            .filter(|c| c.kind() == CounterKind::Flows)
            .map(|c| {
                let name = format!("lb_xdp_{}", c.name());
                let help = format!("XDP: {}{}", c.help()[..1].to_lowercase(), &c.help()[1..]);
                (c, b.single_counter(&name, &help))
            })
            .collect();
        let states = XdpCounter::ALL
            .into_iter()
            .filter(|c| c.kind() == CounterKind::State)
            .map(|c| {
                let name = format!("lb_xdp_{}", c.name());
                let help = format!("XDP: {}{}", c.help()[..1].to_lowercase(), &c.help()[1..]);
                (c, b.single_gauge(&name, &help))
            })
            .collect();
        XdpFamilies {
            verdicts,
            reasons,
            single,
            states,
        }
    }

    fn record(&self, x: &XdpCounters) {
        for (c, n) in x.iter() {
            let series = match c.kind() {
                CounterKind::All | CounterKind::Flows | CounterKind::State => continue,
                CounterKind::Verdict => self.verdicts.get_or_create(&vec![("verdict", c.name().into())]),
                CounterKind::Reason => self.reasons.get_or_create(&vec![("reason", c.name().into())]),
            };
            series.inc_by(n);
        }
        for (c, counter) in &self.single {
            counter.inc_by(x.get(*c));
        }
        for (c, gauge) in &self.states {
            gauge.set(gauge_i64(x.get(*c)));
        }
    }
}
