//! `lb`: a layer-4 TCP/AJP load balancer. This library holds everything; `main.rs` is the CLI edge.
//!
//! - [`config`]: the TOML file, parsed and validated with file/line/key errors.
//! - [`state`]: services, backends, Maglev rings; the [`state::Command`] vocabulary; reload diff.
//! - [`maglev`]: the weighted Maglev table builder.
//! - [`balancer`]: state + per-service affinity tables; backend selection by the DESIGN.md rules.
pub mod balancer;
pub mod config;
pub mod maglev;
pub mod state;
