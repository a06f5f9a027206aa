//! Writing the state into the kernel's maps: services, backends (with the source address toward
//! each) and the Maglev ring, only the slots that changed.

use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use lb_common::maps::{AffinityKey, AffinityValue, MAP_AFFINITY};
use lb_common::maps::{
    BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, BackendValue, NO_BACKEND, SERVICE_DSR, ServiceKey, ServiceValue,
};
use lb_common::maps::{
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_RING, MAP_SERVICES, MAP_SNAT_ADDRS, TrafficCounters,
};

use crate::config::Forwarding;
use crate::datapath::affinity::Filter;
use crate::state::Service;

use super::{Inner, KernelService, UNKNOWN, XdpError, map_err, monotonic_ns};

fn ipv4(addr: SocketAddr) -> Result<SocketAddrV4, XdpError> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(_) => Err(XdpError::NotIpv4(addr)),
    }
}

/// The address this host would use as source toward `backend` (route lookup without sending).
/// A backend whose route is local (the source is the backend's own address) is refused.
fn source_toward(backend: SocketAddrV4) -> Result<Ipv4Addr, XdpError> {
    let route = |source| XdpError::Route {
        backend: SocketAddr::V4(backend),
        source,
    };
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(route)?;
    socket.connect(backend).map_err(route)?;
    match socket.local_addr().map_err(route)?.ip() {
        IpAddr::V4(v4) if v4 == *backend.ip() => Err(XdpError::LocalBackend(SocketAddr::V4(backend))),
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(route(std::io::Error::other("IPv6 source"))),
    }
}

/// State backend id → kernel index, looked up once per ring slot (65,537 or more on every change).
enum IndexOf<'a> {
    /// Ids are handed out in order, so a table indexed by id is small unless churn left gaps.
    Table(Vec<u32>),
    Map(&'a std::collections::HashMap<u32, u32>),
}

impl<'a> IndexOf<'a> {
    fn new(backends: &'a std::collections::HashMap<u32, u32>) -> Self {
        let len = backends.keys().max().map_or(0, |m| *m as usize + 1);
        if len > 16 * (backends.len() + 64) {
            return IndexOf::Map(backends);
        }
        let mut table = vec![NO_BACKEND; len];
        for (id, index) in backends {
            table[*id as usize] = *index;
        }
        IndexOf::Table(table)
    }

    fn get(&self, id: u32) -> u32 {
        match self {
            IndexOf::Table(t) => t.get(id as usize).copied().unwrap_or(NO_BACKEND),
            IndexOf::Map(m) => m.get(&id).copied().unwrap_or(NO_BACKEND),
        }
    }
}

