//! The proxy's worker threads: one single-threaded tokio runtime per CPU, each accepting from the
//! service's listening socket itself and relaying the connections it accepted. A connection's
//! readiness events, its task and its relay buffer stay on one thread: no wakeup crosses to
//! another core, which the shared multi-threaded runtime paid on every readiness event. Each
//! worker accepts only when it is free to, so connections spread by load, not by a hash as with
//! SO_REUSEPORT (where a few connections can land on one worker while the other idles).
//!
//! Each worker also keeps one timer armed at most [`TIMER_STEP`] ahead. tokio wakes its driver (an
//! eventfd write, then an extra `epoll_wait`) whenever a timer is set to expire before every other
//! one pending: with none pending, that was every proxied connection's connect timeout, two
//! syscalls each. Behind the armed timer, any timeout of more than a second is set without waking
//! anything. (The daemon's own runtime, where the AJP datapath runs, always has its 1 s
//! announcement tick pending.)

use std::sync::LazyLock;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tracing::warn;

/// How far ahead each worker keeps a timer armed.
const TIMER_STEP: Duration = Duration::from_secs(1);

/// The workers' runtimes, started on first use and kept for the life of the process.
static WORKERS: LazyLock<Vec<Handle>> = LazyLock::new(start);

/// A handle to each worker's runtime; empty if none could be started (the caller then serves on
/// its own runtime).
pub fn handles() -> &'static [Handle] {
    &WORKERS
}

fn start() -> Vec<Handle> {
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (0..n)
        .map_while(|i| {
            let started = Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    let handle = runtime.handle().clone();
                    handle.spawn(keep_a_timer_armed());
                    std::thread::Builder::new()
                        .name(format!("lb-worker-{i}"))
                        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
                    Ok(handle)
                });
            started
                .inspect_err(|e| warn!(error = %e, "cannot start a proxy worker thread"))
                .ok()
        })
        .collect()
}

/// Fires every [`TIMER_STEP`] for the life of the worker (see the module's notes).
async fn keep_a_timer_armed() {
    let mut tick = tokio::time::interval(TIMER_STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}
