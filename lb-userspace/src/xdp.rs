//! The XDP datapath (`datapath = "xdp"`): loads the embedded eBPF program, pins its maps and links
//! under `[xdp] pin_path`, attaches it to the configured interfaces, and keeps the kernel's maps equal
//! to the state: services, backends, and Maglev rings (only changed slots are written).
//!
//! Restart without drops: maps and links stay pinned when `lb` exits, so the kernel keeps forwarding.
//! The next `lb run` adopts them (same layout version and ring size), finds every service's slot
//! and backend's index again by address, and swaps the program in place. `lb cleanup` removes it all.

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use lb_common::maps::{
    AffinityKey, AffinityValue, BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, BackendValue, Counter,
    FLOW_TO_BACKEND, FlowKey, FlowValue, GlobalConfig, LAYOUT_VERSION, NO_BACKEND, ServiceKey, ServiceValue,
    TrafficCounters, global_counter,
};
use lb_common::maps::{
    MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_GLOBAL_STATS, MAP_RING,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SNAT, MAP_SNAT_ADDRS,
};
use lb_common::select::{self, BackendTable, Peek, Policy, Ring};
use tracing::{info, warn};

use crate::config::{DatapathKind, XdpConfig, XdpMode};
use crate::datapath::{BackendTraffic, Datapath, DatapathError, Drained, ServiceTraffic, Which};
use crate::ebpf::{self, XDP_PROGRAM};
use crate::runtime::Snapshot;
use crate::state::{Backend, Effect, Service};

const IPPROTO_TCP: u8 = 6;
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
    #[error("cannot attach XDP to interface `{interface}` in {mode} mode: {source}")]
    Attach {
        interface: String,
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
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("{0}")]
    System(String),
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
}

/// Read-only views of one service's kernel maps for [`select::select`] (`lb which`).
struct KernelViews<'a> {
    maps: &'a Maps,
    service: &'a KernelService,
    affinity: Option<AffinityValue>,
}

impl BackendTable for KernelViews<'_> {
    fn admits_known(&self, index: u32) -> bool {
        let want = BACKEND_PRESENT | BACKEND_ADMITS_KNOWN;
        self.maps
            .backends
            .get(&index, 0)
            .is_ok_and(|b| b.flags & want == want && b.service_slot == self.service.slot)
    }
}

impl Ring for KernelViews<'_> {
    fn size(&self) -> u32 {
        self.service.ring.len() as u32
    }
    fn get(&self, slot: u32) -> Option<u32> {
        self.service.ring.get(slot as usize).copied()
    }
}

/// Kernel-side counters of one backend or service, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTraffic {
    pub traffic: TrafficCounters,
    /// Open connections (client → backend conntrack entries neither closed nor expired).
    pub active: u64,
}

/// Where the kernel would send a client, from its own maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    /// State backend id, if the index maps to a live backend.
    pub backend_id: Option<u32>,
    pub reason: &'static str,
    pub detail: String,
}

pub struct XdpDatapath {
    inner: Mutex<Inner>,
    pin_path: Option<PathBuf>,
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let t =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).expect("CLOCK_MONOTONIC_COARSE");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn ipv4(addr: SocketAddr) -> Result<SocketAddrV4, XdpError> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(_) => Err(XdpError::NotIpv4(addr)),
    }
}

/// The address this host would use as source toward `backend` (route lookup without sending).
fn source_toward(backend: SocketAddrV4) -> Result<Ipv4Addr, XdpError> {
    let route = |source| XdpError::Route {
        backend: SocketAddr::V4(backend),
        source,
    };
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(route)?;
    socket.connect(backend).map_err(route)?;
    match socket.local_addr().map_err(route)?.ip() {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(route(std::io::Error::other("IPv6 source"))),
    }
}

