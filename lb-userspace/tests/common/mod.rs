//! Shared by the XDP fixture test binaries: whether they can run here, the fixture namespace's
//! addresses and neighbours, the `web` service they load into the program, and its counters; and
//! [`lb_tests::per_hook!`], which runs each fixture at both hooks (`lb_xdp`, and `lb_tc` as `mode = "tc"`
//! loads it).

// Each binary uses its own part.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use lb::balancer::Balancer;
pub use lb::config::Hook;
use lb::config::{
    BackendConfig, DatapathKind, HealthConfig, HealthKind, OnDown, Protocol, ServiceConfig, XdpConfig,
    XdpMode,
};
use lb::datapath::xdp::XdpDatapath;
use lb::state::State;
use lb_tests::fixture::FixtureSpec;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The `[xdp] mode` that runs the datapath at `hook`.
pub fn mode(hook: Hook) -> XdpMode {
    match hook {
        Hook::Xdp => XdpMode::Driver,
        Hook::Tc => XdpMode::Tc,
    }
}

/// The default `[xdp]` table with the mode of `hook`.
pub fn sizes(hook: Hook) -> XdpConfig {
    XdpConfig {
        mode: mode(hook),
        ..XdpConfig::default()
    }
}

/// The program of `hook` loaded with default sizes, nothing pinned or attached.
pub fn start(hook: Hook) -> XdpDatapath {
    XdpDatapath::start_unattached(&sizes(hook), 0, RING).expect("load the datapath program")
}

/// The verdict of a frame sent back out the interface it came in on: XDP_TX, or at TC a redirect
/// to the ingress interface.
pub fn tx(hook: Hook) -> u32 {
    match hook {
        Hook::Xdp => XDP_TX,
        Hook::Tc => XDP_REDIRECT,
    }
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const LB_BACKEND_SIDE: Ipv4Addr = lb_tests::fixture::LB_BACKEND_SIDE;
pub const RING: u32 = 101;

/// Backend `i` (1-based): 10.1.1.(1+i).
pub fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 1, 1 + i)
}
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, 1 + i]
}
/// Client `i` (0-based): 10.0.0.(10+i), MAC [`CLIENT_MAC`] + i.
pub fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i)
}

/// The fixture namespace with the VIP, `clients` clients and `backends` backends as neighbours.
pub fn spec(clients: u8, backends: u8) -> FixtureSpec {
    FixtureSpec {
        vip: Some(VIP),
        clients: (0..clients)
            .map(|i| {
                let mut mac = CLIENT_MAC;
                mac[5] += i;
                (client(i), mac)
            })
            .collect(),
        backends: (1..=backends).map(|i| (backend_ip(i), backend_mac(i))).collect(),
    }
}

/// Runs `f(client ifindex, backend ifindex)` in a thread inside a fresh fixture namespace
/// ([`spec`]`(clients, backends)`).
pub fn in_fixture_netns<T: Send>(clients: u8, backends: u8, f: impl FnOnce(u32, u32) -> T + Send) -> T {
    lb_tests::fixture::in_fixture_netns(&spec(clients, backends), |links| {
        f(links.client_if, links.backend_if)
    })
    .expect("fixture namespace")
}

/// The backend the user-space selection picks for a new `client` of `web` in `state` (no
/// affinity): what the kernel's ring must pick too.
pub fn ring_choice(state: &State, client: Ipv4Addr) -> Ipv4Addr {
    match Balancer::new(state.clone())
        .choose("web", IpAddr::V4(client), Instant::now(), &[])
        .unwrap()
        .address
        .ip()
    {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!(),
    }
}

/// Pins the calling thread to CPU 0, so its test runs share one CPU's per-CPU state (SNAT
/// cursor, next hops).
pub fn pin_to_one_cpu() {
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).expect("CPU 0 in a CpuSet");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pin to CPU 0");
}

/// The kernel counter `name`.
pub fn counter(xdp: &XdpDatapath, name: &str) -> u64 {
    xdp.kernel_counters()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or_else(|| panic!("no counter {name}"), |(_, v)| v)
}

/// Whether the test can run: lb carries its eBPF object (required with `LB_REQUIRE_EBPF=1`) and
/// we are root. Says why not.
pub fn ready(test: &str) -> bool {
    let thread = std::thread::current();
    // per_hook! names the thread `test::xdp` / `test::tc`.
    let test = thread.name().filter(|n| n.starts_with(test)).unwrap_or(test);
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
        idle_timeout: lb::config::DEFAULT_PROXY_IDLE_TIMEOUT,
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
