//! The daemon's core: one [`Balancer`] behind a mutex, the datapaths, and the config last applied.
//!
//! Every change, whatever its source (config file at start, control socket, reload, health checks),
//! goes through [`Engine::execute`]: apply to the state, then let the datapath of the service follow.

use crate::config::enum_text;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ajp_datapath::AjpDatapath;
use crate::balancer::{Balancer, Reason, SelectError};
use crate::config::{BackendConfig, Config, ConfigError, DatapathKind, ServiceConfig};
use crate::control::protocol::{
    BackendStatsView, BackendView, ReloadView, Request, ServiceStatsView, ServiceView, StatsView, StatusView,
    WhichView,
};
use crate::datapath::{Datapath, DatapathError};
use crate::health::{HealthEvent, Supervisor};
use crate::proxy::ProxyDatapath;
use crate::state::{
    self, BackendStats, Command, Effect, Health, State, StateError, Transition, TransitionKind,
};
use crate::xdp::XdpDatapath;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the daemon was started without a config file; nothing to reload")]
    NoConfigFile,
    #[error("`{0}` is not an IP address (or IP:PORT)")]
    BadAddress(String),
    #[error(transparent)]
    Xdp(#[from] crate::xdp::XdpError),
}

/// Who asked for a change: recorded as the reason of the transitions it causes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config file, when the daemon starts.
    Start,
    /// A control-socket request, with the caller's uid when known.
    Operator { uid: Option<u32> },
    /// A reload of the config file (`lb reload` with the caller's uid, or SIGHUP).
    Reload { uid: Option<u32> },
    /// A health check, with its result.
    Health { reason: String },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Start => f.write_str("config file at start"),
            Origin::Operator { uid: Some(uid) } => write!(f, "operator uid {uid}"),
            Origin::Operator { uid: None } => f.write_str("operator"),
            Origin::Reload { uid: Some(uid) } => write!(f, "reload by uid {uid}"),
            Origin::Reload { uid: None } => f.write_str("reload (SIGHUP)"),
            Origin::Health { reason } => write!(f, "health check: {reason}"),
        }
    }
}

pub struct Engine {
    balancer: Arc<Mutex<Balancer>>,
    config: Mutex<Config>,
    proxy: ProxyDatapath,
    ajp: AjpDatapath,
    xdp: Option<XdpDatapath>,
    health: Supervisor,
    started: Instant,
}

impl Engine {
    /// Builds an engine and brings up every service of `config`. Health transitions are sent to
    /// `events`; feed them back through [`Engine::health_event`].
    pub fn start(
        config: Config,
        events: mpsc::Sender<HealthEvent>,
        shutdown: CancellationToken,
    ) -> Result<Engine, EngineError> {
        let balancer = Arc::new(Mutex::new(Balancer::new(State::new(
            config.seed,
            config.ring_size,
        ))));
        let wants_xdp = config.services.iter().any(|s| s.datapath == DatapathKind::Xdp);
        let xdp = match &config.xdp {
            Some(x) if wants_xdp || !x.interfaces.is_empty() => {
                Some(XdpDatapath::start(Some(x), config.seed, config.ring_size)?)
            }
            _ => None,
        };
        let engine = Engine {
            proxy: ProxyDatapath::new(balancer.clone()),
            ajp: AjpDatapath::new(balancer.clone()),
            xdp,
            balancer,
            config: Mutex::new(config.clone()),
            health: Supervisor::new(events, shutdown),
            started: Instant::now(),
        };
        for service in config.services {
            engine.execute_by(Command::AddService { service }, &Origin::Start)?;
        }
        if let Some(xdp) = &engine.xdp {
            xdp.finish_adoption()?;
        }
        Ok(engine)
    }

    pub fn balancer(&self) -> &Arc<Mutex<Balancer>> {
        &self.balancer
    }

