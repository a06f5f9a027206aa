//! The AJP datapath (`datapath = "ajp"`): terminates the web tier's AJP 1.3 connections and
//! routes every request on its own, over pooled connections to the backends.
//!
//! - [`front`]: one web-tier connection (CPing, Shutdown refusal, secret and attribute checks,
//!   routing, body relay, retries, lb's own 403/503).
//! - [`pool`]: the connections to one backend.
//! - [`counters`]: live counters and their serializable snapshots.
//! - [`keepalive`]: TCP keepalive on both sides' sockets.
//!
//! Listeners, `max_connections` and shutdown follow the proxy datapath. Settings and backend
//! states are read at every request, so `drain`, `disable`, `enable` and `weight` act on the next
//! one.

pub mod counters;
mod front;
pub mod keepalive;
pub mod pool;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ajp::route::RouteKeys;
use crate::balancer::Balancer;
use crate::config::{AdminState, AjpConfig, BackendConfig, DatapathKind};
use crate::datapath::listener::Listeners;
use crate::datapath::{Datapath, DatapathError, Drained, ServiceTraffic};
use crate::health::passive::Passive;
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Effect, Health, Service as StateService, State};
pub use counters::{AjpBackendCounters, AjpServiceCounters, LatencySnapshot};
use pool::Pool;

/// How often idle pooled connections are checked for age and for the backend closing them.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// The route of a backend: its `route`, or its name when none was set.
pub(crate) fn route_of(b: &BackendConfig) -> &[u8] {
    if b.route.is_empty() {
        b.name.as_bytes()
    } else {
        b.route.as_bytes()
    }
}

/// What a request needs of its service's settings (read once per request).
pub(crate) struct Settings {
    pub ajp: AjpConfig,
    pub keys: RouteKeys,
    pub max_packet: usize,
    pub retry_buffer: usize,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub secret: Option<Bytes>,
    pub backend_secret: Option<Bytes>,
}

impl Settings {
    fn new(ajp: Option<&AjpConfig>, connect_timeout: Duration) -> Settings {
        let ajp = ajp.cloned().unwrap_or_default();
        Settings {
            keys: RouteKeys {
                cookies: ajp.session_cookies.clone(),
                path_params: ajp.session_path_params.clone(),
            },
            max_packet: ajp.max_packet_size as usize,
            retry_buffer: ajp.retry_buffer as usize,
            retries: ajp.retries,
            connect_timeout,
            secret: ajp.secret.as_ref().map(|s| Bytes::from(s.0.clone())),
            backend_secret: ajp.backend_secret.as_ref().map(|s| Bytes::from(s.0.clone())),
            ajp,
        }
    }
}

/// One AJP service: shared by its accept loop and its connections.
pub(crate) struct Service {
    pub name: String,
    pub balancer: Arc<Balancer>,
    pub counters: counters::ServiceCounters,
    settings: Mutex<Arc<Settings>>,
    /// Pools by backend id.
    pools: Mutex<HashMap<u32, Arc<Pool>>>,
    /// Where new connections' outcomes go (passive health).
    passive: Passive,
    /// Logs requests refused for a wrong secret, at most once a second.
    pub secret_refusals: crate::observe::throttle::Throttle,
}

impl Service {
    /// A pool's new connection to backend `id`: connected (`failure` None) or not; for passive
    /// health.
    fn connect_outcome(&self, id: u32, runtime: &BackendRuntime, failure: Option<&str>) {
        let Some(why) = failure else {
            self.passive.connected(runtime);
            return;
        };
        let snapshot = self.balancer.snapshot();
        let Ok(svc) = snapshot.state.service(&self.name) else {
            return;
        };
        if let Some(be) = svc.backends.iter().find(|b| b.id == id)
            && self.passive.failed(svc, be, runtime, why)
        {
            warn!(service = %self.name, backend = %be.config.address, "passive health: backend marked down after connect failures");
        }
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.lock().unwrap().clone()
    }

    pub fn pool(&self, id: u32) -> Option<Arc<Pool>> {
        self.pools.lock().unwrap().get(&id).cloned()
    }

    /// Whether some backend takes requests (up, and active or draining): lb answers the web
    /// tier's CPing only then.
    pub fn takes_requests(&self) -> bool {
        self.balancer
            .snapshot()
            .state
            .service(&self.name)
            .is_ok_and(|s| s.backends.iter().any(super::super::state::Backend::admits_known))
    }

    /// Makes settings and pools match the state: new pools for new backends, idle connections
    /// of removed, down or maintenance backends closed.
    fn sync(&self, snapshot: &Snapshot) {
        let Ok(svc) = snapshot.state.service(&self.name) else {
            return;
        };
        let settings = Settings::new(svc.settings.ajp.as_ref(), svc.settings.connect_timeout);
        let size = settings.ajp.pool_size;
        *self.settings.lock().unwrap() = Arc::new(settings);
        let mut pools = self.pools.lock().unwrap();
        pools.retain(|id, pool| {
            let keep = svc
                .backend_by_id(*id)
                .is_some_and(|b| b.config.address == pool.address);
            if !keep {
                pool.set_usable(false);
            }
            keep
        });
        for be in &svc.backends {
            let pool = pools
                .entry(be.id)
                .or_insert_with(|| Pool::new(be.config.address, size, snapshot.runtime(svc, be)));
            pool.resize(size);
            pool.set_usable(be.health == Health::Up && be.config.state != AdminState::Maintenance);
        }
    }

