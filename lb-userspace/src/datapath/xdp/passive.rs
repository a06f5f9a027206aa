//! Kernel passive health in user space ([`lb_common::passive`]): the XDP program's per-backend
//! handshake counters polled every [`POLL_MS`] ms into [`Passive`], the refusing marks kept until a
//! check passes, and each service's fallback list of backups written with its ring.
//!
//! Per backend of an XDP service with `observe = "layer4"`, each poll turns the counters' growth
//! into connect outcomes: SYNs answered by an RST (or by a stale answer the kernel turned into one)
//! are refused connects; SYNs forwarded before
//! `now − connect_timeout` that no answer (SYN-ACK or RST) has met yet, and were not counted yet,
//! timed out (the history of the SYN counter gives what was forwarded by then); SYN-ACKs with no
//! failure in the same poll are successes. `error_limit` failures in a row mark the backend down
//! (reason "passive"), and the active checks bring it back with `rise`.
//!
//! The kernel marks a backend refusing at its first RST to a SYN, or its second stale answer in a
//! row (a bare ACK from TIME_WAIT; new connections go elsewhere for [`REFUSING_NS`]). Where checks
//! run, the poller keeps the mark fresh until a check passes after it, then clears it: a backend
//! that refuses gets no new clients while a healthy one exists, until it is shown to listen again.

use std::collections::{HashMap as StdHashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, MapData, PerCpuArray};
use lb_common::hash::{client_hash, ring_slot};
use lb_common::maps::NO_BACKEND;
use lb_common::passive::{
    FALLBACK_SLOTS, Fallback, Liveness, MAP_ALIVE, MAP_FALLBACK, MAP_PASSIVE, MAP_REFUSING, POLL_MS,
    PassiveCounters, REFUSING_NS, RING_PROBES, refusing,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Inner, XdpDatapath, XdpError, map_err, monotonic_ns, take};
use crate::balancer::Balancer;
use crate::config::{DatapathKind, HealthKind};
use crate::health::passive::Passive;
use crate::runtime::Snapshot;
use crate::state::Service;

/// The program's passive-health maps and what user space last wrote into them.
pub(super) struct PassiveMaps {
    counters: PerCpuArray<MapData, PassiveCounters>,
    refusing: Array<MapData, u64>,
    /// The kernel's liveness per backend (cleared when an index changes hands).
    alive: Array<MapData, Liveness>,
    fallback: Array<MapData, Fallback>,
    /// Fallback lists as written, by service slot.
    written: StdHashMap<u32, Fallback>,
}