    fn datapath(&self, kind: DatapathKind) -> Option<&dyn Datapath> {
        match kind {
            DatapathKind::Proxy => Some(&self.proxy),
            DatapathKind::Ajp => Some(&self.ajp),
            DatapathKind::Xdp => self.xdp.as_ref().map(|x| x as &dyn Datapath),
        }
    }

    /// Applies one command to the state and the datapath. On error nothing changed.
    pub fn execute(&self, command: Command) -> Result<Effect, EngineError> {
        self.execute_by(command, &Origin::Operator { uid: None })
    }

    /// [`Engine::execute`], recording `origin` as the reason of the health or state transition the
    /// command causes (in the backend's [`state::TransitionLog`], and one log line each).
    pub fn execute_by(&self, command: Command, origin: &Origin) -> Result<Effect, EngineError> {
        let mut b = self.balancer.lock().unwrap();
        let kind = match &command {
            Command::AddService { service } => service.datapath,
            other => b.state.service(other.service())?.settings.datapath,
        };
        let description = describe(&command);
        // Health and state of the backend the command targets, to see afterwards what changed.
        let target = match &command {
            Command::SetState { service, backend, .. } | Command::SetHealth { service, backend, .. } => {
                Some((service.clone(), backend.clone()))
            }
            Command::UpdateBackend { service, backend } => {
                Some((service.clone(), backend.address.to_string()))
            }
            _ => None,
        };
        let before = target.as_ref().and_then(|(service, backend)| {
            let be = b.state.service(service).ok()?.backend(backend)?;
            Some((be.config.state, be.health))
        });
        let transition_only = matches!(command, Command::SetState { .. } | Command::SetHealth { .. });
        let effect = b.apply(command)?;
        let applied = match self.datapath(kind) {
            Some(d) => d.apply(&effect, &b.state),
            None => match &effect {
                Effect::ServiceAdded(name) => Err(DatapathError::Unavailable(name.clone())),
                _ => Ok(()),
            },
        };
        if let Err(e) = applied {
            if let Effect::ServiceAdded(name) = &effect {
                b.apply(Command::RemoveService {
                    service: name.clone(),
                })?;
            }
            return Err(e.into());
        }
        if effect != Effect::Nothing {
            if let (Some((service, backend)), Some(before)) = (&target, before) {
                record_transitions(&b.state, service, backend, before, origin);
            }
            if !transition_only {
                info!(change = %description, by = %origin, "applied");
            }
            self.health.reconcile(&b.state);
        }
        Ok(effect)
    }

    /// Applies a health transition reported by a checker (logged once, with the reason).
    pub fn health_event(&self, event: HealthEvent) {
        let HealthEvent {
            service,
            backend,
            health,
            reason,
        } = event;
        let command = Command::SetHealth {
            service: service.clone(),
            backend: backend.to_string(),
            health,
        };
        // The transition is logged ("backend DOWN" / "backend UP") and recorded as it is applied.
        match self.execute_by(command, &Origin::Health { reason }) {
            Ok(_) => {
                let b = self.balancer.lock().unwrap();
                let Ok(svc) = b.state.service(&service) else {
                    return;
                };
                let Some(be) = svc.backend(&backend.to_string()) else {
                    return;
                };
                let xdp = self
                    .xdp
                    .as_ref()
                    .filter(|_| svc.settings.datapath == DatapathKind::Xdp);
                if health == Health::Down && svc.settings.on_down == crate::config::OnDown::Reset {
                    be.stats.reset_connections();
                    let flows = xdp.map_or(0, |x| x.reset_backend(&service, be.id));
                    info!(%service, %backend, kernel_flows = flows, "on_down = reset: open connections reset");
                }
                if health == Health::Up
                    && svc.settings.failback
                    && let Some(x) = xdp
                {
                    x.fail_back(&service, be.id);
                }
            }
            // The backend or service went away while the check ran.
            Err(e) => info!(%service, %backend, error = %e, "health event dropped"),
        }
    }

