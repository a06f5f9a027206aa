//! Backend selection by the rules of DESIGN.md, shared by every user-space datapath:
//! existing connection (the datapath's own business) > affinity entry > Maglev ring.
//!
//! [`Balancer`] owns the [`State`] and one [`AffinityTable`] per service, so commands and selection
//! see one consistent picture.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::state::{BackendStats, Command, Effect, State, StateError};

/// Most affinity entries kept per service; beyond it expired entries are swept, then the oldest go.
pub const AFFINITY_CAPACITY: usize = 1 << 20;

/// Folds a client address into the 32 bits the shared hash takes (IPv4 as is).
pub fn client_key(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (0..4).fold(0u32, |acc, i| {
                acc ^ u32::from_be_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct AffinityEntry {
    backend: u32,
    last_seen: Instant,
    /// The backend the client was on before it failed over (for `failback = true`).
    home: Option<u32>,
}

/// Source-IP affinity of one service: client → backend, forgotten `timeout` after the last connection.
#[derive(Debug, Default)]
pub struct AffinityTable {
    entries: HashMap<IpAddr, AffinityEntry>,
}

impl AffinityTable {
    fn get(&self, client: IpAddr, timeout: Duration, now: Instant) -> Option<AffinityEntry> {
        self.entries
            .get(&client)
            .copied()
            .filter(|e| now.saturating_duration_since(e.last_seen) < timeout)
    }

    fn record(&mut self, client: IpAddr, backend: u32, now: Instant, timeout: Duration) {
        if self.entries.len() >= AFFINITY_CAPACITY && !self.entries.contains_key(&client) {
            self.sweep(now, timeout);
            if self.entries.len() >= AFFINITY_CAPACITY
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_seen)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        let home = match self.entries.get(&client) {
            Some(e) if e.backend != backend => e.home.or(Some(e.backend)),
            Some(e) => e.home,
            None => None,
        };
        let home = home.filter(|h| *h != backend);
        self.entries.insert(
            client,
            AffinityEntry {
                backend,
                last_seen: now,
                home,
            },
        );
    }

    /// Forgets clients that failed over away from `backend`, so they return to it.
    fn fail_back(&mut self, backend: u32) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.home != Some(backend));
        before - self.entries.len()
    }

    /// Drops expired entries; returns how many remain.
    pub fn sweep(&mut self, now: Instant, timeout: Duration) -> usize {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < timeout);
        self.entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Why a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The client has a live affinity entry to a backend that still admits known clients.
    Affinity,
    /// Maglev ring lookup (primaries, or backups when no primary takes new clients).
    Ring,
}

/// The outcome of a selection.
#[derive(Clone, Debug)]
pub struct Choice {
    pub backend_id: u32,
    pub backend_name: String,
    pub address: std::net::SocketAddr,
    pub reason: Reason,
    /// Ring slot looked up (for `Reason::Ring`).
    pub slot: Option<u32>,
    pub stats: Arc<BackendStats>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "service `{0}` has no backend that takes new clients (all down, drained, in maintenance or weight 0)"
    )]
    NoBackend(String),
}

/// State plus affinity: everything selection needs.
#[derive(Debug)]
pub struct Balancer {
    pub state: State,
    affinity: HashMap<String, AffinityTable>,
}

impl Balancer {
    pub fn new(state: State) -> Self {
        Balancer {
            state,
            affinity: HashMap::new(),
        }
    }

    /// Applies a command. Affinity entries live on unless their service goes away, or (with
    /// `failback = true`) their client's original backend is healthy again.
    pub fn apply(&mut self, command: Command) -> Result<Effect, StateError> {
        let back_up = match &command {
            Command::SetHealth {
                service,
                backend,
                health: crate::state::Health::Up,
            } => {
                let svc = self.state.service(service)?;
                svc.settings
                    .failback
                    .then(|| svc.backend(backend).map(|b| b.id))
                    .flatten()
            }
            _ => None,
        };
        let effect = self.state.apply(command)?;
        match &effect {
            Effect::ServiceRemoved { name, .. } => {
                self.affinity.remove(name);
            }
            Effect::ServiceChanged(name) => {
                if let (Some(id), Some(table)) = (back_up, self.affinity.get_mut(name)) {
                    let moved = table.fail_back(id);
                    tracing::info!(service = %name, clients = moved, "failback: clients return to their backend");
                }
            }
            _ => {}
        }
        Ok(effect)
    }

