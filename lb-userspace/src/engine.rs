//! The daemon's core: one [`Balancer`] behind a mutex, the datapaths, and the config last applied.
//!
//! Every change, whatever its source (config file at start, control socket, reload, health checks),
//! goes through [`Engine::execute`]: apply to the state, then let the datapath of the service follow.

use crate::config::enum_text;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::balancer::{Balancer, Reason, SelectError};
use crate::config::{BackendConfig, Config, ConfigError, DatapathKind, ServiceConfig};
use crate::control::protocol::{
    AFFINITY_LIST_DEFAULT, AffinityChange, AffinityChangeView, AffinityEntryView, AffinityListView,
    BackendStatsView, BackendView, CheckView, Query, ReloadView, Request, ResetView, ServiceStatsView,
    ServiceView, StatsView, StatusView, WhichView,
};
use crate::datapath::affinity::AffinityTable;
use crate::datapath::ajp::AjpDatapath;
use crate::datapath::proxy::ProxyDatapath;
use crate::datapath::xdp::XdpDatapath;
use crate::datapath::{Datapath, DatapathError, ServiceTraffic};
use crate::health::passive::Passive;
use crate::health::{HealthEvent, HealthSource, Supervisor};
use crate::runtime::Snapshot;
use crate::state::{self, Command, Effect, Health, Service, State, StateError, Transition, TransitionKind};

/// Whether a client at `client` can reach a service listening on `listen`: an IPv4 listener takes
/// only IPv4 clients (an XDP VIP is always one); an IPv6 one takes IPv6 clients, and IPv4 ones
/// too when it listens on every address (`[::]`, dual-stack).
fn reaches(client: IpAddr, listen: std::net::SocketAddr) -> bool {
    match (client, listen.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => true,
        (IpAddr::V4(_), IpAddr::V6(l)) => l.is_unspecified(),
        (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

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
    #[error(
        "service `{service}` listens on {listen}, which a client at {client} cannot reach; \
         ask about an {family} client"
    )]
    WrongFamily {
        service: String,
        listen: std::net::SocketAddr,
        client: IpAddr,
        family: &'static str,
    },
    #[error(transparent)]
    Xdp(#[from] crate::datapath::xdp::XdpError),
    #[error("service `{0}` keeps no affinity (affinity_timeout = 0); there is nothing to pin")]
    NoAffinity(String),
    #[error(
        "backend `{backend}` of `{service}` takes no clients now ({why}); pin clients to an active or draining backend that is up"
    )]
    PinRefused {
        service: String,
        backend: String,
        why: String,
    },
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
    /// Passive health: connect failures of real connections.
    Passive { reason: String },
    /// The state file, when the daemon starts (after the config file).
    Restore,
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
            Origin::Passive { reason } => write!(f, "passive: {reason}"),
            Origin::Restore => f.write_str("state file at start"),
        }
    }
}

pub struct Engine {
    balancer: Arc<Balancer>,
    /// Held by every change from stage to commit, so changes apply one at a time.
    commands: Mutex<()>,
    config: Mutex<Config>,
    /// One per kind; a service whose kind has none here cannot be added.
    datapaths: Vec<Box<dyn Datapath>>,
    health: Supervisor,
    /// The handle datapaths report connect outcomes through (into the health pipeline).
    passive: Passive,
    started: Instant,
    /// Writes the `state_file` after every change, when the config has one.
    persist: Option<crate::persist::Writer>,
    /// Keeps the VIP routes of `[announce]` in line with the state, when the config has one.
    announce: Option<crate::announce::Announcer>,
}

impl Engine {
    /// Builds an engine with the daemon's datapaths (the proxy always, XDP when `[xdp]` is set)
    /// and brings up every service of `config`. Health transitions are sent to `events`; feed them
    /// back through [`Engine::health_event`].
    pub fn start(
        config: Config,
        events: mpsc::Sender<HealthEvent>,
        shutdown: CancellationToken,
    ) -> Result<Engine, EngineError> {
        let wants_xdp = config.services.iter().any(|s| s.datapath == DatapathKind::Xdp);
        let xdp_config = config
            .xdp
            .clone()
            .filter(|x| wants_xdp || !x.interfaces.is_empty());
        let (seed, ring_size) = (config.seed, config.ring_size);
        let passive = Passive::new(events.clone());
        let announce = config.announce.as_ref().map(crate::announce::Announcer::new);
        let stop = shutdown.clone();
        let mut engine = Engine::assemble(config, events, shutdown, |balancer| {
            let mut datapaths: Vec<Box<dyn Datapath>> = vec![
                Box::new(ProxyDatapath::new(balancer.clone(), passive.clone())),
                Box::new(AjpDatapath::new(balancer.clone(), passive.clone())),
            ];
            if let Some(x) = &xdp_config {
                let xdp = XdpDatapath::start(Some(x), seed, ring_size)?;
                xdp.watch_passive(balancer.clone(), passive, stop);
                datapaths.push(Box::new(xdp));
            }
            Ok(datapaths)
        })?;
        if let Some(a) = announce {
            // Every service is up (and the state file restored); VIPs are announced as soon as
            // a check finds a backend up ([`Engine::announce_tick`]).
            a.follow(&engine.snapshot());
            engine.announce = Some(a);
        }
        Ok(engine)
    }

