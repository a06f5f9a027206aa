//! The config file's rules that depend on the running daemon, checked for a change from the
//! control socket: `[xdp]` present for an `xdp` service, its SNAT ports, `max_services` and
//! `max_backends`, IPv4 non-loopback backends for `xdp` (on the VIP's port for `dsr`), listen overlap (with the other services and
//! `[metrics]`) and the `ring_size` rule. Per-field rules were checked when the request was parsed.

use crate::config::{
    BackendConfig, Config, ConfigError, DatapathKind, Forwarding, ServiceConfig, XdpConfig,
    dsr_port_mismatch, listen_is_backend, listens_overlap, loop_message, loops_back, xdp_backend_refusal,
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
            Some(s) => backends_fit_service(
                config,
                state,
                &s.settings,
                s.backends.len(),
                std::slice::from_ref(backend),
            ),
            None => Ok(()),
        },
        Command::AddBackends { service, backends } => match state.services.get(service) {
            Some(s) => backends_fit_service(config, state, &s.settings, s.backends.len(), backends),
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
    no_loop(state, &new.backends)?;
    if let Some((service, backend)) = state.services.values().find_map(|s| {
        s.backends
            .iter()
            .find(|b| loops_back(new.listen, b.config.address))
            .map(|b| (&s.settings.name, b.config.address))
    }) {
        return Err(field("listen", listen_is_backend(new.listen, backend, service)));
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

/// `new` backends added together to `service`, which has `count` already.
fn backends_fit_service(
    config: &Config,
    state: &State,
    service: &ServiceConfig,
    count: usize,
    new: &[BackendConfig],
) -> Result<(), ConfigError> {
    no_loop(state, new)?;
    ring_fits(state, &service.name, count + new.len())?;
    if service.datapath != DatapathKind::Xdp {
        return Ok(());
    }
    if let Some((b, why)) = new
        .iter()
        .find_map(|b| xdp_backend_refusal(b.address).map(|why| (b, why)))
    {
        return Err(field(
            "address",
            format!(
                "{}: service \"{}\" uses the xdp datapath: {why}",
                b.address, service.name
            ),
        ));
    }
    if service.forwarding == Forwarding::Dsr
        && let Some(message) = new
            .iter()
            .find_map(|b| dsr_port_mismatch(service.listen, b.address))
    {
        return Err(field("address", message));
    }
    backends_fit(xdp_table(config)?, state, new.len())
}

/// Refuses a backend that is the listen address of a service of this daemon.
fn no_loop(state: &State, new: &[BackendConfig]) -> Result<(), ConfigError> {
    for b in new {
        if let Some(s) = state
            .services
            .values()
            .find(|s| loops_back(s.settings.listen, b.address))
        {
            return Err(field(
                "address",
                loop_message(b.address, &s.settings.name, s.settings.listen),
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Request;

    /// The daemon's config (with `[xdp]` when `xdp` is given: its extra keys) and its state.
    fn daemon(top: &str, xdp: Option<&str>, services: &str) -> (Config, State) {
        let xdp = xdp.map_or(String::new(), |x| format!("[xdp]\ninterfaces = [\"lo\"]\n{x}\n"));
        let config = Config::parse(&format!("{top}\n{xdp}{services}"), "lb.toml").unwrap();
        let state = State::from_config(&config).unwrap();
        (config, state)
    }

    fn change(line: &str) -> Command {
        match Request::parse(line) {
            Ok(Request::Change(c)) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn accepted(daemon: &(Config, State), line: &str) {
        if let Err(e) = fits(&daemon.0, &daemon.1, &change(line)) {
            panic!("{line}: refused: {e}");
        }
    }

    /// Asserts `line` is refused with an error starting with `starts` and containing `contains`.
    fn refused(daemon: &(Config, State), line: &str, starts: &str, contains: &str) {
        let e = match fits(&daemon.0, &daemon.1, &change(line)) {
            Ok(()) => panic!("{line}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with(starts) && e.contains(contains), "{line}: {e}");
    }

    const WEB: &str = "[[service]]\nname = \"web\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\n[[service.backend]]\naddress = \"10.0.1.1:80\"\n";
    const PROXY: &str = "[[service]]\nname = \"px\"\nlisten = \"0.0.0.0:8080\"\n[[service.backend]]\naddress = \"10.0.1.1:80\"\n";
    const ADD_XDP: &str = r#"{"cmd":"add-service","name":"x","listen":"10.0.0.100:81","datapath":"xdp"}"#;

    #[test]
    fn xdp_service_needs_the_daemons_xdp_table() {
        accepted(&daemon("", Some(""), WEB), ADD_XDP);
        let without = daemon("", None, PROXY);
        refused(
            &without,
            ADD_XDP,
            "datapath: \"xdp\" needs the daemon's [xdp] table",
            "restart",
        );
        // A proxy service needs none.
        accepted(
            &without,
            r#"{"cmd":"add-service","name":"p","listen":"10.0.0.100:81"}"#,
        );
    }

    #[test]
    fn xdp_limits_of_the_running_daemon() {
        let d = daemon("", Some("snat_ports = \"20000-29999\""), WEB);
        refused(
            &d,
            r#"{"cmd":"add-service","name":"x","listen":"10.0.0.100:20001","datapath":"xdp"}"#,
            "listen: 10.0.0.100:20001: port 20001 is inside the daemon's xdp.snat_ports 20000-29999",
            "",
        );
        // The same port is fine for a proxy service.
        accepted(
            &d,
            r#"{"cmd":"add-service","name":"x","listen":"10.0.0.100:20001"}"#,
        );

        let d = daemon("", Some("max_services = 1"), WEB);
        refused(&d, ADD_XDP, "datapath: ", "xdp.max_services is 1");

        let d = daemon("", Some("max_backends = 2"), WEB);
        accepted(
            &d,
            r#"{"cmd":"add-backend","service":"web","address":"10.0.1.2:80"}"#,
        );
        let two = r#"{"cmd":"add-service","name":"x","listen":"10.0.0.100:81","datapath":"xdp","backend":[{"address":"10.0.1.2:80"},{"address":"10.0.1.3:80"}]}"#;
        refused(
            &d,
            two,
            "address: the xdp services would have 3 backends",
            "max_backends is 2",
        );

        let d = daemon("", Some(""), WEB);
        refused(
            &d,
            r#"{"cmd":"add-backend","service":"web","address":"[2001:db8::1]:80"}"#,
            "address: [2001:db8::1]:80: service \"web\" uses the xdp datapath",
            "IPv4",
        );
    }

    #[test]
    fn proxy_services_take_ipv6_backends() {
        let d = daemon("", None, PROXY);
        accepted(
            &d,
            r#"{"cmd":"add-backend","service":"px","address":"[2001:db8::1]:80"}"#,
        );
        // A backend of a service that does not exist is left to the state's own error.
        accepted(
            &d,
            r#"{"cmd":"add-backend","service":"nosuch","address":"[2001:db8::1]:80"}"#,
        );
    }

    #[test]
    fn listen_must_not_overlap() {
        let d = daemon("[metrics]\nlisten = \"127.0.0.1:9100\"", None, PROXY);
        // 0.0.0.0:8080 takes port 8080 on every address.
        refused(
            &d,
            r#"{"cmd":"add-service","name":"x","listen":"10.0.0.9:8080"}"#,
            "listen: 10.0.0.9:8080 overlaps service \"px\" (listen 0.0.0.0:8080)",
            "",
        );
        refused(
            &d,
            r#"{"cmd":"add-service","name":"x","listen":"0.0.0.0:9100"}"#,
            "listen: 0.0.0.0:9100 overlaps the daemon's [metrics] listen 127.0.0.1:9100",
            "",
        );
        accepted(&d, r#"{"cmd":"add-service","name":"x","listen":"10.0.0.9:8081"}"#);
    }

    #[test]
    fn a_backend_must_not_be_lbs_own_listen_address() {
        let d = daemon("", Some(""), &format!("{WEB}{PROXY}"));
        // px listens on 0.0.0.0:8080, which takes in 127.0.0.1:8080 (and its IPv4-mapped spelling).
        for address in ["127.0.0.1:8080", "[::ffff:127.0.0.1]:8080", "10.0.0.1:80"] {
            refused(
                &d,
                &format!(r#"{{"cmd":"add-backend","service":"px","address":"{address}"}}"#),
                "address: backend ",
                "is lb's own listen address",
            );
        }
        refused(
            &d,
            r#"{"cmd":"add-backends","service":"web","backends":[{"address":"10.0.1.7:80"},{"address":"127.0.0.1:8080"}]}"#,
            "address: backend 127.0.0.1:8080 is lb's own listen address (service \"px\"",
            "",
        );
        // A service whose backend is its own listen address is refused as the request is read.
        let own = Request::parse(
            r#"{"cmd":"add-service","name":"x","listen":"127.0.0.1:7000","backend":[{"address":"127.0.0.1:7000"}]}"#,
        );
        assert!(
            matches!(&own, Err(e) if e.to_string().contains("backend 127.0.0.1:7000 is lb's own listen address (service \"x\"")),
            "{own:?}"
        );
        // A new service on an existing backend's address would take that backend's connections.
        refused(
            &d,
            r#"{"cmd":"add-service","name":"x","listen":"10.0.1.1:80"}"#,
            "listen: 10.0.1.1:80 is the address of backend 10.0.1.1:80 of service",
            "",
        );
        accepted(
            &d,
            r#"{"cmd":"add-backend","service":"px","address":"127.0.0.1:8081"}"#,
        );
    }

    #[test]
    fn ring_size_rule_as_in_the_file() {
        // 101 slots: more than 100 x 1 backend, not 100 x 2.
        let d = daemon("ring_size = 101", None, PROXY);
        refused(
            &d,
            r#"{"cmd":"add-backend","service":"px","address":"10.0.1.2:80"}"#,
            "ring_size: 101 is too small for service \"px\" with 2 backends",
            "at most 1 here",
        );
        let two = r#"{"cmd":"add-service","name":"x","listen":"10.0.0.9:81","backend":[{"address":"10.0.1.2:80"},{"address":"10.0.1.3:80"}]}"#;
        refused(&d, two, "ring_size: ", "with 2 backends");
        // The file refuses the same.
        let file = format!("ring_size = 101\n{PROXY}[[service.backend]]\naddress = \"10.0.1.2:80\"\n");
        let e = Config::parse(&file, "lb.toml").unwrap_err().to_string();
        assert!(e.contains("ring_size: ring_size 101 is too small"), "{e}");
    }

    /// An engine over fake datapaths of `kinds` (the ones the daemon would run for `text`).
    fn engine(text: &str, kinds: &[DatapathKind]) -> crate::engine::Engine {
        crate::datapath::fake::engine(Config::parse(text, "lb.toml").unwrap(), kinds).unwrap()
    }

    fn services(engine: &crate::engine::Engine) -> Vec<String> {
        let status = engine
            .handle(Request::parse(r#"{"cmd":"status"}"#).unwrap())
            .unwrap();
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// No health checks: nothing is ever connected to.
    const QUIET: &str = "[service.health]\nkind = \"none\"\n";

    #[test]
    fn socket_xdp_service_add_through_the_engine() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = runtime.enter();
        // The daemon runs XDP: `lb service add x --listen 10.0.0.100:81 --datapath xdp` works.
        let web = WEB.replace("[[service.backend]]", &format!("{QUIET}[[service.backend]]"));
        let with = engine(
            &format!("[xdp]\ninterfaces = [\"lo\"]\n{web}"),
            &[DatapathKind::Proxy, DatapathKind::Xdp],
        );
        with.handle(Request::parse(ADD_XDP).unwrap()).unwrap();
        assert_eq!(services(&with), ["web", "x"]);
        // Then an IPv6 backend for it is refused, naming the field, and leaves no trace.
        let v6 = r#"{"cmd":"add-backend","service":"x","address":"[2001:db8::1]:80"}"#;
        let e = with.handle(Request::parse(v6).unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("address: "), "{e}");
        let backends = with.handle(Request::parse(r#"{"cmd":"backends","service":"x"}"#).unwrap());
        assert_eq!(
            backends.unwrap()["services"][0]["backends"],
            serde_json::json!([])
        );

        // Without [xdp] it is refused with an error saying why, and nothing is added.
        let proxy = PROXY.replace("[[service.backend]]", &format!("{QUIET}[[service.backend]]"));
        let without = engine(&proxy, &[DatapathKind::Proxy]);
        let e = without
            .handle(Request::parse(ADD_XDP).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs the daemon's [xdp] table"), "{e}");
        assert_eq!(services(&without), ["px"]);
    }
}