    /// Re-reads the config file and applies what changed since the last one applied (SIGHUP).
    pub fn reload(&self) -> Result<ReloadView, EngineError> {
        self.reload_by(None)
    }

    /// [`Engine::reload`] on behalf of the control-socket caller `uid`.
    pub fn reload_by(&self, uid: Option<u32>) -> Result<ReloadView, EngineError> {
        let origin = Origin::Reload { uid };
        let path = self
            .config
            .lock()
            .unwrap()
            .path
            .clone()
            .ok_or(EngineError::NoConfigFile)?;
        let new = Config::load(&path)?;
        let mut old = self.config.lock().unwrap();
        let mut view = ReloadView::default();
        // Settings read once at start: reported (on every reload) until the daemon restarts.
        let restart_only = [
            ("seed", new.seed != old.seed),
            ("ring_size", new.ring_size != old.ring_size),
            ("[control]", new.control != old.control),
            ("log_level", new.log_level != old.log_level),
            ("shutdown_timeout", new.shutdown_timeout != old.shutdown_timeout),
            ("[xdp]", new.xdp != old.xdp),
            ("[metrics]", new.metrics != old.metrics),
        ];
        for (setting, changed) in restart_only {
            if changed {
                view.problems
                    .push(format!("{setting} takes effect only after a restart"));
            }
        }
        let mut applied_config = Config {
            seed: old.seed,
            ring_size: old.ring_size,
            control: old.control.clone(),
            log_level: old.log_level.clone(),
            shutdown_timeout: old.shutdown_timeout,
            xdp: old.xdp.clone(),
            metrics: old.metrics.clone(),
            ..new.clone()
        };
        for command in state::diff(&old, &new) {
            let description = describe(&command);
            match self.execute_by(command.clone(), &origin) {
                Ok(_) => view.applied.push(description),
                Err(e) => {
                    warn!(change = %description, error = %e, "reload: change not applied");
                    view.problems.push(format!("{description}: {e}"));
                    // Remember what did not come up, so the next reload tries again.
                    forget_failed(&mut applied_config, &command);
                }
            }
        }
        *old = applied_config;
        info!(
            applied = view.applied.len(),
            problems = view.problems.len(),
            "reloaded {}",
            path.display()
        );
        Ok(view)
    }

