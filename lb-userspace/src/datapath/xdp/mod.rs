//! The XDP datapath (`datapath = "xdp"`): loads the embedded eBPF program, pins its maps and links
//! under `[xdp] pin_path`, attaches it to the configured interfaces, and keeps the kernel's maps equal
//! to the state: services, backends, and Maglev rings (only changed slots are written).
//!
//! Restart without drops: maps and links stay pinned when `lb` exits, so the kernel keeps forwarding.
//! The next `lb run` adopts them (same layout version and ring size), finds every service's slot
//! and backend's index again by address, and swaps the program in place. `lb cleanup` removes it all.
//!
//! With `[xdp] mode = "tc"` the same datapath runs at TC ingress instead (`lb_tc`, attached by a
//! TCX link pinned as `tclink_IFACE` beside the XDP link's `link_IFACE`); only the entry point in use
//! is loaded.
//!
//! - `loader`: load, pin or adopt, attach (XDP or TC), log bridge; `pins`: the pin directory's lock, half-made
//!   directories, undoing a failed start; `sync`: state → maps; `query`: maps → counters,
//!   `lb which`, marking flows for reset; `host`: sysctls and `lb cleanup`; `passive`: the
//!   kernel's handshake counters polled into passive health, refusing marks, fallback lists;
//!   `synproxy`: SYN cookies (the SYN-proxy program, its secret, "auto" switching).

pub mod host;
mod loader;
mod passive;
mod peers;
mod pins;
mod query;
mod sync;
mod synproxy;

pub use host::{Cleanup, cleanup};
pub use query::{KernelChoice, KernelState, KernelTraffic};

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::ProgramError;
use lb_common::maps::{
    AffinityKey, AffinityValue, BackendValue, Counter, FlowKey, FlowValue, GlobalConfig, IPPROTO_TCP,
    NO_BACKEND, ServiceKey, ServiceValue, TrafficCounters,
};

use crate::config::{DatapathKind, Hook};
use crate::datapath::affinity::AffinityTable;
use crate::datapath::{BackendTraffic, Datapath, DatapathError, Drained, ServiceTraffic, Which};
use crate::ebpf;
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Backend, Effect, Service};

/// Ring content not yet written by this process (never a backend index).
const UNKNOWN: u32 = NO_BACKEND - 1;

/// Magic number of the BPF filesystem (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(transparent)]
    Load(#[from] ebpf::LoadError),
    #[error("eBPF: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error(
        "cannot attach {} to interface `{interface}` in {mode} mode: {source}; {}",
        attach_hook(mode),
        attach_hint(mode)
    )]
    Attach {
        interface: String,
        /// The attach mode tried: `driver`, `skb` or `tc`.
        mode: &'static str,
        source: ProgramError,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "the maps pinned at {path} have layout version {found} / ring size {found_ring} but this lb needs {want} / {want_ring}; \
         run `lb cleanup -c FILE` to remove them (this drops live XDP connections) or restore the old setting"
    )]
    Layout {
        path: PathBuf,
        found: u32,
        want: u32,
        found_ring: u32,
        want_ring: u32,
    },
    #[error("no free {what} slot in the XDP maps (max {max}); raise [xdp] {key}")]
    Full {
        what: &'static str,
        max: u32,
        key: &'static str,
    },
    #[error("XDP services need IPv4 addresses; {0} is not")]
    NotIpv4(SocketAddr),
    #[error("cannot find the source address toward backend {backend}: {source}")]
    Route {
        backend: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "backend {0} is an address of this host: the xdp datapath sends the client's packets out toward the backend, and none comes back in to this host's own stack (its clients would hang although a local health check passes); use datapath = \"proxy\" for a backend on this host"
    )]
    LocalBackend(SocketAddr),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    #[error("interface {0} does not exist; check [xdp] interfaces (`ip link` lists them)")]
    NoInterface(String),
    #[error("{0}")]
    System(String),
}

/// The hook an attach mode attaches at.
fn attach_hook(mode: &str) -> &'static str {
    if mode == "tc" {
        "the TC ingress program"
    } else {
        "XDP"
    }
}

/// What to try when attaching in `mode` fails.
fn attach_hint(mode: &str) -> &'static str {
    if mode == "tc" {
        "TCX links need Linux 6.6 or later ([xdp] mode = \"driver\" attaches at XDP instead; \"auto\" takes TC on veth)"
    } else {
        "[xdp] mode = \"tc\" runs the same datapath at TC ingress instead"
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |source| XdpError::Map { name, source }
}

/// Typed handles on the program's maps.
struct Maps {
    config: Array<MapData, GlobalConfig>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    ring: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    global: PerCpuArray<MapData, Counter>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    /// The SNAT source addresses in use (replies to them without a flow are dropped, not passed).
    snat_addrs: HashMap<MapData, u32, u32>,
}

/// Second handles on the maps that status reads entry by entry (conntrack for open connections,
/// affinity for its entries): walked without holding [`Inner`], so a walk over a full table
/// (seconds at millions of entries, two syscalls an entry) never holds up a change, a health event
/// or a reset.
struct Walkers {
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, XdpError> {
    let map = ebpf.take_map(name).ok_or(XdpError::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_string(),
        },
    })?;
    T::try_from(map).map_err(map_err(name))
}

