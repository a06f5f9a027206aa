//! `lb run`: binds the control socket (and the metrics endpoint when `[metrics]` is set), starts the
//! engine with the config's services, feeds health transitions into it, and handles
//! signals (SIGHUP reloads; SIGTERM/SIGINT stop accepting and let connections finish).

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

/// Runs until SIGTERM/SIGINT or `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
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
    tokio::spawn(server::run(listener, access, engine.clone(), shutdown.clone()));
    if let Some(l) = metrics_listener {
        tokio::spawn(http::run(l, engine.clone(), shutdown.clone()));
    }

    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = term.recv() => { info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { info!("SIGINT: shutting down"); break }
            _ = hup.recv() => match engine.reload() {
                Ok(view) => {
                    for p in view.problems { warn!(problem = %p, "SIGHUP reload"); }
                }
                Err(e) => warn!(error = %e, "SIGHUP reload failed; the running config stays"),
            },
            _ = sweep.tick() => engine.sweep(),
            Some(event) = events.recv() => engine.health_event(event),
        }
    }
    shutdown.cancel();
    server::remove(&socket);
    info!(
        grace_secs = grace.as_secs(),
        "stopped accepting; waiting for open connections"
    );
    if tokio::time::timeout(grace, engine.shutdown()).await.is_err() {
        warn!("connections still open after the shutdown timeout; closing them");
    }
    info!("lb stopped");
    Ok(())
}
