//! Backend selection by the rules of DESIGN.md, shared by every user-space datapath:
//! existing connection (the datapath's own business) > affinity entry > Maglev ring, by
//! [`lb_common::select`].
//!
//! [`Balancer`] publishes the state with its runtime as an immutable [`Snapshot`] (arc-swap) and
//! keeps source-IP affinity in a lock-free hash map (papaya), so a new connection takes no lock:
//! it reads the snapshot and its client's entry, and writes the entry back atomically.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use papaya::{Compute, Operation};
use serde::Serialize;

use lb_common::maps::AffinityValue;
use lb_common::select::{self, BackendTable, Peek, Policy, Ring};

use crate::datapath::DatapathError;
use crate::datapath::affinity::{AffinityEntry, AffinityTable, Failback, Filter};
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Command, Effect, Service, State, StateError};

/// Most affinity entries kept (all services together); beyond it expired entries are swept, then
/// the oldest go.
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

/// An affinity entry's value if it is younger than `timeout` at `now`.
fn live(entry: Option<&AffinityValue>, timeout: Duration, now: u64) -> Option<AffinityValue> {
    entry
        .copied()
        .filter(|e| now.saturating_sub(e.last_seen_ns) < timeout.as_nanos() as u64)
}

/// The published snapshot and a client's affinity entry, read together (see [`Balancer::read`]),
/// and the failback sequence they were read at.
struct Read {
    snapshot: arc_swap::Guard<Arc<Snapshot>>,
    entry: Option<AffinityValue>,
    seq: u64,
}

/// The selection's view of a service's backends and ring.
struct View<'a>(&'a Service);

impl BackendTable for View<'_> {
    fn admits_known(&self, backend: u32) -> bool {
        self.0
            .backend_by_id(backend)
            .is_some_and(super::state::Backend::admits_known)
    }
}

impl Ring for View<'_> {
    fn size(&self) -> u32 {
        self.0.ring.len() as u32
    }
    fn get(&self, slot: u32) -> Option<u32> {
        self.0.ring.get(slot as usize).copied()
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
    /// A healthy backup, the last resort of a connection whose primaries all failed to connect
    /// before they were marked down.
    Backup,
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
    /// Counters and reset token of the chosen backend.
    pub runtime: Arc<BackendRuntime>,
    /// The failback sequence the choice was made at (see [`Chosen`]).
    failbacks: u64,
}

impl Choice {
    /// What [`Balancer::confirm`] needs of it.
    pub fn chosen(&self) -> Chosen {
        Chosen {
            backend_id: self.backend_id,
            reason: self.reason,
            failbacks: self.failbacks,
        }
    }
}

/// A choice as [`Balancer::confirm`] takes it: the backend, why, and the failback commits published
/// when it was made (a ring choice that a failback overtook must not record what that failback
/// sends back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub backend_id: u32,
    pub reason: Reason,
    failbacks: u64,
}

impl Chosen {
    /// A choice made without [`Balancer::choose`]: a session route's backend (`Affinity`) or a
    /// healthy backup as the last resort (`Backup`). Recorded as it is.
    pub fn new(backend_id: u32, reason: Reason) -> Chosen {
        debug_assert!(reason != Reason::Ring, "ring choices come from Balancer::choose");
        Chosen {
            backend_id,
            reason,
            failbacks: 0,
        }
    }
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

/// A command applied to a copy of the state, not yet published: [`Balancer::commit`] publishes it,
/// dropping it changes nothing.
#[derive(Debug)]
#[must_use = "commit it, or drop it to change nothing"]
pub struct Pending {
    snapshot: Snapshot,
    effect: Effect,
    /// Clients the change sends back to the ring (`failback = true`): service id and which.
    failback: Option<(u32, Failback)>,
}

impl Pending {
    pub fn effect(&self) -> &Effect {
        &self.effect
    }

    /// The state as it will be once committed.
    pub fn state(&self) -> &State {
        &self.snapshot.state
    }

