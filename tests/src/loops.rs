//! Loops of new connections from client addresses, timed per request: what the failover tests
//! (passive health on both datapaths) run while they kill or black-hole a backend.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Topology;

/// One request of a client loop: when it started and ended, and the answer (the backend's name)
/// or the error.
pub struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub result: Result<String, String>,
}

/// Runs one loop of `get(src)` per address of the first `clients` client addresses of `topo`,
/// 5 ms apart, until `stop`; returns every sample.
pub fn client_loops(
    topo: &Topology,
    clients: usize,
    stop: &AtomicBool,
    get: impl Fn(Ipv4Addr) -> Result<String, String> + Sync,
) -> Vec<Sample> {
    let get = &get;
    thread::scope(|s| {
        let loops: Vec<_> = topo
            .client_addrs()
            .into_iter()
            .take(clients)
            .map(|src| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let result = get(src);
                        out.push(Sample {
                            start,
                            end: Instant::now(),
                            result,
                        });
                        thread::sleep(Duration::from_millis(5));
                    }
                    out
                })
            })
            .collect();
        loops
            .into_iter()
            .flat_map(|l| l.join().expect("client loop"))
            .collect()
    })
}

/// Milliseconds since the Unix epoch (what lb's transitions carry as `unix_ms`).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// When a fault applied by a command that ran from `issued` to `done` began (a `nft` rule, whose
/// commit waits for the kernel's network-namespace lock and took over a second while other tests
/// tore their namespaces down): no later than the start of the first sample it `hit`, clamped to
/// the command's run. What a failover time is measured from.
pub fn fault_began(
    samples: &[Sample],
    issued: Instant,
    done: Instant,
    hit: impl Fn(&Sample) -> bool,
) -> Instant {
    let first_hit = samples.iter().filter(|s| hit(s)).map(|s| s.start).min();
    first_hit.unwrap_or(done).clamp(issued, done)
}

/// [`unix_ms`] at `at` (an instant in the past).
pub fn unix_ms_at(at: Instant) -> u64 {
    unix_ms().saturating_sub(at.elapsed().as_millis() as u64)
}
