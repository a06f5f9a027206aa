//! The config file's rules that depend on the running daemon, checked for a change from the
//! control socket: `[xdp]` present for an `xdp` service, its SNAT ports, `max_services` and
//! `max_backends`, IPv4 backends for `xdp`, listen overlap (with the other services and
//! `[metrics]`) and the `ring_size` rule. Per-field rules were checked when the request was parsed.

use crate::config::{
    BackendConfig, Config, ConfigError, DatapathKind, ServiceConfig, XdpConfig, listens_overlap,
};
use crate::state::{Command, State};

fn field(key: &str, message: String) -> ConfigError {
    ConfigError::Field {
        key: key.to_owned(),
        message,
    }
}

/// Whether `command` fits the running daemon (its `config`, the services in `state`). Commands
/// that are not about adding (or that name a missing service) pass: the state refuses those.
pub fn fits(config: &Config, state: &State, command: &Command) -> Result<(), ConfigError> {
    match command {
        Command::AddService { service } => service_fits(config, state, service),
        Command::AddBackend { service, backend } => match state.services.get(service) {
            Some(s) => backend_fits(config, state, &s.settings, s.backends.len(), backend),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

fn service_fits(config: &Config, state: &State, new: &ServiceConfig) -> Result<(), ConfigError> {
    if let Some(m) = &config.metrics
        && listens_overlap(m.listen, new.listen)
    {
        return Err(field(
            "listen",
            format!(
                "{} overlaps the daemon's [metrics] listen {}; use another ip:port",
                new.listen, m.listen
            ),
        ));
    }
    if let Some(other) = state
        .services
        .values()
        .find(|s| s.settings.name != new.name && listens_overlap(s.settings.listen, new.listen))
    {
        return Err(field(
            "listen",
            format!(
                "{} overlaps service \"{}\" (listen {}); each service needs its own ip:port",
                new.listen, other.settings.name, other.settings.listen
            ),
        ));
    }
    ring_fits(state, &new.name, new.backends.len())?;
    if new.datapath != DatapathKind::Xdp {
        return Ok(());
    }
    let x = xdp_table(config)?;
    let (lo, hi) = x.snat_ports;
    let port = new.listen.port();
    if (lo..=hi).contains(&port) {
        return Err(field(
            "listen",
            format!(
                "{}: port {port} is inside the daemon's xdp.snat_ports {lo}-{hi}, reserved for the source ports toward backends; use a listen port outside {lo}-{hi}",
                new.listen
            ),
        ));
    }
    let services = xdp_services(state).count() + 1;
    if services > x.max_services as usize {
        return Err(field(
            "datapath",
            format!(
                "\"xdp\": the daemon has {} xdp services and its xdp.max_services is {}; raise max_services (restart) or use datapath \"proxy\"",
                services - 1,
                x.max_services
            ),
        ));
    }
    backends_fit(x, state, new.backends.len())
}

fn backend_fits(
    config: &Config,
    state: &State,
    service: &ServiceConfig,
    count: usize,
    new: &BackendConfig,
) -> Result<(), ConfigError> {
    ring_fits(state, &service.name, count + 1)?;
    if service.datapath != DatapathKind::Xdp {
        return Ok(());
    }
    if !new.address.is_ipv4() {
        return Err(field(
            "address",
            format!(
                "{}: service \"{}\" uses the xdp datapath, which forwards to IPv4 backends only",
                new.address, service.name
            ),
        ));
    }
    backends_fit(xdp_table(config)?, state, 1)
}

/// The daemon's `[xdp]` table, which every `xdp` service needs.
fn xdp_table(config: &Config) -> Result<&XdpConfig, ConfigError> {
    config.xdp.as_ref().ok_or_else(|| {
        field(
            "datapath",
            "\"xdp\" needs the daemon's [xdp] table, and this daemon runs without one; add [xdp] to its config and restart, or use datapath \"proxy\"".to_owned(),
        )
    })
}

fn xdp_services(state: &State) -> impl Iterator<Item = &crate::state::Service> {
    state
        .services
        .values()
        .filter(|s| s.settings.datapath == DatapathKind::Xdp)
}

/// `max_backends` counts the backends of every xdp service together.
fn backends_fit(x: &XdpConfig, state: &State, more: usize) -> Result<(), ConfigError> {
    let total = xdp_services(state).map(|s| s.backends.len()).sum::<usize>() + more;
    if total > x.max_backends as usize {
        return Err(field(
            "address",
            format!(
                "the xdp services would have {total} backends and the daemon's xdp.max_backends is {}; raise max_backends (restart) or remove backends first",
                x.max_backends
            ),
        ));
    }
    Ok(())
}

/// The Maglev table must be larger than 100 × the backends of each service.
fn ring_fits(state: &State, service: &str, backends: usize) -> Result<(), ConfigError> {
    let need = 100 * backends as u64;
    if u64::from(state.ring_size) <= need {
        return Err(field(
            "ring_size",
            format!(
                "{} is too small for service \"{service}\" with {backends} backends (it must be larger than 100 x the backends of each service, so at most {} here); remove a backend first, or raise ring_size (restart)",
                state.ring_size,
                (state.ring_size - 1) / 100
            ),
        ));
    }
    Ok(())
}
