//! Counters of the AJP datapath: live atomics per service and backend, and the serializable
//! snapshots ([`AjpServiceCounters`], [`AjpBackendCounters`]) the engine reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the request-latency histogram buckets; a last bucket takes the rest.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Request latency: Forward Request received to End Response sent.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let mut cumulative = 0;
        let counts = self
            .buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        LatencySnapshot {
            bounds_seconds: LATENCY_BOUNDS.to_vec(),
            cumulative_counts: counts,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
            count: cumulative,
        }
    }
}

/// A latency histogram as Prometheus wants it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// Bucket upper bounds in seconds (the `le` labels; `+Inf` is implied last).
    pub bounds_seconds: Vec<f64>,
    /// Requests at or below each bound, then the total (`+Inf`): one more entry than the bounds.
    pub cumulative_counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// Live counters of one backend.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Requests sent to the backend (every attempt, retries included).
    pub requests: AtomicU64,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx (others count as 5xx).
    pub responses: [AtomicU64; 5],
    pub in_flight: AtomicU64,
    /// Requests sent here because their session route names this backend.
    pub route_hits: AtomicU64,
    /// Requests sent here by the browser's address (affinity entry or Maglev ring), or as a backup.
    pub address_hits: AtomicU64,
    /// Requests whose session route named another backend that could not take them.
    pub route_failovers: AtomicU64,
    /// Requests that failed here before any answer with their body held: each moved on to the
    /// next backend (or got a 503 when none was left).
    pub retries: AtomicU64,
    /// Requests given up because the backend sent nothing for `reply_timeout`.
    pub reply_timeouts: AtomicU64,
    pub latency: Latency,
}

impl BackendCounters {
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }
}

/// Live counters of one service.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Requests refused with 403: missing or wrong `secret`.
    pub refused_secret: AtomicU64,
    /// Requests refused with 403: a `req_attribute` outside `allowed_attributes` (or an include
    /// attribute).
    pub refused_attribute: AtomicU64,
    /// Shutdown packets (type 7) refused (their connection is closed).
    pub refused_shutdown: AtomicU64,
    /// CPings of the web tier answered by lb's own CPong.
    pub cpings_answered: AtomicU64,
    /// 503 responses sent because no backend could take a request.
    pub unavailable: AtomicU64,
    /// Front connections closed for an AJP protocol error.
    pub protocol_errors: AtomicU64,
    /// Requests abandoned because the web tier closed its connection while they waited for
    /// their backend.
    pub abandoned: AtomicU64,
    /// Front connections closed because a packet was not complete within `request_timeout`.
    pub request_timeouts: AtomicU64,
    /// Front connections closed after `idle_timeout` without a packet.
    pub idle_closed: AtomicU64,
}

/// Snapshot of one backend's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AjpBackendCounters {
    pub name: String,
    pub route: String,
    pub requests: u64,
    pub responses_1xx: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    pub in_flight: u64,
    pub pool_idle: u64,
    pub pool_busy: u64,
    pub route_hits: u64,
    pub address_hits: u64,
    pub route_failovers: u64,
    pub retries: u64,
    #[serde(default)]
    pub reply_timeouts: u64,
    pub latency: LatencySnapshot,
}

/// Snapshot of one service's counters, with its backends keyed by state backend id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AjpServiceCounters {
    pub refused_secret: u64,
    pub refused_attribute: u64,
    pub refused_shutdown: u64,
    pub cpings_answered: u64,
    pub unavailable_503: u64,
    pub protocol_errors: u64,
    #[serde(default)]
    pub abandoned: u64,
    #[serde(default)]
    pub request_timeouts: u64,
    #[serde(default)]
    pub idle_closed: u64,
    pub backends: BTreeMap<u32, AjpBackendCounters>,
}

impl ServiceCounters {
    pub fn snapshot(&self, backends: BTreeMap<u32, AjpBackendCounters>) -> AjpServiceCounters {
        AjpServiceCounters {
            refused_secret: self.refused_secret.load(Relaxed),
            refused_attribute: self.refused_attribute.load(Relaxed),
            refused_shutdown: self.refused_shutdown.load(Relaxed),
            cpings_answered: self.cpings_answered.load(Relaxed),
            unavailable_503: self.unavailable.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            request_timeouts: self.request_timeouts.load(Relaxed),
            idle_closed: self.idle_closed.load(Relaxed),
            backends,
        }
    }
}

impl BackendCounters {
    pub fn snapshot(&self, name: &str, route: &str, idle: u64, open: u64) -> AjpBackendCounters {
        let r = |i: usize| self.responses[i].load(Relaxed);
        AjpBackendCounters {
            name: name.to_string(),
            route: route.to_string(),
            requests: self.requests.load(Relaxed),
            responses_1xx: r(0),
            responses_2xx: r(1),
            responses_3xx: r(2),
            responses_4xx: r(3),
            responses_5xx: r(4),
            in_flight: self.in_flight.load(Relaxed),
            pool_idle: idle,
            pool_busy: open.saturating_sub(idle),
            route_hits: self.route_hits.load(Relaxed),
            address_hits: self.address_hits.load(Relaxed),
            route_failovers: self.route_failovers.load(Relaxed),
            retries: self.retries.load(Relaxed),
            reply_timeouts: self.reply_timeouts.load(Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let l = Latency::default();
        l.observe(Duration::from_micros(500));
        l.observe(Duration::from_millis(3));
        l.observe(Duration::from_secs(20));
        let s = l.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative_counts.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.cumulative_counts[0], 1);
        assert_eq!(s.cumulative_counts[2], 2);
        assert_eq!(s.cumulative_counts[LATENCY_BOUNDS.len() - 1], 2);
        assert_eq!(*s.cumulative_counts.last().unwrap(), 3);
        assert!((s.sum_seconds - 20.0035).abs() < 1e-6);
    }

    #[test]
    fn status_classes() {
        let c = BackendCounters::default();
        for s in [100, 200, 204, 302, 404, 503, 999, 0] {
            c.response(s);
        }
        let s = c.snapshot("a", "a", 1, 3);
        assert_eq!(
            (
                s.responses_1xx,
                s.responses_2xx,
                s.responses_3xx,
                s.responses_4xx,
                s.responses_5xx
            ),
            (2, 2, 1, 1, 2)
        );
        assert_eq!((s.pool_idle, s.pool_busy), (1, 2));
    }
}
