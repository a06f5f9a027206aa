//! Shared by the XDP fixture test binaries: whether they can run here, and the `web` service they
//! load into the program.

use std::time::Duration;

use lb::config::{BackendConfig, DatapathKind, HealthConfig, HealthKind, OnDown, Protocol, ServiceConfig};

/// Whether the test can run: lb carries its eBPF object (required with `LB_REQUIRE_EBPF=1`) and
/// we are root. Says why not.
pub fn ready(test: &str) -> bool {
    if lb::ebpf::object().is_none() {
        assert!(
            std::env::var_os("LB_REQUIRE_EBPF").is_none_or(|v| v != "1"),
            "{test}: LB_REQUIRE_EBPF=1 but lb was built without its eBPF object"
        );
        eprintln!("SKIP: {test}: lb built without its eBPF object (use cargo xtask test)");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: {test} needs root");
        return false;
    }
    true
}

/// The `web` service on 10.0.0.100:80 over the XDP datapath, with `backends`.
pub fn xdp_service(backends: Vec<BackendConfig>) -> ServiceConfig {
    ServiceConfig {
        name: "web".into(),
        listen: "10.0.0.100:80".parse().unwrap(),
        protocol: Protocol::Tcp,
        datapath: DatapathKind::Xdp,
        forwarding: Default::default(),
        affinity_timeout: Duration::from_secs(600),
        max_connections: 100,
        splice: Default::default(),
        connect_timeout: Duration::from_secs(1),
        failback: false,
        on_down: OnDown::Keep,
        health: HealthConfig {
            kind: HealthKind::None,
            interval: Duration::from_secs(2),
            fast_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            observe: lb::config::Observe::None,
            error_limit: lb::config::DEFAULT_ERROR_LIMIT,
        },
        ajp: None,
        backends,
    }
}
