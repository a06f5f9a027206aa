//! The desired forwarding state: services, their backends and Maglev rings. Plain data, no I/O.
//!
//! Every change arrives as a [`Command`] (from the config file, the control socket, reload or the
//! health checker) and is applied by [`State::apply`], which rebuilds the ring of the touched service
//! and returns an [`Effect`] for the datapaths.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{AdminState, BackendConfig, Config, DatapathKind, ServiceConfig};
use crate::datapath::ajp::route_of;
use crate::maglev;

/// Health as decided by the checker (or `Up` when a service has no checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

/// How many recent transitions each backend keeps.
pub const RECENT_TRANSITIONS: usize = 16;

/// What changed in a [`Transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransitionKind {
    /// Health decided by the checks: `up` ↔ `down`.
    Health,
    /// Operator state: `active`, `drain`, `maintenance`.
    State,
}

impl TransitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionKind::Health => "health",
            TransitionKind::State => "state",
        }
    }
}

/// One change of a backend's health or operator state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Unix time in milliseconds.
    pub unix_ms: u64,
    pub kind: TransitionKind,
    pub from: String,
    pub to: String,
    /// Why: the failed check's result, or who changed the state ("operator uid 0", "reload").
    pub reason: String,
}

/// A backend inside the state.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Stable within its service for the backend's lifetime (index into kernel arrays later).
    /// A service's backends are in the order of their ids.
    pub id: u32,
    pub config: BackendConfig,
    pub health: Health,
}

impl Backend {
    /// May take clients it has never seen (ring member).
    pub fn admits_new(&self) -> bool {
        self.config.state == AdminState::Active && self.health == Health::Up && self.config.weight > 0
    }

    /// May take clients that have affinity to it.
    pub fn admits_known(&self) -> bool {
        self.health == Health::Up && matches!(self.config.state, AdminState::Active | AdminState::Drain)
    }

    fn matches(&self, reference: &str) -> bool {
        self.config.name == reference || self.config.address.to_string() == reference
    }
}

/// A service inside the state.
#[derive(Clone, Debug)]
pub struct Service {
    pub id: u32,
    /// Settings; `settings.backends` is kept empty (the live list is `backends`).
    pub settings: ServiceConfig,
    /// In the order of their ids (the order they were added in).
    pub backends: Vec<Backend>,
    /// Maglev table of backend ids; empty when no backend takes new clients.
    pub ring: Arc<Vec<u32>>,
    /// Whether the ring is made of backups (no primary takes new clients).
    pub ring_uses_backups: bool,
    /// What `ring` was built from.
    ring_inputs: Arc<RingInputs>,
    /// The ring before the last build, and what it was built from (kept to be taken back).
    previous_ring: Option<(Arc<RingInputs>, Arc<Vec<u32>>)>,
    next_backend_id: u32,
}

impl Service {
    /// The service as it runs now, as a config: its settings with the live backends (runtime
    /// changes included).
    pub fn config(&self) -> ServiceConfig {
        ServiceConfig {
            backends: self.backends.iter().map(|b| b.config.clone()).collect(),
            ..self.settings.clone()
        }
    }

    pub fn backend(&self, reference: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.matches(reference))
    }

    pub fn backend_by_id(&self, id: u32) -> Option<&Backend> {
        // `backends` is in id order: ids are handed out in increasing order and only appended.
        self.backends
            .binary_search_by_key(&id, |b| b.id)
            .ok()
            .map(|at| &self.backends[at])
    }

    fn backend_mut(&mut self, reference: &str) -> Result<&mut Backend, StateError> {
        let service = self.settings.name.clone();
        self.backends
            .iter_mut()
            .find(|b| b.matches(reference))
            .ok_or(StateError::NoBackend {
                service,
                backend: reference.to_string(),
            })
    }

    /// Brings the ring in line with the backends. The table is a function of its members (id,
    /// key, weight), the size and the seed alone, so it is built only when they differ from those
    /// of the current ring and of the one before it (a drain undone, a backend down and up again,
    /// a change to a backup while the primaries serve: no build).
    fn rebuild_ring(&mut self, ring_size: u32, seed: u32) {
        let inputs = RingInputs::of(&self.backends, ring_size, seed);
        if inputs == *self.ring_inputs {
            return;
        }
        // Taken either way: the ring replaced below becomes the previous one.
        if let Some(previous) = self.previous_ring.take()
            && *previous.0 == inputs
        {
            let current = (self.ring_inputs.clone(), self.ring.clone());
            (self.ring_inputs, self.ring) = previous;
            self.ring_uses_backups = inputs.backups;
            self.previous_ring = Some(current);
            return;
        }
        let members: Vec<maglev::Member<'_>> = inputs
            .members
            .iter()
            .map(|(id, weight, span)| maglev::Member {
                id: *id,
                key: &inputs.text.as_bytes()[span.clone()],
                weight: *weight,
            })
            .collect();
        let ring = Arc::new(maglev::build(&members, ring_size, seed));
        self.ring_uses_backups = inputs.backups;
        let current = (
            std::mem::replace(&mut self.ring_inputs, Arc::new(inputs)),
            std::mem::replace(&mut self.ring, ring),
        );
        self.previous_ring = Some(current);
    }
}

/// What a Maglev table is built from: its members (id, weight, key) in id order, whether they
/// are the backups, the table size and the seed. Two equal inputs give the same table.
#[derive(Debug, Default, PartialEq, Eq)]
struct RingInputs {
    /// The members' keys (their addresses as text) one after the other: one allocation, not
    /// one per backend.
    text: String,
    /// Id, weight and span of the key in `text` of each member.
    members: Vec<(u32, u32, std::ops::Range<usize>)>,
    backups: bool,
    size: u32,
    seed: u32,
}

