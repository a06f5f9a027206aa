//! Reading the kernel's maps: counters, open connections, affinity, where a client would go
//! (`lb which`, by the shared selection over read-only views), forgetting affinity and marking
//! flows for reset.

use std::collections::HashMap as StdHashMap;
use std::net::Ipv4Addr;

use aya::maps::PerCpuArray;
use lb_common::maps::{
    AffinityKey, AffinityValue, BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, FLOW_RESET, FLOW_TO_BACKEND, FlowKey,
    FlowValue, MAP_SNAT, TrafficCounters, global_counter,
};
use lb_common::select::{self, BackendTable, Peek, Policy, Ring};

use super::{IPPROTO_TCP, Inner, KernelService, Maps, XdpDatapath, monotonic_ns};
use crate::datapath::DatapathError;
use crate::datapath::affinity::{AffinityEntry, AffinityTable, Filter};
use crate::state::Service;

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

/// How much state the kernel's packets have created ([`XdpDatapath::kernel_state`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    pub conntrack: u64,
    pub affinity: u64,
    pub snat_cursors: u64,
}

/// Where the kernel would send a client, from its own maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    /// State backend id, if the index maps to a live backend.
    pub backend_id: Option<u32>,
    pub reason: &'static str,
    pub detail: String,
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

impl XdpDatapath {
    /// Global counters by name, summed over CPUs.
    pub fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
        let inner = self.inner.lock().unwrap();
        global_counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                if i as u32 == global_counter::SYN_COOKIES {
                    return (*name, u64::from(inner.synproxy.on));
                }
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
        let (slot, ids, mut by_index, global) = {
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
            let global = inner.maps.config.get(&0, 0).unwrap_or_default();
            (ks.slot, ks.backends.clone(), by_index, global)
        };
        let now = monotonic_ns();
        let walkers = self.walkers.lock().unwrap();
        for (_, v) in walkers.conntrack.iter().flatten() {
            if v.flags & FLOW_TO_BACKEND != 0
                && v.service_slot == slot
                && !v.closed()
                && v.flags & FLOW_RESET == 0
                && !v.expired(now, &global)
                && let Some(t) = by_index.get_mut(&v.backend)
            {
                t.active += 1;
            }
        }
        drop(walkers);
        ids.iter()
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
                        "open connection from port {port}, idle {} ms{}",
                        now.saturating_sub(flow.last_seen_ns) / 1_000_000,
                        if flow.flags & FLOW_RESET != 0 {
                            ", reset: its next packet gets an RST"
                        } else {
                            ""
                        }
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
        // A choice that has just refused a SYN: the kernel sends the client elsewhere.
        if let Some((other, what)) = inner.passive.steer(
            ks.slot,
            &ks.ring,
            global.seed,
            u32::from(client),
            choice.backend,
            now,
        ) {
            return Some(KernelChoice {
                backend_id: id_of(other),
                reason: "ring",
                detail: format!("{detail}, refusing SYNs (RST): {what} instead"),
            });
        }
        Some(KernelChoice {
            backend_id: id_of(choice.backend),
            reason,
            detail,
        })
    }

    /// Every entry of the conntrack and affinity maps (live or not, all services), and the SNAT
    /// port cursors summed over CPUs (each claim moves one): what packets have created so far.
    pub fn kernel_state(&self) -> KernelState {
        let inner = self.inner.lock().unwrap();
        let snat_cursors = inner
            .ebpf
            .map(MAP_SNAT)
            .and_then(|m| PerCpuArray::<_, u32>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .map_or(0, |v| v.iter().map(|c| u64::from(*c)).sum());
        KernelState {
            conntrack: inner.maps.conntrack.keys().flatten().count() as u64,
            affinity: inner.maps.affinity.keys().flatten().count() as u64,
            snat_cursors,
        }
    }

    /// Marks every open connection to `backend_id` for reset (`on_down = "reset"`, `lb backend
    /// disable --reset`): both entries get [`FLOW_RESET`], so the next packet in either direction
    /// is answered by the kernel with an RST toward its sender. Returns how many connections
    /// (client → backend entries, neither closed nor expired) were marked.
    pub fn reset_flows(&self, service: &str, backend_id: u32) -> usize {
        let mut inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return 0;
        };
        let (slot, Some(index)) = (ks.slot, ks.backends.get(&backend_id).copied()) else {
            return 0;
        };
        let now = monotonic_ns();
        let global = inner.maps.config.get(&0, 0).unwrap_or_default();
        let flows: Vec<(FlowKey, FlowValue)> = inner
            .maps
            .conntrack
            .iter()
            .flatten()
            .filter(|(_, v)| v.service_slot == slot && v.backend == index && v.flags & FLOW_RESET == 0)
            .collect();
        let mut open = 0;
        for (k, mut v) in flows {
            if v.flags & FLOW_TO_BACKEND != 0 && !v.closed() && !v.expired(now, &global) {
                open += 1;
            }
            v.flags |= FLOW_RESET;
            // BPF_EXIST: an entry the kernel dropped meanwhile stays dropped.
            let _ = inner.maps.conntrack.insert(k, v, 2);
        }
        open
    }
}