impl XdpDatapath {
    /// Loads the program and its maps. With `config`, maps and links are pinned (adopting pinned
    /// ones) and the program is attached to the configured interfaces; without, nothing is pinned
    /// or attached (packet-fixture tests and benchmarks drive it through [`XdpDatapath::test_run`]).
    pub fn start(config: Option<&XdpConfig>, seed: u32, ring_size: u32) -> Result<XdpDatapath, XdpError> {
        let object = ebpf::object().ok_or(ebpf::LoadError::NotEmbedded)?;
        let defaults = XdpConfig::default();
        let cfg = config.unwrap_or(&defaults);
        let pin_path = config.map(|c| c.pin_path.clone());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, cfg.max_services)
            .map_max_entries(MAP_SERVICE_STATS, cfg.max_services)
            .map_max_entries(MAP_BACKENDS, cfg.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, cfg.max_backends)
            .map_max_entries(MAP_RING, cfg.max_services * ring_size)
            .map_max_entries(MAP_CONNTRACK, cfg.conntrack_entries)
            .map_max_entries(MAP_AFFINITY, cfg.affinity_entries);
        let names = [
            MAP_GLOBAL_STATS,
            MAP_CONFIG,
            MAP_SERVICES,
            MAP_BACKENDS,
            MAP_RING,
            MAP_CONNTRACK,
            MAP_AFFINITY,
            MAP_SNAT,
            MAP_SNAT_ADDRS,
            MAP_SERVICE_STATS,
            MAP_BACKEND_STATS,
        ];
        if let Some(dir) = &pin_path {
            ensure_bpffs(dir)?;
            for name in names {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(object)?;
        let mut maps = Maps {
            config: take(&mut ebpf, MAP_CONFIG)?,
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            conntrack: take(&mut ebpf, MAP_CONNTRACK)?,
            affinity: take(&mut ebpf, MAP_AFFINITY)?,
            global: take(&mut ebpf, MAP_GLOBAL_STATS)?,
            service_stats: take(&mut ebpf, MAP_SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            snat_addrs: take(&mut ebpf, MAP_SNAT_ADDRS)?,
        };
        let max_services = maps.service_stats.len();
        let max_backends = maps.backends.len();
        let old = maps.config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        let adopting = old.layout_version != 0;
        if adopting
            && (old.layout_version != LAYOUT_VERSION
                || old.ring_size != ring_size
                || maps.ring.len() != max_services * ring_size)
        {
            return Err(XdpError::Layout {
                path: pin_path.clone().unwrap_or_default(),
                found: old.layout_version,
                want: LAYOUT_VERSION,
                found_ring: old.ring_size,
                want_ring: ring_size,
            });
        }
        let global = GlobalConfig {
            layout_version: LAYOUT_VERSION,
            seed,
            ring_size,
            snat_port_lo: cfg.snat_ports.0,
            snat_port_hi: cfg.snat_ports.1,
            cpus: aya::util::nr_cpus().map_err(|(_, e)| XdpError::System(format!("counting CPUs: {e}")))?
                as u32,
            _pad: 0,
            idle_timeout_ns: cfg.idle_timeout.as_nanos() as u64,
            closed_timeout_ns: cfg.closed_timeout.as_nanos() as u64,
        };
        maps.config.set(0, global, 0).map_err(map_err(MAP_CONFIG))?;

        let mut adopt_services = StdHashMap::new();
        let mut adopt_backends = StdHashMap::new();
        if adopting {
            for entry in &maps.services {
                let (k, v) = entry.map_err(map_err(MAP_SERVICES))?;
                adopt_services.insert(k, v.slot);
            }
            for i in 0..max_backends {
                let b = maps.backends.get(&i, 0).map_err(map_err(MAP_BACKENDS))?;
                if b.flags & BACKEND_PRESENT != 0 {
                    adopt_backends.insert((b.service_slot, b.addr_be, b.port_be), i);
                }
            }
            info!(
                path = %pin_path.as_deref().unwrap_or(Path::new("")).display(),
                services = adopt_services.len(),
                backends = adopt_backends.len(),
                "adopting pinned XDP maps: live connections and affinity carry on"
            );
        }
        let taken_slots: Vec<u32> = adopt_services.values().copied().collect();
        let taken_backends: Vec<u32> = adopt_backends.values().copied().collect();

        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| XdpError::System(format!("program {XDP_PROGRAM} missing from the object")))?
            .try_into()?;
        program.load()?;
        if let Some(config) = config {
            crate::host::prepare(&config.pin_path, &config.interfaces, config.snat_ports, adopting)?;
            for interface in &config.interfaces {
                attach(program, interface, config.mode, &config.pin_path)?;
            }
            forward_program_logs(&mut ebpf);
        }
        Ok(XdpDatapath {
            inner: Mutex::new(Inner {
                ebpf,
                maps,
                ring_size,
                max_services,
                services: StdHashMap::new(),
                free_slots: (0..max_services).filter(|s| !taken_slots.contains(s)).collect(),
                free_backends: (0..max_backends)
                    .filter(|b| !taken_backends.contains(b))
                    .collect(),
                adopt_services,
                adopt_backends,
            }),
            pin_path,
        })
    }

    /// Runs the program once (or `repeat` times) on `frame` as if it arrived on `ingress_ifindex`:
    /// (verdict, output frame, average time per run).
    pub fn test_run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration), XdpError> {
        let inner = self.inner.lock().unwrap();
        let program: &Xdp = inner
            .ebpf
            .program(XDP_PROGRAM)
            .ok_or_else(|| XdpError::System("program missing".into()))?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// Global counters by name, summed over CPUs.
    pub fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
        let inner = self.inner.lock().unwrap();
        global_counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let packets = inner
                    .maps
                    .global
                    .get(&(i as u32), 0)
                    .map_or(0, |v| v.iter().map(|c| c.packets).sum());
                (*name, packets)
            })
            .collect()
    }

    /// Kernel counters of each backend of `service`, by state backend id.
    pub fn backend_traffic(&self, service: &str) -> StdHashMap<u32, KernelTraffic> {
        let inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return StdHashMap::new();
        };
        let mut by_index: StdHashMap<u32, KernelTraffic> = StdHashMap::new();
        for index in ks.backends.values() {
            let traffic = inner
                .maps
                .backend_stats
                .get(index, 0)
                .map(|v| v.iter().fold(TrafficCounters::default(), |a, c| add(&a, c)))
                .unwrap_or_default();
            by_index.insert(*index, KernelTraffic { traffic, active: 0 });
        }
        let now = monotonic_ns();
        let global = inner.maps.config.get(&0, 0).unwrap_or_default();
        for (_, v) in inner.maps.conntrack.iter().flatten() {
            if v.flags & FLOW_TO_BACKEND != 0
                && v.service_slot == ks.slot
                && !v.closed()
                && !v.expired(now, &global)
                && let Some(t) = by_index.get_mut(&v.backend)
            {
                t.active += 1;
            }
        }
        ks.backends
            .iter()
            .filter_map(|(id, index)| by_index.get(index).map(|t| (*id, *t)))
            .collect()
    }

    /// Which backend the kernel would give `client` (with `port`: an existing connection first).
    pub fn kernel_which(&self, service: &str, client: Ipv4Addr, port: Option<u16>) -> Option<KernelChoice> {
        let inner = self.inner.lock().unwrap();
        let ks = inner.services.get(service)?;
        let id_of = |index: u32| ks.backends.iter().find(|(_, i)| **i == index).map(|(id, _)| *id);
        let now = monotonic_ns();
        let global = inner.maps.config.get(&0, 0).ok()?;
        if let Some(port) = port {
            let key = FlowKey {
                src_be: u32::from(client).to_be(),
                dst_be: ks.key.vip_be,
                sport_be: port.to_be(),
                dport_be: ks.key.port_be,
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            if let Ok(flow) = inner.maps.conntrack.get(&key, 0)
                && !flow.expired(now, &global)
            {
                return Some(KernelChoice {
                    backend_id: id_of(flow.backend),
                    reason: "conntrack",
                    detail: format!(
                        "open connection from port {port}, idle {} ms",
                        (now - flow.last_seen_ns) / 1_000_000
                    ),
                });
            }
        }
        let akey = AffinityKey {
            service_slot: ks.slot,
            client_be: u32::from(client).to_be(),
        };
        let views = KernelViews {
            maps: &inner.maps,
            service: ks,
            affinity: inner.maps.affinity.get(&akey, 0).ok(),
        };
        let policy = Policy {
            seed: global.seed,
            affinity_timeout_ns: ks.value.affinity_timeout_ns,
        };
        let Some(choice) = select::select(
            &policy,
            None,
            u32::from(client),
            now,
            &mut Peek(views.affinity),
            &views,
            &views,
            |_| false,
            1,
        ) else {
            return Some(KernelChoice {
                backend_id: None,
                reason: "none",
                detail: "the kernel ring is empty".into(),
            });
        };
        let (reason, detail) = match choice.reason {
            select::Reason::Affinity => (
                "affinity",
                format!(
                    "kernel affinity entry, last connection {}s ago",
                    views.affinity.map_or(0, |a| now.saturating_sub(a.last_seen_ns)) / 1_000_000_000
                ),
            ),
            _ => (
                "ring",
                format!("kernel Maglev ring slot {} of {}", choice.slot, inner.ring_size),
            ),
        };
        Some(KernelChoice {
            backend_id: id_of(choice.backend),
            reason,
            detail,
        })
    }

    /// Forgets kernel affinity entries of clients that failed over away from `backend_id`.
    pub fn forget_failed_over(&self, service: &str, backend_id: u32) {
        let mut inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return;
        };
        let (slot, Some(index)) = (ks.slot, ks.backends.get(&backend_id).copied()) else {
            return;
        };
        let stale: Vec<AffinityKey> = inner
            .maps
            .affinity
            .iter()
            .flatten()
            .filter(|(k, v)| k.service_slot == slot && select::failed_over_from(v, index))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            let _ = inner.maps.affinity.remove(k);
        }
        info!(
            service,
            clients = stale.len(),
            "failback: kernel affinity entries forgotten"
        );
    }

    /// Live kernel affinity entries of `service`.
    pub fn affinity_len(&self, service: &str) -> u64 {
        let inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return 0;
        };
        let now = monotonic_ns();
        inner
            .maps
            .affinity
            .iter()
            .flatten()
            .filter(|(k, v)| {
                k.service_slot == ks.slot && now.saturating_sub(v.last_seen_ns) < ks.value.affinity_timeout_ns
            })
            .count() as u64
    }

    /// Forgets every connection to `backend_id` (`on_down = "reset"`): their next packets have no
    /// conntrack entry and are dropped, so both ends time out or reset.
    pub fn forget_flows(&self, service: &str, backend_id: u32) -> usize {
        let mut inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return 0;
        };
        let (slot, Some(index)) = (ks.slot, ks.backends.get(&backend_id).copied()) else {
            return 0;
        };
        let flows: Vec<FlowKey> = inner
            .maps
            .conntrack
            .iter()
            .flatten()
            .filter(|(_, v)| v.service_slot == slot && v.backend == index)
            .map(|(k, _)| k)
            .collect();
        for k in &flows {
            let _ = inner.maps.conntrack.remove(k);
        }
        flows.len() / 2
    }

    /// After the config's services are synced: removes pinned services and backends that no
    /// service claimed (they were removed from the config while `lb` was down).
    pub fn finish_adoption(&self) -> Result<(), XdpError> {
        let mut inner = self.inner.lock().unwrap();
        let services: Vec<(ServiceKey, u32)> = inner.adopt_services.drain().collect();
        for (key, slot) in services {
            let _ = inner.maps.services.remove(&key);
            inner.free_slots.push_back(slot);
            info!(slot, "removed a pinned XDP service that is no longer configured");
        }
        let backends: Vec<u32> = inner.adopt_backends.drain().map(|(_, index)| index).collect();
        for index in backends {
            inner
                .maps
                .backends
                .set(index, BackendValue::default(), 0)
                .map_err(map_err(MAP_BACKENDS))?;
            inner.free_backends.push_back(index);
        }
        Ok(())
    }

    pub fn pin_path(&self) -> Option<&Path> {
        self.pin_path.as_deref()
    }
}