impl RingInputs {
    /// The ring members of `backends`: the active, healthy primaries with weight, or the
    /// backups when no primary takes new clients.
    fn of(backends: &[Backend], size: u32, seed: u32) -> RingInputs {
        use std::fmt::Write as _;
        let takers = || backends.iter().filter(|b| b.admits_new());
        let primaries = takers().any(|b| !b.config.backup);
        let mut text = String::with_capacity(backends.len() * 24);
        let mut members = Vec::with_capacity(backends.len());
        for b in takers().filter(|b| b.config.backup != primaries) {
            let start = text.len();
            let _ = write!(text, "{}", b.config.address);
            members.push((b.id, b.config.weight, start..text.len()));
        }
        RingInputs {
            text,
            backups: !primaries && !members.is_empty(),
            members,
            size,
            seed,
        }
    }
}

/// One change to the state. The same vocabulary serves the config file, the control socket, reload
/// and the health checker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    AddService {
        service: ServiceConfig,
    },
    RemoveService {
        service: String,
    },
    /// Changes a service's settings (timeouts, health, limits); backends and listen stay.
    UpdateService {
        service: ServiceConfig,
    },
    AddBackend {
        service: String,
        backend: BackendConfig,
    },
    /// Adds several backends at once: one ring rebuild, all of them or none.
    AddBackends {
        service: String,
        backends: Vec<BackendConfig>,
    },
    RemoveBackend {
        service: String,
        backend: String,
    },
    /// Sets weight, backup flag, state and route of existing backends (found by address and
    /// name), all of them or none: checked as a whole, so two AJP backends can swap routes in one
    /// change.
    UpdateBackends {
        service: String,
        backends: Vec<BackendConfig>,
    },
    SetState {
        service: String,
        backend: String,
        state: AdminState,
    },
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
    },
    SetHealth {
        service: String,
        backend: String,
        health: Health,
    },
}

impl Command {
    /// Takes out of an [`Command::UpdateBackends`] the backends that no longer run in `state`
    /// (matched by address and name: removed at runtime, say) and returns them, so that they do
    /// not hold back the others. Other commands give none.
    pub fn take_gone_backends(&mut self, state: &State) -> Vec<BackendConfig> {
        let Command::UpdateBackends { service, backends } = self else {
            return Vec::new();
        };
        let Ok(running) = state.service(service) else {
            return Vec::new(); // the whole command fails, as it should
        };
        let (kept, gone) = std::mem::take(backends).into_iter().partition(|b| {
            running
                .backends
                .iter()
                .any(|r| r.config.identity() == b.identity())
        });
        *backends = kept;
        gone
    }

    /// The service the command is about.
    pub fn service(&self) -> &str {
        match self {
            Command::AddService { service } | Command::UpdateService { service } => &service.name,
            Command::RemoveService { service }
            | Command::AddBackend { service, .. }
            | Command::AddBackends { service, .. }
            | Command::RemoveBackend { service, .. }
            | Command::UpdateBackends { service, .. }
            | Command::SetState { service, .. }
            | Command::SetWeight { service, .. }
            | Command::SetHealth { service, .. } => service,
        }
    }
}

/// What a command changed, for the datapaths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    ServiceAdded(String),
    ServiceRemoved {
        name: String,
        id: u32,
    },
    /// Settings, backends or ring of a service changed.
    ServiceChanged(String),
    /// The command changed nothing (e.g. set to the current value).
    Nothing,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("no service named `{0}`; `lb service list` shows the services")]
    NoService(String),
    #[error("service `{0}` exists already")]
    ServiceExists(String),
    #[error("service `{existing}` listens on {listen} already")]
    ListenInUse { existing: String, listen: SocketAddr },
    #[error("service `{service}` has no backend `{backend}` (give its name or address)")]
    NoBackend { service: String, backend: String },
    #[error("service `{service}` has a backend named `{name}` or at {address} already")]
    BackendExists {
        service: String,
        name: String,
        address: SocketAddr,
    },
    #[error("weight {0} is out of range; allowed 0..=256")]
    Weight(u32),
    #[error(
        "service `{service}`: route `{route}` is already the route of backend `{backend}`; each backend needs its own route (Tomcat jvmRoute), give this one --route"
    )]
    RouteInUse {
        service: String,
        route: String,
        backend: String,
    },
}

/// Services keyed by name, and the hashing parameters shared by all rings.
#[derive(Clone, Debug)]
pub struct State {
    pub seed: u32,
    pub ring_size: u32,
    pub services: BTreeMap<String, Service>,
    next_service_id: u32,
}

impl State {
    pub fn new(seed: u32, ring_size: u32) -> Self {
        State {
            seed,
            ring_size,
            services: BTreeMap::new(),
            next_service_id: 0,
        }
    }

    /// The state a config describes (as if each service were added by a command).
    pub fn from_config(config: &Config) -> Result<Self, StateError> {
        let mut state = State::new(config.seed, config.ring_size);
        for service in &config.services {
            state.apply(Command::AddService {
                service: service.clone(),
            })?;
        }
        Ok(state)
    }