    /// The state and runtime as they will be once committed.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The affinity entries the change sends back to the ring once committed (`failback = true`).
    pub fn failback(&self) -> Option<&Failback> {
        self.failback.as_ref().map(|(_, f)| f)
    }
}

/// The published snapshot plus affinity: everything selection needs.
///
/// Readers ([`Balancer::choose`], [`Balancer::snapshot`]) never wait for writers. Writers
/// ([`Balancer::stage`] then [`Balancer::commit`]) must be serialized by the caller: the engine
/// holds its command lock across both.
pub struct Balancer {
    current: ArcSwap<Snapshot>,
    /// Source-IP affinity: (service id, client) → [`AffinityValue`] (backend, failover home, last
    /// seen in nanoseconds of the balancer's clock).
    affinity: papaya::HashMap<(u32, IpAddr), AffinityValue>,
    /// Most entries `affinity` keeps ([`AFFINITY_CAPACITY`]).
    capacity: usize,
    /// Set while one caller makes room in a full table; the others go on.
    making_room: AtomicBool,
    /// Odd while a failback commit publishes its snapshot and forgets the entries it sends back:
    /// a selection that saw it change reads again.
    failback_seq: AtomicU64,
    /// Held by a failback commit; a selection that met one waits here rather than spin.
    failback: Mutex<()>,
    /// Zero of the clock affinity entries are kept in.
    epoch: Instant,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("services", &self.current.load().state.services.len())
            .field("affinity", &self.affinity.len())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    pub fn new(state: State) -> Self {
        Balancer {
            current: ArcSwap::from_pointee(Snapshot::new(state)),
            affinity: papaya::HashMap::new(),
            capacity: AFFINITY_CAPACITY,
            making_room: AtomicBool::new(false),
            failback_seq: AtomicU64::new(0),
            failback: Mutex::new(()),
            // Far enough back that instants taken just before the balancer was made still count.
            epoch: Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(Instant::now),
        }
    }

    /// A balancer whose affinity table keeps at most `capacity` entries.
    #[cfg(test)]
    fn with_capacity(state: State, capacity: usize) -> Self {
        Balancer {
            capacity,
            ..Balancer::new(state)
        }
    }

    /// The current state and runtime; later changes publish a new snapshot and leave this one be.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies a command to the state and its affinity bookkeeping at once ([`Balancer::stage`]
    /// then [`Balancer::commit`]).
    pub fn apply(&self, command: Command) -> Result<Effect, StateError> {
        let pending = self.stage(command)?;
        Ok(self.commit(pending))
    }

    /// Applies a command to a copy of the current state. On error, or when the result is dropped,
    /// nothing changed.
    pub fn stage(&self, command: Command) -> Result<Pending, StateError> {
        let current = self.current.load();
        // Read in place (the loaded snapshot stays alive): a copy of a service with 1,000
        // backends is a copy of 2,000 strings.
        let before = current.state.services.get(command.service());
        let mut state = current.state.clone();
        let effect = state.apply(command)?;
        let failback = before.and_then(|before| {
            let after = state.services.get(&before.settings.name)?;
            (after.id == before.id)
                .then(|| Failback::between(before, after).map(|f| (after.id, f)))
                .flatten()
        });
        let runtime = current.runtime.follow(&state);
        Ok(Pending {
            snapshot: Snapshot { state, runtime },
            effect,
            failback,
        })
    }