    /// Which backend `client` would reach now, and why (no side effects).
    /// For XDP services the answer comes from the kernel's maps (conntrack when a port is given,
    /// affinity, ring).
    pub fn which(&self, service: &str, client: &str) -> Result<WhichView, EngineError> {
        let (ip, port): (IpAddr, Option<u16>) = match client.parse::<std::net::SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => (
                client
                    .parse()
                    .map_err(|_| EngineError::BadAddress(client.to_string()))?,
                None,
            ),
        };
        let b = self.balancer.lock().unwrap();
        let svc = b.state.service(service)?;
        if let (DatapathKind::Xdp, Some(xdp), IpAddr::V4(v4)) = (svc.settings.datapath, &self.xdp, ip)
            && let Some(k) = xdp.which(service, v4, port)
        {
            let backend = k.backend_id.and_then(|id| svc.backend_by_id(id));
            return Ok(WhichView {
                service: service.to_string(),
                client: client.to_string(),
                backend: backend.map(|b| b.config.name.clone()),
                address: backend.map(|b| b.config.address.to_string()),
                reason: k.reason.to_string(),
                detail: k.detail,
            });
        }
        let now = Instant::now();
        let view =
            |backend: Option<String>, address: Option<String>, reason: &str, detail: String| WhichView {
                service: service.to_string(),
                client: client.to_string(),
                backend,
                address,
                reason: reason.to_string(),
                detail,
            };
        match b.choose(service, ip, now, &[]) {
            Ok(c) => {
                let detail = match c.reason {
                    Reason::Affinity => format!(
                        "affinity entry, last connection {}s ago",
                        b.affinity_age(service, ip, now).unwrap_or_default().as_secs()
                    ),
                    Reason::Ring => format!(
                        "Maglev ring slot {} of {}{}",
                        c.slot.unwrap_or_default(),
                        b.state.service(service)?.ring.len(),
                        if b.state.service(service)?.ring_uses_backups {
                            " (backups)"
                        } else {
                            ""
                        }
                    ),
                };
                let reason = enum_text(&c.reason);
                Ok(view(
                    Some(c.backend_name),
                    Some(c.address.to_string()),
                    &reason,
                    detail,
                ))
            }
            Err(SelectError::NoBackend(_)) => Ok(view(
                None,
                None,
                "none",
                "no backend takes new clients".to_string(),
            )),
            Err(SelectError::State(e)) => Err(e.into()),
        }
    }

    /// Services, backends and counters (for XDP services, the kernel's per-CPU counters summed).
    pub fn status(&self, only: Option<&str>) -> Result<StatusView, EngineError> {
        // Lock order: config before balancer (reload holds config while executing commands).
        let config = self
            .config
            .lock()
            .unwrap()
            .path
            .as_ref()
            .map(|p| p.display().to_string());
        let b = self.balancer.lock().unwrap();
        if let Some(name) = only {
            b.state.service(name)?;
        }
        let get = BackendStats::get;
        let mut services = Vec::new();
        for s in b
            .state
            .services
            .values()
            .filter(|s| only.is_none_or(|o| o == s.settings.name))
        {
            let name = &s.settings.name;
            let ring_slots = slots(&s.ring);
            let kernel = match (&self.xdp, s.settings.datapath) {
                (Some(xdp), DatapathKind::Xdp) => Some(xdp.backend_traffic(name)),
                _ => None,
            };
            let backends = s
                .backends
                .iter()
                .map(|be| {
                    let mut view = BackendView {
                        name: be.config.name.clone(),
                        address: be.config.address.to_string(),
                        weight: be.config.weight,
                        backup: be.config.backup,
                        state: be.config.state,
                        health: be.health,
                        ring_slots: ring_slots.get(&be.id).copied().unwrap_or(0),
                        check: (s.settings.health.kind != crate::config::HealthKind::None)
                            .then(|| be.check.lock().unwrap().snapshot()),
                        active_connections: get(&be.stats.active_connections),
                        total_connections: get(&be.stats.total_connections),
                        connect_failures: get(&be.stats.connect_failures),
                        bytes_in: get(&be.stats.bytes_in),
                        bytes_out: get(&be.stats.bytes_out),
                    };
                    if let Some(k) = kernel.as_ref().and_then(|k| k.get(&be.id)) {
                        view.active_connections = k.active;
                        view.total_connections = k.traffic.new_flows;
                        view.bytes_in = k.traffic.bytes_in;
                        view.bytes_out = k.traffic.bytes_out;
                    }
                    view
                })
                .collect();
            services.push(ServiceView {
                name: name.clone(),
                listen: s.settings.listen.to_string(),
                protocol: s.settings.protocol,
                datapath: s.settings.datapath,
                affinity_timeout_secs: s.settings.affinity_timeout.as_secs(),
                affinity_entries: match (&self.xdp, s.settings.datapath) {
                    (Some(xdp), DatapathKind::Xdp) => xdp.affinity_len(name),
                    _ => b.affinity_len(name) as u64,
                },
                on_backups: s.ring_uses_backups,
                failed_connections: self
                    .proxy
                    .service_stats(name)
                    .map_or(0, |st| st.failed.load(std::sync::atomic::Ordering::Relaxed)),
                backends,
            });
        }
        Ok(StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            config,
            xdp: self.xdp.as_ref().map(|x| {
                x.global_counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            }),
            services,
        })
    }

    /// Counters of every service and backend for `lb stats`, `lb top` and the metrics endpoint.
    ///
    /// The balancer is locked only to copy the state and the user-space counters; the kernel's
    /// counters (XDP services) are read afterwards, so a slow map walk never holds up the proxy
    /// or the control socket.
    pub fn stats(&self) -> StatsView {
        let taken_unix_ms = unix_ms();
        let get = BackendStats::get;
        // Each service with the state ids of its backends (to find their kernel counters).
        let mut services: Vec<(ServiceStatsView, Vec<u32>)> = Vec::new();
        {
            let b = self.balancer.lock().unwrap();
            for s in b.state.services.values() {
                let ring_slots = slots(&s.ring);
                let checked = s.settings.health.kind != crate::config::HealthKind::None;
                let proxy = s.settings.datapath == DatapathKind::Proxy;
                let ids = s.backends.iter().map(|be| be.id).collect();
                let backends = s
                    .backends
                    .iter()
                    .map(|be| {
                        let log = be.stats.transitions.lock().unwrap().clone();
                        BackendStatsView {
                            name: be.config.name.clone(),
                            address: be.config.address.to_string(),
                            weight: be.config.weight,
                            backup: be.config.backup,
                            state: be.config.state,
                            health: be.health,
                            ring_slots: ring_slots.get(&be.id).copied().unwrap_or(0),
                            connections_active: get(&be.stats.active_connections),
                            connections_total: get(&be.stats.total_connections),
                            bytes_in: get(&be.stats.bytes_in),
                            bytes_out: get(&be.stats.bytes_out),
                            packets_in: None,
                            packets_out: None,
                            connect_failures: proxy.then(|| get(&be.stats.connect_failures)),
                            check: checked.then(|| be.check.lock().unwrap().snapshot()),
                            health_transitions: log.health,
                            state_transitions: log.state,
                            transitions: log.recent().cloned().collect(),
                        }
                    })
                    .collect();
                let view = ServiceStatsView {
                    name: s.settings.name.clone(),
                    listen: s.settings.listen.to_string(),
                    protocol: s.settings.protocol,
                    datapath: s.settings.datapath,
                    affinity_entries: b.affinity_len(&s.settings.name) as u64,
                    on_backups: s.ring_uses_backups,
                    failed_connections: None,
                    ajp: None,
                    backends,
                };
                services.push((view, ids));
            }
        }
        for (svc, ids) in &mut services {
            match (svc.datapath, &self.xdp) {
                (DatapathKind::Xdp, Some(xdp)) => {
                    let kernel = xdp.backend_traffic(&svc.name);
                    svc.affinity_entries = xdp.affinity_len(&svc.name);
                    for (be, id) in svc.backends.iter_mut().zip(ids.iter()) {
                        let k = kernel.get(id).copied().unwrap_or_default();
                        be.connections_active = k.active;
                        be.connections_total = k.traffic.new_flows;
                        be.bytes_in = k.traffic.bytes_in;
                        be.bytes_out = k.traffic.bytes_out;
                        be.packets_in = Some(k.traffic.packets_in);
                        be.packets_out = Some(k.traffic.packets_out);
                    }
                }
                (DatapathKind::Xdp, None) => {}
                (DatapathKind::Ajp, _) => svc.ajp = self.ajp.counters(&svc.name),
                (DatapathKind::Proxy, _) => {
                    svc.failed_connections = Some(
                        self.proxy
                            .service_stats(&svc.name)
                            .map_or(0, |st| st.failed.load(std::sync::atomic::Ordering::Relaxed)),
                    );
                }
            }
        }
        let uptime = self.started.elapsed();
        StatsView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: uptime.as_secs(),
            start_time_unix: taken_unix_ms.saturating_sub(uptime.as_millis() as u64) / 1000,
            taken_unix_ms,
            xdp: self.xdp.as_ref().map(|x| {
                x.global_counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            }),
            services: services.into_iter().map(|(s, _)| s).collect(),
        }
    }

    /// Answers one control request.
    pub fn handle(&self, request: Request) -> Result<serde_json::Value, EngineError> {
        self.handle_from(request, None)
    }

    /// [`Engine::handle`] for the control-socket caller `uid` (recorded as who made a change).
    pub fn handle_from(&self, request: Request, uid: Option<u32>) -> Result<serde_json::Value, EngineError> {
        let by = Origin::Operator { uid };
        let run = |command| self.execute_by(command, &by);
        Ok(match request {
            Request::Status {} => json(&self.status(None)?),
            Request::Stats {} => json(&self.stats()),
            Request::Backends { service } => json(&self.status(service.as_deref())?),
            Request::Which { service, client } => json(&self.which(&service, &client)?),
            Request::Reload {} => json(&self.reload_by(uid)?),
            Request::AddBackend {
                service,
                address,
                name,
                weight,
                backup,
                state,
            } => {
                let backend = backend_from_request(&address, name, weight, backup, state)?;
                run(Command::AddBackend { service, backend })?;
                serde_json::Value::Null
            }
            Request::AddService {
                name,
                listen,
                protocol,
                datapath,
                affinity_timeout,
                max_connections,
            } => {
                let service = service_from_request(
                    &name,
                    &listen,
                    protocol,
                    datapath,
                    affinity_timeout,
                    max_connections,
                )?;
                run(Command::AddService { service })?;
                serde_json::Value::Null
            }
            Request::RemoveBackend { service, backend } => {
                run(Command::RemoveBackend { service, backend })?;
                serde_json::Value::Null
            }
            Request::RemoveService { service } => {
                run(Command::RemoveService { service })?;
                serde_json::Value::Null
            }
            Request::SetState {
                service,
                backend,
                state,
            } => {
                run(Command::SetState {
                    service,
                    backend,
                    state,
                })?;
                serde_json::Value::Null
            }
            Request::SetWeight {
                service,
                backend,
                weight,
            } => {
                run(Command::SetWeight {
                    service,
                    backend,
                    weight,
                })?;
                serde_json::Value::Null
            }
        })
    }

    /// Drops expired affinity entries.
    pub fn sweep(&self) {
        self.balancer.lock().unwrap().sweep(Instant::now());
    }

    /// Stops accepting; resolves when open connections have finished.
    pub async fn shutdown(&self) {
        tokio::join!(self.proxy.shutdown(), self.ajp.shutdown());
    }
}

