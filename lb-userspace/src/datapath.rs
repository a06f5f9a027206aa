//! The seam between policy and forwarding: every datapath receives the [`Effect`] of each applied
//! command together with the new [`State`], and makes its forwarding match.

use crate::config::DatapathKind;
use crate::state::{Effect, State};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "cannot listen on {listen} for service `{service}`: {source}; is another program using that address?"
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
}

/// A forwarding engine for the services whose `datapath` setting names it.
pub trait Datapath: Send + Sync {
    /// Which services this datapath forwards.
    fn kind(&self) -> DatapathKind;

    /// Makes forwarding match `state` after a command had `effect`. Called with the effect of every
    /// command touching a service of this kind (`ServiceRemoved` carries the old service's id).
    fn apply(&self, effect: &Effect, state: &State) -> Result<(), DatapathError>;

    /// Stops taking new connections; the returned future ends when open ones have finished.
    fn shutdown(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}
