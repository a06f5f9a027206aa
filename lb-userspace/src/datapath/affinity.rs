//! Affinity tables as operators see and move them (`lb affinity list|flush|set`, per-backend
//! counts, failback): the [`AffinityTable`] seam, kept by the balancer for the user-space
//! datapaths and by the kernel's `lb_affinity` map for XDP services.

use std::net::IpAddr;
use std::time::Duration;

use lb_common::maps::{AffinityValue, NO_BACKEND};

use crate::datapath::DatapathError;
use crate::state::Service;

/// One live affinity entry, with backends by state id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    pub client: IpAddr,
    /// The backend the client sticks to.
    pub backend_id: u32,
    /// The backend it failed over from (its home, for `failback`), if any.
    pub home: Option<u32>,
    /// Time since the client's last new connection.
    pub idle: Duration,
}

impl AffinityEntry {
    /// An entry from its table value, once the value's backends are translated to state ids.
    pub fn new(client: IpAddr, backend_id: u32, home: u32, idle: Duration) -> Self {
        AffinityEntry {
            client,
            backend_id,
            home: (home != NO_BACKEND).then_some(home),
            idle,
        }
    }
}

/// Which entries a change sends back to the ring.
pub type Filter<'a> = &'a (dyn Fn(&AffinityEntry) -> bool + Sync);

/// Where one datapath keeps source-IP affinity.
pub trait AffinityTable: Send + Sync {
    /// Live entries of `service` (expired ones left out), in no particular order.
    fn entries(&self, service: &Service) -> Vec<AffinityEntry>;

    /// Forgets the entries of `service` that `filter` picks: their clients' next connections follow
    /// the ring. Returns how many were forgotten.
    fn flush(&self, service: &Service, filter: Filter<'_>) -> Result<usize, DatapathError>;

    /// Pins `client` to backend `backend_id` (replacing its entry; the pin is its home).
    fn pin(&self, service: &Service, client: IpAddr, backend_id: u32) -> Result<(), DatapathError>;
}

/// Affinity entries a committed change sends back to the ring when the service has
/// `failback = true`: clients that failed over from a backend that takes new clients again, and,
/// once the ring leaves the backups for the primaries, every client on a backup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failback {
    /// Backends (state ids) that take new clients again.
    pub homes: Vec<u32>,
    /// Backups to leave (state ids): the ring went back to the primaries.
    pub backups: Vec<u32>,
}

impl Failback {
    /// What a change from `before` to `after` (the same service) sends back, if anything.
    pub fn between(before: &Service, after: &Service) -> Option<Failback> {
        if !after.settings.failback {
            return None;
        }
        let homes: Vec<u32> = after
            .backends
            .iter()
            .filter(|b| b.admits_new() && before.backend_by_id(b.id).is_some_and(|o| !o.admits_new()))
            .map(|b| b.id)
            .collect();
        let backups: Vec<u32> =
            if before.ring_uses_backups && !after.ring_uses_backups && !after.ring.is_empty() {
                after
                    .backends
                    .iter()
                    .filter(|b| b.config.backup)
                    .map(|b| b.id)
                    .collect()
            } else {
                Vec::new()
            };
        (!homes.is_empty() || !backups.is_empty()).then_some(Failback { homes, backups })
    }

    /// Whether the entry goes back to the ring.
    pub fn picks(&self, entry: &AffinityEntry) -> bool {
        entry.home.is_some_and(|h| self.homes.contains(&h)) || self.backups.contains(&entry.backend_id)
    }

    /// Whether `service`, as it stands, would send an entry with `value` back to the ring (with
    /// `failback = true`): its failed-over home takes new clients, or it sits on a backup while the
    /// ring has primaries. For a choice a failback overtook.
    pub fn sends_back(service: &Service, value: &AffinityValue) -> bool {
        service.settings.failback
            && (service
                .backend_by_id(value.home)
                .is_some_and(crate::state::Backend::admits_new)
                || (!service.ring_uses_backups
                    && !service.ring.is_empty()
                    && service
                        .backend_by_id(value.backend)
                        .is_some_and(|b| b.config.backup)))
    }

    /// [`Failback::picks`] on a raw table value whose backends are state ids.
    pub fn picks_value(&self, value: &AffinityValue) -> bool {
        (value.home != NO_BACKEND && self.homes.contains(&value.home))
            || self.backups.contains(&value.backend)
    }
}