impl PassiveMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<PassiveMaps, XdpError> {
        Ok(PassiveMaps {
            counters: take(ebpf, MAP_PASSIVE)?,
            refusing: take(ebpf, MAP_REFUSING)?,
            alive: take(ebpf, MAP_ALIVE)?,
            fallback: take(ebpf, MAP_FALLBACK)?,
            written: StdHashMap::new(),
        })
    }

    /// Service `slot` is gone: its fallback list is emptied (the slot may serve another service).
    pub(super) fn forget_service(&mut self, slot: u32) -> Result<(), XdpError> {
        self.fallback
            .set(slot, Fallback::NONE, 0)
            .map_err(map_err(MAP_FALLBACK))?;
        self.written.insert(slot, Fallback::NONE);
        Ok(())
    }

    /// Backend `index` was given to a new backend: no refusing mark or liveness carries over.
    pub(super) fn forget(&mut self, index: u32) -> Result<(), XdpError> {
        self.refusing.set(index, 0, 0).map_err(map_err(MAP_REFUSING))?;
        self.alive
            .set(index, Liveness::default(), 0)
            .map_err(map_err(MAP_ALIVE))
    }

    /// Writes service `slot`'s fallback list: its backups that take new clients (by kernel index,
    /// `index_of` a state id), while its ring is made of primaries; none otherwise.
    pub(super) fn sync_fallback(
        &mut self,
        slot: u32,
        svc: &Service,
        index_of: impl Fn(u32) -> u32,
    ) -> Result<(), XdpError> {
        let mut backups: Vec<u32> = Vec::new();
        if !svc.ring_uses_backups {
            backups = svc
                .backends
                .iter()
                .filter(|b| b.config.backup && b.admits_new())
                .map(|b| index_of(b.id))
                .filter(|i| *i != NO_BACKEND)
                .collect();
            backups.sort_unstable();
            backups.truncate(FALLBACK_SLOTS);
        }
        let list = Fallback::of(&backups);
        if self.written.get(&slot) != Some(&list) {
            self.fallback.set(slot, list, 0).map_err(map_err(MAP_FALLBACK))?;
            self.written.insert(slot, list);
        }
        Ok(())
    }

    /// Where the kernel sends a new connection of `client` (host order) to service `slot` whose
    /// choice `avoid` is refusing, as `lb_ebpf::passive::elsewhere` does: a backend of the next
    /// [`RING_PROBES`] slots of `ring` (kernel indices) that is not refusing, else a backup of the
    /// fallback list; with what it is. `None`: `avoid` is not refusing, or nobody better.
    pub(super) fn steer(
        &self,
        slot: u32,
        ring: &[u32],
        seed: u32,
        client: u32,
        avoid: u32,
        now: u64,
    ) -> Option<(u32, &'static str)> {
        let refusing_now = |i: u32| refusing(self.refusing.get(&i, 0).unwrap_or(0), now);
        if ring.is_empty() || !refusing_now(avoid) {
            return None;
        }
        let first = ring_slot(seed, client, ring.len() as u32) as usize;
        for step in 0..RING_PROBES as usize {
            let b = ring[(first + step) % ring.len()];
            if b != NO_BACKEND && b != avoid && !refusing_now(b) {
                return Some((b, "a later ring slot"));
            }
        }
        let list = self.written.get(&slot)?;
        let start = client_hash(seed, client) as usize;
        (0..FALLBACK_SLOTS)
            .map(|i| list.backends[(start + i) & (FALLBACK_SLOTS - 1)])
            .filter(|e| *e != 0)
            .map(|e| e - 1)
            .find(|b| *b != avoid && !refusing_now(*b))
            .map(|b| (b, "a backup"))
    }

    /// Backend `index`'s counters summed over CPUs.
    fn read(&self, index: u32) -> PassiveCounters {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().fold(PassiveCounters::default(), |a, c| a.add(c)))
            .unwrap_or_default()
    }
}

/// What the poller remembers of one backend (by kernel index).
struct Watch {
    /// State id of the backend the index belonged to (an index is reused after removal).
    backend_id: u32,
    /// Counters when the watch began and at the last poll.
    start: PassiveCounters,
    last: PassiveCounters,
    /// (time, SYN counter) samples covering at least `connect_timeout`.
    history: VecDeque<(Instant, u64)>,
    /// SYNs counted as timed out that no answer has met since.
    missing: u64,
    /// The refusing mark as last seen or written, and the check count when it was set.
    mark: Option<(u64, u64)>,
}

impl Watch {
    fn new(backend_id: u32, now: PassiveCounters) -> Watch {
        Watch {
            backend_id,
            start: now,
            last: now,
            history: VecDeque::new(),
            missing: 0,
            mark: None,
        }
    }

    /// (refused, timed out, answered) since the last poll, given the counters `c` at `at`.
    fn outcomes(&mut self, c: PassiveCounters, at: Instant, connect_timeout: Duration) -> (u64, u64, u64) {
        let refused = c.refused.saturating_sub(self.last.refused);
        let answered = c.answered.saturating_sub(self.last.answered);
        self.last = c;
        self.history.push_back((at, c.syns));
        // SYNs forwarded by `at − connect_timeout`: the newest sample at or before it (none yet:
        // the watch is younger, and only SYNs since it began count).
        let sent_by = at.checked_sub(connect_timeout).map_or(self.start.syns, |cutoff| {
            while self.history.len() >= 2 && self.history[1].0 <= cutoff {
                self.history.pop_front();
            }
            match self.history.front() {
                Some((t, syns)) if *t <= cutoff => *syns,
                _ => self.start.syns,
            }
        });
        let sent = sent_by.saturating_sub(self.start.syns);
        // A stale answer (a bare ACK of an old connection) answered its SYN too: the client was
        // reset or retries it, it never timed out here.
        let answers = (c.answered + c.refused + c.stale + c.collided).saturating_sub(
            self.start.answered + self.start.refused + self.start.stale + self.start.collided,
        );
        let missing = sent.saturating_sub(answers);
        let timed_out = missing.saturating_sub(self.missing);
        self.missing = missing;
        (refused, timed_out, answered)
    }
}

