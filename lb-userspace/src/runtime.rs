//! Live data kept apart from the plain [`State`]: per-backend traffic counters, the token that
//! resets a backend's connections, its transition log and its health-check status (the rise/fall
//! machine the checker in [`crate::health`] drives), in a
//! [`Registry`] keyed by (service id, backend id), published with the state in a [`Snapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::state::{Backend, Health, RECENT_TRANSITIONS, Service, State, Transition, TransitionKind};

/// Traffic counters of one backend, bumped by the user-space datapaths' connection tasks.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub active_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Bytes from client to backend.
    pub bytes_in: AtomicU64,
    /// Bytes from backend to client.
    pub bytes_out: AtomicU64,
    /// When the backend last sent a response packet (AJP datapath), in ms after [`EPOCH`] plus
    /// one; 0: never.
    last_answer_ms: AtomicU64,
    /// When a request last came to it by its session route (AJP datapath), likewise.
    last_session_ms: AtomicU64,
}

/// The clock origin of [`BackendStats`]' times.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Stores now (ms after [`EPOCH`], plus one) unless it is there already.
fn stamp(at: &AtomicU64) {
    let ms = EPOCH.elapsed().as_millis() as u64 + 1;
    if at.load(Ordering::Relaxed) != ms {
        at.store(ms, Ordering::Relaxed);
    }
}

/// How long ago [`stamp`] stored `at`, if it has.
fn since(at: &AtomicU64) -> Option<Duration> {
    match at.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(EPOCH.elapsed().saturating_sub(Duration::from_millis(ms - 1))),
    }
}

impl BackendStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The backend sent part of a response just now.
    pub fn answered(&self) {
        stamp(&self.last_answer_ms);
    }

    /// How long ago the backend last sent part of a response, if it has.
    pub fn since_answer(&self) -> Option<Duration> {
        since(&self.last_answer_ms)
    }

    /// A request just came to the backend by its session route.
    pub fn session_seen(&self) {
        stamp(&self.last_session_ms);
    }

    /// How long ago a request last came to the backend by its session route, if one has. A
    /// browser whose requests all follow its session refreshes no address affinity entry, so a
    /// draining backend with such a user is not drained.
    pub fn since_session(&self) -> Option<Duration> {
        since(&self.last_session_ms)
    }

    /// Whether the backend is busy rather than down: it sent part of a response within `window`.
    /// A check or a new connection's CPing that times out then (every thread of a Tomcat serving
    /// requests, none free to read it) is not the backend's failure.
    pub fn busy_within(&self, window: Duration) -> bool {
        self.since_answer().is_some_and(|d| d <= window)
    }
}

/// Transition counts since the backend was added, and the last [`RECENT_TRANSITIONS`] of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransitionLog {
    pub health: u64,
    pub state: u64,
    recent: std::collections::VecDeque<Transition>,
}

impl TransitionLog {
    /// Counts `t` and keeps it, dropping the oldest beyond [`RECENT_TRANSITIONS`].
    pub fn record(&mut self, t: Transition) {
        match t.kind {
            // Saturating: a state file may bring back any count.
            TransitionKind::Health => self.health = self.health.saturating_add(1),
            TransitionKind::State => self.state = self.state.saturating_add(1),
        }
        if self.recent.len() == RECENT_TRANSITIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(t);
    }

    /// A log with the given counts and kept transitions (from a state file), oldest first.
    pub fn restored(health: u64, state: u64, recent: impl IntoIterator<Item = Transition>) -> TransitionLog {
        let mut log = TransitionLog {
            health,
            state,
            recent: Default::default(),
        };
        for t in recent {
            if log.recent.len() == RECENT_TRANSITIONS {
                log.recent.pop_front();
            }
            log.recent.push_back(t);
        }
        log
    }

    /// The kept transitions, oldest first.
    pub fn recent(&self) -> impl DoubleEndedIterator<Item = &Transition> {
        self.recent.iter()
    }
}

/// The rise/fall state machine of one backend and what `lb status` shows about its checks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckStatus {
    pub health: Health,
    /// "ok" or the failure reason of the last probe.
    pub last_result: String,
    pub last_latency_ms: Option<f64>,
    pub consecutive_ok: u32,
    pub consecutive_failed: u32,
    pub checks: u64,
    /// Of `checks`, how many failed.
    #[serde(default)]
    pub failed_checks: u64,
    pub transitions: u64,
    /// Unix time (seconds) of the last transition, or of the first check.
    pub since_unix: u64,
    /// Seconds since then (filled in by [`CheckStatus::snapshot`]).
    #[serde(default)]
    pub since_secs: u64,
    #[serde(skip)]
    since: Option<Instant>,
}