    /// Picks a backend for a new connection from `client`, skipping `exclude` (backends whose connect
    /// just failed). Does not record affinity: call [`Balancer::confirm`] once the connection is up.
    pub fn choose(
        &self,
        service: &str,
        client: IpAddr,
        now: Instant,
        exclude: &[u32],
    ) -> Result<Choice, SelectError> {
        let svc = self.state.service(service)?;
        let timeout = svc.settings.affinity_timeout;
        if let Some(entry) = self
            .affinity
            .get(service)
            .and_then(|t| t.get(client, timeout, now))
            && !exclude.contains(&entry.backend)
            && let Some(b) = svc.backend_by_id(entry.backend).filter(|b| b.admits_known())
        {
            return Ok(Choice {
                backend_id: b.id,
                backend_name: b.config.name.clone(),
                address: b.config.address,
                reason: Reason::Affinity,
                slot: None,
                stats: b.stats.clone(),
            });
        }
        let ring = &svc.ring;
        if ring.is_empty() {
            return Err(SelectError::NoBackend(service.to_string()));
        }
        let slot =
            lb_common::hash::ring_slot(self.state.seed, client_key(client), ring.len() as u32) as usize;
        // Walk on from the slot to the next backend not excluded (the ring interleaves all members).
        for step in 0..ring.len() {
            let id = ring[(slot + step) % ring.len()];
            if exclude.contains(&id) {
                continue;
            }
            let b = svc.backend_by_id(id).expect("ring holds only present backends");
            return Ok(Choice {
                backend_id: id,
                backend_name: b.config.name.clone(),
                address: b.config.address,
                reason: Reason::Ring,
                slot: Some(((slot + step) % ring.len()) as u32),
                stats: b.stats.clone(),
            });
        }
        Err(SelectError::NoBackend(service.to_string()))
    }

    /// A healthy active backup not in `exclude`: the last resort of a request whose primaries
    /// all failed before they were detected down (AJP datapath).
    pub fn choose_backup(&self, service: &str, exclude: &[u32]) -> Option<u32> {
        let svc = self.state.services.get(service)?;
        svc.backends
            .iter()
            .find(|b| b.config.backup && b.admits_new() && !exclude.contains(&b.id))
            .map(|b| b.id)
    }

    /// Records that `client` reached `backend_id` (new or refreshed affinity entry).
    pub fn confirm(&mut self, service: &str, client: IpAddr, backend_id: u32, now: Instant) {
        let Some(svc) = self.state.services.get(service) else {
            return;
        };
        let timeout = svc.settings.affinity_timeout;
        if timeout.is_zero() {
            return;
        }
        self.affinity
            .entry(service.to_string())
            .or_default()
            .record(client, backend_id, now, timeout);
    }

    /// Time since `client` was last seen, if its affinity entry is live.
    pub fn affinity_age(&self, service: &str, client: IpAddr, now: Instant) -> Option<Duration> {
        let timeout = self.state.services.get(service)?.settings.affinity_timeout;
        let entry = self.affinity.get(service)?.get(client, timeout, now)?;
        Some(now.saturating_duration_since(entry.last_seen))
    }

    /// Number of live affinity entries per service.
    pub fn affinity_len(&self, service: &str) -> usize {
        self.affinity.get(service).map_or(0, AffinityTable::len)
    }

