//! [`FakeDatapath`]: a datapath that forwards nothing and records what it was asked, so the
//! engine's behaviour (commands, reload, health events, transactions) is tested without root.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatapathKind};
use crate::datapath::{Datapath, DatapathError, Drained, ServiceTraffic};
use crate::engine::{Engine, EngineError};
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Backend, Effect, Service};

/// An engine running `config` over one fake datapath per kind in `kinds` (their journals are not
/// kept; health events go nowhere): the daemon without a kernel, for tests of what sits around
/// the engine.
pub fn engine(config: Config, kinds: &[DatapathKind]) -> Result<Engine, EngineError> {
    let (events, _) = tokio::sync::mpsc::channel(16);
    Engine::assemble(config, events, CancellationToken::new(), |_| {
        Ok(kinds
            .iter()
            .map(|k| Box::new(FakeDatapath::new(*k).0) as Box<dyn Datapath>)
            .collect())
    })
}

/// One call the engine made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Apply(Effect),
    FinishStart,
    Reset { service: String, backend: String },
    Shutdown,
}

/// What a [`FakeDatapath`] saw, shared with the test that made it.
#[derive(Debug, Default)]
pub struct Journal {
    pub calls: Vec<Call>,
    /// Refuse every `apply` whose effect names this service.
    pub refuse: Option<String>,
    /// Refuse to add a service on this listen address (as a datapath that cannot bind it).
    pub refuse_listen: Option<std::net::SocketAddr>,
    /// An address `can_listen` refuses (and `apply` too), as one no interface has.
    pub unbindable: Option<std::net::SocketAddr>,
    /// Addresses `can_listen` finds in use (`apply` binds them: their holder has left).
    pub in_use: Vec<std::net::SocketAddr>,
    /// Backend names per service as the datapath last saw them: what it would forward to.
    pub forwarding: std::collections::BTreeMap<String, Vec<String>>,
}

pub struct FakeDatapath {
    kind: DatapathKind,
    journal: Arc<Mutex<Journal>>,
}

impl FakeDatapath {
    /// A fake for `kind` and the journal it writes to.
    pub fn new(kind: DatapathKind) -> (Self, Arc<Mutex<Journal>>) {
        let journal = Arc::new(Mutex::new(Journal::default()));
        (
            FakeDatapath {
                kind,
                journal: journal.clone(),
            },
            journal,
        )
    }

    fn record(&self, call: Call) {
        self.journal.lock().unwrap().calls.push(call);
    }
}

impl Datapath for FakeDatapath {
    fn kind(&self) -> DatapathKind {
        self.kind
    }

    fn can_listen(&self, name: &str, listen: std::net::SocketAddr) -> Result<(), DatapathError> {
        let j = self.journal.lock().unwrap();
        let kind = if j.unbindable == Some(listen) {
            std::io::ErrorKind::AddrNotAvailable
        } else if j.in_use.contains(&listen) {
            std::io::ErrorKind::AddrInUse
        } else {
            return Ok(());
        };
        Err(DatapathError::Bind {
            service: name.to_string(),
            listen,
            source: kind.into(),
        })
    }

    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError> {
        let state = &snapshot.state;
        let mut j = self.journal.lock().unwrap();
        j.calls.push(Call::Apply(effect.clone()));
        let name = match effect {
            Effect::ServiceAdded(n) | Effect::ServiceChanged(n) | Effect::ServiceRemoved { name: n, .. } => n,
            Effect::Nothing => return Ok(()),
        };
        if j.refuse.as_deref() == Some(name.as_str()) {
            return Err(DatapathError::Refused(format!("service `{name}`")));
        }
        if let (Effect::ServiceAdded(_), Ok(s)) = (effect, state.service(name))
            && [j.refuse_listen, j.unbindable].contains(&Some(s.settings.listen))
        {
            return Err(DatapathError::Refused(format!(
                "listen address {}",
                s.settings.listen
            )));
        }
        match state.service(name) {
            Ok(s) => {
                let names = s.backends.iter().map(|b| b.config.name.clone()).collect();
                j.forwarding.insert(name.clone(), names);
            }
            Err(_) => {
                j.forwarding.remove(name);
            }
        }
        Ok(())
    }

    fn finish_start(&self) -> Result<(), DatapathError> {
        self.record(Call::FinishStart);
        Ok(())
    }

    fn reset_backend(&self, service: &Service, backend: &Backend, _runtime: &BackendRuntime) -> usize {
        self.record(Call::Reset {
            service: service.settings.name.clone(),
            backend: backend.config.name.clone(),
        });
        0
    }

    fn traffic(&self, _service: &Service) -> ServiceTraffic {
        ServiceTraffic {
            failed_connections: None,
            backends: std::collections::HashMap::new(),
            ajp: None,
        }
    }

    fn shutdown(&self) -> Drained<'_> {
        self.record(Call::Shutdown);
        Box::pin(std::future::ready(()))
    }
}
