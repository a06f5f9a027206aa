//! Passive health (`[service.health] observe = "layer4"`): what real client connections say about
//! a backend, next to the active checks.
//!
//! Every datapath gets one [`Passive`] handle from the engine and reports each connect to a backend
//! through it: [`Passive::connected`] or [`Passive::failed`] (refused, timed out). `error_limit`
//! failures in a row mark the backend down at once: its check status turns down (so the active
//! checks need `rise` successes to bring it back) and a [`HealthEvent`] with
//! [`HealthSource::Passive`] goes into the same pipeline as the checkers' transitions. A success
//! resets the count. A datapath that only sees counts (the kernel's per-backend counters, polled)
//! reports them with [`Passive::counted`], and failures a client can cause itself (SYNs the
//! backend's kernel dropped as invalid) with [`Passive::counted_unconfirmed`]: a probe must fail
//! too before those mark the backend down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{HealthEvent, HealthSource};
use crate::config::HealthKind;
use crate::runtime::BackendRuntime;
use crate::state::{Backend, Health, Service};

/// One backend's connect failures since its last success (kept in its runtime).
#[derive(Debug, Default)]
pub struct FailureCount {
    /// Consecutive failed connects.
    failed: AtomicU32,
    /// Apart from them: unanswered SYNs not yet confirmed by a probe.
    unconfirmed: AtomicU32,
    /// Whether a probe confirming them is under way.
    probing: AtomicBool,
    /// When the last such probe started (ms, Unix time).
    probed_ms: AtomicU64,
}

impl FailureCount {
    pub fn get(&self) -> u32 {
        self.failed.load(Ordering::Relaxed)
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
        runtime.passive.failed.store(0, Ordering::Relaxed);
        runtime.passive.unconfirmed.store(0, Ordering::Relaxed);
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
        let count = &runtime.passive.failed;
        let seen = count
            .fetch_add(failures, Ordering::Relaxed)
            .saturating_add(failures);
        if then_ok {
            count.store(0, Ordering::Relaxed);
        }
        if seen < health.error_limit {
            return false;
        }
        count.store(0, Ordering::Relaxed);
        if backend.health == Health::Down {
            return false;
        }
        let reason = format!("{seen} connect failures in a row (last: {why})");
        self.mark_down(&service.settings.name, backend.config.address, runtime, reason)
    }

    /// [`Passive::counted`] for SYNs the kernel forwarded that no answer met within
    /// `connect_timeout`. A client can send SYNs the backend's kernel drops (a bad checksum, say),
    /// so these alone do not mark the backend down: once they reach `error_limit`, a probe as the
    /// checks make one decides. It runs in the background; the backend goes down only if it fails
    /// too (a black-holed backend: within `connect_timeout` and the check's `timeout`).
    pub fn counted_unconfirmed(
        &self,
        service: &Service,
        backend: &Backend,
        runtime: &Arc<BackendRuntime>,
        failures: u32,
        why: &str,
    ) {
        let health = &service.settings.health;
        if !health.passive() || health.kind == HealthKind::None || failures == 0 {
            return;
        }
        // Counted apart from refusals: junk SYNs must not bring a real refusal's mark-down closer.
        let count = &runtime.passive.unconfirmed;
        let seen = count
            .fetch_add(failures, Ordering::Relaxed)
            .saturating_add(failures);
        if seen < health.error_limit {
            return;
        }
        count.store(0, Ordering::Relaxed);
        if backend.health == Health::Down {
            return;
        }
        // At most one probe per `fast_interval`: spoofed SYNs cannot make lb probe the backend
        // (and log) at their own rate.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = runtime.passive.probed_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < health.fast_interval.as_millis() as u64 {
            return;
        }
        if runtime.passive.probing.swap(true, Ordering::AcqRel) {
            return; // a probe is under way
        }
        runtime.passive.probed_ms.store(now_ms, Ordering::Relaxed);
        let passive = self.clone();
        let (name, address, health, runtime) = (
            service.settings.name.clone(),
            backend.config.address,
            health.clone(),
            runtime.clone(),
        );
        let reason = format!("{seen} connect failures in a row (last: {why})");
        tokio::spawn(async move {
            let target = SocketAddr::new(address.ip(), health.port.unwrap_or(address.port()));
            let result = super::probe(health.kind, target, health.timeout).await;
            runtime.passive.probing.store(false, Ordering::Release);
            match result {
                Ok(_) => info!(service = %name, backend = %address, %reason,
                    "passive health: SYNs went unanswered, but the backend answers a check: not marked down (were they invalid?)"),
                Err(super::ProbeError::Local(_)) => {}
                Err(e) => {
                    if passive.mark_down(
                        &name,
                        address,
                        &runtime,
                        format!("{reason}; a check failed too: {e}"),
                    ) {
                        warn!(service = %name, backend = %address,
                            "passive health: backend marked down after unanswered SYNs and a failed check");
                    }
                }
            }
        });
    }

    /// Marks the backend down for passive health (`reason`), unless its checks already have.
    /// Returns whether this call did.
    fn mark_down(
        &self,
        service: &str,
        address: SocketAddr,
        runtime: &BackendRuntime,
        reason: String,
    ) -> bool {
        let before = {
            // The check status decides who reports the transition: only the first to see it up.
            let mut check = runtime.check.lock().unwrap();
            if check.health == Health::Down {
                return false;
            }
            let before = check.clone();
            check.mark_down(&format!("passive: {reason}"));
            before
        };
        let event = HealthEvent {
            service: service.to_string(),
            backend: address,
            health: Health::Down,
            reason,
            source: HealthSource::Passive,
        };
        if let Err(e) = self.events.try_send(event) {
            // Not applied: the checks keep the say they had.
            *runtime.check.lock().unwrap() = before;
            warn!(%service, backend = %address, error = %e,
                "passive health: transition not delivered; the active checks will decide");
            return false;
        }
        true
    }
}