    /// Drops expired affinity entries of every service.
    pub fn sweep(&mut self, now: Instant) {
        for (name, table) in &mut self.affinity {
            if let Some(svc) = self.state.services.get(name) {
                table.sweep(now, svc.settings.affinity_timeout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminState;
    use crate::state::Health;
    use crate::state::tests::{backend, three};
    use std::net::Ipv4Addr;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))
    }

    fn connect(b: &mut Balancer, client: IpAddr, now: Instant) -> Choice {
        let c = b.choose("web", client, now, &[]).unwrap();
        b.confirm("web", client, c.backend_id, now);
        c
    }

    fn set(b: &mut Balancer, backend: &str, state: AdminState) {
        b.apply(Command::SetState {
            service: "web".into(),
            backend: backend.into(),
            state,
        })
        .unwrap();
    }

    #[test]
    fn affinity_holds_across_connections_and_ring_changes() {
        let mut b = Balancer::new(three());
        let now = Instant::now();
        let first = connect(&mut b, ip(1), now);
        assert_eq!(first.reason, Reason::Ring);
        // A weight change reshuffles the ring; the client stays.
        for other in ["b1", "b2", "b3"].iter().filter(|n| **n != first.backend_name) {
            b.apply(Command::SetWeight {
                service: "web".into(),
                backend: (*other).into(),
                weight: 50,
            })
            .unwrap();
        }
        for _ in 0..20 {
            let again = connect(&mut b, ip(1), now);
            assert_eq!(again.backend_id, first.backend_id);
            assert_eq!(again.reason, Reason::Affinity);
        }
    }

    #[test]
    fn different_clients_spread() {
        let mut b = Balancer::new(three());
        let now = Instant::now();
        let mut counts = [0; 3];
        for i in 0..3000 {
            counts[connect(&mut b, ip(i), now).backend_id as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "counts {counts:?}");
        }
    }

    #[test]
    fn drain_keeps_known_clients_and_refuses_new() {
        let mut b = Balancer::new(three());
        let now = Instant::now();
        let known: Vec<_> = (0..300)
            .map(|i| (ip(i), connect(&mut b, ip(i), now).backend_id))
            .collect();
        set(&mut b, "b1", AdminState::Drain);
        for (client, id) in &known {
            assert_eq!(connect(&mut b, *client, now).backend_id, *id);
        }
        for i in 1000..1300 {
            assert_ne!(connect(&mut b, ip(i), now).backend_name, "b1");
        }
    }

    #[test]
    fn maintenance_and_down_admit_nobody_and_client_sticks_to_new_backend() {
        for down in [true, false] {
            let mut b = Balancer::new(three());
            let now = Instant::now();
            let client = (0..100)
                .map(ip)
                .find(|c| b.choose("web", *c, now, &[]).unwrap().backend_name == "b1")
                .unwrap();
            connect(&mut b, client, now);
            if down {
                b.apply(Command::SetHealth {
                    service: "web".into(),
                    backend: "b1".into(),
                    health: Health::Down,
                })
                .unwrap();
            } else {
                set(&mut b, "b1", AdminState::Maintenance);
            }
            let moved = connect(&mut b, client, now);
            assert_ne!(moved.backend_name, "b1");
            // b1 returns: the client does not fail back.
            b.apply(Command::SetHealth {
                service: "web".into(),
                backend: "b1".into(),
                health: Health::Up,
            })
            .unwrap();
            set(&mut b, "b1", AdminState::Active);
            let later = connect(&mut b, client, now);
            assert_eq!(later.backend_id, moved.backend_id);
            assert_eq!(later.reason, Reason::Affinity);
        }
    }

    #[test]
    fn affinity_expires() {
        let mut b = Balancer::new(three());
        let t0 = Instant::now();
        let client = ip(5);
        let first = connect(&mut b, client, t0);
        set(&mut b, &first.backend_name, AdminState::Drain);
        assert_eq!(
            b.choose("web", client, t0 + Duration::from_secs(599), &[])
                .unwrap()
                .reason,
            Reason::Affinity
        );
        let after = b
            .choose("web", client, t0 + Duration::from_secs(601), &[])
            .unwrap();
        assert_eq!(after.reason, Reason::Ring);
        assert_ne!(after.backend_id, first.backend_id);
        b.sweep(t0 + Duration::from_secs(601));
        assert_eq!(b.affinity_len("web"), 0);
    }

    #[test]
    fn exclusion_walks_to_another_backend() {
        let b = Balancer::new(three());
        let now = Instant::now();
        let first = b.choose("web", ip(9), now, &[]).unwrap();
        let second = b.choose("web", ip(9), now, &[first.backend_id]).unwrap();
        assert_ne!(first.backend_id, second.backend_id);
        let third = b
            .choose("web", ip(9), now, &[first.backend_id, second.backend_id])
            .unwrap();
        assert!(![first.backend_id, second.backend_id].contains(&third.backend_id));
        assert!(matches!(
            b.choose("web", ip(9), now, &[0, 1, 2]),
            Err(SelectError::NoBackend(_))
        ));
    }

    #[test]
    fn backups_take_over_and_keep_their_clients() {
        let mut b = Balancer::new(three());
        let mut spare = backend("spare", "10.1.4.2:80");
        spare.backup = true;
        b.apply(Command::AddBackend {
            service: "web".into(),
            backend: spare,
        })
        .unwrap();
        let now = Instant::now();
        for n in ["b1", "b2", "b3"] {
            set(&mut b, n, AdminState::Maintenance);
        }
        assert_eq!(connect(&mut b, ip(1), now).backend_name, "spare");
        set(&mut b, "b2", AdminState::Active);
        assert_eq!(
            connect(&mut b, ip(1), now).backend_name,
            "spare",
            "pinned client stays on the backup"
        );
        assert_eq!(
            connect(&mut b, ip(2), now).backend_name,
            "b2",
            "new clients go to the primary"
        );
    }

    #[test]
    fn failback_returns_failed_over_clients_only_when_enabled() {
        for failback in [false, true] {
            let mut s = three();
            let mut svc = s.service("web").unwrap().settings.clone();
            svc.failback = failback;
            s.apply(Command::UpdateService { service: svc }).unwrap();
            let mut b = Balancer::new(s);
            let now = Instant::now();
            let on_b1: Vec<_> = (0..300)
                .map(ip)
                .filter(|c| connect(&mut b, *c, now).backend_name == "b1")
                .collect();
            let health = |health| Command::SetHealth {
                service: "web".into(),
                backend: "b1".into(),
                health,
            };
            b.apply(health(Health::Down)).unwrap();
            for c in &on_b1 {
                assert_ne!(connect(&mut b, *c, now).backend_name, "b1");
            }
            b.apply(health(Health::Up)).unwrap();
            let back = on_b1
                .iter()
                .filter(|c| connect(&mut b, **c, now).backend_name == "b1")
                .count();
            assert_eq!(
                back,
                if failback { on_b1.len() } else { 0 },
                "failback = {failback}"
            );
        }
    }

    #[test]
    fn zero_timeout_means_no_affinity() {
        let mut s = three();
        let mut svc = s.service("web").unwrap().settings.clone();
        svc.affinity_timeout = Duration::ZERO;
        s.apply(Command::UpdateService { service: svc }).unwrap();
        let mut b = Balancer::new(s);
        connect(&mut b, ip(1), Instant::now());
        assert_eq!(b.affinity_len("web"), 0);
    }
}
