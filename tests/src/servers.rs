//! Starting `lb-testsrv` backends inside test namespaces.

use std::io;
use std::net::SocketAddr;

use crate::child::{Child, READY_TIMEOUT};
use crate::netns::Netns;
use crate::testsrv_bin;
use crate::topology::Topology;

/// Behaviour of `lb-testsrv ajp` towards a CPing (`12 34 00 01 0A`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AjpMode {
    /// Answers every CPing with CPong `41 42 00 01 09`, connection stays open.
    Good,
    /// Accepts and never answers.
    Silent,
    /// Answers `de ad be ef 00`.
    Garbage,
    /// Answers half a CPong (`41 42 00`) and closes.
    CpongClose,
    /// Accepts, then closes with SO_LINGER 0 (RST).
    Reset,
    /// Answers the CPong after 3 s.
    SlowCpong,
}

impl AjpMode {
    /// All modes.
    pub const ALL: [AjpMode; 6] = [
        AjpMode::Good,
        AjpMode::Silent,
        AjpMode::Garbage,
        AjpMode::CpongClose,
        AjpMode::Reset,
        AjpMode::SlowCpong,
    ];

    /// The `--mode` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            AjpMode::Good => "good",
            AjpMode::Silent => "silent",
            AjpMode::Garbage => "garbage",
            AjpMode::CpongClose => "cpong-close",
            AjpMode::Reset => "reset",
            AjpMode::SlowCpong => "slow-cpong",
        }
    }
}

/// Spawn `lb-testsrv <args>` inside `ns` and wait for its `ready` line.
pub fn start_testsrv(ns: &Netns, args: &[&str]) -> io::Result<Child> {
    let mut child = ns.spawn(testsrv_bin(), args)?;
    child.wait_ready(READY_TIMEOUT)?;
    Ok(child)
}

/// `lb-testsrv http --listen 0.0.0.0:PORT --name bI` in every backend namespace (names `b1`, `b2`, …,
/// so a response body `"bI\n"` tells which backend answered). Index `i-1` holds backend `i`.
pub fn start_http_backends(topo: &Topology, port: u16) -> io::Result<Vec<Child>> {
    (1..=topo.backend_count())
        .map(|i| {
            start_testsrv(
                topo.backend_ns(i),
                &[
                    "http",
                    "--listen",
                    &format!("0.0.0.0:{port}"),
                    "--name",
                    &format!("b{i}"),
                ],
            )
        })
        .collect()
}

/// `lb-testsrv echo --listen 0.0.0.0:PORT` in every backend namespace. Index `i-1` holds backend `i`.
pub fn start_echo_backends(topo: &Topology, port: u16) -> io::Result<Vec<Child>> {
    (1..=topo.backend_count())
        .map(|i| {
            start_testsrv(
                topo.backend_ns(i),
                &["echo", "--listen", &format!("0.0.0.0:{port}")],
            )
        })
        .collect()
}

/// `lb-testsrv ajp --listen LISTEN --mode MODE` inside `ns` (e.g. `topo.backend_ns(2)`,
/// `"0.0.0.0:8009".parse()?`).
pub fn start_ajp_backend(ns: &Netns, listen: SocketAddr, mode: AjpMode) -> io::Result<Child> {
    start_testsrv(
        ns,
        &["ajp", "--listen", &listen.to_string(), "--mode", mode.as_str()],
    )
}