    pub fn service(&self, name: &str) -> Result<&Service, StateError> {
        self.services
            .get(name)
            .ok_or_else(|| StateError::NoService(name.to_string()))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, StateError> {
        self.services
            .get_mut(name)
            .ok_or_else(|| StateError::NoService(name.to_string()))
    }

    /// Applies one command; on error nothing changed.
    pub fn apply(&mut self, command: Command) -> Result<Effect, StateError> {
        let (ring_size, seed) = (self.ring_size, self.seed);
        let name = command.service().to_string();
        match command {
            Command::AddService { mut service } => {
                if self.services.contains_key(&service.name) {
                    return Err(StateError::ServiceExists(service.name));
                }
                if let Some(other) = self
                    .services
                    .values()
                    .find(|s| s.settings.listen == service.listen)
                {
                    return Err(StateError::ListenInUse {
                        existing: other.settings.name.clone(),
                        listen: service.listen,
                    });
                }
                let backends = std::mem::take(&mut service.backends);
                let mut new = Service {
                    id: self.next_service_id,
                    settings: service,
                    backends: Vec::new(),
                    ring: Arc::new(Vec::new()),
                    ring_uses_backups: false,
                    ring_inputs: Arc::new(RingInputs::of(&[], ring_size, seed)),
                    previous_ring: None,
                    next_backend_id: 0,
                };
                add_backends(&mut new, backends)?;
                new.rebuild_ring(ring_size, seed);
                self.next_service_id += 1;
                self.services.insert(name.clone(), new);
                Ok(Effect::ServiceAdded(name))
            }
            Command::RemoveService { .. } => {
                let removed = self
                    .services
                    .remove(&name)
                    .ok_or(StateError::NoService(name.clone()))?;
                Ok(Effect::ServiceRemoved { name, id: removed.id })
            }
            Command::UpdateService { mut service } => {
                let current = self.service_mut(&name)?;
                service.backends.clear();
                // Listen and datapath identify the service; reload replaces it when they change.
                service.listen = current.settings.listen;
                service.datapath = current.settings.datapath;
                if current.settings == service {
                    return Ok(Effect::Nothing);
                }
                current.settings = service;
                Ok(Effect::ServiceChanged(name))
            }
            Command::AddBackend { backend, .. } => {
                let service = self.service_mut(&name)?;
                add_backend(service, backend)?;
                service.rebuild_ring(ring_size, seed);
                Ok(Effect::ServiceChanged(name))
            }
            Command::AddBackends { backends, .. } => {
                let service = self.service_mut(&name)?;
                if backends.is_empty() {
                    return Ok(Effect::Nothing);
                }
                // Staged on a copy of the list: one refused backend refuses the batch.
                let mut staged = service.clone();
                add_backends(&mut staged, backends)?;
                staged.rebuild_ring(ring_size, seed);
                *service = staged;
                Ok(Effect::ServiceChanged(name))
            }
            Command::RemoveBackend { backend, .. } => {
                let service = self.service_mut(&name)?;
                let id = service.backend_mut(&backend)?.id;
                service.backends.retain(|b| b.id != id);
                service.rebuild_ring(ring_size, seed);
                Ok(Effect::ServiceChanged(name))
            }
            Command::UpdateBackends { backends, .. } => {
                // Staged on a copy of the list: one refused backend refuses the batch.
                let service = self.service_mut(&name)?;
                let mut staged = service.clone();
                let mut updated = std::collections::HashSet::with_capacity(backends.len());
                for new in backends {
                    check_weight(new.weight)?;
                    // Found by address and name: another backend on the address is not this one.
                    let backend = staged
                        .backends
                        .iter_mut()
                        .find(|b| b.config.identity() == new.identity())
                        .ok_or_else(|| StateError::NoBackend {
                            service: name.clone(),
                            backend: format!("{} ({})", new.name, new.address),
                        })?;
                    if backend.config != new {
                        updated.insert(backend.id);
                        backend.config = new;
                    }
                }
                if updated.is_empty() {
                    return Ok(Effect::Nothing);
                }
                if staged.settings.datapath == DatapathKind::Ajp {
                    // The routes of the others first: a clash is reported on the updated backend.
                    let (changed, kept): (Vec<&Backend>, Vec<&Backend>) =
                        staged.backends.iter().partition(|b| updated.contains(&b.id));
                    let mut routes: HashMap<&[u8], &str> = HashMap::with_capacity(staged.backends.len());
                    for b in kept.into_iter().chain(changed) {
                        if let Some(other) = routes.insert(route_of(&b.config), &b.config.name) {
                            return Err(route_in_use(&name, &b.config, other));
                        }
                    }
                }
                staged.rebuild_ring(ring_size, seed);
                *service = staged;
                Ok(Effect::ServiceChanged(name))
            }
            Command::SetState { backend, state, .. } => {
                let service = self.service_mut(&name)?;
                let backend = service.backend_mut(&backend)?;
                if backend.config.state == state {
                    return Ok(Effect::Nothing);
                }
                backend.config.state = state;
                service.rebuild_ring(ring_size, seed);
                Ok(Effect::ServiceChanged(name))
            }
            Command::SetWeight { backend, weight, .. } => {
                check_weight(weight)?;
                let service = self.service_mut(&name)?;
                let backend = service.backend_mut(&backend)?;
                if backend.config.weight == weight {
                    return Ok(Effect::Nothing);
                }
                backend.config.weight = weight;
                service.rebuild_ring(ring_size, seed);
                Ok(Effect::ServiceChanged(name))
            }
            Command::SetHealth { backend, health, .. } => {
                let service = self.service_mut(&name)?;
                let backend = service.backend_mut(&backend)?;
                if backend.health == health {
                    return Ok(Effect::Nothing);
                }
                backend.health = health;
                service.rebuild_ring(ring_size, seed);
                Ok(Effect::ServiceChanged(name))
            }
        }
    }
}

fn check_weight(weight: u32) -> Result<(), StateError> {
    if weight > crate::config::MAX_WEIGHT {
        Err(StateError::Weight(weight))
    } else {
        Ok(())
    }
}

fn add_backend(service: &mut Service, backend: BackendConfig) -> Result<(), StateError> {
    check_weight(backend.weight)?;
    if service
        .backends
        .iter()
        .any(|b| b.config.name == backend.name || b.config.address == backend.address)
    {
        return Err(StateError::BackendExists {
            service: service.settings.name.clone(),
            name: backend.name,
            address: backend.address,
        });
    }
    if service.settings.datapath == DatapathKind::Ajp
        && let Some(other) = service
            .backends
            .iter()
            .find(|b| route_of(&b.config) == route_of(&backend))
    {
        return Err(route_in_use(&service.settings.name, &backend, &other.config.name));
    }
    push_backend(service, backend);
    Ok(())
}

/// Adds `backends` to `service` after the same checks as [`add_backend`], with names, addresses
/// and (AJP) routes in use looked up in sets: a batch of n is not n × n compares. On an error some
/// may have been added: callers stage on a copy, or drop the service.
fn add_backends(service: &mut Service, backends: Vec<BackendConfig>) -> Result<(), StateError> {
    let mut names: std::collections::HashSet<String> =
        service.backends.iter().map(|b| b.config.name.clone()).collect();
    let mut addresses: std::collections::HashSet<SocketAddr> =
        service.backends.iter().map(|b| b.config.address).collect();
    let ajp = service.settings.datapath == DatapathKind::Ajp;
    let mut routes: HashMap<Vec<u8>, String> = if ajp {
        service
            .backends
            .iter()
            .map(|b| (route_of(&b.config).to_vec(), b.config.name.clone()))
            .collect()
    } else {
        HashMap::new()
    };
    for backend in backends {
        check_weight(backend.weight)?;
        if names.contains(&backend.name) || addresses.contains(&backend.address) {
            return Err(StateError::BackendExists {
                service: service.settings.name.clone(),
                name: backend.name,
                address: backend.address,
            });
        }
        if ajp {
            let route = route_of(&backend).to_vec();
            if let Some(other) = routes.get(&route) {
                return Err(route_in_use(&service.settings.name, &backend, other));
            }
            routes.insert(route, backend.name.clone());
        }
        names.insert(backend.name.clone());
        addresses.insert(backend.address);
        push_backend(service, backend);
    }
    Ok(())
}

/// An AJP backend whose route (`route`, else its name) another backend of the service has: the
/// web tier's session routes could reach only one of them.
fn route_in_use(service: &str, backend: &BackendConfig, other: &str) -> StateError {
    StateError::RouteInUse {
        service: service.to_string(),
        route: String::from_utf8_lossy(route_of(backend)).into_owned(),
        backend: other.to_string(),
    }
}

/// Appends a backend already checked, with the service's next id.
fn push_backend(service: &mut Service, backend: BackendConfig) {
    service.backends.push(Backend {
        id: service.next_backend_id,
        config: backend,
        health: Health::Up,
    });
    service.next_backend_id += 1;
}

/// The commands that turn the services of `old` into those of `new` (reload). Services whose listen
/// address, protocol or datapath changed are removed and added again; everything else changes in place.
///
/// Services and backends are matched through maps (by name; by address and name), so a service of
/// n backends costs n lookups, not n × n compares.
pub fn diff(old: &Config, new: &Config) -> Vec<Command> {
    let old_services = first_by(&old.services, |s| s.name.as_str());
    let new_services = first_by(&new.services, |s| s.name.as_str());
    // Every service that goes (or is made anew) goes first, so one that takes over another's
    // listen address finds it free.
    let mut commands: Vec<Command> = old
        .services
        .iter()
        .filter(|o| {
            new_services
                .get(o.name.as_str())
                .is_none_or(|n| (o.listen, o.datapath) != (n.listen, n.datapath))
        })
        .map(|o| Command::RemoveService {
            service: o.name.clone(),
        })
        .collect();
    for n in &new.services {
        let Some(o) = old_services.get(n.name.as_str()) else {
            commands.push(Command::AddService { service: n.clone() });
            continue;
        };
        if (o.listen, o.datapath) != (n.listen, n.datapath) {
            commands.push(Command::AddService { service: n.clone() });
            continue;
        }
        let settings = |s: &ServiceConfig| ServiceConfig {
            backends: Vec::new(),
            ..s.clone()
        };
        if settings(o) != settings(n) {
            commands.push(Command::UpdateService { service: settings(n) });
        }
        let service = n.name.clone();
        let old_backends = first_by(&o.backends, BackendConfig::identity);
        let new_backends = first_by(&n.backends, BackendConfig::identity);
        for ob in &o.backends {
            if !new_backends.contains_key(&ob.identity()) {
                commands.push(Command::RemoveBackend {
                    service: service.clone(),
                    backend: ob.address.to_string(),
                });
            }
        }
        // Updates in two changes: those of routes together (routes that trade places are checked
        // as a whole), the rest apart (a route clash does not hold back a drain); both before the
        // additions (which may take a route an update gives up).
        let (mut routes, mut others, mut additions) = (Vec::new(), Vec::new(), Vec::new());
        for nb in &n.backends {
            match old_backends.get(&nb.identity()) {
                None => additions.push(Command::AddBackend {
                    service: service.clone(),
                    backend: nb.clone(),
                }),
                Some(ob) if ob.route != nb.route => routes.push(nb.clone()),
                Some(ob) if *ob != nb => others.push(nb.clone()),
                Some(_) => {}
            }
        }
        for backends in [others, routes] {
            if !backends.is_empty() {
                commands.push(Command::UpdateBackends {
                    service: service.clone(),
                    backends,
                });
            }
        }
        commands.extend(additions);
    }
    // Every removed backend goes before anything is added or updated, whatever the file's order
    // of services: what is added is checked against what runs, which no longer has them.
    commands.sort_by_key(|c| match c {
        Command::RemoveService { .. } => 0,
        Command::RemoveBackend { .. } => 1,
        _ => 2,
    });
    commands
}

/// `items` by `key`; the first one wins a key that several have (as a `find` would).
fn first_by<'a, T, K: std::hash::Hash + Eq>(items: &'a [T], key: impl Fn(&'a T) -> K) -> HashMap<K, &'a T> {
    let mut map = HashMap::with_capacity(items.len());
    for item in items {
        map.entry(key(item)).or_insert(item);
    }
    map
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{DatapathKind, HealthConfig, HealthKind, OnDown, Protocol};
    use std::time::Duration;

    pub fn backend(name: &str, address: &str) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            address: address.parse().unwrap(),
            weight: 1,
            backup: false,
            state: AdminState::Active,
            route: name.into(),
        }
    }