impl Default for CheckStatus {
    fn default() -> Self {
        CheckStatus {
            health: Health::Up,
            last_result: "not checked yet".into(),
            last_latency_ms: None,
            consecutive_ok: 0,
            consecutive_failed: 0,
            checks: 0,
            failed_checks: 0,
            transitions: 0,
            since_unix: unix_now(),
            since_secs: 0,
            since: Some(Instant::now()),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CheckStatus {
    /// Records a probe result; returns the new health when it changed.
    pub fn record<E: std::fmt::Display>(
        &mut self,
        result: &Result<Duration, E>,
        rise: u32,
        fall: u32,
    ) -> Option<Health> {
        self.checks += 1;
        match result {
            Ok(latency) => {
                self.consecutive_ok += 1;
                self.consecutive_failed = 0;
                self.last_result = "ok".into();
                self.last_latency_ms = Some(latency.as_secs_f64() * 1000.0);
            }
            Err(e) => {
                self.failed_checks += 1;
                self.consecutive_failed += 1;
                self.consecutive_ok = 0;
                self.last_result = e.to_string();
                self.last_latency_ms = None;
            }
        }
        let next = match self.health {
            Health::Up if self.consecutive_failed >= fall => Health::Down,
            Health::Down if self.consecutive_ok >= rise => Health::Up,
            h => h,
        };
        if next == self.health {
            return None;
        }
        self.health = next;
        self.transitions += 1;
        self.since_unix = unix_now();
        self.since = Some(Instant::now());
        Some(next)
    }

    /// Passive health marked the backend down (`reason`): the checks now need `rise` successes.
    pub fn mark_down(&mut self, reason: &str) {
        self.health = Health::Down;
        self.consecutive_ok = 0;
        self.last_result = reason.to_string();
        self.last_latency_ms = None;
        self.transitions += 1;
        self.since_unix = unix_now();
        self.since = Some(Instant::now());
    }

    /// A copy for display, with `since_secs` current.
    pub fn snapshot(&self) -> CheckStatus {
        CheckStatus {
            since_secs: self.since.map_or(0, |s| s.elapsed().as_secs()),
            ..self.clone()
        }
    }
}

/// Everything live about one backend.
#[derive(Debug, Default)]
pub struct BackendRuntime {
    pub stats: BackendStats,
    /// Cancelled to reset the backend's open connections (`on_down = "reset"`); replaced afterwards.
    reset: Mutex<CancellationToken>,
    /// Health and operator state changes: counts and the most recent ones.
    pub transitions: Mutex<TransitionLog>,
    /// Health-check state machine and last result, shared with the backend's checker task.
    pub check: Arc<Mutex<CheckStatus>>,
    /// Connect failures in a row seen by the datapaths (passive health).
    pub passive: crate::health::passive::FailureCount,
}

impl BackendRuntime {
    /// The token a new connection watches: cancelled by [`BackendRuntime::reset_connections`].
    pub fn reset_token(&self) -> CancellationToken {
        self.reset.lock().unwrap().clone()
    }

    /// Resets every open connection to this backend; later connections are not affected.
    pub fn reset_connections(&self) {
        std::mem::take(&mut *self.reset.lock().unwrap()).cancel();
    }
}

/// The runtime of every backend of a state, by (service id, backend id).
#[derive(Clone, Debug, Default)]
pub struct Registry(BTreeMap<(u32, u32), Arc<BackendRuntime>>);

impl Registry {
    /// The registry for `state`: backends that stay keep their runtime, new ones get a fresh one,
    /// removed ones are dropped.
    pub fn follow(&self, state: &State) -> Registry {
        let mut next = BTreeMap::new();
        for svc in state.services.values() {
            for b in &svc.backends {
                let key = (svc.id, b.id);
                next.insert(key, self.0.get(&key).cloned().unwrap_or_default());
            }
        }
        Registry(next)
    }

    pub fn get(&self, service: &Service, backend: &Backend) -> Arc<BackendRuntime> {
        self.0
            .get(&(service.id, backend.id))
            .cloned()
            .expect("the registry follows every published state")
    }
}

/// A state with the runtime of its backends: what readers see, replaced as a whole on each change.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub runtime: Registry,
}

impl Snapshot {
    pub fn new(state: State) -> Self {
        let runtime = Registry::default().follow(&state);
        Snapshot { state, runtime }
    }

    /// The runtime of a backend of this snapshot.
    pub fn runtime(&self, service: &Service, backend: &Backend) -> Arc<BackendRuntime> {
        self.runtime.get(service, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_log_keeps_the_last_ones_and_counts_all() {
        let mut log = TransitionLog::default();
        for i in 0..(RECENT_TRANSITIONS as u64 + 5) {
            log.record(Transition {
                unix_ms: i,
                kind: if i % 2 == 0 {
                    TransitionKind::Health
                } else {
                    TransitionKind::State
                },
                from: "a".into(),
                to: "b".into(),
                reason: format!("r{i}"),
            });
        }
        assert_eq!(log.health + log.state, RECENT_TRANSITIONS as u64 + 5);
        assert_eq!((log.health, log.state), (11, 10));
        let kept: Vec<u64> = log.recent().map(|t| t.unix_ms).collect();
        assert_eq!(kept, (5..RECENT_TRANSITIONS as u64 + 5).collect::<Vec<_>>());
    }

    #[test]
    fn registry_keeps_runtime_of_backends_that_stay() {
        use crate::state::Command;
        let mut state = crate::state::tests::three();
        let snap = Snapshot::new(state.clone());
        let svc = snap.state.service("web").unwrap();
        let b2 = snap.runtime(svc, svc.backend("b2").unwrap());
        b2.stats.total_connections.fetch_add(5, Ordering::Relaxed);
        state
            .apply(Command::RemoveBackend {
                service: "web".into(),
                backend: "b1".into(),
            })
            .unwrap();
        let next = snap.runtime.follow(&state);
        let svc = state.service("web").unwrap();
        assert!(Arc::ptr_eq(&next.get(svc, svc.backend("b2").unwrap()), &b2));
        assert_eq!(next.0.len(), 2);
    }
}