    /// Builds an engine over the datapaths `make` returns (given the shared balancer) and brings up
    /// every service of `config`. Tests pass [`crate::datapath::fake::FakeDatapath`]s here.
    pub fn assemble(
        config: Config,
        events: mpsc::Sender<HealthEvent>,
        shutdown: CancellationToken,
        make: impl FnOnce(&Arc<Balancer>) -> Result<Vec<Box<dyn Datapath>>, EngineError>,
    ) -> Result<Engine, EngineError> {
        let balancer = Arc::new(Balancer::new(State::new(config.seed, config.ring_size)));
        let mut engine = Engine {
            datapaths: make(&balancer)?,
            balancer,
            commands: Mutex::new(()),
            config: Mutex::new(config.clone()),
            passive: Passive::new(events.clone()),
            health: Supervisor::new(events, shutdown),
            started: Instant::now(),
            persist: None,
            announce: None,
        };
        for service in config.services.clone() {
            engine.execute_by(Command::AddService { service }, &Origin::Start)?;
        }
        if let Some(path) = &config.state_file {
            let persist = crate::persist::restore(&engine, path, &config.services);
            engine.persist = Some(crate::persist::Writer::start(persist));
        }
        for d in &engine.datapaths {
            d.finish_start()?;
        }
        Ok(engine)
    }

    /// The passive-health handle: a datapath reports connect outcomes through it, and its
    /// transitions come back through [`Engine::health_event`] like the checkers' ones.
    pub fn passive(&self) -> &Passive {
        &self.passive
    }

    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    fn datapath(&self, kind: DatapathKind) -> Option<&dyn Datapath> {
        self.datapaths.iter().find(|d| d.kind() == kind).map(|d| &**d)
    }

    /// The datapath of a service that exists (services are only added with their datapath).
    fn datapath_of(&self, service: &Service) -> &dyn Datapath {
        self.datapath(service.settings.datapath)
            .expect("a service is only added when its datapath runs")
    }

    /// The published state and runtime (no lock: later changes publish a new one).
    fn snapshot(&self) -> Arc<Snapshot> {
        self.balancer.snapshot()
    }

    /// Applies one command to the state and the datapath. On error nothing changed.
    pub fn execute(&self, command: Command) -> Result<Effect, EngineError> {
        self.execute_by(command, &Origin::Operator { uid: None })
    }

    /// [`Engine::execute`], recording `origin` as the reason of the health or state transition the
    /// command causes (in the backend's [`crate::runtime::TransitionLog`], and one log line each).
    ///
    /// A transaction: when the datapath refuses the change, the previous state is restored and
    /// applied to the datapath again, so a refused change leaves no trace.
    pub fn execute_by(&self, command: Command, origin: &Origin) -> Result<Effect, EngineError> {
        self.execute_checked(command, origin, None)
    }

    /// A change read from the state file at start: checked against the running config as a
    /// control-socket change is, recorded as [`Origin::Restore`].
    pub(crate) fn execute_restored(&self, command: Command) -> Result<Effect, EngineError> {
        let config = self.config.lock().unwrap();
        self.execute_checked(command, &Origin::Restore, Some(&config))
    }

    /// [`Engine::execute_by`], first checking the change against the running daemon's `config`
    /// (when given) under the same command lock, so two requests cannot both pass one limit.
    fn execute_checked(
        &self,
        command: Command,
        origin: &Origin,
        config: Option<&Config>,
    ) -> Result<Effect, EngineError> {
        let _one_at_a_time = self.commands.lock().unwrap();
        let current = self.balancer.snapshot();
        if let Some(config) = config {
            crate::control::check::fits(config, &current.state, &command)?;
        }
        let kind = match &command {
            Command::AddService { service } => service.datapath,
            other => current.state.service(other.service())?.settings.datapath,
        };
        let datapath = self
            .datapath(kind)
            .ok_or_else(|| DatapathError::Unavailable(command.service().to_string()))?;
        let description = describe(&command);
        let command_service = command.service().to_string();
        // Health and state of the backends the command targets, to see afterwards what changed.
        let targets: Vec<String> = match &command {
            Command::SetState { backend, .. } | Command::SetHealth { backend, .. } => vec![backend.clone()],
            Command::UpdateBackends { backends, .. } => {
                backends.iter().map(|b| b.address.to_string()).collect()
            }
            _ => Vec::new(),
        };
        let before: Vec<_> = targets
            .into_iter()
            .filter_map(|backend| {
                let be = current.state.service(&command_service).ok()?.backend(&backend)?;
                Some((backend, (be.config.state, be.health)))
            })
            .collect();
        let transition_only = matches!(command, Command::SetState { .. } | Command::SetHealth { .. });
        // The checkers depend on the services' backend addresses and check settings only.
        let same_checkers = matches!(
            command,
            Command::SetState { .. } | Command::SetHealth { .. } | Command::SetWeight { .. }
        );
        let (started, cpu_started) = (Instant::now(), thread_cpu());
        let pending = self.balancer.stage(command)?;
        let staged = started.elapsed();
        let applied = datapath.apply(pending.effect(), pending.snapshot());
        let in_datapath = started.elapsed().saturating_sub(staged);
        if let Err(e) = applied {
            // Not published: the state is as before. Bring the datapath back in line with it.
            let undo = match pending.effect() {
                Effect::ServiceAdded(name) => Effect::ServiceRemoved {
                    name: name.clone(),
                    id: pending.state().services.get(name).map_or(u32::MAX, |s| s.id),
                },
                Effect::ServiceRemoved { name, .. } => Effect::ServiceAdded(name.clone()),
                other => other.clone(),
            };
            if let Err(again) = datapath.apply(&undo, &current) {
                warn!(change = %description, error = %again, "could not restore the datapath after a refused change");
            }
            return Err(e.into());
        }
        let failback = pending.failback().cloned();
        let effect = self.balancer.commit(pending);
        if let (Some(failback), Some(table), Ok(svc)) = (
            failback,
            datapath.affinity_table(),
            self.balancer.snapshot().state.service(command_service.as_str()),
        ) {
            // The balancer let its own entries go at commit; the datapath's table follows.
            match table.flush(svc, &|e| failback.picks(e)) {
                Ok(n) => {
                    info!(service = %command_service, clients = n, "failback: clients return to the ring");
                }
                Err(e) => {
                    warn!(service = %command_service, error = %e, "failback: affinity entries not forgotten");
                }
            }
        }
        if effect != Effect::Nothing {
            let now = self.balancer.snapshot();
            for (backend, before) in before {
                record_transitions(&now, &command_service, &backend, before, origin);
            }
            if !same_checkers {
                self.health.reconcile(&now);
            }
            if let Some(a) = &self.announce {
                a.follow(&now);
            }
            if let Some(p) = &self.persist {
                p.save(now.clone());
            }
            // Where the time went: the new state (Maglev rebuild included), the datapath, the rest
            // (publish, health checkers, handing the state file its snapshot); and the CPU time
            // the change took on this thread (the wall time also holds waiting for a CPU).
            let (stage_us, datapath_us) = (staged.as_micros() as u64, in_datapath.as_micros() as u64);
            let total_us = started.elapsed().as_micros() as u64;
            let cpu_us = thread_cpu().saturating_sub(cpu_started).as_micros() as u64;
            if transition_only {
                tracing::debug!(change = %description, stage_us, datapath_us, total_us, cpu_us, "applied");
            } else {
                info!(change = %description, by = %origin, stage_us, datapath_us, total_us, cpu_us, "applied");
            }
        }
        Ok(effect)
    }