    pub fn service(name: &str, listen: &str, backends: Vec<BackendConfig>) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            listen: listen.parse().unwrap(),
            protocol: Protocol::Tcp,
            datapath: DatapathKind::Proxy,
            forwarding: Default::default(),
            affinity_timeout: Duration::from_secs(600),
            max_connections: 100,
            splice: Default::default(),
            idle_timeout: crate::config::DEFAULT_PROXY_IDLE_TIMEOUT,
            connect_timeout: Duration::from_secs(1),
            failback: false,
            on_down: OnDown::Keep,
            health: HealthConfig {
                kind: HealthKind::None,
                interval: Duration::from_secs(2),
                fast_interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                port: None,
                observe: crate::config::Observe::None,
                error_limit: crate::config::DEFAULT_ERROR_LIMIT,
            },
            ajp: None,
            backends,
        }
    }

    pub fn three() -> State {
        let mut s = State::new(0, 101);
        let svc = service(
            "web",
            "10.0.0.100:80",
            vec![
                backend("b1", "10.1.1.2:80"),
                backend("b2", "10.1.2.2:80"),
                backend("b3", "10.1.3.2:80"),
            ],
        );
        s.apply(Command::AddService { service: svc }).unwrap();
        s
    }

    /// AJP backends need routes of their own, whichever way they arrive (one backend, a batch,
    /// a route equal to another's name); other datapaths do not route by session.
    #[test]
    fn an_ajp_backend_with_a_route_already_in_use_is_refused_and_changes_nothing() {
        for datapath in [DatapathKind::Ajp, DatapathKind::Proxy] {
            let mut s = State::new(0, 101);
            let mut svc = service("app", "10.0.0.100:8009", vec![backend("t1", "10.1.1.2:8009")]);
            svc.datapath = datapath;
            s.apply(Command::AddService { service: svc }).unwrap();
            let routed = |name: &str, address: &str, route: &str| BackendConfig {
                route: route.into(),
                ..backend(name, address)
            };
            let attempts = [
                Command::AddBackend {
                    service: "app".into(),
                    backend: routed("t2", "10.1.2.2:8009", "t1"),
                },
                Command::AddBackend {
                    service: "app".into(),
                    backend: routed("t2", "10.1.2.2:8009", ""),
                },
                Command::AddBackends {
                    service: "app".into(),
                    backends: vec![
                        routed("t3", "10.1.3.2:8009", "r"),
                        routed("t4", "10.1.4.2:8009", "r"),
                    ],
                },
            ];
            // A reload changing a backend's route to one another backend has.
            let mut t1 = backend("t1", "10.1.1.2:8009");
            t1.route = "t7".into();
            let mut copy = s.clone();
            copy.apply(Command::AddBackend {
                service: "app".into(),
                backend: routed("t7x", "10.1.7.2:8009", "t7"),
            })
            .unwrap();
            let r = copy.apply(Command::UpdateBackends {
                service: "app".into(),
                backends: vec![t1],
            });
            assert_eq!(
                matches!(r, Err(StateError::RouteInUse { .. })),
                datapath == DatapathKind::Ajp,
                "update: {r:?}"
            );
            for (i, attempt) in attempts.into_iter().enumerate() {
                let mut copy = s.clone();
                if i == 1 {
                    // A route given as another backend's name: `t1x` routed `t1x` exists first.
                    copy.apply(Command::AddBackend {
                        service: "app".into(),
                        backend: routed("t1x", "10.1.9.2:8009", "t2"),
                    })
                    .unwrap();
                }
                let before = copy.service("app").unwrap().backends.len();
                let r = copy.apply(attempt);
                let after = copy.service("app").unwrap().backends.len();
                if datapath == DatapathKind::Ajp {
                    assert!(matches!(r, Err(StateError::RouteInUse { .. })), "{i}: {r:?}");
                    assert_eq!(after, before, "{i}: a refused add leaves no backend behind");
                } else {
                    assert!(r.is_ok(), "{i}: {r:?}");
                }
            }
        }
    }

    fn ring_ids(s: &State) -> std::collections::BTreeSet<u32> {
        s.service("web").unwrap().ring.iter().copied().collect()
    }

    #[test]
    fn ring_holds_active_healthy_primaries() {
        let mut s = three();
        assert_eq!(ring_ids(&s), [0, 1, 2].into());
        s.apply(Command::SetState {
            service: "web".into(),
            backend: "b1".into(),
            state: AdminState::Drain,
        })
        .unwrap();
        assert_eq!(ring_ids(&s), [1, 2].into());
        s.apply(Command::SetHealth {
            service: "web".into(),
            backend: "10.1.2.2:80".into(),
            health: Health::Down,
        })
        .unwrap();
        assert_eq!(ring_ids(&s), [2].into());
        s.apply(Command::SetWeight {
            service: "web".into(),
            backend: "b3".into(),
            weight: 0,
        })
        .unwrap();
        assert!(ring_ids(&s).is_empty());
    }

    #[test]
    fn backups_only_when_no_primary_takes_clients() {
        let mut s = three();
        let mut spare = backend("spare", "10.1.4.2:80");
        spare.backup = true;
        s.apply(Command::AddBackend {
            service: "web".into(),
            backend: spare,
        })
        .unwrap();
        assert!(!ring_ids(&s).contains(&3));
        for b in ["b1", "b2", "b3"] {
            s.apply(Command::SetHealth {
                service: "web".into(),
                backend: b.into(),
                health: Health::Down,
            })
            .unwrap();
        }
        assert_eq!(ring_ids(&s), [3].into());
        assert!(s.service("web").unwrap().ring_uses_backups);
        s.apply(Command::SetHealth {
            service: "web".into(),
            backend: "b2".into(),
            health: Health::Up,
        })
        .unwrap();
        assert_eq!(ring_ids(&s), [1].into());
    }

    #[test]
    fn a_batch_is_added_whole_or_not_at_all() {
        let mut s = three();
        let before = (ring_ids(&s), s.service("web").unwrap().backends.len());
        let batch = |list: Vec<BackendConfig>| Command::AddBackends {
            service: "web".into(),
            backends: list,
        };
        let mut heavy = backend("b5", "10.1.5.2:80");
        heavy.weight = 999;
        for (list, why) in [
            (
                vec![backend("b4", "10.1.4.2:80"), backend("b1", "10.1.9.2:80")],
                "name in use",
            ),
            (
                vec![backend("b4", "10.1.4.2:80"), backend("b5", "10.1.1.2:80")],
                "address in use",
            ),
            (
                vec![backend("b4", "10.1.4.2:80"), backend("b4", "10.1.5.2:80")],
                "twice in the batch",
            ),
            (vec![backend("b4", "10.1.4.2:80"), heavy], "weight out of range"),
        ] {
            assert!(s.apply(batch(list)).is_err(), "{why}");
            assert_eq!(
                (ring_ids(&s), s.service("web").unwrap().backends.len()),
                before,
                "{why}"
            );
        }
        assert_eq!(s.apply(batch(Vec::new())), Ok(Effect::Nothing));
        s.apply(batch(vec![
            backend("b4", "10.1.4.2:80"),
            backend("b5", "10.1.5.2:80"),
        ]))
        .unwrap();
        let web = s.service("web").unwrap();
        let ids: Vec<u32> = web.backends.iter().map(|b| b.id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
        assert_eq!(ring_ids(&s).len(), 5, "one ring with every backend");
    }

    #[test]
    fn errors_change_nothing() {
        let mut s = three();
        let before = ring_ids(&s);
        assert!(matches!(
            s.apply(Command::SetWeight {
                service: "web".into(),
                backend: "b1".into(),
                weight: 999
            }),
            Err(StateError::Weight(999))
        ));
        assert!(matches!(
            s.apply(Command::RemoveBackend {
                service: "web".into(),
                backend: "nope".into()
            }),
            Err(StateError::NoBackend { .. })
        ));
        assert!(matches!(
            s.apply(Command::AddBackend {
                service: "web".into(),
                backend: backend("b1", "10.9.9.9:1")
            }),
            Err(StateError::BackendExists { .. })
        ));
        assert!(matches!(
            s.apply(Command::AddService {
                service: service("other", "10.0.0.100:80", vec![])
            }),
            Err(StateError::ListenInUse { .. })
        ));
        assert_eq!(ring_ids(&s), before);
    }

    #[test]
    fn backend_ids_are_stable_across_removal() {
        let mut s = three();
        s.apply(Command::RemoveBackend {
            service: "web".into(),
            backend: "b2".into(),
        })
        .unwrap();
        s.apply(Command::AddBackend {
            service: "web".into(),
            backend: backend("b4", "10.1.4.2:80"),
        })
        .unwrap();
        let svc = s.service("web").unwrap();
        assert_eq!(svc.backend("b3").unwrap().id, 2);
        assert_eq!(svc.backend("b4").unwrap().id, 3);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(32))]

        /// After any sequence of changes, the service's ring is the one a node builds from
        /// scratch for the same backends (given in another order, health set afterwards), its
        /// backends stay in id order and each is found by its id.
        #[test]
        fn the_ring_after_any_changes_is_the_ring_built_afresh(
            changes in proptest::collection::vec((0u8..6, 0usize..10, 0u32..4), 1..40),
        ) {
            let address = |i: usize| format!("10.2.0.{}:80", i + 1);
            let mut running = State::new(9, 1009);
            let start: Vec<BackendConfig> =
                (0..4).map(|i| backend(&format!("b{i}"), &address(i))).collect();
            running.apply(Command::AddService { service: service("web", "10.0.0.100:80", start) }).unwrap();
            for (op, i, n) in changes {
                let (web, name) = ("web".to_string(), format!("b{i}"));
                let command = match op {
                    0 => Command::AddBackend { service: web, backend: backend(&name, &address(i)) },
                    1 => Command::RemoveBackend { service: web, backend: name },
                    2 => Command::SetState { service: web,
                        backend: name,
                        state: [AdminState::Active, AdminState::Drain, AdminState::Maintenance][n as usize % 3],
                    },
                    3 => Command::SetWeight { service: web, backend: name, weight: n },
                    4 => Command::SetHealth { service: web,
                        backend: name,
                        health: if n % 2 == 0 { Health::Up } else { Health::Down },
                    },
                    _ => {
                        let mut b = backend(&name, &address(i));
                        b.backup = n % 2 == 0;
                        b.weight = n + 1;
                        Command::UpdateBackends { service: web, backends: vec![b] }
                    }
                };
                // Refused changes (unknown backend, name in use) are part of the sequence too.
                let _ = running.apply(command);
                let svc = running.service("web").unwrap();
                proptest::prop_assert!(svc.backends.windows(2).all(|w| w[0].id < w[1].id));
                for b in &svc.backends {
                    proptest::prop_assert_eq!(svc.backend_by_id(b.id).map(|f| f.id), Some(b.id));
                }
                let mut configs: Vec<BackendConfig> = svc.backends.iter().map(|b| b.config.clone()).collect();
                configs.reverse();
                let mut fresh = State::new(9, 1009);
                fresh.apply(Command::AddService { service: service("web", "10.0.0.100:80", configs) }).unwrap();
                for b in svc.backends.iter().filter(|b| b.health == Health::Down) {
                    fresh.apply(Command::SetHealth {
                        service: "web".into(),
                        backend: b.config.name.clone(),
                        health: Health::Down,
                    }).unwrap();
                }
                let by_address = |s: &State| -> Vec<std::net::SocketAddr> {
                    let svc = s.service("web").unwrap();
                    svc.ring.iter().map(|id| svc.backend_by_id(*id).unwrap().config.address).collect()
                };
                proptest::prop_assert_eq!(by_address(&running), by_address(&fresh));
                proptest::prop_assert_eq!(
                    running.service("web").unwrap().ring_uses_backups,
                    fresh.service("web").unwrap().ring_uses_backups
                );
            }
        }
    }

    #[test]
    fn diff_applies_only_changes() {
        let base = |backends| Config {
            path: None,
            log_level: "info".into(),
            seed: 0,
            ring_size: 101,
            shutdown_timeout: Duration::from_secs(1),
            control: crate::config::ControlConfig {
                socket: "/tmp/x".into(),
                mode: 0o600,
                group: None,
                allowed_uids: vec![],
            },
            xdp: None,
            metrics: None,
            announce: None,
            state_file: None,
            services: vec![service("web", "10.0.0.100:80", backends)],
        };
        let old = base(vec![backend("b1", "10.1.1.2:80"), backend("b2", "10.1.2.2:80")]);
        let mut heavier = backend("b2", "10.1.2.2:80");
        heavier.weight = 5;
        let new = base(vec![heavier.clone(), backend("b3", "10.1.3.2:80")]);
        let commands = diff(&old, &new);
        assert_eq!(
            commands,
            vec![
                Command::RemoveBackend {
                    service: "web".into(),
                    backend: "10.1.1.2:80".into()
                },
                Command::UpdateBackends {
                    service: "web".into(),
                    backends: vec![heavier]
                },
                Command::AddBackend {
                    service: "web".into(),
                    backend: backend("b3", "10.1.3.2:80")
                },
            ]
        );
        assert!(diff(&new, &new).is_empty());
        let mut moved = new.clone();
        moved.services[0].listen = "10.0.0.101:80".parse().unwrap();
        assert_eq!(diff(&new, &moved).len(), 2);
        // Two services swap their listen addresses: both go before either comes back, so
        // applying the diff in order never finds an address taken.
        let mut two = new.clone();
        two.services.push(service(
            "api",
            "10.0.0.101:80",
            vec![backend("a1", "10.1.4.2:80")],
        ));
        let mut swapped = two.clone();
        swapped.services[0].listen = "10.0.0.101:80".parse().unwrap();
        swapped.services[1].listen = "10.0.0.100:80".parse().unwrap();
        let kinds: Vec<_> = diff(&two, &swapped)
            .iter()
            .map(|c| match c {
                Command::RemoveService { service } => format!("remove {service}"),
                Command::AddService { service } => format!("add {}", service.name),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["remove web", "remove api", "add web", "add api"]);
        // Applying the diff to the old state gives the new state's backends.
        let mut s = State::from_config(&old).unwrap();
        for c in commands {
            s.apply(c).unwrap();
        }
        let names: Vec<_> = s
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.config.name.clone())
            .collect();
        assert_eq!(names, ["b2", "b3"]);
    }

    /// A service's route changes are one command, its other backend changes another (a route
    /// clash does not hold back a drain), both before its additions; a batch is all or none.
    #[test]
    fn diff_batches_route_changes_apart_from_other_updates() {
        let config = |backends: Vec<BackendConfig>| {
            let mut s = service("app", "10.0.0.100:8009", backends);
            s.datapath = DatapathKind::Ajp;
            s.protocol = crate::config::Protocol::Ajp;
            Config {
                services: vec![s],
                ..Config::parse("", "(test)").unwrap()
            }
        };
        let [t1, t2, t3] = ["t1", "t2", "t3"].map(|n| backend(n, &format!("10.1.{}.2:8009", &n[1..])));
        let old = config(vec![t1.clone(), t2.clone(), t3.clone()]);
        let (mut s1, mut s2, mut d3) = (t1.clone(), t2.clone(), t3.clone());
        (s1.route, s2.route) = ("t2".into(), "t1".into());
        d3.state = AdminState::Drain;
        let t4 = backend("t4", "10.1.4.2:8009");
        let new = config(vec![s1.clone(), s2.clone(), d3.clone(), t4.clone()]);
        let commands = diff(&old, &new);
        let app = || "app".to_string();
        assert_eq!(
            commands,
            [
                Command::UpdateBackends {
                    service: app(),
                    backends: vec![d3]
                },
                Command::UpdateBackends {
                    service: app(),
                    backends: vec![s1, s2]
                },
                Command::AddBackend {
                    service: app(),
                    backend: t4
                },
            ]
        );
        let mut state = State::from_config(&old).unwrap();
        for c in commands {
            state.apply(c).unwrap();
        }
        let routes: Vec<_> = state
            .service("app")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.config.route.clone())
            .collect();
        assert_eq!(routes, ["t2", "t1", "t3", "t4"]);
        // A batch with a clash changes nothing; one naming a backend not running neither.
        let before = state.clone();
        let mut clash = t3.clone();
        clash.route = "t4".into();
        let mut fine = t1.clone();
        fine.weight = 9;
        for batch in [
            vec![fine.clone(), clash],
            vec![fine, backend("t1", "10.1.9.2:8009")],
        ] {
            let r = state.apply(Command::UpdateBackends {
                service: app(),
                backends: batch,
            });
            assert!(r.is_err(), "{r:?}");
            let configs = |s: &State| -> Vec<BackendConfig> {
                s.service("app")
                    .unwrap()
                    .backends
                    .iter()
                    .map(|b| b.config.clone())
                    .collect()
            };
            assert_eq!(configs(&state), configs(&before));
        }
    }

    #[test]
    fn diff_of_two_services_of_twenty_thousand_backends() {
        const N: usize = 20_000;
        let address = |i: usize| format!("10.{}.{}.{}:80", 1 + i / 62_500, (i / 250) % 250, 1 + i % 250);
        let config = |backends: Vec<BackendConfig>| Config {
            services: vec![service("web", "10.0.0.100:80", backends)],
            ..Config::parse("", "(test)").unwrap()
        };
        let old: Vec<_> = (0..N).map(|i| backend(&format!("b{i}"), &address(i))).collect();
        // b5 goes, b7 gets weight 3, b12 moves to a new address, b20000 comes.
        let mut new = old.clone();
        new.remove(5);
        new[6].weight = 3;
        new[11].address = address(N + 1).parse().unwrap();
        new.push(backend("b20000", &address(N)));
        let (old, new) = (config(old), config(new));
        let commands = diff(&old, &new);
        let remove = |i: usize| Command::RemoveBackend {
            service: "web".into(),
            backend: address(i),
        };
        assert_eq!(
            commands,
            vec![
                remove(5),
                remove(12),
                Command::UpdateBackends {
                    service: "web".into(),
                    backends: vec![new.services[0].backends[6].clone()],
                },
                Command::AddBackend {
                    service: "web".into(),
                    backend: new.services[0].backends[11].clone(),
                },
                Command::AddBackend {
                    service: "web".into(),
                    backend: backend("b20000", &address(N)),
                },
            ]
        );
        assert!(diff(&new, &new).is_empty());
        // Every backend of a service that appears, none of one that goes.
        let empty = Config {
            services: Vec::new(),
            ..old.clone()
        };
        assert_eq!(
            diff(&empty, &new),
            [Command::AddService {
                service: new.services[0].clone()
            }]
        );
        assert_eq!(
            diff(&new, &empty),
            [Command::RemoveService {
                service: "web".into()
            }]
        );
    }

    /// A change that leaves the ring's members as they are builds nothing; one that brings back
    /// the members of the ring before takes that ring back; either way the ring is the one a
    /// build gives.
    #[test]
    fn rings_are_built_only_for_new_members() {
        let mut s = three();
        let ring = |s: &State| s.service("web").unwrap().ring.clone();
        let set = |s: &mut State, backend: &str, state: AdminState| {
            s.apply(Command::SetState {
                service: "web".into(),
                backend: backend.into(),
                state,
            })
            .unwrap();
        };
        let mut spare = backend("spare", "10.1.4.2:80");
        spare.backup = true;
        let before = ring(&s);
        s.apply(Command::AddBackend {
            service: "web".into(),
            backend: spare,
        })
        .unwrap();
        assert!(Arc::ptr_eq(&ring(&s), &before), "a backup while primaries serve");
        set(&mut s, "b2", AdminState::Drain);
        let drained = ring(&s);
        assert!(!drained.contains(&1));
        set(&mut s, "b2", AdminState::Maintenance);
        assert!(Arc::ptr_eq(&ring(&s), &drained), "out of the ring either way");
        set(&mut s, "b2", AdminState::Active);
        assert!(Arc::ptr_eq(&ring(&s), &before), "the drain undone");
        set(&mut s, "b2", AdminState::Drain);
        assert!(Arc::ptr_eq(&ring(&s), &drained), "and done again");
        let fresh = {
            let mut f = three();
            set(&mut f, "b2", AdminState::Drain);
            ring(&f)
        };
        assert_eq!(*ring(&s), *fresh);
    }

    /// A node that removed and added a backend again at run time (so it comes last in its list)
    /// and a node restarted with the file (so it comes first) build rings naming the same
    /// backends slot by slot: nodes behind ECMP keep agreeing.
    #[test]
    fn the_ring_does_not_depend_on_the_order_backends_came_in() {
        let addresses = |s: &State| -> Vec<String> {
            let svc = s.service("web").unwrap();
            svc.ring
                .iter()
                .map(|id| svc.backend_by_id(*id).unwrap().config.address.to_string())
                .collect()
        };
        let restarted = three();
        let mut running = three();
        running
            .apply(Command::RemoveBackend {
                service: "web".into(),
                backend: "b1".into(),
            })
            .unwrap();
        let b1 = restarted
            .service("web")
            .unwrap()
            .backend("b1")
            .unwrap()
            .config
            .clone();
        running
            .apply(Command::AddBackend {
                service: "web".into(),
                backend: b1,
            })
            .unwrap();
        let order: Vec<&str> = running
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.config.name.as_str())
            .collect();
        assert_eq!(order, ["b2", "b3", "b1"]);
        assert_eq!(addresses(&running), addresses(&restarted));
    }
}