/// Records (and logs, one line each) the health and state transitions of backend `backend` of
/// `service` since `before` (its operator state and health before the command).
fn record_transitions(
    state: &State,
    service: &str,
    backend: &str,
    before: (crate::config::AdminState, Health),
    origin: &Origin,
) {
    let Some(be) = state.service(service).ok().and_then(|s| s.backend(backend)) else {
        return;
    };
    let name = &be.config.name;
    let address = be.config.address;
    let mut log = be.stats.transitions.lock().unwrap();
    let mut record = |kind, from: String, to: String| {
        log.record(Transition {
            unix_ms: unix_ms(),
            kind,
            from,
            to,
            reason: origin.to_string(),
        });
    };
    if be.health != before.1 {
        let (from, to) = (enum_text(&before.1), enum_text(&be.health));
        let reason = match origin {
            Origin::Health { reason } => reason.clone(),
            other => other.to_string(),
        };
        match be.health {
            Health::Down => warn!(service, backend = %name, %address, %from, %to, %reason, "backend DOWN"),
            Health::Up => info!(service, backend = %name, %address, %from, %to, %reason, "backend UP"),
        }
        record(TransitionKind::Health, from, to);
    }
    if be.config.state != before.0 {
        let (from, to) = (enum_text(&before.0), enum_text(&be.config.state));
        info!(service, backend = %name, %address, %from, %to, by = %origin, "backend state changed");
        record(TransitionKind::State, from, to);
    }
}

