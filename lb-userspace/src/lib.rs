//! `lb`: a layer-4 TCP/AJP load balancer. This library holds everything; `main.rs` is the CLI edge.
//!
//! - [`config`]: the TOML file, parsed and validated with file/line/key errors.
//! - [`state`]: services, backends, Maglev rings, plain data; the [`state::Command`] vocabulary;
//!   reload diff.
//! - [`runtime`]: live data per backend (counters, reset token, transitions, check status) kept
//!   apart from the state, published with it as a [`runtime::Snapshot`].
//! - [`maglev`]: the weighted Maglev table builder.
//! - [`balancer`]: the published snapshot and affinity, both read without a lock; backend
//!   selection by `lb_common::select`, the one implementation of the DESIGN.md rules.
//! - [`engine`]: applies commands to the balancer and the datapaths as transactions; answers
//!   control requests.
//! - [`datapath`]: the seam every datapath implements, with [`datapath::proxy`] (the tokio full
//!   proxy) and [`datapath::fake`] (for engine tests), [`datapath::ajp`] (the AJP 1.3 request router: per-request
//!   routing, backend pools); [`xdp`]: the kernel fast path (loads, pins
//!   and attaches the eBPF program, writes its maps).
//! - [`host`]: the sysctls the XDP datapath sets, recorded so `lb cleanup` restores them.
//! - [`health`]: TCP and AJP health checks ([`ajp`]: the CPing/CPong codec), rise/fall.
//! - [`control`]: the control socket protocol, server and client.
//! - [`announce`]: VIP routes in a kernel table for BIRD (`[announce]`), and `lb withdraw`.
//! - [`daemon`]: `lb run` (socket, engine, signals, graceful shutdown).
//! - [`observe`]: what the daemon shows of itself: [`observe::metrics`] renders
//!   [`engine::Engine::stats`] snapshots for Prometheus, [`observe::http`] serves them
//!   (`[metrics] listen`, `GET /metrics`, and the status page at `/` from [`observe::status`]), [`observe::top`] is `lb top`, the live terminal view.
//! - [`persist`]: the `state_file`, runtime changes kept across restarts.
//! - [`report`]: how an error and its causes are shown, each cause once.
//! - [`cli`]: table rendering for the client subcommands.
//! - [`ebpf`]: the embedded XDP object and its loader.
pub mod ajp;
pub mod announce;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod ebpf;
pub mod engine;
pub mod health;
pub mod maglev;
pub mod netlink;
pub mod observe;
pub mod persist;
pub mod report;
pub mod runtime;
pub mod state;
#[cfg(test)]
mod testlog;