    /// Applies a health transition reported by a checker (logged once, with the reason), then lets
    /// the datapath react: reset the backend's connections (`on_down = "reset"`). Clients that
    /// failed over away from it return ([`crate::datapath::affinity::Failback`]) as the change is
    /// committed.
    pub fn health_event(&self, event: HealthEvent) {
        let HealthEvent {
            service,
            backend,
            health,
            reason,
            source,
        } = event;
        let command = Command::SetHealth {
            service: service.clone(),
            backend: backend.to_string(),
            health,
        };
        // The transition is logged ("backend DOWN" / "backend UP") and recorded as it is applied.
        let origin = match source {
            HealthSource::Check => Origin::Health { reason },
            HealthSource::Passive => Origin::Passive { reason },
        };
        if let Err(e) = self.execute_by(command, &origin) {
            // The backend or service went away while the check ran.
            info!(%service, %backend, error = %e, "health event dropped");
            return;
        }
        let snapshot = self.snapshot();
        let Ok(svc) = snapshot.state.service(&service) else {
            return;
        };
        let Some(be) = svc.backend(&backend.to_string()) else {
            return;
        };
        let datapath = self.datapath_of(svc);
        if health == Health::Down && svc.settings.on_down == crate::config::OnDown::Reset {
            let reset = datapath.reset_backend(svc, be, &snapshot.runtime(svc, be));
            info!(%service, %backend, connections = reset, "on_down = reset: open connections reset");
        }
    }

    /// Re-reads the config file and applies what changed since the last one applied (SIGHUP).
    pub fn reload(&self) -> Result<ReloadView, EngineError> {
        self.reload_by(None)
    }

