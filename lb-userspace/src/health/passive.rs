//! Passive health (`[service.health] observe = "layer4"`): what real client connections say about
//! a backend, next to the active checks.
//!
//! Every datapath gets one [`Passive`] handle from the engine and reports each connect to a backend
//! through it: [`Passive::connected`] or [`Passive::failed`] (refused, timed out). `error_limit`
//! failures in a row mark the backend down at once: its check status turns down (so the active
//! checks need `rise` successes to bring it back) and a [`HealthEvent`] with
//! [`HealthSource::Passive`] goes into the same pipeline as the checkers' transitions. A success
//! resets the count. A datapath that only sees counts (the kernel's per-backend counters, polled)
//! reports them with [`Passive::counted`].

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::mpsc;
use tracing::warn;

use super::{HealthEvent, HealthSource};
use crate::config::HealthKind;
use crate::runtime::BackendRuntime;
use crate::state::{Backend, Health, Service};

/// Consecutive connect failures of one backend since its last success (kept in its runtime).
#[derive(Debug, Default)]
pub struct FailureCount(AtomicU32);

impl FailureCount {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The handle through which a datapath reports connect outcomes; cheap to clone.
#[derive(Clone, Debug)]
pub struct Passive {
    events: mpsc::Sender<HealthEvent>,
}

impl Passive {
    /// Transitions are sent to `events`, the health pipeline the engine reads.
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        Passive { events }
    }

    /// A connect to `backend` succeeded: the count starts again.
    pub fn connected(&self, runtime: &BackendRuntime) {
        runtime.passive.0.store(0, Ordering::Relaxed);
    }

    /// A connect to `backend` of `service` failed (`why`: refused, timed out …). Returns whether
    /// this failure marked the backend down.
    pub fn failed(&self, service: &Service, backend: &Backend, runtime: &BackendRuntime, why: &str) -> bool {
        self.counted(service, backend, runtime, 1, false, why)
    }

    /// `failures` connect failures counted since the last report (a datapath that polls counters,
    /// such as the kernel's), and whether a success came after them (`then_ok`: the count restarts
    /// after they are judged). Returns whether they marked the backend down.
    pub fn counted(
        &self,
        service: &Service,
        backend: &Backend,
        runtime: &BackendRuntime,
        failures: u32,
        then_ok: bool,
        why: &str,
    ) -> bool {
        let health = &service.settings.health;
        // Without checks nothing would bring the backend back (the config refuses that pair).
        if !health.passive() || health.kind == HealthKind::None || failures == 0 {
            return false;
        }
        let count = &runtime.passive.0;
        let seen = count
            .fetch_add(failures, Ordering::Relaxed)
            .saturating_add(failures);
        if then_ok {
            count.store(0, Ordering::Relaxed);
        }
        if seen < health.error_limit {
            return false;
        }
        let reason = format!("{seen} connect failures in a row (last: {why})");
        let before = {
            // The check status decides who reports the transition: only the first to see it up.
            let mut check = runtime.check.lock().unwrap();
            count.store(0, Ordering::Relaxed);
            if check.health == Health::Down || backend.health == Health::Down {
                return false;
            }
            let before = check.clone();
            check.mark_down(&format!("passive: {reason}"));
            before
        };
        let event = HealthEvent {
            service: service.settings.name.clone(),
            backend: backend.config.address,
            health: Health::Down,
            reason,
            source: HealthSource::Passive,
        };
        if let Err(e) = self.events.try_send(event) {
            // Not applied: the checks keep the say they had.
            *runtime.check.lock().unwrap() = before;
            warn!(service = %service.settings.name, backend = %backend.config.address, error = %e,
                "passive health: transition not delivered; the active checks will decide");
            return false;
        }
        true
    }
}