fn add(a: &TrafficCounters, c: &TrafficCounters) -> TrafficCounters {
    TrafficCounters {
        packets_in: a.packets_in + c.packets_in,
        bytes_in: a.bytes_in + c.bytes_in,
        packets_out: a.packets_out + c.packets_out,
        bytes_out: a.bytes_out + c.bytes_out,
        new_flows: a.new_flows + c.new_flows,
        _reserved: 0,
    }
}

impl Inner {
    /// Writes a service, its backends and the changed ring slots.
    fn sync(&mut self, svc: &Service) -> Result<(), XdpError> {
        let listen = ipv4(svc.settings.listen)?;
        let key = ServiceKey {
            vip_be: u32::from(*listen.ip()).to_be(),
            port_be: listen.port().to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let name = svc.settings.name.clone();
        if !self.services.contains_key(&name) {
            let slot = match self.adopt_services.remove(&key) {
                Some(slot) => slot,
                None => self.free_slots.pop_front().ok_or(XdpError::Full {
                    what: "service",
                    max: self.max_services,
                    key: "max_services",
                })?,
            };
            // The slot's ring content is unknown (fresh map, adopted or reused): write every slot once.
            let ring = vec![UNKNOWN; self.ring_size as usize];
            self.services.insert(
                name.clone(),
                KernelService {
                    slot,
                    key,
                    ring,
                    // Never equal to a real value, so the first sync writes the service entry.
                    value: ServiceValue {
                        slot: u32::MAX,
                        ..ServiceValue::default()
                    },
                    ..Default::default()
                },
            );
        }
        let ks = self.services.get_mut(&name).expect("inserted above");
        let value = ServiceValue {
            slot: ks.slot,
            flags: 0,
            affinity_timeout_ns: svc.settings.affinity_timeout.as_nanos() as u64,
        };
        if value != ks.value || ks.key != key {
            self.maps
                .services
                .insert(key, value, 0)
                .map_err(map_err(MAP_SERVICES))?;
            ks.key = key;
            ks.value = value;
        }
        // Backends: new ones get an index (their pinned one when adopting), gone ones are cleared.
        for b in &svc.backends {
            let address = ipv4(b.config.address)?;
            let index = match ks.backends.get(&b.id) {
                Some(i) => *i,
                None => {
                    let pinned = (ks.slot, u32::from(*address.ip()).to_be(), address.port().to_be());
                    let i = match self.adopt_backends.remove(&pinned) {
                        Some(i) => i,
                        None => self.free_backends.pop_front().ok_or(XdpError::Full {
                            what: "backend",
                            max: self.maps.backends.len(),
                            key: "max_backends",
                        })?,
                    };
                    ks.backends.insert(b.id, i);
                    i
                }
            };
            let mut flags = BACKEND_PRESENT;
            if b.admits_known() {
                flags |= BACKEND_ADMITS_KNOWN;
            }
            let snat = match ks.written.get(&index) {
                Some(old) if old.addr_be == u32::from(*address.ip()).to_be() => old.snat_be,
                _ => u32::from(source_toward(address)?).to_be(),
            };
            let value = BackendValue {
                addr_be: u32::from(*address.ip()).to_be(),
                snat_be: snat,
                port_be: address.port().to_be(),
                flags,
                service_slot: ks.slot,
            };
            if ks.written.get(&index) != Some(&value) {
                self.maps
                    .snat_addrs
                    .insert(snat, 1, 0)
                    .map_err(map_err(MAP_SNAT_ADDRS))?;
                self.maps
                    .backends
                    .set(index, value, 0)
                    .map_err(map_err(MAP_BACKENDS))?;
                ks.written.insert(index, value);
            }
        }
        let gone: Vec<u32> = ks
            .backends
            .keys()
            .filter(|id| svc.backend_by_id(**id).is_none())
            .copied()
            .collect();
        for id in gone {
            let index = ks.backends.remove(&id).expect("listed above");
            ks.written.remove(&index);
            self.maps
                .backends
                .set(index, BackendValue::default(), 0)
                .map_err(map_err(MAP_BACKENDS))?;
            self.free_backends.push_back(index);
        }
        // Ring: translate backend ids to kernel indices and write only the slots that differ.
        let base = ks.slot * self.ring_size;
        let mut changed = 0usize;
        for slot in 0..self.ring_size as usize {
            let want = svc
                .ring
                .get(slot)
                .and_then(|id| ks.backends.get(id))
                .copied()
                .unwrap_or(NO_BACKEND);
            if ks.ring[slot] != want {
                self.maps
                    .ring
                    .set(base + slot as u32, want, 0)
                    .map_err(map_err(MAP_RING))?;
                ks.ring[slot] = want;
                changed += 1;
            }
        }
        if changed > 0 {
            tracing::debug!(service = %name, slots = changed, "kernel ring updated");
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), XdpError> {
        let Some(ks) = self.services.remove(name) else {
            return Ok(());
        };
        let _ = self.maps.services.remove(&ks.key);
        for index in ks.backends.values() {
            self.maps
                .backends
                .set(*index, BackendValue::default(), 0)
                .map_err(map_err(MAP_BACKENDS))?;
            self.free_backends.push_back(*index);
        }
        self.free_slots.push_back(ks.slot);
        Ok(())
    }
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
        result.map_err(|e| DatapathError::Xdp(e.to_string()))
    }

    fn finish_start(&self) -> Result<(), DatapathError> {
        self.finish_adoption()
            .map_err(|e| DatapathError::Xdp(e.to_string()))
    }

    fn reset_backend(&self, service: &Service, backend: &Backend) -> usize {
        self.forget_flows(&service.settings.name, backend.id)
    }

    fn fail_back(&self, service: &Service, backend: &Backend) {
        self.forget_failed_over(&service.settings.name, backend.id);
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
        ServiceTraffic {
            affinity_entries: self.affinity_len(name),
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
                        connect_failures: None,
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

/// Forwards the program's aya-log records into tracing (target `lb::xdp::kernel`).
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "lb::xdp::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "lb::xdp::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "lb::xdp::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "lb::xdp::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "lb::xdp::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Starts a task draining the program's log ring buffer (needs a tokio runtime; skipped without).
fn forward_program_logs(ebpf: &mut Ebpf) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "XDP program logs are not forwarded"),
    };
    // SAFETY: the logger owns its ring buffer fd and neither closes nor replaces it while registered.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "XDP program logs are not forwarded"),
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Mounts bpffs at /sys/fs/bpf if needed and creates the pin directory.
fn ensure_bpffs(dir: &Path) -> Result<(), XdpError> {
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !is_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| XdpError::System(format!("mounting bpffs on /sys/fs/bpf: {e}")))?;
        info!(
            "mounted the BPF filesystem on /sys/fs/bpf; if lb runs in a private mount namespace \
             (e.g. under `ip netns exec`), its pins vanish when it exits and a restart drops connections"
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| XdpError::Pin {
        path: dir.into(),
        message: e.to_string(),
    })
}

fn link_pin(pin_path: &Path, interface: &str) -> PathBuf {
    pin_path.join(format!("link_{interface}"))
}

/// Attaches (or, when a pinned link exists, swaps the program inside it) and pins the link.
fn attach(program: &mut Xdp, interface: &str, mode: XdpMode, pin_path: &Path) -> Result<(), XdpError> {
    let pin = link_pin(pin_path, interface);
    if pin.exists() {
        let pinned = PinnedLink::from_pin(&pin).map_err(|e| XdpError::Pin {
            path: pin.clone(),
            message: e.to_string(),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| XdpError::Pin {
            path: pin.clone(),
            message: e.to_string(),
        })?;
        program.attach_to_link(link)?;
        info!(
            interface,
            "XDP program replaced inside the pinned link; forwarding never stopped"
        );
        return Ok(());
    }
    let tries: &[(AyaXdpMode, &'static str)] = match mode {
        XdpMode::Driver => &[(AyaXdpMode::Driver, "driver")],
        XdpMode::Skb => &[(AyaXdpMode::Skb, "skb")],
        XdpMode::Auto => &[(AyaXdpMode::Driver, "driver"), (AyaXdpMode::Skb, "skb")],
    };
    let mut last = None;
    for (aya_mode, name) in tries {
        match program.attach(interface, *aya_mode) {
            Ok(id) => {
                let link = FdLink::try_from(program.take_link(id)?).map_err(|e| XdpError::Pin {
                    path: pin.clone(),
                    message: e.to_string(),
                })?;
                link.pin(&pin).map_err(|e| XdpError::Pin {
                    path: pin.clone(),
                    message: e.to_string(),
                })?;
                info!(interface, mode = name, "XDP program attached");
                return Ok(());
            }
            Err(source) => {
                if tries.len() > 1 && *name == "driver" {
                    warn!(interface, error = %source, "attach failed in driver mode; retrying in skb mode");
                }
                last = Some(XdpError::Attach {
                    interface: interface.to_string(),
                    mode: name,
                    source,
                });
            }
        }
    }
    Err(last.expect("at least one mode tried"))
}

/// What `lb cleanup` did.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Sysctls written back to the values recorded before lb changed them.
    pub restored: Vec<(String, String)>,
    /// Pinned links and maps removed.
    pub removed: Vec<PathBuf>,
}

/// `lb cleanup`: restores the sysctls lb changed ([`crate::host::restore`]), detaches the program
/// (removes the pinned links) and removes the pinned maps.
pub fn cleanup(pin_path: &Path) -> Result<Cleanup, XdpError> {
    let mut report = Cleanup {
        restored: crate::host::restore(pin_path)?,
        removed: Vec::new(),
    };
    let removed = &mut report.removed;
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return Ok(report);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| XdpError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })?;
        removed.push(path);
    }
    std::fs::remove_dir(pin_path).map_err(|e| XdpError::Pin {
        path: pin_path.into(),
        message: e.to_string(),
    })?;
    Ok(report)
}
