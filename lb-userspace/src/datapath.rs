//! The seam between policy and forwarding: the [`Datapath`] trait, everything the engine needs from
//! a datapath, and the plain values it answers with. The engine knows datapaths only through it.
//!
//! - [`proxy`]: `datapath = "proxy"`, the tokio full proxy.
//! - [`ajp`]: `datapath = "ajp"`, the AJP 1.3 request router (per-request routing, backend pools).
//! - [`listener`]: the accepting side both user-space datapaths share.
//! - [`limit`]: a limit that can be lowered while in use (`max_connections`, `pool_size`).
//! - [`pipe`]: the proxy's splice(2) relay (`splice = "pipe"`).
//! - [`fake`]: records what it was asked, for the engine's unit tests.
//! - [`affinity`]: the affinity tables operators list, flush and pin, and failback.

pub mod affinity;
pub mod ajp;
pub mod fake;
pub mod limit;
pub mod listener;
pub mod pipe;
pub mod proxy;
pub mod workers;
pub mod xdp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use crate::config::DatapathKind;
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Backend, Effect, Service};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "cannot listen on {listen} for service `{service}`: {source}{}",
        listener::bind_hint(source)
    )]
    Bind {
        service: String,
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "service `{0}` asks for datapath \"xdp\", but the XDP datapath is not running (needs an [xdp] table)"
    )]
    Unavailable(String),
    #[error("XDP datapath: {0}")]
    Xdp(String),
    /// Raised by [`crate::datapath::fake::FakeDatapath`] when told to refuse.
    #[error("datapath refused the change: {0}")]
    Refused(String),
}

/// Traffic counters of one backend as a datapath counts them. `None` where a counter means nothing
/// for that datapath (packets in user space, connect failures in the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendTraffic {
    pub active: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: Option<u64>,
    pub packets_out: Option<u64>,
    pub connect_failures: Option<u64>,
}

impl BackendTraffic {
    /// The user-space counters every backend carries in its [`crate::runtime::BackendStats`].
    pub fn user_space(runtime: &BackendRuntime) -> Self {
        let get = crate::runtime::BackendStats::get;
        let s = &runtime.stats;
        BackendTraffic {
            active: get(&s.active_connections),
            total: get(&s.total_connections),
            bytes_in: get(&s.bytes_in),
            bytes_out: get(&s.bytes_out),
            packets_in: None,
            packets_out: None,
            connect_failures: Some(get(&s.connect_failures)),
        }
    }
}

/// Counters of one service: what the datapath keeps about it and its backends (by state id).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceTraffic {
    /// Clients no backend could take, for datapaths that count them.
    pub failed_connections: Option<u64>,
    pub backends: HashMap<u32, BackendTraffic>,
    /// Request-level counters, for the datapath that routes AJP requests.
    pub ajp: Option<ajp::AjpServiceCounters>,
}

impl ServiceTraffic {
    /// The counters of `backend`: the datapath's own, else the user-space ones of its runtime.
    pub fn of(&self, backend: &Backend, runtime: &BackendRuntime) -> BackendTraffic {
        self.backends
            .get(&backend.id)
            .copied()
            .unwrap_or_else(|| BackendTraffic::user_space(runtime))
    }
}

/// Where a datapath would send a client, from its own tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Which {
    /// State id of the backend; `None` when no backend takes the client.
    pub backend_id: Option<u32>,
    /// "conntrack", "affinity", "ring" or "none".
    pub reason: &'static str,
    pub detail: String,
}

/// A future a datapath resolves when its open connections have finished.
pub type Drained<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A forwarding engine for the services whose `datapath` setting names it.
pub trait Datapath: Send + Sync {
    /// Which services this datapath forwards.
    fn kind(&self) -> DatapathKind;

    /// Makes forwarding match `snapshot` (the state and its backends' runtime) after a command had
    /// `effect`. Called with the effect of every command touching a service of this kind
    /// (`ServiceRemoved` carries the old service's id). On error, the engine keeps the previous
    /// snapshot and applies it again.
    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError>;

    /// Whether service `name` could start on `listen` now: a reload moves a service (removes it,
    /// then adds it anew) only if it could, so a move that cannot happen leaves it untouched.
    fn can_listen(&self, _name: &str, _listen: SocketAddr) -> Result<(), DatapathError> {
        Ok(())
    }

    /// Called once the config's services are all added at start (an XDP datapath drops pinned
    /// entries nobody claimed).
    fn finish_start(&self) -> Result<(), DatapathError> {
        Ok(())
    }

    /// A backend went down with `on_down = "reset"`, or was disabled with `--reset`: resets its
    /// open connections (both ends see an RST; XDP marks the flows so each end's next packet is
    /// answered with one) and returns how many it reset. `runtime` is the backend's, from the same
    /// snapshot as `service` and `backend`. By default the user-space datapaths' way: their
    /// connections to the backend watch its reset token.
    fn reset_backend(&self, _service: &Service, _backend: &Backend, runtime: &BackendRuntime) -> usize {
        let open = crate::runtime::BackendStats::get(&runtime.stats.active_connections) as usize;
        runtime.reset_connections();
        open
    }

    /// The affinity table of the datapath's services when it keeps its own (the kernel's), or
    /// `None` when they use the shared balancer's.
    fn affinity_table(&self) -> Option<&dyn affinity::AffinityTable> {
        None
    }

    /// Where `client` (with `port`: its open connection first) would go by the datapath's own
    /// tables, or `None` when the datapath decides from the shared balancer.
    fn which(&self, _service: &Service, _client: IpAddr, _port: Option<u16>) -> Option<Which> {
        None
    }

    /// Counters of `service` and its backends (by state id; a backend left out is shown with the
    /// user-space counters of its runtime). Called without any engine lock held.
    fn traffic(&self, service: &Service) -> ServiceTraffic;

    /// Counters of the datapath as a whole (the XDP program's verdicts and reasons), if it has any.
    fn global_counters(&self) -> Option<Vec<(&'static str, u64)>> {
        None
    }

    /// Stops taking new connections; the returned future ends when open ones have finished.
    fn shutdown(&self) -> Drained<'_>;
}