    /// [`Engine::reload`] on behalf of the control-socket caller `uid`.
    pub fn reload_by(&self, uid: Option<u32>) -> Result<ReloadView, EngineError> {
        let origin = Origin::Reload { uid };
        // The file is read under the lock: of two reloads, the one that read it last applies last.
        let mut old = self.config.lock().unwrap();
        let path = old.path.clone().ok_or(EngineError::NoConfigFile)?;
        let new = Config::load(&path)?;
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
            ("[announce]", new.announce != old.announce),
            ("state_file", new.state_file != old.state_file),
        ];
        for (setting, changed) in restart_only {
            if changed {
                view.restart
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
            announce: old.announce.clone(),
            state_file: old.state_file.clone(),
            ..new.clone()
        };
        let before = self.snapshot();
        let mut commands = state::diff(&old, &new);
        self.keep_moves_that_cannot_listen(&before, &old, &mut commands, &mut applied_config, &mut view);
        for mut command in commands {
            // A backend the runtime removed since (or replaced by another of its address) is not
            // updated: reported once, and its entry counts as applied, as a removal's would.
            for gone in command.take_gone_backends(&self.snapshot().state) {
                let what = format!(
                    "update backend {} ({}) of {}",
                    gone.name,
                    gone.address,
                    command.service()
                );
                warn!(change = %what, "reload: backend not running, not updated");
                view.problems
                    .push(format!("{what}: the backend does not run (removed at runtime?)"));
            }
            if matches!(&command, Command::UpdateBackends { backends, .. } if backends.is_empty()) {
                continue;
            }
            let description = describe(&command);
            // Checked as a control-socket change is: against what runs (a service or backend added
            // at runtime, the settings read at start), not only against the file itself.
            match self.execute_checked(command.clone(), &origin, Some(&applied_config)) {
                Ok(_) => view.applied.push(description),
                Err(e) => {
                    warn!(change = %description, error = %e, "reload: change not applied");
                    view.problems.push(format!("{description}: {e}"));
                    // Remember what was not done, so the next reload tries again.
                    forget_failed(&mut applied_config, &old, &self.snapshot().state, &command);
                    if let Command::AddService { service } = &command
                        && let Some(was) = before.state.services.get(&service.name)
                        && self.snapshot().state.service(&service.name).is_err()
                    {
                        self.reload_put_back(was, &origin, &old, &mut applied_config, &mut view);
                    }
                }
            }
        }
        if let Some(p) = &self.persist {
            // Written with the new base: wait for saves queued against the old one.
            p.flush();
            p.persist().rebase(applied_config.services.clone());
            p.save(self.snapshot());
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

    /// Takes out of a reload's `commands` each move (a running service removed and added anew on
    /// another listen address) whose datapath could not listen where it goes: the service runs on
    /// as it was (connections, affinity, counters, health), the file's old entry stays the applied
    /// one so the next reload tries again, and the view reports it. An address in use passes only
    /// when a service this reload removes holds it (the real bind then decides).
    fn keep_moves_that_cannot_listen(
        &self,
        before: &Snapshot,
        old: &Config,
        commands: &mut Vec<Command>,
        applied: &mut Config,
        view: &mut ReloadView,
    ) {
        // Until nothing more is kept: a service kept where it was keeps its address from others.
        loop {
            let leaving: Vec<SocketAddr> = commands
                .iter()
                .filter_map(|c| match c {
                    Command::RemoveService { service } => before.state.services.get(service),
                    _ => None,
                })
                .map(|s| s.settings.listen)
                .collect();
            let refused = commands.iter().find_map(|c| {
                let Command::AddService { service } = c else {
                    return None;
                };
                let running = before.state.services.get(&service.name)?;
                let was = old.services.iter().find(|s| s.name == service.name)?;
                if running.settings.listen == service.listen {
                    return None;
                }
                let e = self
                    .datapath(service.datapath)?
                    .can_listen(&service.name, service.listen)
                    .err()?;
                let held_by_leaver = matches!(&e, DatapathError::Bind { source, .. }
                    if source.kind() == std::io::ErrorKind::AddrInUse)
                    && leaving.contains(&service.listen);
                (!held_by_leaver).then(|| (running.settings.listen, was.clone(), e))
            });
            let Some((listen, was, e)) = refused else { return };
            warn!(service = %was.name, %listen, error = %e, "reload: service kept as it was");
            view.problems
                .push(format!("service {} kept as it was, on {listen}: {e}", was.name));
            commands.retain(|c| match c {
                Command::AddService { service } => service.name != was.name,
                Command::RemoveService { service } => *service != was.name,
                _ => true,
            });
            applied.services.retain(|s| s.name != was.name);
            applied.services.push(was);
        }
    }

    /// A change removed `was` to make it anew (its listen address or datapath changed) and the
    /// new form did not come up: the service goes back as it ran before that change (runtime
    /// changes included; affinity and open connections are gone with the removal), so a refused
    /// change does not cost it its traffic. Used by a reload and by the state file's restore.
    pub(crate) fn put_back(&self, was: &state::Service, origin: &Origin) -> Result<Effect, EngineError> {
        self.execute_by(
            Command::AddService {
                service: was.config(),
            },
            origin,
        )
    }

    /// [`Engine::put_back`] in a reload: reported in its view, and the file's old entry stays the
    /// applied one, so the next reload tries the change again.
    fn reload_put_back(
        &self,
        was: &state::Service,
        origin: &Origin,
        old: &Config,
        applied: &mut Config,
        view: &mut ReloadView,
    ) {
        let name = &was.settings.name;
        match self.put_back(was, origin) {
            Ok(_) => {
                warn!(service = %name, listen = %was.settings.listen, "reload: service put back as it was");
                view.problems.push(format!(
                    "service {name} put back as it was, on {} (its affinity and counters start anew)",
                    was.settings.listen
                ));
                applied
                    .services
                    .extend(old.services.iter().find(|s| &s.name == name).cloned());
            }
            Err(e) => {
                warn!(service = %name, error = %e, "reload: the service could not be put back either");
                view.problems.push(format!(
                    "service {name} could not be put back as it was either: {e}"
                ));
            }
        }
    }

    /// Which backend `client` would reach now, and why (no side effects). A datapath with tables
    /// of its own (XDP: conntrack when a port is given, affinity, ring) answers from them; the
    /// others answer from the shared balancer.
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
        // An IPv4 client written as IPv6 (`::ffff:192.0.2.9`) is that IPv4 client.
        let ip = ip.to_canonical();
        let snapshot = self.snapshot();
        let svc = snapshot.state.service(service)?;
        // An AJP service's clients are the web tier's browsers, whose addresses come in its
        // requests: any family, whatever the listener's.
        if svc.settings.datapath != DatapathKind::Ajp && !reaches(ip, svc.settings.listen) {
            return Err(EngineError::WrongFamily {
                service: service.to_string(),
                listen: svc.settings.listen,
                client: ip,
                family: if svc.settings.listen.is_ipv4() {
                    "IPv4"
                } else {
                    "IPv6"
                },
            });
        }
        let view = |backend: Option<&state::Backend>, reason: &str, detail: String| WhichView {
            service: service.to_string(),
            client: client.to_string(),
            backend: backend.map(|b| b.config.name.clone()),
            address: backend.map(|b| b.config.address.to_string()),
            reason: reason.to_string(),
            detail,
        };
        if let Some(w) = self.datapath_of(svc).which(svc, ip, port) {
            let backend = w.backend_id.and_then(|id| svc.backend_by_id(id));
            return Ok(view(backend, w.reason, w.detail));
        }
        let b = &self.balancer;
        let now = Instant::now();
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
                        svc.ring.len(),
                        if svc.ring_uses_backups { " (backups)" } else { "" }
                    ),
                    Reason::Backup => "a healthy backup".to_string(),
                };
                Ok(view(
                    svc.backend_by_id(c.backend_id),
                    &enum_text(&c.reason),
                    detail,
                ))
            }
            Err(SelectError::NoBackend(_)) => {
                Ok(view(None, "none", "no backend takes new clients".to_string()))
            }
            Err(SelectError::State(e)) => Err(e.into()),
        }
    }

    /// `check`: whether `service` has a backend that takes new clients, with a one-line reason.
    pub fn check(&self, service: &str) -> CheckView {
        let snapshot = self.snapshot();
        let Ok(svc) = snapshot.state.service(service) else {
            return CheckView {
                service: service.to_string(),
                status: CheckView::UNKNOWN_SERVICE.into(),
                detail: format!("no service `{service}`"),
                announced: None,
            };
        };
        let taking: Vec<&str> = crate::announce::taking_new_clients(svc)
            .map(|b| b.config.name.as_str())
            .collect();
        let ok = crate::announce::serving(&snapshot, svc);
        let detail = if ok {
            format!(
                "{} of {} backends take new clients{}: {}",
                taking.len(),
                svc.backends.len(),
                if svc.ring_uses_backups {
                    " (backups; no primary does)"
                } else {
                    ""
                },
                taking.join(", ")
            )
        } else if !taking.is_empty() {
            format!(
                "no backend has passed a health check yet ({} take new clients once one does)",
                taking.join(", ")
            )
        } else if svc.backends.is_empty() {
            "no backend takes new clients: the service has no backends".to_string()
        } else {
            let why: Vec<String> = svc
                .backends
                .iter()
                .map(|b| {
                    let state = if b.health == Health::Down {
                        "down".to_string()
                    } else if b.config.weight == 0 {
                        "weight 0".to_string()
                    } else {
                        enum_text(&b.config.state)
                    };
                    format!("{} {state}", b.config.name)
                })
                .collect();
            format!("no backend takes new clients ({})", why.join(", "))
        };
        CheckView {
            service: service.to_string(),
            status: if ok { CheckView::OK } else { CheckView::NO_BACKEND }.into(),
            detail,
            announced: self
                .announce
                .as_ref()
                .map(|a| a.is_announced(svc.settings.listen.ip())),
        }
    }

    /// Withdraws every announced VIP at once (the daemon is stopping); nothing is announced after.
    pub fn withdraw_announcements(&self) {
        if let Some(a) = &self.announce {
            a.withdraw_all();
        }
    }

    /// Counters of the datapaths as a whole (the XDP program's).
    fn global_counters(&self) -> Option<lb_common::counters::XdpCounters> {
        self.datapaths
            .iter()
            .find_map(|d| d.global_counters())
            .map(lb_common::counters::XdpCounters::from_named)
    }

    /// Each service of a state snapshot with its datapath's counters and its clients with
    /// affinity per backend id (read without any lock held).
    fn traffic<'s>(
        &self,
        snapshot: &'s Snapshot,
        only: Option<&str>,
    ) -> Vec<(&'s Service, ServiceTraffic, HashMap<u32, u64>)> {
        snapshot
            .state
            .services
            .values()
            .filter(|s| only.is_none_or(|o| o == s.settings.name))
            .map(|s| {
                let mut affinity = HashMap::new();
                for e in self.affinity_of(s).entries(s) {
                    *affinity.entry(e.backend_id).or_default() += 1;
                }
                (s, self.datapath_of(s).traffic(s), affinity)
            })
            .collect()
    }

    /// The affinity table of a service: its datapath's own, else the balancer's.
    fn affinity_of(&self, service: &Service) -> &dyn AffinityTable {
        self.datapath_of(service)
            .affinity_table()
            .unwrap_or(&*self.balancer)
    }

    /// `affinity-list`: live entries of `service` (on `backend` only, when given), most recent first.
    pub fn affinity_list(
        &self,
        service: &str,
        backend: Option<&str>,
        limit: Option<u32>,
    ) -> Result<AffinityListView, EngineError> {
        let snapshot = self.snapshot();
        let svc = snapshot.state.service(service)?;
        let only = backend.map(|b| backend_of(svc, b)).transpose()?.map(|b| b.id);
        let mut entries: Vec<_> = self
            .affinity_of(svc)
            .entries(svc)
            .into_iter()
            .filter(|e| only.is_none_or(|id| id == e.backend_id))
            .collect();
        let total = entries.len() as u64;
        entries.sort_by_key(|e| (e.idle, e.client));
        let name = |id: u32| svc.backend_by_id(id).map(|b| b.config.name.clone());
        let entries = entries
            .into_iter()
            .take(limit.unwrap_or(AFFINITY_LIST_DEFAULT) as usize)
            .filter_map(|e| {
                let b = svc.backend_by_id(e.backend_id)?;
                Some(AffinityEntryView {
                    client: e.client.to_string(),
                    backend: b.config.name.clone(),
                    address: b.config.address.to_string(),
                    home: e.home.and_then(name),
                    idle_secs: e.idle.as_secs(),
                })
            })
            .collect();
        Ok(AffinityListView {
            service: service.to_string(),
            total,
            entries,
        })
    }

    /// `affinity-flush` and `affinity-set`, one at a time with the state's changes and logged as
    /// they are. A refused change (unknown service or backend, a backend that takes no clients, an
    /// address the datapath cannot hold) changes nothing.
    pub fn affinity_change(
        &self,
        change: AffinityChange,
        origin: &Origin,
    ) -> Result<AffinityChangeView, EngineError> {
        let _one_at_a_time = self.commands.lock().unwrap();
        let snapshot = self.snapshot();
        let view = match &change {
            AffinityChange::AffinityFlush { service, backend } => {
                let svc = snapshot.state.service(service)?;
                let only = backend.as_deref().map(|b| backend_of(svc, b)).transpose()?;
                let id = only.map(|b| b.id);
                let n = self
                    .affinity_of(svc)
                    .flush(svc, &|e| id.is_none_or(|id| id == e.backend_id))?;
                AffinityChangeView {
                    summary: match only {
                        Some(b) => format!(
                            "forgot {n} affinity entries of {service} on {}; their clients follow the ring",
                            b.config.name
                        ),
                        None => {
                            format!("forgot {n} affinity entries of {service}; their clients follow the ring")
                        }
                    },
                    entries: n as u64,
                }
            }
            AffinityChange::AffinitySet {
                service,
                client,
                backend,
            } => {
                let svc = snapshot.state.service(service)?;
                let be = backend_of(svc, backend)?;
                if svc.settings.affinity_timeout.is_zero() {
                    return Err(EngineError::NoAffinity(service.clone()));
                }
                if !be.admits_known() {
                    let why = if be.health == Health::Down {
                        "down".to_string()
                    } else {
                        format!("state {}", enum_text(&be.config.state))
                    };
                    return Err(EngineError::PinRefused {
                        service: service.clone(),
                        backend: be.config.name.clone(),
                        why,
                    });
                }
                self.affinity_of(svc).pin(svc, *client, be.id)?;
                AffinityChangeView {
                    summary: format!(
                        "{client} sticks to {} ({}) in {service}",
                        be.config.name, be.config.address
                    ),
                    entries: 1,
                }
            }
        };
        info!(change = %view.summary, by = %origin, "applied");
        Ok(view)
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
        let snapshot = self.snapshot();
        if let Some(name) = only {
            snapshot.state.service(name)?;
        }
        let services = self
            .traffic(&snapshot, only)
            .into_iter()
            .map(|(s, traffic, affinity)| {
                let ring_slots = slots(&s.ring);
                let backends = s
                    .backends
                    .iter()
                    .map(|be| {
                        let runtime = snapshot.runtime(s, be);
                        let t = traffic.of(be, &runtime);
                        let affinity_clients = affinity.get(&be.id).copied().unwrap_or(0);
                        BackendView {
                            name: be.config.name.clone(),
                            address: be.config.address.to_string(),
                            weight: be.config.weight,
                            backup: be.config.backup,
                            state: be.config.state,
                            health: be.health,
                            ring_slots: ring_slots.get(&be.id).copied().unwrap_or(0),
                            check: (s.settings.health.kind != crate::config::HealthKind::None)
                                .then(|| runtime.check.lock().unwrap().snapshot()),
                            active_connections: t.active,
                            total_connections: t.total,
                            connect_failures: t.connect_failures.unwrap_or(0),
                            bytes_in: t.bytes_in,
                            bytes_out: t.bytes_out,
                            affinity_clients,
                            drained: be.config.state == crate::config::AdminState::Drain
                                && t.active == 0
                                && affinity_clients == 0
                                && runtime
                                    .stats
                                    .since_session()
                                    .is_none_or(|d| d >= s.settings.affinity_timeout),
                        }
                    })
                    .collect();
                ServiceView {
                    name: s.settings.name.clone(),
                    listen: s.settings.listen.to_string(),
                    protocol: s.settings.protocol,
                    datapath: s.settings.datapath,
                    forwarding: s.settings.forwarding,
                    affinity_timeout_secs: s.settings.affinity_timeout.as_secs(),
                    affinity_entries: affinity.values().sum(),
                    on_backups: s.ring_uses_backups,
                    failed_connections: traffic.failed_connections.unwrap_or(0),
                    ajp: traffic.ajp,
                    backends,
                }
            })
            .collect();
        Ok(StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            config,
            xdp: self.global_counters(),
            services,
        })
    }

    /// Counters of every service and backend for `lb stats`, `lb top` and the metrics endpoint.
    ///
    /// The balancer is locked only to copy the state; the datapaths' counters (the kernel's, for
    /// XDP services) are read afterwards, so a slow map walk never holds up forwarding or the
    /// control socket.
    pub fn stats(&self) -> StatsView {
        let taken_unix_ms = unix_ms();
        let snapshot = self.snapshot();
        let services = self
            .traffic(&snapshot, None)
            .into_iter()
            .map(|(s, traffic, affinity)| {
                let ring_slots = slots(&s.ring);
                let checked = s.settings.health.kind != crate::config::HealthKind::None;
                let backends = s
                    .backends
                    .iter()
                    .map(|be| {
                        let runtime = snapshot.runtime(s, be);
                        let t = traffic.of(be, &runtime);
                        let log = runtime.transitions.lock().unwrap().clone();
                        BackendStatsView {
                            name: be.config.name.clone(),
                            address: be.config.address.to_string(),
                            weight: be.config.weight,
                            backup: be.config.backup,
                            state: be.config.state,
                            health: be.health,
                            ring_slots: ring_slots.get(&be.id).copied().unwrap_or(0),
                            connections_active: t.active,
                            connections_total: t.total,
                            affinity_clients: affinity.get(&be.id).copied().unwrap_or(0),
                            bytes_in: t.bytes_in,
                            bytes_out: t.bytes_out,
                            packets_in: t.packets_in,
                            packets_out: t.packets_out,
                            connect_failures: t.connect_failures,
                            check: checked.then(|| runtime.check.lock().unwrap().snapshot()),
                            health_transitions: log.health,
                            state_transitions: log.state,
                            transitions: log.recent().cloned().collect(),
                        }
                    })
                    .collect();
                ServiceStatsView {
                    name: s.settings.name.clone(),
                    listen: s.settings.listen.to_string(),
                    protocol: s.settings.protocol,
                    datapath: s.settings.datapath,
                    affinity_entries: affinity.values().sum(),
                    on_backups: s.ring_uses_backups,
                    failed_connections: traffic.failed_connections,
                    ajp: traffic.ajp,
                    backends,
                }
            })
            .collect();
        let uptime = self.started.elapsed();
        StatsView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: uptime.as_secs(),
            start_time_unix: taken_unix_ms.saturating_sub(uptime.as_millis() as u64) / 1000,
            taken_unix_ms,
            xdp: self.global_counters(),
            proxy_workers: crate::datapath::workers::connections(),
            services,
        }
    }

    /// Answers one control request.
    pub fn handle(&self, request: Request) -> Result<serde_json::Value, EngineError> {
        self.handle_from(request, None)
    }

    /// [`Engine::handle`] for the control-socket caller `uid` (recorded as who made a change).
    ///
    /// A change is first checked against the running daemon ([`crate::control::check::fits`]:
    /// the config file's rules that depend on its `[xdp]`, `[metrics]`, `ring_size` and the
    /// other services), then executed.
    pub fn handle_from(&self, request: Request, uid: Option<u32>) -> Result<serde_json::Value, EngineError> {
        Ok(match request {
            Request::Query(Query::Status {}) => json(&self.status(None)?),
            Request::Query(Query::Stats {}) => json(&self.stats()),
            Request::Query(Query::Backends { service }) => json(&self.status(service.as_deref())?),
            Request::Query(Query::Which { service, client }) => json(&self.which(&service, &client)?),
            Request::Query(Query::Check { service }) => json(&self.check(&service)),
            Request::Query(Query::AffinityList {
                service,
                backend,
                limit,
            }) => json(&self.affinity_list(&service, backend.as_deref(), limit)?),
            Request::Affinity(change) => json(&self.affinity_change(change, &Origin::Operator { uid })?),
            Request::Reload => json(&self.reload_by(uid)?),
            Request::Change(command) => {
                let config = self.config.lock().unwrap();
                self.execute_checked(command, &Origin::Operator { uid }, Some(&config))?;
                serde_json::Value::Null
            }
            Request::DisableReset { service, backend } => {
                json(&self.disable_with_reset(service, backend, &Origin::Operator { uid })?)
            }
        })
    }

    /// `lb backend disable --reset`: the backend goes to maintenance, then its datapath resets
    /// its open connections (the proxies close both sides; XDP marks the flows so each end's
    /// next packet is answered with an RST). Also resets what is left on a backend already in
    /// maintenance.
    fn disable_with_reset(
        &self,
        service: String,
        backend: String,
        origin: &Origin,
    ) -> Result<ResetView, EngineError> {
        let command = Command::SetState {
            service: service.clone(),
            backend: backend.clone(),
            state: crate::config::AdminState::Maintenance,
        };
        {
            let config = self.config.lock().unwrap();
            self.execute_checked(command, origin, Some(&config))?;
        }
        let snapshot = self.snapshot();
        let svc = snapshot.state.service(&service)?;
        let Some(be) = svc.backend(&backend) else {
            // Removed by another change in between: nothing left to reset.
            return Ok(ResetView {
                service,
                backend,
                connections: 0,
            });
        };
        let connections = self
            .datapath_of(svc)
            .reset_backend(svc, be, &snapshot.runtime(svc, be)) as u64;
        let name = be.config.name.clone();
        info!(%service, backend = %name, connections, by = %origin, "maintenance with reset: open connections reset");
        Ok(ResetView {
            service,
            backend: name,
            connections,
        })
    }

    /// Brings the `[announce]` routes in line with the state (the daemon calls it every second):
    /// announces a VIP once a check has found one of its backends up (that changes no state),
    /// puts back a route removed by hand, retries after a netlink error.
    pub fn announce_tick(&self) {
        if let Some(a) = &self.announce {
            let _one_at_a_time = self.commands.lock().unwrap();
            a.follow(&self.snapshot());
        }
    }

    /// Drops expired affinity entries.
    pub fn sweep(&self) {
        self.balancer.sweep(Instant::now());
    }

    /// Stops accepting; resolves when open connections have finished.
    pub async fn shutdown(&self) {
        // Every datapath stops accepting first, then each one's open connections finish.
        let drains: Vec<_> = self.datapaths.iter().map(|d| d.shutdown()).collect();
        for drained in drains {
            drained.await;
        }
    }

    /// Waits until the state file holds the last change (the daemon calls this before it exits).
    pub fn flush_state_file(&self) {
        if let Some(p) = &self.persist {
            p.flush();
        }
    }
}