/// What reading a service's affinity entries needs of it, taken under the [`Inner`] lock.
struct AffinityScope {
    slot: u32,
    /// Kernel backend index → state backend id.
    id_of: StdHashMap<u32, u32>,
    timeout_ns: u64,
}

impl Inner {
    fn affinity_scope(&self, service: &str) -> Option<AffinityScope> {
        let ks = self.services.get(service)?;
        Some(AffinityScope {
            slot: ks.slot,
            id_of: ks.backends.iter().map(|(id, index)| (*index, *id)).collect(),
            timeout_ns: ks.value.affinity_timeout_ns,
        })
    }

    /// Live kernel affinity entries of `service` with their keys (see [`live_affinity`]).
    pub(super) fn affinity_entries(&self, service: &str) -> Vec<(AffinityKey, AffinityEntry)> {
        self.affinity_scope(service)
            .map(|scope| live_affinity(&self.maps.affinity, &scope))
            .unwrap_or_default()
    }
}

/// The live entries of `map` in `scope`'s service with their keys, backends as state ids (entries
/// on an index no backend of the service holds are left out).
fn live_affinity(
    map: &aya::maps::HashMap<aya::maps::MapData, AffinityKey, AffinityValue>,
    scope: &AffinityScope,
) -> Vec<(AffinityKey, AffinityEntry)> {
    let now = monotonic_ns();
    map.iter()
        .flatten()
        .filter(|(k, _)| k.service_slot == scope.slot)
        .filter_map(|(k, v)| {
            let idle = now.saturating_sub(v.last_seen_ns);
            if idle >= scope.timeout_ns {
                return None;
            }
            let backend = *scope.id_of.get(&v.backend)?;
            let home = scope
                .id_of
                .get(&v.home)
                .copied()
                .unwrap_or(lb_common::maps::NO_BACKEND);
            let client = Ipv4Addr::from(u32::from_be(k.client_be)).into();
            Some((
                k,
                AffinityEntry::new(client, backend, home, std::time::Duration::from_nanos(idle)),
            ))
        })
        .collect()
}

impl AffinityTable for XdpDatapath {
    fn entries(&self, service: &Service) -> Vec<AffinityEntry> {
        let Some(scope) = self.inner.lock().unwrap().affinity_scope(&service.settings.name) else {
            return Vec::new();
        };
        let walkers = self.walkers.lock().unwrap();
        live_affinity(&walkers.affinity, &scope)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    fn flush(&self, service: &Service, filter: Filter<'_>) -> Result<usize, DatapathError> {
        let mut inner = self.inner.lock().unwrap();
        inner
            .forget_affinity(&service.settings.name, filter)
            .map_err(|e| DatapathError::Xdp(e.to_string()))
    }

    fn pin(&self, service: &Service, client: std::net::IpAddr, backend_id: u32) -> Result<(), DatapathError> {
        let mut inner = self.inner.lock().unwrap();
        inner
            .pin_affinity(&service.settings.name, client, backend_id)
            .map_err(|e| DatapathError::Xdp(e.to_string()))
    }
}