impl Inner {
    /// Writes a service, its backends and the changed ring slots.
    pub(super) fn sync(&mut self, svc: &Service) -> Result<(), XdpError> {
        let listen = ipv4(svc.settings.listen)?;
        let key = ServiceKey::tcp(u32::from(*listen.ip()).to_be(), listen.port().to_be());
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
            flags: match svc.settings.forwarding {
                Forwarding::Nat => 0,
                Forwarding::Dsr => SERVICE_DSR,
            },
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
        // Several backends on one host (ports) share the route lookup.
        let mut sources: StdHashMap<Ipv4Addr, Ipv4Addr> = StdHashMap::new();
        for b in &svc.backends {
            let address = ipv4(b.config.address)?;
            let index = match ks.backends.get(&b.id) {
                Some(i) => *i,
                None => {
                    let pinned = (ks.slot, u32::from(*address.ip()).to_be(), address.port().to_be());
                    let i = match self.adopt_backends.remove(&pinned) {
                        Some(i) => i,
                        None => {
                            let i = *self.free_backends.front().ok_or(XdpError::Full {
                                what: "backend",
                                max: self.maps.backends.len(),
                                key: "max_backends",
                            })?;
                            zero_backend_stats(&mut self.maps.backend_stats, i)?;
                            self.free_backends.pop_front();
                            i
                        }
                    };
                    ks.backends.insert(b.id, i);
                    self.passive.forget(i)?;
                    i
                }
            };
            let mut flags = BACKEND_PRESENT;
            if b.admits_known() {
                flags |= BACKEND_ADMITS_KNOWN;
            }
            let snat = match ks.written.get(&index) {
                Some(old) if old.addr_be == u32::from(*address.ip()).to_be() => old.snat_be,
                _ => {
                    let source = match sources.get(address.ip()) {
                        Some(s) => *s,
                        None => {
                            let s = source_toward(address)?;
                            sources.insert(*address.ip(), s);
                            s
                        }
                    };
                    u32::from(source).to_be()
                }
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
        // Ring: translate backend ids to kernel indices and write only the slots that differ.
        let index_of = IndexOf::new(&ks.backends);
        let base = ks.slot * self.ring_size;
        let mut changed = 0usize;
        for slot in 0..self.ring_size as usize {
            let want = svc.ring.get(slot).map_or(NO_BACKEND, |id| index_of.get(*id));
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
        self.passive.sync_fallback(ks.slot, svc, |id| index_of.get(id))?;
        // Backends that left are cleared only now that no ring slot names them, so a new
        // connection never meets a slot whose backend is gone.
        let present: std::collections::HashSet<u32> = svc.backends.iter().map(|b| b.id).collect();
        let gone: Vec<u32> = ks
            .backends
            .keys()
            .filter(|id| !present.contains(id))
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
        Ok(())
    }

    pub(super) fn remove(&mut self, name: &str) -> Result<(), XdpError> {
        let Some(ks) = self.services.remove(name) else {
            return Ok(());
        };
        let _ = self.maps.services.remove(&ks.key);
        self.passive.forget_service(ks.slot)?;
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

/// Sets the kernel counters of backend index `index` to 0 on every CPU: a new backend on a freed
/// index starts at 0, not at the totals of the one that had it.
fn zero_backend_stats(
    stats: &mut aya::maps::PerCpuArray<aya::maps::MapData, TrafficCounters>,
    index: u32,
) -> Result<(), XdpError> {
    let cpus = stats.get(&index, 0).map_err(map_err(MAP_BACKEND_STATS))?.len();
    let zeros = aya::maps::PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
        .map_err(|e| XdpError::System(format!("counters of backend index {index}: {e}")))?;
    stats.set(index, zeros, 0).map_err(map_err(MAP_BACKEND_STATS))
}

impl Inner {
    /// Removes the kernel affinity entries of `service` that `filter` picks; returns how many.
    pub(super) fn forget_affinity(&mut self, service: &str, filter: Filter<'_>) -> Result<usize, XdpError> {
        let picked: Vec<AffinityKey> = self
            .affinity_entries(service)
            .into_iter()
            .filter(|(_, e)| filter(e))
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for k in &picked {
            match self.maps.affinity.remove(k) {
                Ok(()) => removed += 1,
                // Evicted or expired meanwhile: gone either way.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_AFFINITY)(e)),
            }
        }
        Ok(removed)
    }

    /// Writes a kernel affinity entry: `client` sticks to backend `backend_id` of `service`.
    pub(super) fn pin_affinity(
        &mut self,
        service: &str,
        client: IpAddr,
        backend_id: u32,
    ) -> Result<(), XdpError> {
        let IpAddr::V4(v4) = client else {
            return Err(XdpError::System(format!(
                "XDP services keep affinity for IPv4 clients only; {client} is not one"
            )));
        };
        let ks = self
            .services
            .get(service)
            .ok_or_else(|| XdpError::System(format!("service `{service}` is not in the kernel maps")))?;
        let index = *ks.backends.get(&backend_id).ok_or_else(|| {
            XdpError::System(format!(
                "backend {backend_id} of `{service}` is not in the kernel maps"
            ))
        })?;
        let key = AffinityKey {
            service_slot: ks.slot,
            client_be: u32::from(v4).to_be(),
        };
        let value = AffinityValue {
            backend: index,
            home: NO_BACKEND,
            last_seen_ns: monotonic_ns(),
        };
        self.maps
            .affinity
            .insert(key, value, 0)
            .map_err(map_err(MAP_AFFINITY))
    }
}
