//! The `lb_ajp_*` families: request-level counters of `datapath = "ajp"` services and the
//! per-backend request-duration histogram, exported from the snapshot the datapath took.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::metrics::{Builder, Labels, gauge_i64, with};
use crate::datapath::ajp::{AjpServiceCounters, LatencySnapshot};

/// A histogram exported as it was in a snapshot (the datapath observes; the endpoint only shows).
#[derive(Debug, Default)]
pub(super) struct SnapshotHistogram(std::sync::Mutex<LatencySnapshot>);

impl SnapshotHistogram {
    fn set(&self, s: &LatencySnapshot) {
        *self.0.lock().unwrap() = s.clone();
    }
}

impl TypedMetric for SnapshotHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for SnapshotHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap();
        // The snapshot counts cumulatively; the encoder wants each bucket's own count.
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = s
            .bounds_seconds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.cumulative_counts.iter())
            .map(|(bound, c)| {
                let own = c.saturating_sub(previous);
                previous = *c;
                (bound, own)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

pub(super) struct AjpFamilies {
    refused: Family<Labels, Counter>,
    cpings: Family<Labels, Counter>,
    unavailable: Family<Labels, Counter>,
    protocol_errors: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    pool: Family<Labels, Gauge>,
    routed: Family<Labels, Counter>,
    failovers: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    reply_timeouts: Family<Labels, Counter>,
    web_closed: Family<Labels, Counter>,
    latency: Family<Labels, SnapshotHistogram>,
}

impl AjpFamilies {
    pub(super) fn new(b: &mut Builder) -> Self {
        AjpFamilies {
            refused: b.counter(
                "lb_ajp_refused",
                "AJP: requests or packets of the web tier refused, by reason (secret and attribute: 403 sent; shutdown: Shutdown packet, connection closed)",
            ),
            cpings: b.counter(
                "lb_ajp_cpings_answered",
                "AJP: CPings of the web tier answered by lb's own CPong",
            ),
            unavailable: b.counter(
                "lb_ajp_unavailable",
                "AJP: requests answered with lb's own 503 because no backend could take them",
            ),
            protocol_errors: b.counter(
                "lb_ajp_protocol_errors",
                "AJP: web-tier connections closed for a protocol error",
            ),
            requests: b.counter(
                "lb_ajp_backend_requests",
                "AJP: requests sent to the backend (every attempt, retries included)",
            ),
            responses: b.counter(
                "lb_ajp_backend_responses",
                "AJP: responses of the backend by status class (1xx..5xx)",
            ),
            in_flight: b.gauge(
                "lb_ajp_backend_requests_in_flight",
                "AJP: requests under way on the backend",
            ),
            pool: b.gauge(
                "lb_ajp_backend_pool_connections",
                "AJP: pooled connections to the backend by state (idle, busy)",
            ),
            routed: b.counter(
                "lb_ajp_backend_routed",
                "AJP: requests sent to the backend by how it was chosen (route: session route; address: the browser's address)",
            ),
            failovers: b.counter(
                "lb_ajp_backend_route_failovers",
                "AJP: requests whose session route named a backend that could not take them, sent here by address",
            ),
            retries: b.counter(
                "lb_ajp_backend_retries",
                "AJP: requests that failed on the backend before any answer and were retried on another",
            ),
            reply_timeouts: b.counter(
                "lb_ajp_backend_reply_timeouts",
                "AJP: requests given up because the backend sent nothing for reply_timeout (503 to the web tier when nothing was sent yet; never retried)",
            ),
            web_closed: b.counter(
                "lb_ajp_web_connections_closed",
                "AJP: web-tier connections ended by lb or by the web tier, by reason (abandoned: the web tier closed while its request waited, the request dropped; request_timeout: a packet not completed within request_timeout; idle: no request for idle_timeout)",
            ),
            latency: b.register_family(
                "lb_ajp_backend_request_duration_seconds",
                "AJP: time from the Forward Request to the End Response, per backend that answered",
            ),
        }
    }

    pub(super) fn record(&self, service: &str, a: &AjpServiceCounters) {
        let svc = || vec![("service", service.to_string())];
        for (reason, n) in [
            ("secret", a.refused_secret),
            ("attribute", a.refused_attribute),
            ("shutdown", a.refused_shutdown),
        ] {
            self.refused
                .get_or_create(&with(svc(), "reason", reason))
                .inc_by(n);
        }
        self.cpings.get_or_create(&svc()).inc_by(a.cpings_answered);
        self.unavailable.get_or_create(&svc()).inc_by(a.unavailable_503);
        self.protocol_errors
            .get_or_create(&svc())
            .inc_by(a.protocol_errors);
        for (reason, n) in [
            ("abandoned", a.abandoned),
            ("request_timeout", a.request_timeouts),
            ("idle", a.idle_closed),
        ] {
            self.web_closed
                .get_or_create(&with(svc(), "reason", reason))
                .inc_by(n);
        }
        for be in a.backends.values() {
            let labels = || vec![("service", service.to_string()), ("backend", be.name.clone())];
            self.requests.get_or_create(&labels()).inc_by(be.requests);
            for (class, n) in [
                ("1xx", be.responses_1xx),
                ("2xx", be.responses_2xx),
                ("3xx", be.responses_3xx),
                ("4xx", be.responses_4xx),
                ("5xx", be.responses_5xx),
            ] {
                self.responses
                    .get_or_create(&with(labels(), "class", class))
                    .inc_by(n);
            }
            self.in_flight
                .get_or_create(&labels())
                .set(gauge_i64(be.in_flight));
            self.pool
                .get_or_create(&with(labels(), "state", "idle"))
                .set(gauge_i64(be.pool_idle));
            self.pool
                .get_or_create(&with(labels(), "state", "busy"))
                .set(gauge_i64(be.pool_busy));
            self.routed
                .get_or_create(&with(labels(), "by", "route"))
                .inc_by(be.route_hits);
            self.routed
                .get_or_create(&with(labels(), "by", "address"))
                .inc_by(be.address_hits);
            self.failovers.get_or_create(&labels()).inc_by(be.route_failovers);
            self.retries.get_or_create(&labels()).inc_by(be.retries);
            self.reply_timeouts
                .get_or_create(&labels())
                .inc_by(be.reply_timeouts);
            self.latency.get_or_create(&labels()).set(&be.latency);
        }
    }
}