/// The poller's memory: watches by kernel backend index.
#[derive(Default)]
struct Poller {
    watches: StdHashMap<u32, Watch>,
}

impl Poller {
    /// One poll over every XDP service of `snapshot`.
    fn poll(&mut self, inner: &mut Inner, snapshot: &Snapshot, passive: &Passive) {
        let at = Instant::now();
        let now_ns = monotonic_ns();
        let mut seen = std::collections::HashSet::new();
        for svc in snapshot.state.services.values() {
            // Without checks there is neither passive health (nothing would bring a backend back)
            // nor a mark to keep (the kernel's window alone decides): nothing to read.
            if svc.settings.datapath != DatapathKind::Xdp || svc.settings.health.kind == HealthKind::None {
                continue;
            }
            let Some(ks) = inner.services.get(&svc.settings.name) else {
                continue;
            };
            let health = &svc.settings.health;
            for b in &svc.backends {
                let Some(&index) = ks.backends.get(&b.id) else {
                    continue;
                };
                seen.insert(index);
                let c = inner.passive.read(index);
                let w = self.watches.entry(index).or_insert_with(|| Watch::new(b.id, c));
                if w.backend_id != b.id {
                    *w = Watch::new(b.id, c);
                }
                let runtime = snapshot.runtime(svc, b);
                let (refused, timed_out, answered) = w.outcomes(c, at, svc.settings.connect_timeout);
                if health.passive() {
                    let n = |c: u64| u32::try_from(c).unwrap_or(u32::MAX);
                    // An RST is the backend's own answer; a SYN left unanswered may be one its
                    // kernel dropped as invalid (a client's doing), so a probe confirms those.
                    if refused > 0 {
                        let why = "refused: the backend answered the SYN with an RST";
                        if passive.counted(svc, b, &runtime, n(refused), false, why) {
                            warn!(service = %svc.settings.name, backend = %b.config.address, %why,
                                "passive health: backend marked down after connect failures seen by XDP");
                        }
                    }
                    if timed_out > 0 {
                        let why = format!(
                            "timed out: no SYN-ACK within connect_timeout {} ms",
                            svc.settings.connect_timeout.as_millis()
                        );
                        passive.counted_unconfirmed(svc, b, &runtime, n(timed_out), &why);
                    }
                    if refused + timed_out == 0 && answered > 0 {
                        passive.connected(&runtime);
                    }
                }
                // The refusing mark: kept fresh until a check passes after it, then cleared.
                let mark = inner.passive.refusing.get(&index, 0).unwrap_or(0);
                if !refusing(mark, now_ns) {
                    w.mark = None;
                    continue;
                }
                let (checks, ok) = {
                    let check = runtime.check.lock().unwrap();
                    (check.checks, check.consecutive_ok > 0)
                };
                let since = match w.mark {
                    Some((written, since)) if written == mark => since,
                    _ => checks, // set (again) by the kernel
                };
                if checks > since && ok {
                    if inner.passive.refusing.set(index, 0, 0).is_ok() {
                        info!(service = %svc.settings.name, backend = %b.config.address,
                            "XDP: a check passed since the backend refused a SYN; it takes new connections again");
                    }
                    w.mark = None;
                } else if now_ns.saturating_sub(mark) > REFUSING_NS / 4 {
                    let fresh = now_ns;
                    if inner.passive.refusing.set(index, fresh, 0).is_ok() {
                        w.mark = Some((fresh, since));
                    }
                } else {
                    w.mark = Some((mark, since));
                }
            }
        }
        self.watches.retain(|index, _| seen.contains(index));
    }
}