/// A service as written into the kernel.
#[derive(Debug, Default)]
struct KernelService {
    slot: u32,
    key: ServiceKey,
    value: ServiceValue,
    /// State backend id → kernel backend index.
    backends: StdHashMap<u32, u32>,
    /// What each backend index holds now.
    written: StdHashMap<u32, BackendValue>,
    /// The ring as written (kernel indices).
    ring: Vec<u32>,
}

struct Inner {
    ebpf: Ebpf,
    maps: Maps,
    ring_size: u32,
    max_services: u32,
    services: StdHashMap<String, KernelService>,
    free_slots: VecDeque<u32>,
    free_backends: VecDeque<u32>,
    /// Pinned service slots and backend indices found at start, waiting to be claimed.
    adopt_services: StdHashMap<ServiceKey, u32>,
    adopt_backends: StdHashMap<(u32, u32, u16), u32>,
    /// Passive health: handshake counters, refusing marks, fallback lists.
    passive: passive::PassiveMaps,
    /// SYN cookies: the SYN proxy's maps and mode.
    synproxy: synproxy::SynProxy,
    /// Where the program runs (which entry point is loaded).
    hook: Hook,
}

pub struct XdpDatapath {
    /// Shared (weakly) with the passive-health poller.
    inner: Arc<Mutex<Inner>>,
    /// For status walks over whole maps, apart from `inner`.
    walkers: Mutex<Walkers>,
    pin_path: Option<PathBuf>,
    /// The locked pin directory (with a pin path): dropped uncommitted, it removes what the start
    /// made. Declared after `inner`, so the program and maps are closed first.
    pins: Option<pins::PinDir>,
    /// Links of the other hook found pinned for the configured interfaces (the mode changed
    /// across a restart): removed once the start is committed, so a failed start keeps them.
    stale_links: Vec<PathBuf>,
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let t =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).expect("CLOCK_MONOTONIC_COARSE");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl Datapath for XdpDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Xdp
    }

    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError> {
        let state = &snapshot.state;
        let mut inner = self.inner.lock().unwrap();
        let result = match effect {
            Effect::ServiceAdded(name) | Effect::ServiceChanged(name) => match state.service(name) {
                Ok(svc) => inner.sync(svc),
                Err(_) => Ok(()),
            },
            Effect::ServiceRemoved { name, .. } => inner.remove(name),
            Effect::Nothing => Ok(()),
        };
        result.map_err(|e| DatapathError::Xdp(crate::report::chain(&e)))
    }

    fn finish_start(&self) -> Result<(), DatapathError> {
        self.finish_adoption()
            .map_err(|e| DatapathError::Xdp(crate::report::chain(&e)))?;
        if let Some(pins) = &self.pins {
            pins.commit();
        }
        self.remove_stale_links();
        Ok(())
    }

    fn reset_backend(&self, service: &Service, backend: &Backend, _runtime: &BackendRuntime) -> usize {
        self.reset_flows(&service.settings.name, backend.id)
    }

    fn affinity_table(&self) -> Option<&dyn AffinityTable> {
        Some(self)
    }

    fn which(&self, service: &Service, client: IpAddr, port: Option<u16>) -> Option<Which> {
        let IpAddr::V4(v4) = client else { return None };
        let k = self.kernel_which(&service.settings.name, v4, port)?;
        Some(Which {
            backend_id: k.backend_id,
            reason: k.reason,
            detail: k.detail,
        })
    }

    fn traffic(&self, service: &Service) -> ServiceTraffic {
        let name = &service.settings.name;
        let kernel = self.backend_traffic(name);
        let passive = self.passive_counters(name);
        ServiceTraffic {
            failed_connections: None,
            backends: service
                .backends
                .iter()
                .map(|b| {
                    let k = kernel.get(&b.id).copied().unwrap_or_default();
                    let t = BackendTraffic {
                        active: k.active,
                        total: k.traffic.new_flows,
                        bytes_in: k.traffic.bytes_in,
                        bytes_out: k.traffic.bytes_out,
                        packets_in: Some(k.traffic.packets_in),
                        packets_out: Some(k.traffic.packets_out),
                        // SYNs the backend refused (RST), as the kernel counts them.
                        connect_failures: passive.get(&b.id).map(|(c, _)| c.refused),
                    };
                    (b.id, t)
                })
                .collect(),
            ajp: None,
        }
    }

    fn global_counters(&self) -> Option<Vec<(&'static str, u64)>> {
        Some(self.kernel_counters())
    }

    fn shutdown(&self) -> Drained<'_> {
        // The kernel keeps forwarding through the pinned link and maps; nothing to wait for.
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_errors_name_the_interface_the_mode_and_the_way_out() {
        let err = |mode| XdpError::Attach {
            interface: "eth0".into(),
            mode,
            source: ProgramError::NotLoaded,
        };
        let xdp = err("driver").to_string();
        assert!(
            xdp.starts_with("cannot attach XDP to interface `eth0` in driver mode: ")
                && xdp.ends_with("[xdp] mode = \"tc\" runs the same datapath at TC ingress instead"),
            "{xdp}"
        );
        let tc = err("tc").to_string();
        assert!(
            tc.starts_with("cannot attach the TC ingress program to interface `eth0` in tc mode: ")
                && tc.contains("TCX links need Linux 6.6 or later"),
            "{tc}"
        );
    }
}
