//! The `lb` command: `lb run` starts the daemon; the other subcommands talk to it over the control
//! socket (tables by default, `--json` for scripts; `lb top` is a live view); `lb check-config`
//! validates a file offline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use lb::config::{AdminState, BackendConfig, Config, ServiceConfig};
use lb::control::client::{self, SocketSource};
use lb::control::protocol::{
    AffinityChange, AffinityChangeView, AffinityListView, CheckView, Query, ReloadView, Request,
    RequestError, ResetView, StatsView, StatusView, WhichView,
};
use lb::state::Command;
use serde_json::{Map, Value};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Layer-4 TCP/AJP load balancer with an XDP fast path",
    long_about = "Layer-4 TCP/AJP load balancer with an XDP fast path.\n\n\
`lb run -c FILE` starts the daemon. The other commands talk to it over its control socket, found \
in this order: --socket PATH, -c FILE's [control] socket, $LB_SOCKET (when not empty), \
/etc/lb/lb.toml's [control] socket, /run/lb/lb.sock."
)]
struct Cli {
    /// Control socket of the daemon (client commands; may also follow the subcommand).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the daemon's JSON response instead of a table (client commands).
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

/// Where a client command finds the daemon.
#[derive(Args, Clone, Default)]
struct Target {
    /// Config file whose [control] socket to use (default: $LB_SOCKET, then /etc/lb/lb.toml's
    /// socket, then /run/lb/lb.sock).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Control socket of the daemon (overrides -c).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
}

/// Options of the client commands that print the daemon's answer.
#[derive(Args, Clone, Default)]
struct ClientArgs {
    #[command(flatten)]
    target: Target,
    /// Print the daemon's JSON response instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        /// Config file (services, backends, [control], [xdp], [metrics]).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file without starting.
    CheckConfig {
        /// Config file to check.
        file: PathBuf,
    },
    /// Detach the XDP program, remove its pinned maps (drops live XDP connections and affinity)
    /// and restore the host settings (sysctls) lb changed.
    Cleanup {
        /// Config file of the lb instance to clean up (its [xdp] pin_path).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Exit 0 only when the daemon is up and SERVICE has a backend taking new clients that has
    /// passed a health check (for keepalived's track_script); otherwise one line saying why, and
    /// exit 1 (no backend takes new clients), 3 (no such service) or 4 (daemon not reachable).
    Check {
        #[command(flatten)]
        target: Target,
        /// Service name.
        service: String,
    },
    /// Remove the VIP routes of [announce] lb left in its routing table (after a crash; the
    /// packaged unit runs it as ExecStopPost). Offline: no daemon needed.
    Withdraw {
        /// Config file of the lb instance (its [announce] table and protocol).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Services, backends and counters.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Counters of every backend (connections, bytes, packets, checks, transitions) and of XDP.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Live view of every backend, refreshed every interval (q, Esc or Ctrl-C quits).
    Top {
        #[command(flatten)]
        target: Target,
        /// Refresh interval: "1s", "500ms" or plain seconds (100ms..=1h).
        #[arg(long, default_value = "1s", value_parser = lb::observe::top::parse_interval)]
        interval: std::time::Duration,
    },
    /// Manage backends.
    Backend {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Manage services.
    Service {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Which backend a client would reach, and why (CLIENT is IP, or IP:PORT for an open connection).
    Which {
        #[command(flatten)]
        client_args: ClientArgs,
        /// Service name.
        service: String,
        /// Client address: IP, or IP:PORT for an open connection.
        client: String,
    },
    /// See and move source-IP affinity (which clients stick to which backend).
    Affinity {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: AffinityCmd,
    },
    /// Re-read the config file and apply what changed (exit 1 if a change was not made).
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// Shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of lb, or write every page (lb.1, lb-run.1, lb-backend-drain.1 …)
    /// into a directory.
    Man {
        /// Write all pages into this directory instead of printing lb.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// List backends (of one service, or all).
    List {
        /// Only this service's backends.
        service: Option<String>,
    },
    /// Add one backend, or several at once (one request: all of them or none).
    Add {
        /// Service name.
        service: String,
        /// Backend address, IP:PORT; several add them together, with the options below each.
        #[arg(required = true, num_args = 1.., value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// Backend name (default: its address); only with one address.
        #[arg(long)]
        name: Option<String>,
        /// 0..=256 (default 1).
        #[arg(long)]
        weight: Option<i64>,
        /// Hot spare: used only while no primary is healthy.
        #[arg(long)]
        backup: bool,
        /// active, drain or maintenance (default active).
        #[arg(long)]
        state: Option<String>,
        /// Session route (Tomcat jvmRoute) for `ajp` services (default: the name); only with one
        /// address.
        #[arg(long)]
        route: Option<String>,
    },
    /// Remove a backend (its open connections finish).
    Remove {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Take no new clients; clients with affinity and open connections stay.
    Drain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Back to active.
    Enable {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Maintenance: no clients at all; open connections finish (or, with --reset, are reset).
    Disable {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// Also reset the backend's open connections: both ends see an RST (proxy: closed at
        /// once; xdp: each end's next packet is answered with an RST) and clients reconnect.
        #[arg(long)]
        reset: bool,
    },
    /// Set the weight (0..=256).
    Weight {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// New weight, 0..=256.
        #[arg(allow_negative_numbers = true)]
        weight: i64,
    },
}

#[derive(Subcommand)]
enum AffinityCmd {
    /// Clients with a live affinity entry, most recent first.
    List {
        /// Service name.
        service: String,
        /// Only clients of this backend (name or address).
        #[arg(long)]
        backend: Option<String>,
        /// At most this many entries (1..=100000, default 100).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Forget affinity entries, so the ring decides again (open connections stay).
    Flush {
        /// Service name.
        service: String,
        /// Only clients of this backend (name or address).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Pin a client to a backend.
    Set {
        /// Service name.
        service: String,
        /// Client IP address.
        client: std::net::IpAddr,
        /// Backend (name or address); it must be up and active or draining.
        backend: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// List services.
    List,
    /// Add a service (settings not given take the config file's defaults).
    Add {
        /// Service name.
        name: String,
        /// Listen address (the VIP), IP:PORT.
        #[arg(long)]
        listen: String,
        /// tcp or ajp (default tcp).
        #[arg(long)]
        protocol: Option<String>,
        /// proxy or xdp (default proxy; xdp needs the daemon's [xdp] table).
        #[arg(long)]
        datapath: Option<String>,
        /// nat or dsr (xdp services only; default nat). dsr backends need the VIP on a local
        /// interface and an ipip tunnel: `lb check-config` prints the setup.
        #[arg(long)]
        forwarding: Option<String>,
        /// How long a client sticks to its backend after its last connection, e.g. "30m".
        #[arg(long)]
        affinity_timeout: Option<String>,
        /// Most open connections at once (proxy datapath).
        #[arg(long, allow_negative_numbers = true)]
        max_connections: Option<i64>,
    },
    /// Remove a service (stops listening; open connections finish).
    Remove {
        /// Service name.
        name: String,
    },
}

impl Cmd {
    /// Options of a client command that sends one request.
    fn client_args(&self) -> Option<&ClientArgs> {
        match self {
            Cmd::Status { client }
            | Cmd::Stats { client }
            | Cmd::Backend { client, .. }
            | Cmd::Service { client, .. }
            | Cmd::Reload { client }
            | Cmd::Affinity { client, .. }
            | Cmd::Which {
                client_args: client, ..
            } => Some(client),
            _ => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", lb::report::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout; a closed stdout (`lb status --json | head`) ends the command quietly.
fn emit(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other.context("writing to stdout")?),
    }
}

/// The socket a client command talks to: the subcommand's options, then the ones before it.
fn find_socket(cli_socket: Option<PathBuf>, target: &Target) -> anyhow::Result<(PathBuf, SocketSource)> {
    let flag = target.socket.clone().or(cli_socket);
    let env = std::env::var_os(client::SOCKET_ENV);
    Ok(client::discover(
        flag.as_deref(),
        target.config.as_deref(),
        env.as_deref(),
        Path::new(client::SYSTEM_CONFIG),
    )?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json || cli.command.client_args().is_some_and(|c| c.json);
    let target = cli.command.client_args().map(|c| c.target.clone());
    let service_list = matches!(
        cli.command,
        Cmd::Service {
            cmd: ServiceCmd::List,
            ..
        }
    );
    let request = match cli.command {
        Cmd::Run { config, log_format } => return run_daemon(&config, log_format),
        Cmd::CheckConfig { file } => {
            let c = Config::load(&file)?;
            let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
            let mut out = format!(
                "{}: ok ({} services, {} backends)\n",
                file.display(),
                c.services.len(),
                backends
            );
            out.push_str(&lb::config::dsr::backend_setup(&c));
            return emit(out.as_bytes());
        }
        Cmd::Cleanup { config } => {
            let c = Config::load(&config)?;
            let Some(xdp) = c.xdp else {
                return emit(
                    format!("{}: no [xdp] table; nothing to clean up\n", config.display()).as_bytes(),
                );
            };
            let report = lb::datapath::xdp::cleanup(&xdp.pin_path)?;
            let mut out = String::new();
            for (key, value) in &report.restored {
                out.push_str(&format!("restored {key} = {value}\n"));
            }
            out.push_str(&format!(
                "removed {} pinned objects under {}\n",
                report.removed.len(),
                xdp.pin_path.display()
            ));
            return emit(out.as_bytes());
        }
        Cmd::Check { target, service } => {
            let (code, line) = check(cli.socket, &target, service);
            let _ = emit(format!("{line}\n").as_bytes());
            std::process::exit(code);
        }
        Cmd::Withdraw { config } => {
            let c = Config::load(&config)?;
            let Some(announce) = c.announce else {
                return emit(
                    format!("{}: no [announce] table; nothing to withdraw\n", config.display()).as_bytes(),
                );
            };
            let gone = lb::announce::withdraw(&announce)?;
            let list: Vec<String> = gone.iter().map(ToString::to_string).collect();
            return emit(
                format!(
                    "withdrew {} VIP routes from table {}{}{}\n",
                    gone.len(),
                    announce.table,
                    if list.is_empty() { "" } else { ": " },
                    list.join(", ")
                )
                .as_bytes(),
            );
        }
        Cmd::Top { target, interval } => {
            let (socket, _) = find_socket(cli.socket, &target)?;
            lb::observe::top::run(&socket, interval)?;
            return Ok(());
        }
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut out);
            return emit(&out);
        }
        Cmd::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            return Ok(());
        }
        Cmd::Man { dir: None } => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .context("rendering the man page")?;
            return emit(&out);
        }
        other => request(other)?,
    };
    let (socket, how) = find_socket(cli.socket, &target.unwrap_or_default())?;
    let response = client::call_found(&socket, &how, &request)?;
    let unfinished = matches!(request, Request::Reload) && reload_had_problems(&response.result);
    if json {
        emit(format!("{}\n", serde_json::to_string_pretty(&response)?).as_bytes())?;
        if !response.ok || unfinished {
            std::process::exit(1);
        }
        return Ok(());
    }
    if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    }
    let result = response.result.unwrap_or_default();
    let out = match (&request, service_list) {
        (Request::Query(Query::Status {}), true) => {
            lb::cli::services(&serde_json::from_value::<StatusView>(result)?)
        }
        (Request::Query(Query::Status {} | Query::Backends { .. }), _) => {
            lb::cli::status(&serde_json::from_value::<StatusView>(result)?)
        }
        (Request::Query(Query::Stats {}), _) => lb::cli::stats(&serde_json::from_value::<StatsView>(result)?),
        (Request::Query(Query::Check { .. }), _) => {
            format!("{}\n", serde_json::from_value::<CheckView>(result)?.detail)
        }
        (Request::Query(Query::Which { .. }), _) => {
            lb::cli::which(&serde_json::from_value::<WhichView>(result)?)
        }
        (Request::Reload, _) => {
            let view = serde_json::from_value::<ReloadView>(result)?;
            emit(lb::cli::reload(&view).as_bytes())?;
            if unfinished {
                std::process::exit(1);
            }
            return Ok(());
        }
        (Request::Change(_), _) => "ok\n".to_string(),
        (Request::DisableReset { .. }, _) => lb::cli::reset(&serde_json::from_value::<ResetView>(result)?),
        (Request::Query(Query::AffinityList { .. }), _) => {
            lb::cli::affinity(&serde_json::from_value::<AffinityListView>(result)?)
        }
        (Request::Affinity(_), _) => {
            format!(
                "{}\n",
                serde_json::from_value::<AffinityChangeView>(result)?.summary
            )
        }
    };
    emit(out.as_bytes())
}

/// Whether a reload's answer lists a change that was not made: `lb reload` then exits 1, with or
/// without `--json`, so a script cannot read it as done.
fn reload_had_problems(result: &Option<serde_json::Value>) -> bool {
    result
        .as_ref()
        .and_then(|r| r.get("problems"))
        .and_then(serde_json::Value::as_array)
        .is_some_and(|p| !p.is_empty())
}

/// The request a client subcommand sends: the same [`Request`] values the daemon decodes, built
/// with the same validators (so a bad value is refused here, naming the field, before sending).
fn request(command: Cmd) -> Result<Request, RequestError> {
    let set_state = |service, backend, state| Command::SetState {
        service,
        backend,
        state,
    };
    let change = match command {
        Cmd::Status { .. }
        | Cmd::Service {
            cmd: ServiceCmd::List,
            ..
        } => return Ok(Request::Query(Query::Status {})),
        Cmd::Stats { .. } => return Ok(Request::Query(Query::Stats {})),
        Cmd::Backend {
            cmd: BackendCmd::List { service },
            ..
        } => return Ok(Request::Query(Query::Backends { service })),
        Cmd::Which { service, client, .. } => return Ok(Request::Query(Query::Which { service, client })),
        Cmd::Reload { .. } => return Ok(Request::Reload),
        Cmd::Affinity { cmd, .. } => {
            return Ok(match cmd {
                AffinityCmd::List {
                    service,
                    backend,
                    limit,
                } => {
                    let query = Query::AffinityList {
                        service,
                        backend,
                        limit,
                    };
                    query.check()?;
                    Request::Query(query)
                }
                AffinityCmd::Flush { service, backend } => {
                    Request::Affinity(AffinityChange::AffinityFlush { service, backend })
                }
                AffinityCmd::Set {
                    service,
                    client,
                    backend,
                } => Request::Affinity(AffinityChange::AffinitySet {
                    service,
                    client,
                    backend,
                }),
            });
        }
        Cmd::Backend {
            cmd:
                BackendCmd::Add {
                    service,
                    addresses,
                    name,
                    weight,
                    backup,
                    state,
                    route,
                },
            ..
        } => {
            if addresses.len() > 1 && (name.is_some() || route.is_some()) {
                return Err(RequestError::Bad(format!(
                    "--name and --route belong to one backend, and {} addresses were given; add that backend on its own",
                    addresses.len()
                )));
            }
            let mut list: Vec<Value> = addresses
                .into_iter()
                .map(|address| {
                    let mut fields = Map::new();
                    fields.insert("address".into(), address.into());
                    put(&mut fields, "name", name.clone());
                    put(&mut fields, "weight", weight);
                    put(&mut fields, "backup", backup.then_some(true));
                    put(&mut fields, "state", state.clone());
                    put(&mut fields, "route", route.clone());
                    Value::Object(fields)
                })
                .collect();
            if list.len() == 1 {
                Command::AddBackend {
                    service,
                    backend: BackendConfig::from_fields(list.remove(0))?,
                }
            } else {
                Command::AddBackends {
                    service,
                    backends: lb::control::protocol::backends_from_list(Some(Value::Array(list)))?,
                }
            }
        }
        Cmd::Backend {
            cmd: BackendCmd::Remove { service, backend },
            ..
        } => Command::RemoveBackend { service, backend },
        Cmd::Backend {
            cmd: BackendCmd::Drain { service, backend },
            ..
        } => set_state(service, backend, AdminState::Drain),
        Cmd::Backend {
            cmd: BackendCmd::Enable { service, backend },
            ..
        } => set_state(service, backend, AdminState::Active),
        Cmd::Backend {
            cmd:
                BackendCmd::Disable {
                    service,
                    backend,
                    reset: true,
                },
            ..
        } => return Ok(Request::DisableReset { service, backend }),
        Cmd::Backend {
            cmd: BackendCmd::Disable { service, backend, .. },
            ..
        } => set_state(service, backend, AdminState::Maintenance),
        Cmd::Backend {
            cmd:
                BackendCmd::Weight {
                    service,
                    backend,
                    weight,
                },
            ..
        } => Command::SetWeight {
            service,
            backend,
            weight: lb::config::weight(weight)?,
        },
        Cmd::Service {
            cmd:
                ServiceCmd::Add {
                    name,
                    listen,
                    protocol,
                    datapath,
                    forwarding,
                    affinity_timeout,
                    max_connections,
                },
            ..
        } => {
            let mut fields = Map::new();
            fields.insert("name".into(), name.into());
            fields.insert("listen".into(), listen.into());
            put(&mut fields, "protocol", protocol);
            put(&mut fields, "datapath", datapath);
            put(&mut fields, "forwarding", forwarding);
            put(&mut fields, "affinity_timeout", affinity_timeout);
            put(&mut fields, "max_connections", max_connections);
            Command::AddService {
                service: ServiceConfig::from_fields(Value::Object(fields))?,
            }
        }
        Cmd::Service {
            cmd: ServiceCmd::Remove { name },
            ..
        } => Command::RemoveService { service: name },
        Cmd::Run { .. }
        | Cmd::CheckConfig { .. }
        | Cmd::Cleanup { .. }
        | Cmd::Check { .. }
        | Cmd::Withdraw { .. }
        | Cmd::Top { .. }
        | Cmd::Completions { .. }
        | Cmd::Man { .. } => {
            unreachable!("handled without a request")
        }
    };
    Ok(Request::Change(change))
}

/// Exit codes of `lb check`.
const CHECK_NO_BACKEND: i32 = 1;
const CHECK_UNKNOWN_SERVICE: i32 = 3;
const CHECK_DAEMON_DOWN: i32 = 4;

/// `lb check SERVICE`: the exit code and the one line to print.
fn check(cli_socket: Option<PathBuf>, target: &Target, service: String) -> (i32, String) {
    let down = |e: &dyn std::fmt::Display| (CHECK_DAEMON_DOWN, format!("daemon down: {e}"));
    let (socket, how) = match find_socket(cli_socket, target) {
        Ok(found) => found,
        Err(e) => return down(&lb::report::chain(e.as_ref())),
    };
    let request = Request::Query(Query::Check { service });
    let response = match client::call_found(&socket, &how, &request) {
        Ok(r) => r,
        Err(e) => return down(&lb::report::chain(&e)),
    };
    let view = match response.result.filter(|_| response.ok) {
        Some(v) => serde_json::from_value::<CheckView>(v),
        None => return down(&response.error.unwrap_or_default()),
    };
    match view {
        Ok(v) => {
            let code = match v.status.as_str() {
                CheckView::OK => 0,
                CheckView::UNKNOWN_SERVICE => CHECK_UNKNOWN_SERVICE,
                _ => CHECK_NO_BACKEND,
            };
            let announced = match v.announced {
                Some(true) => "; VIP announced",
                Some(false) => "; VIP not announced",
                None => "",
            };
            (code, format!("{}: {}{announced}", v.service, v.detail))
        }
        Err(e) => down(&format!("unreadable answer: {e}")),
    }
}

/// Sets `key` when the option was given.
fn put(fields: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        fields.insert(key.into(), v.into());
    }
}

fn run_daemon(path: &std::path::Path, format: LogFormat) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log_level))
        .with_context(|| format!("log_level `{}` is not a valid filter", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(lb::daemon::run(
        config,
        tokio_util::sync::CancellationToken::new(),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `lb ARGS…` sends, or the error it stops with.
    fn sent(args: &[&str]) -> Result<Request, String> {
        let cli = Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        request(cli.command).map_err(|e| e.to_string())
    }

    /// The JSON line `lb ARGS…` writes to the socket.
    fn line(args: &[&str]) -> serde_json::Value {
        serde_json::to_value(sent(args).unwrap()).unwrap()
    }

    /// Every argument of every (sub)command, with the command's path.
    fn all_args(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Arg)>) {
        for a in cmd.get_arguments() {
            out.push((path.clone(), a.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_has_help_and_run_lists_only_its_own() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut args = Vec::new();
        all_args(&cmd, "lb".into(), &mut args);
        let missing: Vec<String> = args
            .iter()
            .filter(|(_, a)| a.get_help().is_none())
            .map(|(p, a)| format!("{p} {}", a.get_id()))
            .collect();
        assert!(missing.is_empty(), "options without help text: {missing:?}");
        let run = cmd.find_subcommand("run").unwrap();
        let mut ids: Vec<&str> = run.get_arguments().map(|a| a.get_id().as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["config", "help", "log_format"]);
        let help = run.clone().render_long_help().to_string();
        assert!(!help.contains("--socket") && !help.contains("--json"), "{help}");
    }

    #[test]
    fn client_options_go_before_or_after_the_subcommand() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied())).unwrap();
        let cli = parse(&["--socket", "/s", "--json", "status"]);
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/s")));
        assert!(cli.json);
        let cli = parse(&["backend", "drain", "web", "b1", "-c", "/etc/x.toml", "--json"]);
        let c = cli.command.client_args().unwrap();
        assert_eq!(c.target.config.as_deref(), Some(Path::new("/etc/x.toml")));
        assert!(c.json);
        let cli = parse(&["which", "web", "192.0.2.1", "--socket", "/t"]);
        assert_eq!(
            cli.command.client_args().unwrap().target.socket.as_deref(),
            Some(Path::new("/t"))
        );
        // --socket after the subcommand wins over the one before it.
        let (socket, how) =
            find_socket(Some("/before".into()), &cli.command.client_args().unwrap().target).unwrap();
        assert_eq!((socket, how), (PathBuf::from("/t"), SocketSource::Flag));
    }

    #[test]
    fn subcommands_send_the_documented_requests() {
        let cases: &[(&[&str], serde_json::Value)] = &[
            (&["status"], serde_json::json!({"cmd":"status"})),
            (&["service", "list"], serde_json::json!({"cmd":"status"})),
            (&["stats"], serde_json::json!({"cmd":"stats"})),
            (
                &["backend", "list"],
                serde_json::json!({"cmd":"backends","service":null}),
            ),
            (
                &["backend", "list", "web"],
                serde_json::json!({"cmd":"backends","service":"web"}),
            ),
            (
                &["which", "web", "192.0.2.7"],
                serde_json::json!({"cmd":"which","service":"web","client":"192.0.2.7"}),
            ),
            (
                &["affinity", "list", "web"],
                serde_json::json!({"cmd":"affinity-list","service":"web"}),
            ),
            (
                &["affinity", "list", "web", "--backend", "b1", "--limit", "5"],
                serde_json::json!({"cmd":"affinity-list","service":"web","backend":"b1","limit":5}),
            ),
            (
                &["affinity", "flush", "web", "--backend", "b1"],
                serde_json::json!({"cmd":"affinity-flush","service":"web","backend":"b1"}),
            ),
            (
                &["affinity", "flush", "web"],
                serde_json::json!({"cmd":"affinity-flush","service":"web"}),
            ),
            (
                &["affinity", "set", "web", "192.0.2.7", "b2"],
                serde_json::json!({"cmd":"affinity-set","service":"web","client":"192.0.2.7","backend":"b2"}),
            ),
            (&["reload"], serde_json::json!({"cmd":"reload"})),
            (
                &["backend", "drain", "web", "app1"],
                serde_json::json!({"cmd":"set-state","service":"web","backend":"app1","state":"drain"}),
            ),
            (
                &["backend", "enable", "web", "app1"],
                serde_json::json!({"cmd":"set-state","service":"web","backend":"app1","state":"active"}),
            ),
            (
                &["backend", "disable", "web", "app1"],
                serde_json::json!({"cmd":"set-state","service":"web","backend":"app1","state":"maintenance"}),
            ),
            (
                &["backend", "disable", "web", "app1", "--reset"],
                serde_json::json!({"cmd":"set-state","service":"web","backend":"app1","state":"maintenance","reset":true}),
            ),
            (
                &["backend", "weight", "web", "app3", "2"],
                serde_json::json!({"cmd":"set-weight","service":"web","backend":"app3","weight":2}),
            ),
            (
                &["backend", "remove", "web", "app4"],
                serde_json::json!({"cmd":"remove-backend","service":"web","backend":"app4"}),
            ),
            (
                &["service", "remove", "api"],
                serde_json::json!({"cmd":"remove-service","service":"api"}),
            ),
            // Defaults filled in from the config file's.
            (
                &["backend", "add", "web", "10.0.1.4:8080", "--name", "app4"],
                serde_json::json!({"cmd":"add-backend","service":"web","address":"10.0.1.4:8080",
                    "name":"app4","route":"app4","weight":1,"backup":false,"state":"active"}),
            ),
            (
                &[
                    "backend",
                    "add",
                    "web",
                    "10.0.1.5:8080",
                    "--weight",
                    "0",
                    "--backup",
                    "--state",
                    "drain",
                ],
                serde_json::json!({"cmd":"add-backend","service":"web","address":"10.0.1.5:8080",
                    "name":"10.0.1.5:8080","route":"10.0.1.5:8080","weight":0,"backup":true,"state":"drain"}),
            ),
            // Several addresses: one request with a list, the options applying to each.
            (
                &[
                    "backend",
                    "add",
                    "web",
                    "10.0.1.6:8080",
                    "10.0.1.7:8080",
                    "--weight",
                    "2",
                ],
                serde_json::json!({"cmd":"add-backends","service":"web","backends":[
                    {"address":"10.0.1.6:8080","weight":2},{"address":"10.0.1.7:8080","weight":2}]}),
            ),
        ];
        for (args, want) in cases {
            let got = line(args);
            assert_eq!(&got, want, "lb {args:?}");
            // The daemon decodes the line into the value the CLI built.
            assert_eq!(
                Request::parse(&got.to_string()).unwrap(),
                sent(args).unwrap(),
                "lb {args:?}"
            );
        }
    }

    #[test]
    fn service_add_sends_a_full_service_with_the_file_defaults() {
        let args = [
            "service",
            "add",
            "x",
            "--listen",
            "10.0.0.100:81",
            "--datapath",
            "xdp",
            "--affinity-timeout",
            "10m",
        ];
        let Ok(Request::Change(Command::AddService { service })) = sent(&args) else {
            panic!("not an add-service");
        };
        let file = "[xdp]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"x\"\nlisten = \"10.0.0.100:81\"\ndatapath = \"xdp\"\naffinity_timeout = \"10m\"\n";
        assert_eq!(service, Config::parse(file, "t.toml").unwrap().services.remove(0));
        let v = line(&args);
        assert_eq!(
            (v["cmd"].as_str(), v["datapath"].as_str()),
            (Some("add-service"), Some("xdp"))
        );
        assert_eq!(v["affinity_timeout"], "10m");
        assert_eq!(v["health"]["interval"], "2s");
    }

    #[test]
    fn bad_values_are_refused_before_sending_naming_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["affinity", "list", "web", "--limit", "0"],
                "limit: 0 is out of range; allowed 1..=100000",
            ),
            (
                &["backend", "weight", "web", "b1", "300"],
                "weight: 300 is out of range; allowed 0..=256",
            ),
            (
                &["backend", "weight", "web", "b1", "-1"],
                "weight: -1 is out of range",
            ),
            (
                &["backend", "add", "web", "10.9.9.9"],
                "address: \"10.9.9.9\" is not a valid address",
            ),
            (
                &["backend", "add", "web", "10.9.9.9:80", "--weight", "257"],
                "weight: 257 is out of range",
            ),
            (
                &["backend", "add", "web", "10.9.9.9:80", "--state", "up"],
                "state: \"up\" is not allowed",
            ),
            (
                &["backend", "add", "web", "10.9.9.9:80", "--name", "a/b"],
                "name: \"a/b\" is not allowed",
            ),
            (
                &["backend", "add", "web", "10.9.9.9:80", "10.9.9.9"],
                "backends[1].address: \"10.9.9.9\" is not a valid address",
            ),
            (
                &["backend", "add", "web", "10.9.9.9:80", "10.9.9.9:80"],
                "backends[1].address: 10.9.9.9:80 is already used by backends[0]",
            ),
            (
                &[
                    "backend",
                    "add",
                    "web",
                    "10.9.9.9:80",
                    "10.9.9.8:80",
                    "--name",
                    "x",
                ],
                "bad request: --name and --route belong to one backend",
            ),
            (
                &[
                    "service",
                    "add",
                    "web3",
                    "--listen",
                    "10.0.0.100:81",
                    "--affinity-timeout",
                    "soon",
                ],
                "affinity_timeout: \"soon\" is not a valid duration",
            ),
            (
                &[
                    "service",
                    "add",
                    "w",
                    "--listen",
                    "10.0.0.1:80",
                    "--protocol",
                    "http",
                ],
                "protocol: \"http\"",
            ),
            (
                &[
                    "service",
                    "add",
                    "w",
                    "--listen",
                    "10.0.0.1:80",
                    "--datapath",
                    "dpdk",
                ],
                "datapath: \"dpdk\"",
            ),
            (
                &[
                    "service",
                    "add",
                    "w",
                    "--listen",
                    "10.0.0.1:80",
                    "--max-connections",
                    "0",
                ],
                "max_connections: 0",
            ),
            (
                &["service", "add", "w", "--listen", "[::1]:80", "--datapath", "xdp"],
                "listen: ",
            ),
        ];
        for (args, want) in cases {
            match sent(args) {
                Ok(r) => panic!("lb {args:?} should be refused, built {r:?}"),
                Err(e) => assert!(
                    e.starts_with(want),
                    "lb {args:?}: {e:?} should start with {want:?}"
                ),
            }
        }
    }
}
