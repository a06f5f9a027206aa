//! The control socket: a Unix socket speaking newline-delimited JSON ([`protocol`]), served by
//! [`server`] and used by the `lb` CLI through [`client`].
pub mod client;
pub mod protocol;
pub mod server;