/// Wall-clock time in milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Ring slots per backend id.
fn slots(ring: &[u32]) -> std::collections::HashMap<u32, u64> {
    let mut counts = std::collections::HashMap::new();
    for id in ring {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// One line naming a command, for logs and reload reports.
fn describe(command: &Command) -> String {
    match command {
        Command::AddService { service } => format!("add service {} on {}", service.name, service.listen),
        Command::RemoveService { service } => format!("remove service {service}"),
        Command::UpdateService { service } => format!("update settings of service {}", service.name),
        Command::AddBackend { service, backend } => {
            format!("add backend {} ({}) to {service}", backend.name, backend.address)
        }
        Command::RemoveBackend { service, backend } => format!("remove backend {backend} from {service}"),
        Command::UpdateBackend { service, backend } => format!(
            "update backend {} ({}) of {service}: weight {}, backup {}, state {:?}",
            backend.name, backend.address, backend.weight, backend.backup, backend.state
        ),
        Command::SetState {
            service,
            backend,
            state,
        } => format!("set {service}/{backend} state {state:?}"),
        Command::SetWeight {
            service,
            backend,
            weight,
        } => format!("set {service}/{backend} weight {weight}"),
        Command::SetHealth {
            service,
            backend,
            health,
        } => format!("{service}/{backend} health {health:?}"),
    }
}

fn forget_failed(config: &mut Config, command: &Command) {
    match command {
        Command::AddService { service } => config.services.retain(|s| s.name != service.name),
        Command::AddBackend { service, backend } => {
            if let Some(s) = config.services.iter_mut().find(|s| &s.name == service) {
                s.backends.retain(|b| b.address != backend.address);
            }
        }
        _ => {}
    }
}

/// Builds a config fragment and runs it through the config parser, so requests get the file's
/// defaults and validation.
fn parse_fragment(service: toml::Table) -> Result<ServiceConfig, EngineError> {
    let mut root = toml::Table::new();
    root.insert(
        "service".into(),
        toml::Value::Array(vec![toml::Value::Table(service)]),
    );
    let mut config = Config::parse(&root.to_string(), "request")?;
    Ok(config.services.remove(0))
}

fn backend_from_request(
    address: &str,
    name: Option<String>,
    weight: Option<u32>,
    backup: Option<bool>,
    state: Option<crate::config::AdminState>,
) -> Result<BackendConfig, EngineError> {
    let mut b = toml::Table::new();
    b.insert("address".into(), address.into());
    if let Some(n) = name {
        b.insert("name".into(), n.into());
    }
    if let Some(w) = weight {
        b.insert("weight".into(), (w as i64).into());
    }
    if let Some(x) = backup {
        b.insert("backup".into(), x.into());
    }
    if let Some(s) = state {
        b.insert("state".into(), enum_text(&s).into());
    }
    let mut s = toml::Table::new();
    s.insert("name".into(), "request".into());
    s.insert("listen".into(), "127.0.0.1:1".into());
    s.insert("backend".into(), toml::Value::Array(vec![toml::Value::Table(b)]));
    Ok(parse_fragment(s)?.backends.remove(0))
}

fn service_from_request(
    name: &str,
    listen: &str,
    protocol: Option<crate::config::Protocol>,
    datapath: Option<DatapathKind>,
    affinity_timeout: Option<String>,
    max_connections: Option<u32>,
) -> Result<ServiceConfig, EngineError> {
    let mut s = toml::Table::new();
    s.insert("name".into(), name.into());
    s.insert("listen".into(), listen.into());
    if let Some(p) = protocol {
        s.insert("protocol".into(), enum_text(&p).into());
    }
    if let Some(d) = datapath {
        s.insert("datapath".into(), enum_text(&d).into());
    }
    if let Some(t) = affinity_timeout {
        s.insert("affinity_timeout".into(), t.into());
    }
    if let Some(m) = max_connections {
        s.insert("max_connections".into(), (m as i64).into());
    }
    parse_fragment(s)
}