    /// Publishes a staged command. Affinity entries live on unless their service went away, or
    /// (with `failback = true`) the change sends their clients back to the ring.
    pub fn commit(&self, pending: Pending) -> Effect {
        let Pending {
            snapshot,
            effect,
            failback,
        } = pending;
        let removed = match &effect {
            Effect::ServiceRemoved { id, .. } => Some(*id),
            _ => None,
        };
        match (&effect, failback) {
            (Effect::ServiceChanged(name), Some((service, failback))) => {
                // Published and forgotten inside a failback section: a selection that overlapped
                // it reads again (see `read`), so it sees the old snapshot with the old entries or
                // the new one without them, never the new state with a failed-over entry.
                let _section = self
                    .failback
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.failback_seq.fetch_add(1, Ordering::SeqCst);
                // Even again when this section ends, however it ends: an odd sequence left behind
                // would hold every selection.
                struct Done<'a>(&'a AtomicU64);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::Release);
                    }
                }
                let done = Done(&self.failback_seq);
                // Pairs with the fence in `confirm`: an entry a confirmation wrote before it read
                // the sequence unchanged is seen by the forgetting below.
                std::sync::atomic::fence(Ordering::SeqCst);
                self.current.store(Arc::new(snapshot));
                let moved = self.forget(|(s, _), e| *s == service && failback.picks_value(e));
                drop(done);
                if moved > 0 {
                    tracing::info!(service = %name, clients = moved, "failback: clients return to the ring");
                }
            }
            _ => self.current.store(Arc::new(snapshot)),
        }
        if let Some(id) = removed {
            self.forget(|(s, _), _| *s == id);
        }
        effect
    }

    /// Forgets the entries `pick` chooses; returns how many.
    fn forget(&self, pick: impl Fn(&(u32, IpAddr), &AffinityValue) -> bool) -> usize {
        let mut forgotten = 0;
        self.affinity.pin().retain(|k, e| {
            let go = pick(k, e);
            forgotten += usize::from(go);
            !go
        });
        forgotten
    }

    /// The published snapshot and `client`'s affinity entry in `service`, read together: never the
    /// snapshot of a failback with an entry that failback forgets (see `commit`). Takes no lock
    /// unless a failback commit is under way.
    fn read(&self, service: &str, client: IpAddr) -> Result<Read, StateError> {
        let map = self.affinity.pin();
        loop {
            let seq = self.failback_seq.load(Ordering::Acquire);
            if seq.is_multiple_of(2) {
                let snapshot = self.current.load();
                let id = snapshot.state.service(service)?.id;
                let entry = map.get(&(id, client)).copied();
                if self.failback_seq.load(Ordering::Acquire) == seq {
                    return Ok(Read { snapshot, entry, seq });
                }
            }
            self.wait_for_failback();
        }
    }

    /// Waits for the failback commit under way, if any.
    fn wait_for_failback(&self) {
        drop(
            self.failback
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
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
        let Read { snapshot, entry, seq } = self.read(service, client)?;
        let svc = snapshot.state.service(service)?;
        let timeout = svc.settings.affinity_timeout;
        let now = self.clock(now);
        let policy = Policy {
            seed: snapshot.state.seed,
            affinity_timeout_ns: timeout.as_nanos() as u64,
        };
        let live = live(entry.as_ref(), timeout, now);
        let choice = select::select(
            &policy,
            None,
            client_key(client),
            now,
            &mut Peek(live),
            &View(svc),
            &View(svc),
            |id| exclude.contains(&id),
            svc.ring.len() as u32,
        )
        .ok_or_else(|| SelectError::NoBackend(service.to_string()))?;
        let b = svc
            .backend_by_id(choice.backend)
            .expect("selection picks only present backends");
        Ok(Choice {
            backend_id: b.id,
            backend_name: b.config.name.clone(),
            address: b.config.address,
            reason: match choice.reason {
                select::Reason::Affinity | select::Reason::Conntrack => Reason::Affinity,
                select::Reason::Ring => Reason::Ring,
            },
            slot: (choice.reason == select::Reason::Ring).then_some(choice.slot),
            runtime: snapshot.runtime(svc, b),
            failbacks: seq,
        })
    }

    /// Nanoseconds of `now` on the balancer's clock (affinity entries are kept in it).
    fn clock(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Affinity timeouts by service id, for sweeping.
    fn timeouts(&self) -> HashMap<u32, Duration> {
        self.current
            .load()
            .state
            .services
            .values()
            .map(|s| (s.id, s.settings.affinity_timeout))
            .collect()
    }

    /// A healthy active backup not in `exclude`: the last resort of a request whose primaries
    /// all failed before they were detected down (AJP datapath).
    pub fn choose_backup(&self, service: &str, exclude: &[u32]) -> Option<u32> {
        let snapshot = self.current.load();
        let svc = snapshot.state.services.get(service)?;
        svc.backends
            .iter()
            .find(|b| b.config.backup && b.admits_new() && !exclude.contains(&b.id))
            .map(|b| b.id)
    }

    /// [`Balancer::choose_backup`] as a [`Choice`]: the last resort of a new connection whose
    /// primaries all failed to connect (refused, timed out) before the checks marked them down.
    pub fn last_resort(&self, service: &str, exclude: &[u32]) -> Result<Choice, SelectError> {
        let snapshot = self.current.load();
        let svc = snapshot.state.service(service)?;
        let b = self
            .choose_backup(service, exclude)
            .and_then(|id| svc.backend_by_id(id))
            .ok_or_else(|| SelectError::NoBackend(service.to_string()))?;
        Ok(Choice {
            backend_id: b.id,
            backend_name: b.config.name.clone(),
            address: b.config.address,
            reason: Reason::Backup,
            slot: None,
            runtime: snapshot.runtime(svc, b),
            failbacks: 0,
        })
    }

    /// Records that `client` reached the backend it was given (new or refreshed affinity entry).
    ///
    /// A change may commit between the choice and the confirmation. When it forgot or changed the
    /// entry the choice followed (a failback, a flush, a pin), nothing is recorded. When a failback overtook a
    /// choice from the ring, nothing that failback sends back is recorded (an entry failed over
    /// from a home that is back, or on a backup the ring has left). Either way the client's next
    /// connection follows the ring, as it would have had the connection come a moment later.
    pub fn confirm(&self, service: &str, client: IpAddr, chosen: Chosen, now: Instant) {
        let now = self.clock(now);
        let map = self.affinity.pin();
        // Read and written in one step: a failback or flush forgets the entry before or after,
        // never in between; a failback commit that overlaps the step has it done again.
        let inserted = loop {
            let seq = self.failback_seq.load(Ordering::Acquire);
            if !seq.is_multiple_of(2) {
                self.wait_for_failback();
                continue;
            }
            let snapshot = self.current.load();
            let Some(svc) = snapshot.state.services.get(service) else {
                return;
            };
            let timeout = svc.settings.affinity_timeout;
            if timeout.is_zero() {
                return;
            }
            let overtaken = chosen.reason == Reason::Ring && seq != chosen.failbacks;
            let outcome = map.compute((svc.id, client), |entry| {
                let live = live(entry.map(|(_, e)| e), timeout, now);
                // An entry forgotten, or pointed elsewhere (a pin), since the choice followed it.
                if chosen.reason == Reason::Affinity && live.is_none_or(|l| l.backend != chosen.backend_id) {
                    return Operation::Abort(());
                }
                let value = select::next_entry(live, chosen.backend_id, now);
                match (overtaken && Failback::sends_back(svc, &value), entry) {
                    (false, _) => Operation::Insert(value),
                    (true, Some(_)) => Operation::Remove,
                    (true, None) => Operation::Abort(()),
                }
            });
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.failback_seq.load(Ordering::Acquire) == seq {
                break matches!(outcome, Compute::Inserted(..));
            }
        };
        if inserted {
            self.make_room(now);
        }
    }

    /// Keeps the affinity table within its capacity once an insert went past it: drops expired
    /// entries, then the oldest, down to a sixteenth below the capacity so that the next inserts
    /// do not each scan the table. One caller at a time; the others go on.
    fn make_room(&self, now: u64) {
        if self.affinity.len() <= self.capacity || self.making_room.swap(true, Ordering::Acquire) {
            return;
        }
        self.sweep_at(now);
        // Down to the headroom mark even when the sweep freed a few: else the next insert scans
        // the whole table again.
        let over = self
            .affinity
            .len()
            .saturating_sub(self.capacity - self.capacity / 16);
        if over > 0 {
            let map = self.affinity.pin();
            // The service that holds the most entries makes the room when it can: one service's
            // clients (or addresses a web tier passes on unchecked) cannot push another's out.
            let mut by_service: HashMap<u32, Vec<u64>> = HashMap::new();
            for ((service, _), e) in &map {
                by_service.entry(*service).or_default().push(e.last_seen_ns);
            }
            let biggest = by_service
                .iter()
                .max_by_key(|(_, seen)| seen.len())
                .filter(|(_, seen)| seen.len() >= over)
                .map(|(service, _)| *service);
            // Else the oldest of all (from the same walk, not a second one).
            let (only, mut seen) = match biggest.and_then(|s| by_service.remove(&s).map(|seen| (s, seen))) {
                Some((service, seen)) => (Some(service), seen),
                None => (None, by_service.into_values().flatten().collect()),
            };
            let n = over.min(seen.len());
            if n > 0 {
                let cutoff = *seen.select_nth_unstable(n - 1).1;
                map.retain(|(service, _), e| only.is_some_and(|o| o != *service) || e.last_seen_ns > cutoff);
            }
        }
        self.making_room.store(false, Ordering::Release);
    }

    /// Time since `client` was last seen, if its affinity entry is live.
    pub fn affinity_age(&self, service: &str, client: IpAddr, now: Instant) -> Option<Duration> {
        let snapshot = self.current.load();
        let svc = snapshot.state.services.get(service)?;
        let now = self.clock(now);
        let map = self.affinity.pin();
        let entry = live(map.get(&(svc.id, client)), svc.settings.affinity_timeout, now)?;
        Some(Duration::from_nanos(now.saturating_sub(entry.last_seen_ns)))
    }

    /// Number of affinity entries of a service (expired ones go at the next sweep).
    #[cfg(test)]
    pub fn affinity_len(&self, service: &str) -> usize {
        let Some(id) = self.current.load().state.services.get(service).map(|s| s.id) else {
            return 0;
        };
        self.affinity.pin().keys().filter(|(s, _)| *s == id).count()
    }

    /// Drops expired affinity entries of every service.
    pub fn sweep(&self, now: Instant) {
        self.sweep_at(self.clock(now));
    }

    /// [`Balancer::sweep`] at `now` on the balancer's clock: drops entries older than their
    /// service's timeout (all of a service that is gone).
    fn sweep_at(&self, now: u64) {
        let timeouts = self.timeouts();
        self.affinity.pin().retain(|(service, _), e| {
            timeouts
                .get(service)
                .is_some_and(|t| now.saturating_sub(e.last_seen_ns) < t.as_nanos() as u64)
        });
    }
}

impl AffinityTable for Balancer {
    fn entries(&self, service: &Service) -> Vec<AffinityEntry> {
        let timeout = service.settings.affinity_timeout.as_nanos() as u64;
        let now = self.clock(Instant::now());
        self.affinity
            .pin()
            .iter()
            .filter_map(|((s, client), e)| {
                let idle = now.saturating_sub(e.last_seen_ns);
                (*s == service.id && idle < timeout)
                    .then(|| AffinityEntry::new(*client, e.backend, e.home, Duration::from_nanos(idle)))
            })
            .collect()
    }

    fn flush(&self, service: &Service, filter: Filter<'_>) -> Result<usize, DatapathError> {
        let now = self.clock(Instant::now());
        Ok(self.forget(|(s, client), e| {
            *s == service.id
                && filter(&AffinityEntry::new(
                    *client,
                    e.backend,
                    e.home,
                    Duration::from_nanos(now.saturating_sub(e.last_seen_ns)),
                ))
        }))
    }

    fn pin(&self, service: &Service, client: IpAddr, backend_id: u32) -> Result<(), DatapathError> {
        let value = AffinityValue {
            backend: backend_id,
            home: lb_common::maps::NO_BACKEND,
            last_seen_ns: self.clock(Instant::now()),
        };
        self.affinity.pin().insert((service.id, client), value);
        self.make_room(value.last_seen_ns);
        Ok(())
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

    fn connect(b: &Balancer, client: IpAddr, now: Instant) -> Choice {
        let c = b.choose("web", client, now, &[]).unwrap();
        b.confirm("web", client, c.chosen(), now);
        c
    }

    fn set(b: &Balancer, backend: &str, state: AdminState) {
        b.apply(Command::SetState {
            service: "web".into(),
            backend: backend.into(),
            state,
        })
        .unwrap();
    }

    #[test]
    fn affinity_holds_across_connections_and_ring_changes() {
        let b = Balancer::new(three());
        let now = Instant::now();
        let first = connect(&b, ip(1), now);
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
            let again = connect(&b, ip(1), now);
            assert_eq!(again.backend_id, first.backend_id);
            assert_eq!(again.reason, Reason::Affinity);
        }
    }

    #[test]
    fn different_clients_spread() {
        let b = Balancer::new(three());
        let now = Instant::now();
        let mut counts = [0; 3];
        for i in 0..3000 {
            counts[connect(&b, ip(i), now).backend_id as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "counts {counts:?}");
        }
    }

    #[test]
    fn drain_keeps_known_clients_and_refuses_new() {
        let b = Balancer::new(three());
        let now = Instant::now();
        let known: Vec<_> = (0..300)
            .map(|i| (ip(i), connect(&b, ip(i), now).backend_id))
            .collect();
        set(&b, "b1", AdminState::Drain);
        for (client, id) in &known {
            assert_eq!(connect(&b, *client, now).backend_id, *id);
        }
        for i in 1000..1300 {
            assert_ne!(connect(&b, ip(i), now).backend_name, "b1");
        }
    }

    #[test]
    fn maintenance_and_down_admit_nobody_and_client_sticks_to_new_backend() {
        for down in [true, false] {
            let b = Balancer::new(three());
            let now = Instant::now();
            let client = first_client_on(&b, "b1", now);
            connect(&b, client, now);
            if down {
                b.apply(health("b1", Health::Down)).unwrap();
            } else {
                set(&b, "b1", AdminState::Maintenance);
            }
            let moved = connect(&b, client, now);
            assert_ne!(moved.backend_name, "b1");
            // b1 returns: the client does not fail back.
            b.apply(health("b1", Health::Up)).unwrap();
            set(&b, "b1", AdminState::Active);
            let later = connect(&b, client, now);
            assert_eq!(later.backend_id, moved.backend_id);
            assert_eq!(later.reason, Reason::Affinity);
        }
    }

    #[test]
    fn affinity_expires() {
        let b = Balancer::new(three());
        let t0 = Instant::now();
        let client = ip(5);
        let first = connect(&b, client, t0);
        set(&b, &first.backend_name, AdminState::Drain);
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

    /// Adds a backup `spare` and puts every primary in maintenance.
    fn only_the_spare_left(b: &Balancer) {
        let mut spare = backend("spare", "10.1.4.2:80");
        spare.backup = true;
        b.apply(Command::AddBackend {
            service: "web".into(),
            backend: spare,
        })
        .unwrap();
        for n in ["b1", "b2", "b3"] {
            set(b, n, AdminState::Maintenance);
        }
    }

    #[test]
    fn backups_take_over_and_keep_their_clients() {
        let b = Balancer::new(three());
        only_the_spare_left(&b);
        let now = Instant::now();
        assert_eq!(connect(&b, ip(1), now).backend_name, "spare");
        set(&b, "b2", AdminState::Active);
        assert_eq!(
            connect(&b, ip(1), now).backend_name,
            "spare",
            "pinned client stays on the backup"
        );
        assert_eq!(
            connect(&b, ip(2), now).backend_name,
            "b2",
            "new clients go to the primary"
        );
    }

    #[test]
    fn failback_returns_failed_over_clients_only_when_enabled() {
        for failback in [false, true] {
            let b = with_failback(failback);
            let now = Instant::now();
            let on_b1: Vec<_> = (0..300)
                .map(ip)
                .filter(|c| connect(&b, *c, now).backend_name == "b1")
                .collect();
            b.apply(health("b1", Health::Down)).unwrap();
            for c in &on_b1 {
                assert_ne!(connect(&b, *c, now).backend_name, "b1");
            }
            b.apply(health("b1", Health::Up)).unwrap();
            let back = on_b1
                .iter()
                .filter(|c| connect(&b, **c, now).backend_name == "b1")
                .count();
            assert_eq!(
                back,
                if failback { on_b1.len() } else { 0 },
                "failback = {failback}"
            );
        }
    }

    #[test]
    fn a_connection_confirmed_across_a_failback_does_not_pin_its_client() {
        let b = failing_back();
        let now = Instant::now();
        let client = first_client_on(&b, "b1", now);
        connect(&b, client, now);
        b.apply(health("b1", Health::Down)).unwrap();
        let moved = connect(&b, client, now);
        assert_ne!(moved.backend_name, "b1");
        // A connection chosen by the failed-over entry, confirmed after b1 came back (the
        // failback forgot that entry in between).
        let in_flight = b.choose("web", client, now, &[]).unwrap();
        assert_eq!(in_flight.reason, Reason::Affinity);
        b.apply(health("b1", Health::Up)).unwrap();
        b.confirm("web", client, in_flight.chosen(), now);
        assert_eq!(
            connect(&b, client, now).backend_name,
            "b1",
            "the client fails back"
        );
    }

    fn failing_back() -> Balancer {
        with_failback(true)
    }

    /// The three-backend service with `failback` set as given.
    fn with_failback(failback: bool) -> Balancer {
        let mut s = three();
        let mut svc = s.service("web").unwrap().settings.clone();
        svc.failback = failback;
        s.apply(Command::UpdateService { service: svc }).unwrap();
        Balancer::new(s)
    }

    /// The first test client the ring sends to `backend`.
    fn first_client_on(b: &Balancer, backend: &str, now: Instant) -> IpAddr {
        (0..100)
            .map(ip)
            .find(|c| b.choose("web", *c, now, &[]).unwrap().backend_name == backend)
            .unwrap()
    }

    fn health(backend: &str, health: Health) -> Command {
        Command::SetHealth {
            service: "web".into(),
            backend: backend.into(),
            health,
        }
    }

    #[test]
    fn a_ring_choice_overtaken_by_a_failback_does_not_pin_its_client_away_from_home() {
        let b = failing_back();
        let now = Instant::now();
        let client = first_client_on(&b, "b1", now);
        connect(&b, client, now);
        b.apply(health("b1", Health::Down)).unwrap();
        // Chosen from the ring while b1 is down, confirmed once it is back: the entry would say
        // "failed over from b1", which the failback has already sent home.
        let in_flight = b.choose("web", client, now, &[]).unwrap();
        assert_eq!(in_flight.reason, Reason::Ring);
        assert_ne!(in_flight.backend_name, "b1");
        b.apply(health("b1", Health::Up)).unwrap();
        b.confirm("web", client, in_flight.chosen(), now);
        assert_eq!(
            connect(&b, client, now).backend_name,
            "b1",
            "the client fails back"
        );
        // Without a failback in between, the same kind of choice is recorded as it always was.
        b.apply(health("b1", Health::Down)).unwrap();
        let moved = connect(&b, client, now);
        assert_eq!(connect(&b, client, now).backend_id, moved.backend_id);
    }

    #[test]
    fn a_backup_choice_overtaken_by_a_failback_does_not_pin_its_client_to_the_backup() {
        let b = failing_back();
        only_the_spare_left(&b);
        let now = Instant::now();
        let in_flight = b.choose("web", ip(1), now, &[]).unwrap();
        assert_eq!(in_flight.backend_name, "spare");
        set(&b, "b2", AdminState::Active);
        b.confirm("web", ip(1), in_flight.chosen(), now);
        assert_eq!(b.affinity_len("web"), 0);
        assert_eq!(connect(&b, ip(1), now).backend_name, "b2");
    }

    #[test]
    fn a_full_table_drops_expired_entries_then_the_oldest() {
        let b = Balancer::with_capacity(three(), 64);
        let t0 = Instant::now();
        // 40 clients that will have expired (the timeout is 600 s), then 40 live ones.
        for i in 0..40 {
            connect(&b, ip(i), t0);
        }
        let t1 = t0 + Duration::from_secs(1000);
        for i in 40..80 {
            connect(&b, ip(i), t1 + Duration::from_millis(u64::from(i)));
        }
        let left: Vec<u32> = (0..80)
            .filter(|i| {
                b.affinity_age("web", ip(*i), t1 + Duration::from_secs(1))
                    .is_some()
            })
            .collect();
        assert_eq!(left, (40..80).collect::<Vec<_>>(), "the expired went first");
        assert!(b.affinity.len() <= 64);
        // 60 more live clients: the table stays within its capacity by dropping the oldest.
        let t2 = t1 + Duration::from_secs(1);
        for i in 80..140 {
            connect(&b, ip(i), t2 + Duration::from_millis(u64::from(i)));
        }
        assert!(b.affinity.len() <= 64, "{} entries", b.affinity.len());
        let newest = b.affinity_age("web", ip(139), t2 + Duration::from_secs(1));
        assert!(newest.is_some(), "the newest client keeps its entry");
        assert!(
            b.affinity_age("web", ip(40), t2 + Duration::from_secs(1))
                .is_none(),
            "the oldest live client lost its entry"
        );
    }

    /// A full table makes room in the service that holds the most entries: a flood of new
    /// addresses on one service does not push the older clients of another out.
    #[test]
    fn a_full_table_makes_room_in_the_service_with_the_most_entries() {
        let mut state = three();
        let mut api = state.service("web").unwrap().settings.clone();
        api.name = "api".into();
        api.listen = "10.0.0.101:80".parse().unwrap();
        api.backends = vec![backend("a1", "10.1.9.2:80")];
        state.apply(Command::AddService { service: api }).unwrap();
        let b = Balancer::with_capacity(state, 64);
        let t0 = Instant::now();
        for i in 0..10 {
            let c = b.choose("api", ip(i), t0, &[]).unwrap();
            b.confirm("api", ip(i), c.chosen(), t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        for i in 100..300 {
            connect(&b, ip(i), t1 + Duration::from_millis(u64::from(i)));
        }
        assert!(b.affinity.len() <= 64, "{} entries", b.affinity.len());
        let now = t1 + Duration::from_secs(1);
        assert!(
            (0..10).all(|i| b.affinity_age("api", ip(i), now).is_some()),
            "api's clients keep their entries"
        );
        assert!(
            b.affinity_age("web", ip(299), now).is_some(),
            "the newest web client too"
        );
        assert!(
            b.affinity_age("web", ip(100), now).is_none(),
            "web's oldest made the room"
        );
    }

    /// Selections from several threads, refreshing the entries they follow, while b1 goes down
    /// (its clients fail over) and comes back (`failback = true` sends them home): a selection
    /// never reads the state after a failback together with an entry that failback forgot, and no
    /// refresh confirmed across a failback brings one back. (Ring choices confirmed across a
    /// failback: `a_ring_choice_overtaken_by_a_failback_…`; here the test's own pins would race
    /// them.)
    #[test]
    fn selections_racing_failbacks_never_see_an_entry_the_failback_forgot() {
        use std::sync::atomic::AtomicUsize;
        let b = failing_back();
        let b1 = b
            .snapshot()
            .state
            .service("web")
            .unwrap()
            .backend_by_id(0)
            .unwrap()
            .id;
        let clients: Vec<IpAddr> = (0..64).map(ip).collect();
        let (stop, seen) = (AtomicBool::new(false), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for part in clients.chunks(32) {
                let (b, stop, seen) = (&b, &stop, &seen);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for c in part {
                            let Read { snapshot, entry, .. } = b.read("web", *c).unwrap();
                            let home_is_back = snapshot
                                .state
                                .service("web")
                                .unwrap()
                                .backend_by_id(b1)
                                .unwrap()
                                .admits_new();
                            if let Some(e) = entry.filter(|e| e.home == b1) {
                                assert!(!home_is_back, "{e:?} read with b1 back");
                                seen.fetch_add(1, Ordering::Relaxed);
                            }
                            drop(snapshot);
                            let now = Instant::now();
                            let choice = b.choose("web", *c, now, &[]).unwrap();
                            if choice.reason == Reason::Affinity {
                                b.confirm("web", *c, choice.chosen(), now);
                            }
                        }
                    }
                });
            }
            let web = b.snapshot().state.service("web").unwrap().clone();
            for _ in 0..200 {
                // Every client on b1, then failed over from it, then sent home.
                for c in &clients {
                    b.pin(&web, *c, b1).unwrap();
                }
                b.apply(health("b1", Health::Down)).unwrap();
                for c in &clients {
                    connect(&b, *c, Instant::now());
                }
                b.apply(health("b1", Health::Up)).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(seen.into_inner() > 0, "no failed-over entry was ever read");
        for c in &clients {
            let entry = b.read("web", *c).unwrap().entry;
            assert!(
                entry.is_none_or(|e| e.home != b1),
                "{c} still failed over from b1"
            );
        }
    }

    #[test]
    fn zero_timeout_means_no_affinity() {
        let mut s = three();
        let mut svc = s.service("web").unwrap().settings.clone();
        svc.affinity_timeout = Duration::ZERO;
        s.apply(Command::UpdateService { service: svc }).unwrap();
        let b = Balancer::new(s);
        connect(&b, ip(1), Instant::now());
        assert_eq!(b.affinity_len("web"), 0);
    }
}

#[cfg(test)]
mod agree;
