//! Active health checks: TCP connect or AJP CPing/CPong per backend, rise/fall state machine.
//!
//! One task per checked backend, started and stopped by [`Supervisor::reconcile`] as services and
//! backends come and go. First checks are spread over the interval (by a hash of the address), and
//! every probe has its own timeout, so a backend that hangs delays nobody else. A transition is sent
//! as a [`HealthEvent`] into the daemon's command pipeline, where it becomes `Command::SetHealth`.
//! [`passive`] sends the datapaths' connect failures into the same pipeline.

pub mod passive;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ajp;
use crate::config::{HealthConfig, HealthKind};
pub use crate::runtime::CheckStatus;
use crate::runtime::{BackendRuntime, BackendStats, Snapshot};
use crate::state::Health;

/// How long the AJP probe waits after the CPong to see whether the peer closes or sends more.
const AFTER_CPONG: Duration = Duration::from_millis(20);

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("timed out after {0} ms")]
    Timeout(u128),
    #[error("timed out after {ms} ms with {got} of 5 CPong bytes")]
    Stalled { ms: u128, got: usize },
    #[error("I/O error: {0}")]
    Io(String),
    #[error("the backend accepted the connection, then reset it: {0}")]
    Reset(String),
    #[error(transparent)]
    Ajp(#[from] ajp::AjpError),
    #[error("peer closed the connection right after the CPong")]
    ClosedAfterCpong,
    #[error("not run: lb itself is short of resources ({0}); the backend's health is left as it was")]
    Local(String),
}

/// Logs that lb itself is short of resources (`e`), and what that cost (`consequence`): at most
/// once a second (the shortage comes with a flood of connections), with how many since.
pub fn warn_short_of_resources(service: &str, e: &std::io::Error, consequence: &str) {
    static THROTTLE: crate::observe::throttle::Throttle = crate::observe::throttle::Throttle::new();
    if let Some(times) = THROTTLE.due() {
        warn!(
            %service,
            error = %e,
            times,
            "lb is short of resources: {consequence} (raise the open-file limit or lower max_connections)"
        );
    }
}

/// What a connection to a backend that lb could not open costs.
pub const BACKEND_CONNECTION_CLOSED: &str = "connection closed, backend health not counted";

/// Whether a failed connect says that lb itself ran short (open files, memory, socket buffers),
/// not that the backend failed. Such a failure tells nothing of the backend's health,
/// so neither the checks nor passive health count it.
pub fn lb_short_of_resources(e: &std::io::Error) -> bool {
    use nix::libc;
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// An I/O error of a probe as `otherwise`, unless it is a reset: a reset means the backend had
/// accepted the connection (a connect can report it too, when the RST comes before the
/// handshake is seen complete), so it is never shown as a failed connect.
fn failed(e: std::io::Error, otherwise: fn(String) -> ProbeError) -> ProbeError {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => ProbeError::Reset(e.to_string()),
        _ if lb_short_of_resources(&e) => ProbeError::Local(e.to_string()),
        _ => otherwise(e.to_string()),
    }
}

/// Runs one probe; returns its latency.
pub async fn probe(kind: HealthKind, addr: SocketAddr, timeout: Duration) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || ProbeError::Timeout(timeout.as_millis());
    let mut stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| failed(e, ProbeError::Connect))?;
    if kind != HealthKind::Ajp {
        return Ok(start.elapsed());
    }
    stream
        .write_all(&ajp::CPING)
        .await
        .map_err(|e| failed(e, ProbeError::Io))?;
    let mut reply = Vec::with_capacity(16);
    let mut buf = [0u8; 64];
    while reply.len() < ajp::CPONG.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(ProbeError::Stalled {
                    ms: timeout.as_millis(),
                    got: reply.len(),
                });
            }
            Ok(Err(e)) if reply.is_empty() => return Err(failed(e, ProbeError::Io)),
            Ok(Err(_) | Ok(0)) => break,
            Ok(Ok(n)) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.len() > 256 {
                    break;
                }
            }
        }
    }
    // Reject early on wrong bytes, then look a little further for extra bytes or a close.
    ajp::check_reply(&reply[..reply.len().min(ajp::CPONG.len())])?;
    let latency = start.elapsed();
    ajp::check_reply(&reply)?;
    match tokio::time::timeout(AFTER_CPONG, stream.read(&mut buf)).await {
        Err(_) => Ok(latency),
        Ok(Ok(0) | Err(_)) => Err(ProbeError::ClosedAfterCpong),
        Ok(Ok(n)) => Err(ajp::AjpError::Extra(n).into()),
    }
}