impl XdpDatapath {
    /// Starts the passive-health poller (needs a tokio runtime; without one nothing is started):
    /// every [`POLL_MS`] ms until `shutdown` or until the datapath is dropped.
    pub fn watch_passive(&self, balancer: Arc<Balancer>, passive: Passive, shutdown: CancellationToken) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let inner: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut poller = Poller::default();
            let mut tick = tokio::time::interval(Duration::from_millis(POLL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(inner) = inner.upgrade() else { return };
                let snapshot = balancer.snapshot();
                poller.poll(&mut inner.lock().unwrap(), &snapshot, &passive);
            }
        });
    }

    /// Per backend of `service` (by state id): the kernel's handshake counters, summed over CPUs,
    /// and whether it is marked refusing now.
    pub fn passive_counters(&self, service: &str) -> StdHashMap<u32, (PassiveCounters, bool)> {
        let inner = self.inner.lock().unwrap();
        let Some(ks) = inner.services.get(service) else {
            return StdHashMap::new();
        };
        let now = monotonic_ns();
        ks.backends
            .iter()
            .map(|(id, index)| {
                let mark = inner.passive.refusing.get(index, 0).unwrap_or(0);
                (*id, (inner.passive.read(*index), refusing(mark, now)))
            })
            .collect()
    }
}

impl XdpDatapath {
    /// Instructions the verifier processed to accept the program (its complexity budget is
    /// 1,000,000), when the kernel reports it.
    pub fn verified_instructions(&self) -> Option<u32> {
        let inner = self.inner.lock().unwrap();
        let program = inner.ebpf.program(super::loader::entry_point(inner.hook))?;
        program.info().ok()?.verified_instruction_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(syns: u64, answered: u64, refused: u64) -> PassiveCounters {
        PassiveCounters {
            syns,
            answered,
            refused,
            ..PassiveCounters::default()
        }
    }

    #[test]
    fn unanswered_syns_time_out_after_connect_timeout_once_each() {
        let ct = Duration::from_millis(100);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = Watch::new(1, c(10, 8, 2));
        // 5 SYNs, 3 answered; nothing is old enough yet.
        assert_eq!(w.outcomes(c(15, 11, 2), ms(10), ct), (0, 0, 3));
        assert_eq!(w.outcomes(c(15, 11, 2), ms(50), ct), (0, 0, 0));
        // At 115 ms the SYNs sent by 15 ms (5) are due: 3 answered, 2 timed out.
        assert_eq!(w.outcomes(c(16, 11, 2), ms(115), ct), (0, 2, 0));
        // Counted once.
        assert_eq!(w.outcomes(c(16, 11, 2), ms(130), ct), (0, 0, 0));
        // One of them is answered late: nothing new is due. Two more SYNs go out meanwhile.
        assert_eq!(w.outcomes(c(18, 12, 2), ms(140), ct), (0, 0, 1));
        // At 260 ms the three SYNs sent after 15 ms are due, unanswered.
        assert_eq!(w.outcomes(c(18, 12, 2), ms(260), ct), (0, 3, 0));
        // A late RST to one of them: refused, and no new timeout.
        assert_eq!(w.outcomes(c(18, 12, 3), ms(270), ct), (1, 0, 0));
    }

    #[test]
    fn answered_syns_never_time_out() {
        let ct = Duration::from_millis(20);
        let t0 = Instant::now();
        let mut w = Watch::new(1, c(0, 0, 0));
        for i in 1..50u64 {
            let at = t0 + Duration::from_millis(i * 10);
            assert_eq!(w.outcomes(c(i * 3, i * 3, 0), at, ct), (0, 0, 3));
        }
        assert!(w.history.len() <= 4, "history stays bounded: {}", w.history.len());
    }
}
