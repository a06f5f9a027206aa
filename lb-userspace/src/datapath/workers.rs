//! The proxy's worker threads: one single-threaded tokio runtime per CPU, each accepting from the
//! service's listening socket itself. A connection's readiness events, its task and its relay
//! buffer stay on the one thread that serves it: no wakeup crosses to another core, which the
//! shared multi-threaded runtime paid on every readiness event.
//!
//! Every worker is woken for every new connection (each has the listening socket in its own
//! epoll), and the first to call accept(2) gets it. Left at that, the worker that happens to be
//! awake takes a burst of connections: the four streams of one `iperf3 -P 4` could all land on
//! one worker, one core relaying while the other idled (SO_REUSEPORT's hash has the same flaw).
//! So a worker serving more connections than another hands the new one to the least loaded
//! ([`Served::least_loaded_unless`]), as HAProxy spreads accepted connections over its threads: the
//! connection is not registered with a reactor yet, so moving it costs one cross-thread wakeup.
//!
//! Each worker also keeps one timer armed at most [`TIMER_STEP`] ahead. tokio wakes its driver (an
//! eventfd write, then an extra `epoll_wait`) whenever a timer is set to expire before every other
//! one pending: with none pending, that was every proxied connection's connect timeout, two
//! syscalls each. Behind the armed timer, any timeout of more than a second is set without waking
//! anything. (The daemon's own runtime, where the AJP datapath runs, always has its 1 s
//! announcement tick pending.)

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tracing::warn;

/// How far ahead each worker keeps a timer armed.
const TIMER_STEP: Duration = Duration::from_secs(1);

/// The workers, started on first use and kept for the life of the process.
static WORKERS: OnceLock<Workers> = OnceLock::new();

struct Workers {
    /// Each worker's runtime.
    handles: Vec<Handle>,
    /// The connections each worker serves (of every service), by worker index.
    loads: Vec<AtomicUsize>,
}

fn workers() -> &'static Workers {
    WORKERS.get_or_init(|| {
        let handles = start();
        let loads = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Workers { handles, loads }
    })
}

thread_local! {
    /// The index of the worker running on this thread (`None` off the workers).
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the worker whose thread this is, if it is one.
pub fn current() -> Option<usize> {
    WORKER.get()
}

/// A connection counted in the load of the worker that serves it, while this lives.
pub struct Served(usize);

impl Served {
    /// Counts a connection worker `i` accepted on the worker that is to serve it: `i` itself
    /// unless another serves fewer connections, then the one that serves fewest. The count is
    /// claimed with a compare-and-swap, so workers accepting at once do not all pick the same one.
    pub fn least_loaded_unless(i: usize) -> Served {
        let loads = &workers().loads;
        loop {
            let load = |w: usize| loads[w].load(Ordering::Relaxed);
            let to = least_of(loads.len(), load, i);
            let seen = load(to);
            if loads[to]
                .compare_exchange(seen, seen + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Served(to);
            }
        }
    }

    /// The worker that serves the connection.
    pub fn worker(&self) -> usize {
        self.0
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        workers().loads[self.0].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Of workers `0..n` with loads `load`: `i` unless another has less load, then the least loaded.
fn least_of(n: usize, load: impl Fn(usize) -> usize, i: usize) -> usize {
    match (0..n).min_by_key(|&w| load(w)) {
        Some(least) if load(least) < load(i) => least,
        _ => i,
    }
}

/// A handle to each worker's runtime; empty if none could be started (the caller then serves on
/// its own runtime).
pub fn handles() -> &'static [Handle] {
    &workers().handles
}

/// The connections each worker serves, by worker index; empty while no worker has started (no
/// proxy service yet), and this does not start them.
pub fn connections() -> Vec<u64> {
    WORKERS.get().map_or_else(Vec::new, |w| {
        w.loads.iter().map(|l| l.load(Ordering::Relaxed) as u64).collect()
    })
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
                        .spawn(move || {
                            WORKER.set(Some(i));
                            runtime.block_on(std::future::pending::<()>());
                        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections go to the least loaded worker, and stay where they were accepted on a tie, so
    /// four accepted one after another on one worker end up two and two.
    #[test]
    fn a_connection_goes_to_the_least_loaded_worker() {
        let pick = |loads: &[usize], i| least_of(loads.len(), |w| loads[w], i);
        assert_eq!(pick(&[3, 1, 2], 0), 1);
        assert_eq!(pick(&[1, 1, 2], 1), 1, "a tie stays");
        assert_eq!(pick(&[1, 1, 2], 2), 0);
        assert_eq!(pick(&[0], 0), 0);
        let mut loads = [0, 0];
        for _ in 0..4 {
            let to = pick(&loads, 0);
            loads[to] += 1;
        }
        assert_eq!(loads, [2, 2]);
    }
}