/// Why a probe's failure says nothing about the backend, if it does not:
/// - lb itself was short of resources ([`ProbeError::Local`]);
/// - it timed out while the backend was answering requests (within `window`, the check's
///   interval and timeout): a Tomcat whose threads are all serving requests reads no CPing until
///   one is free. Busy is not down: marking it down would move its sessions off a backend that
///   works. A backend that stops answering requests is counted again after `window`.
pub fn not_counted(
    result: &Result<Duration, ProbeError>,
    stats: &BackendStats,
    window: Duration,
) -> Option<String> {
    match result {
        Err(e @ ProbeError::Local(_)) => Some(e.to_string()),
        Err(e @ (ProbeError::Timeout(_) | ProbeError::Stalled { .. })) if stats.busy_within(window) => {
            Some(format!(
                "{e}, but the backend answered a request {} ms ago: busy, not down",
                stats.since_answer().unwrap_or_default().as_millis()
            ))
        }
        _ => None,
    }
}

/// A health transition on its way into the command pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthEvent {
    pub service: String,
    pub backend: SocketAddr,
    pub health: Health,
    pub reason: String,
    pub source: HealthSource,
}

/// Who saw a health transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthSource {
    /// The backend's active checker.
    Check,
    /// Connect failures of real connections ([`passive`]).
    Passive,
}

struct Checker {
    settings: HealthConfig,
    stop: CancellationToken,
}