/// Records (and logs, one line each) the health and state transitions of backend `backend` of
/// `service` since `before` (its operator state and health before the command).
fn record_transitions(
    snapshot: &Snapshot,
    service: &str,
    backend: &str,
    before: (crate::config::AdminState, Health),
    origin: &Origin,
) {
    let Ok(svc) = snapshot.state.service(service) else {
        return;
    };
    let Some(be) = svc.backend(backend) else {
        return;
    };
    let name = &be.config.name;
    let address = be.config.address;
    let runtime = snapshot.runtime(svc, be);
    let mut log = runtime.transitions.lock().unwrap();
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

/// The backend of `service` named by `reference` (name or address).
fn backend_of<'s>(service: &'s Service, reference: &str) -> Result<&'s state::Backend, StateError> {
    service.backend(reference).ok_or_else(|| StateError::NoBackend {
        service: service.settings.name.clone(),
        backend: reference.to_string(),
    })
}

/// Wall-clock time in milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CPU time this thread has used (zero where the clock cannot be read).
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(Duration::ZERO, Duration::from)
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
pub(crate) fn describe(command: &Command) -> String {
    match command {
        Command::AddService { service } => format!("add service {} on {}", service.name, service.listen),
        Command::RemoveService { service } => format!("remove service {service}"),
        Command::UpdateService { service } => format!("update settings of service {}", service.name),
        Command::AddBackend { service, backend } => {
            format!("add backend {} ({}) to {service}", backend.name, backend.address)
        }
        Command::AddBackends { service, backends } => match &backends[..] {
            [one] => format!("add backend {} ({}) to {service}", one.name, one.address),
            many => format!(
                "add {} backends to {service}: {}{}",
                many.len(),
                many.iter()
                    .take(3)
                    .map(|b| b.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if many.len() > 3 { ", …" } else { "" }
            ),
        },
        Command::RemoveBackend { service, backend } => format!("remove backend {backend} from {service}"),
        Command::UpdateBackends { service, backends } => {
            let fields = |b: &BackendConfig| {
                format!(
                    "weight {}, backup {}, state {:?}, route {:?}",
                    b.weight, b.backup, b.state, b.route
                )
            };
            match &backends[..] {
                [b] => format!(
                    "update backend {} ({}) of {service}: {}",
                    b.name,
                    b.address,
                    fields(b)
                ),
                many => format!(
                    "update {} backends of {service}: {}",
                    many.len(),
                    many.iter()
                        .map(|b| format!("{} ({}): {}", b.name, b.address, fields(b)))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }
        }
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

/// Keeps in the config a reload records as applied what a failed `command` left as it runs, so the
/// next reload finds the difference again and retries it instead of taking it for done: an add
/// that failed is not there; a removal or update whose target still runs keeps the `old` file's
/// entry. A target already gone (removed at runtime) counts as removed, so no later reload trips
/// over it again.
fn forget_failed(config: &mut Config, old: &Config, running: &state::State, command: &Command) {
    fn service_of<'a>(config: &'a mut Config, name: &str) -> Option<&'a mut ServiceConfig> {
        config.services.iter_mut().find(|s| s.name == name)
    }
    let old_service = |name: &str| old.services.iter().find(|s| s.name == name);
    let runs = |name: &str| running.service(name).ok();
    // Whether service `name` runs a backend `matching`.
    let runs_backend = |name: &str, matching: &dyn Fn(&BackendConfig) -> bool| {
        runs(name).is_some_and(|s| s.backends.iter().any(|b| matching(&b.config)))
    };
    match command {
        Command::AddService { service } => {
            config.services.retain(|s| s.name != service.name);
            // Its removal failed too: it still runs as the old file had it.
            if runs(&service.name).is_some()
                && let Some(was) = old_service(&service.name)
            {
                config.services.push(was.clone());
            }
        }
        Command::RemoveService { service } => {
            if runs(service).is_some()
                && let Some(was) = old_service(service)
            {
                config.services.retain(|s| &s.name != service);
                config.services.push(was.clone());
            }
        }
        Command::UpdateService { service } => {
            if runs(&service.name).is_some()
                && let (Some(was), Some(s)) = (old_service(&service.name), service_of(config, &service.name))
            {
                let backends = std::mem::take(&mut s.backends);
                *s = ServiceConfig {
                    backends,
                    ..was.clone()
                };
            }
        }
        Command::AddBackend { service, backend } => {
            if let Some(s) = service_of(config, service) {
                s.backends.retain(|b| b.address != backend.address);
            }
        }
        Command::UpdateBackends { service, backends } => {
            for backend in backends {
                let same = |b: &&BackendConfig| b.identity() == backend.identity();
                let still = runs_backend(service, &|b| same(&b));
                let was = old_service(service).and_then(|o| o.backends.iter().find(same));
                if still
                    && let (Some(was), Some(s)) = (was, service_of(config, service))
                    && let Some(b) = s.backends.iter_mut().find(|b| same(&&**b))
                {
                    *b = was.clone();
                }
            }
        }
        Command::RemoveBackend { service, backend } => {
            let at = |b: &&BackendConfig| b.address.to_string() == *backend;
            let still = runs_backend(service, &|b| at(&b));
            let was = old_service(service).and_then(|o| o.backends.iter().find(at));
            if still && let (Some(was), Some(s)) = (was, service_of(config, service)) {
                s.backends.push(was.clone());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
