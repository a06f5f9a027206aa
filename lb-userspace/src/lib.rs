//! `lb`: a layer-4 TCP/AJP load balancer. This library holds everything; `main.rs` is the CLI edge.
//!
//! - [`config`]: the TOML file, parsed and validated with file/line/key errors.
//! - [`state`]: services, backends, Maglev rings; the [`state::Command`] vocabulary; reload diff.
//! - [`maglev`]: the weighted Maglev table builder.
//! - [`balancer`]: state + per-service affinity tables; backend selection by the DESIGN.md rules.
//! - [`engine`]: applies commands to the balancer and the datapaths; answers control requests.
//! - [`datapath`]: the trait every datapath implements; [`proxy`]: the tokio full proxy;
//!   [`ajp_datapath`]: the AJP 1.3 request router (per-request routing, backend pools);
//!   [`xdp`]: the kernel fast path (loads, pins and attaches the eBPF program, writes its maps).
//! - [`health`]: TCP and AJP health checks ([`ajp`]: the CPing/CPong codec), rise/fall.
//! - [`control`]: the control socket protocol, server and client.
//! - [`daemon`]: `lb run` (socket, engine, signals, graceful shutdown).
//! - [`metrics`]: the Prometheus endpoint (`[metrics] listen`, `GET /metrics`) rendered from
//!   [`engine::Engine::stats`] snapshots.
//! - [`cli`]: table rendering for the client subcommands; [`top`]: `lb top`, the live terminal view.
//! - [`ebpf`]: the embedded XDP object and its loader.
pub mod ajp;
pub mod ajp_datapath;
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
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod top;
pub mod xdp;
