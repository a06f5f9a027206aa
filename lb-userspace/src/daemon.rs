//! `lb run`: binds the control socket (and the metrics endpoint when `[metrics]` is set), starts the
//! engine with the config's services, feeds health transitions into it, and handles
//! signals (SIGHUP reloads; SIGTERM/SIGINT stop accepting and let connections finish), and tells
//! systemd when it is ready, reloading or stopping, with watchdog pings when `WatchdogSec=` is set.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::control::server;
use crate::engine::{Engine, EngineError};
use crate::observe::http::{self, HttpError};

/// How often expired affinity entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often the `[announce]` routes are compared with the state (besides every change).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] server::ServerError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Metrics(#[from] HttpError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Raises the soft limit on open files to the hard one, as HAProxy and nginx do for themselves: a
/// proxied connection holds two descriptors (six with `splice = "pipe"`), and a shell's usual soft
/// limit of 1,024 is far below `max_connections`. Running out costs new connections only (see
/// [`crate::health::lb_short_of_resources`]), but it should not come before the hard limit.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // Linux caps the hard limit at fs.nr_open: it is never unlimited for open files.
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => info!(from = soft, to = hard, "open-file limit raised"),
        Err(e) => warn!(limit = soft, error = %e, "cannot raise the open-file limit"),
    }
}

/// Runs until SIGTERM/SIGINT or `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    // First of all: a SIGTERM that comes as soon as the control socket answers (a service manager
    // stopping lb right after it started) must find the handler, not the default action, which
    // ends the process without its shutdown (the VIPs withdrawn, the state file flushed).
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    raise_open_file_limit();
    let (listener, access) = server::bind(&config.control)?;
    let socket = config.control.socket.clone();
    let grace = config.shutdown_timeout;
    let metrics_listener = match config.metrics.as_ref().map(http::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            server::remove(&socket);
            return Err(e.into());
        }
    };
    let (events_tx, mut events) = tokio::sync::mpsc::channel(1024);
    let engine = match Engine::start(config, events_tx, shutdown.clone()) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            server::remove(&socket);
            return Err(e.into());
        }
    };
    info!(socket = %socket.display(), "lb running");
    // systemd (Type=notify): ready once the socket is bound and every service is applied.
    notify(&[sd_notify::NotifyState::Ready]);
    let mut watchdog = watchdog_interval();
    tokio::spawn(server::run(listener, access, engine.clone(), shutdown.clone()));
    if let Some(l) = metrics_listener {
        tokio::spawn(http::run(l, engine.clone(), shutdown.clone()));
    }

    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = term.recv() => { info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::monotonic_usec_now().unwrap_or(sd_notify::NotifyState::Status("reloading"))]);
                match engine.reload() {
                    Ok(view) => {
                        for p in view.problems { warn!(problem = %p, "SIGHUP reload"); }
                        for r in view.restart { warn!(setting = %r, "SIGHUP reload"); }
                    }
                    Err(e) => warn!(error = %e, "SIGHUP reload failed; the running config stays"),
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = sweep.tick() => engine.sweep(),
            _ = announce.tick() => engine.announce_tick(),
            // Pinged from this loop, so a wedged loop stops the pings and systemd restarts lb.
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Some(event) = events.recv() => engine.health_event(event),
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    // The VIPs go first, so the routers move new connections to the other nodes at once.
    engine.withdraw_announcements();
    shutdown.cancel();
    server::remove(&socket);
    info!(
        grace_secs = grace.as_secs(),
        "stopped accepting; waiting for open connections"
    );
    if tokio::time::timeout(grace, engine.shutdown()).await.is_err() {
        warn!("connections still open after the shutdown timeout; closing them");
    }
    engine.flush_state_file();
    info!("lb stopped");
    Ok(())
}

/// Tells systemd (when lb runs under it with `NOTIFY_SOCKET` set) about a state change; a failure
/// is logged, never fatal.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Half of systemd's `WatchdogSec=` when the watchdog is on for this process.
fn watchdog_interval() -> Option<tokio::time::Interval> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    Some(tokio::time::interval(every))
}
