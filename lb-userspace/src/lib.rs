//! `lb`: a layer-4 TCP/AJP load balancer. This library holds everything; `main.rs` is the CLI edge.
pub mod config;