/// Starts and stops checker tasks so that every checked backend has exactly one.
pub struct Supervisor {
    events: mpsc::Sender<HealthEvent>,
    checkers: Mutex<HashMap<(String, SocketAddr), Checker>>,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(events: mpsc::Sender<HealthEvent>, shutdown: CancellationToken) -> Self {
        Supervisor {
            events,
            checkers: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Makes the running checkers match the state (start new, stop gone or changed).
    pub fn reconcile(&self, snapshot: &Snapshot) {
        let mut checkers = self.checkers.lock().unwrap();
        let mut wanted = HashMap::new();
        for svc in snapshot
            .state
            .services
            .values()
            .filter(|s| s.settings.health.kind != HealthKind::None)
        {
            for b in &svc.backends {
                wanted.insert(
                    (svc.settings.name.clone(), b.config.address),
                    (&svc.settings.health, snapshot.runtime(svc, b)),
                );
            }
        }
        checkers.retain(|key, c| {
            let keep = wanted.get(key).is_some_and(|(h, _)| **h == c.settings);
            if !keep {
                c.stop.cancel();
            }
            keep
        });
        for (key, (settings, backend)) in wanted {
            if checkers.contains_key(&key) {
                continue;
            }
            let stop = self.shutdown.child_token();
            tokio::spawn(run_checker(
                key.0.clone(),
                key.1,
                settings.clone(),
                backend,
                self.events.clone(),
                stop.clone(),
            ));
            checkers.insert(
                key,
                Checker {
                    settings: settings.clone(),
                    stop,
                },
            );
        }
    }
}

#[tracing::instrument(skip_all, fields(service = %service, backend = %address))]
async fn run_checker(
    service: String,
    address: SocketAddr,
    settings: HealthConfig,
    backend: Arc<BackendRuntime>,
    events: mpsc::Sender<HealthEvent>,
    stop: CancellationToken,
) {
    let status = &backend.check;
    let target = SocketAddr::new(address.ip(), settings.port.unwrap_or(address.port()));
    // Spread first checks over the interval so many backends do not fire together.
    let spread = lb_common::hash::bytes_hash(0, address.to_string().as_bytes())
        % (settings.interval.as_millis().max(1) as u64);
    let mut wait = Duration::from_millis(spread);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let result = probe(settings.kind, target, settings.timeout).await;
        if let Some(why) = not_counted(&result, &backend.stats, settings.interval + settings.timeout) {
            warn!(reason = %why, "health check not counted");
            wait = settings.interval;
            continue;
        }
        let (changed, failing) = {
            let mut s = status.lock().unwrap();
            let changed = s.record(&result, settings.rise, settings.fall);
            (changed, s.consecutive_failed > 0 || s.health == Health::Down)
        };
        wait = if failing {
            settings.fast_interval
        } else {
            settings.interval
        };
        if let Some(health) = changed {
            let reason = status.lock().unwrap().last_result.clone();
            let event = HealthEvent {
                service: service.clone(),
                backend: address,
                health,
                reason,
                source: HealthSource::Check,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<Duration, ProbeError> {
        Ok(Duration::from_millis(1))
    }
    fn fail() -> Result<Duration, ProbeError> {
        Err(ProbeError::Timeout(1000))
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut s = CheckStatus::default();
        assert_eq!(s.record(&fail(), 2, 3), None);
        assert_eq!(s.record(&fail(), 2, 3), None);
        assert_eq!(s.record(&fail(), 2, 3), Some(Health::Down));
        assert_eq!(s.record(&fail(), 2, 3), None);
        assert_eq!(s.record(&ok(), 2, 3), None);
        assert_eq!(s.record(&ok(), 2, 3), Some(Health::Up));
        assert_eq!(s.transitions, 2);
        assert_eq!((s.checks, s.failed_checks), (6, 4));
        assert_eq!(s.last_result, "ok");
    }

    #[test]
    fn flapping_below_thresholds_changes_nothing() {
        let mut s = CheckStatus::default();
        for _ in 0..50 {
            assert_eq!(s.record(&fail(), 2, 3), None);
            assert_eq!(s.record(&fail(), 2, 3), None);
            assert_eq!(s.record(&ok(), 2, 3), None);
        }
        assert_eq!(s.health, Health::Up);
        s.record(&fail(), 2, 3);
        s.record(&fail(), 2, 3);
        s.record(&fail(), 2, 3);
        for _ in 0..50 {
            assert_eq!(s.record(&ok(), 2, 3), None);
            assert_eq!(s.record(&fail(), 2, 3), None);
        }
        assert_eq!(s.health, Health::Down);
        assert!(s.last_result.contains("timed out"));
    }

    /// A backend that accepts each connection and resets it at once (linger 0).
    async fn resetting_backend() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let linger = nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).unwrap();
                drop(s);
            }
        });
        addr
    }

    #[test]
    fn a_timeout_while_the_backend_answers_requests_is_not_counted() {
        let stats = BackendStats::default();
        let window = Duration::from_millis(300);
        let timeout = Err(ProbeError::Timeout(1000));
        let stalled = Err(ProbeError::Stalled { ms: 1000, got: 0 });
        // Never answered a request: a timeout counts.
        assert_eq!(not_counted(&timeout, &stats, window), None);
        stats.answered();
        for r in [&timeout, &stalled] {
            let why = not_counted(r, &stats, window).expect("busy");
            assert!(why.contains("busy, not down"), "{why}");
        }
        // Other failures count whatever the traffic.
        let refused = Err(ProbeError::Connect("refused".into()));
        assert_eq!(not_counted(&refused, &stats, window), None);
        assert_eq!(not_counted(&ok(), &stats, window), None);
        // Once it has not answered for the window, timeouts count again.
        std::thread::sleep(window + Duration::from_millis(50));
        assert_eq!(not_counted(&timeout, &stats, window), None);
        assert!(not_counted(&Err(ProbeError::Local("EMFILE".into())), &stats, window).is_some());
    }

    #[tokio::test]
    async fn a_reset_after_accept_is_reported_as_a_reset_not_a_failed_connect() {
        let addr = resetting_backend().await;
        for _ in 0..20 {
            let e = probe(HealthKind::Ajp, addr, Duration::from_secs(2))
                .await
                .unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, ProbeError::Reset(_)), "{text}");
            assert!(!text.contains("connect failed"), "{text}");
        }
        // A refused connect is still a failed connect.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = probe(HealthKind::Tcp, closed, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("connect failed"), "{e}");
    }
}
