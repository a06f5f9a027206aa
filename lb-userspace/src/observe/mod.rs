//! What the daemon shows of itself beyond the control socket's answers: the Prometheus endpoint and
//! the live terminal view.
//!
//! - [`metrics`]: a `stats` snapshot → Prometheus text or OpenMetrics, with `prometheus-client`
//!   (the `lb_ajp_*` families of AJP services in `metrics_ajp`).
//! - [`http`]: the `[metrics] listen` server (`GET /metrics`, the status page `/` and
//!   `/status.json`) on hyper.
//! - [`status`]: the status page, a `stats` snapshot as HTML (and JSON).
//! - [`top`]: `lb top`, the live terminal view over the control socket.
//! - [`throttle`]: at most one log line per second for events a client can cause at will.
//!
//! All three, and `lb stats`, show the XDP counters by the taxonomy of [`lb_common::counters`].

pub mod http;
pub mod metrics;
mod metrics_ajp;
pub mod status;
pub mod throttle;
pub mod top;

#[cfg(test)]
pub(crate) mod tests;
