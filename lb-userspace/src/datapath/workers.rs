//! The proxy's worker threads: one single-threaded tokio runtime per CPU, each accepting from the
//! service's listening socket itself and relaying the connections it accepted. A connection's
//! readiness events, its task and its relay buffer stay on one thread: no wakeup crosses to
//! another core, which the shared multi-threaded runtime paid on every readiness event. Each
//! worker accepts only when it is free to, so connections spread by load, not by a hash as with
//! SO_REUSEPORT (where a few connections can land on one worker while the other idles).

use std::sync::LazyLock;

use tokio::runtime::{Builder, Handle};
use tracing::warn;

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