    fn close_idle(&self) {
        for pool in self.pools.lock().unwrap().values() {
            pool.set_usable(false);
        }
    }

    fn snapshot(&self, state: &State) -> Option<AjpServiceCounters> {
        let svc = state.service(&self.name).ok()?;
        let pools = self.pools.lock().unwrap();
        let backends: BTreeMap<u32, AjpBackendCounters> = svc
            .backends
            .iter()
            .filter_map(|be| {
                let pool = pools.get(&be.id)?;
                let (idle, open) = pool.sizes();
                let route = String::from_utf8_lossy(route_of(&be.config)).into_owned();
                Some((be.id, pool.counters.snapshot(&be.config.name, &route, idle, open)))
            })
            .collect();
        Some(self.counters.snapshot(backends))
    }
}

pub struct AjpDatapath {
    balancer: Arc<Balancer>,
    listeners: Listeners<Service>,
    passive: Passive,
}

impl AjpDatapath {
    /// An AJP datapath choosing from `balancer`, reporting its pools' new connections to `passive`.
    pub fn new(balancer: Arc<Balancer>, passive: Passive) -> Self {
        AjpDatapath {
            balancer,
            listeners: Listeners::new("ajp datapath"),
            passive,
        }
    }

    /// Counters of an AJP service, its backends keyed by backend id.
    pub fn counters(&self, service: &str) -> Option<AjpServiceCounters> {
        let svc = self.listeners.service(service)?;
        svc.snapshot(&self.balancer.snapshot().state)
    }

    /// The address a service's listener is bound to.
    pub fn local_addr(&self, service: &str) -> Option<SocketAddr> {
        self.listeners.local_addr(service)
    }

    fn start(&self, name: &str, snapshot: &Snapshot) -> Result<(), DatapathError> {
        let svc = snapshot
            .state
            .service(name)
            .expect("effect names a present service");
        let service = Arc::new(Service {
            name: name.to_string(),
            balancer: self.balancer.clone(),
            counters: Default::default(),
            secret_refusals: Default::default(),
            settings: Mutex::new(Arc::new(Settings::new(None, svc.settings.connect_timeout))),
            pools: Mutex::new(HashMap::new()),
            passive: self.passive.clone(),
        });
        service.sync(snapshot);
        self.listeners.start(
            name,
            svc.settings.listen,
            svc.settings.max_connections,
            service.clone(),
            front::serve,
        )?;
        if let Some(stop) = self.listeners.stop_token(name) {
            self.listeners.spawn(reaper(service, stop));
        }
        if let Some(ajp) = &svc.settings.ajp
            && ajp.backend_secret.is_some()
            && ajp.secret.is_none()
        {
            warn!(service = name, listen = %svc.settings.listen,
                "backend_secret without secret: every request that reaches listen goes to the backends with their secret; let only the web tier reach listen, or set secret");
        }
        Ok(())
    }

    fn changed(&self, name: &str, snapshot: &Snapshot) {
        let Ok(svc) = snapshot.state.service(name) else {
            return;
        };
        if let Some(service) = self.listeners.service(name) {
            service.sync(snapshot);
        }
        self.listeners.resize(name, svc.settings.max_connections);
    }
}

impl Datapath for AjpDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Ajp
    }

    fn can_listen(&self, name: &str, listen: std::net::SocketAddr) -> Result<(), DatapathError> {
        crate::datapath::listener::can_listen(name, listen)
    }

    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError> {
        match effect {
            Effect::ServiceAdded(name) => self.start(name, snapshot),
            Effect::ServiceRemoved { name, .. } => {
                // Requests under way finish; idle pooled connections close now.
                if let Some(service) = self.listeners.stop(name) {
                    service.close_idle();
                }
                Ok(())
            }
            Effect::ServiceChanged(name) => {
                self.changed(name, snapshot);
                Ok(())
            }
            Effect::Nothing => Ok(()),
        }
    }

    fn traffic(&self, service: &StateService) -> ServiceTraffic {
        let name = &service.settings.name;
        ServiceTraffic {
            failed_connections: None,
            // The runtime's user-space counters, which the engine reads itself.
            backends: HashMap::new(),
            ajp: self.counters(name),
        }
    }

    fn shutdown(&self) -> Drained<'_> {
        // Idle front and back connections close at once; requests under way finish.
        let drained = self.listeners.shutdown();
        for service in self.listeners.services() {
            service.close_idle();
        }
        drained
    }
}

/// Closes idle pooled connections past `pool_idle_timeout` or closed by their backend.
async fn reaper(service: Arc<Service>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                service.close_idle();
                return;
            }
            () = tokio::time::sleep(REAP_EVERY) => {}
        }
        let timeout = service.settings().ajp.pool_idle_timeout;
        let pools: Vec<Arc<Pool>> = service.pools.lock().unwrap().values().cloned().collect();
        for p in pools {
            p.reap(timeout);
        }
    }
}
