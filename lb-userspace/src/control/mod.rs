//! The control socket: a Unix socket speaking newline-delimited JSON ([`protocol`]), served by
//! [`server`] and used by the `lb` CLI through [`client`]; [`check`] holds the config file's rules
//! that a change must also pass against the running daemon.
pub mod check;
pub mod client;
pub mod protocol;
pub mod server;
