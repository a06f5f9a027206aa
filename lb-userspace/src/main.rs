//! The `lb` command: `lb run` starts the daemon; the other subcommands talk to it over the control
//! socket (tables by default, `--json` for scripts; `lb top` is a live view); `lb check-config`
//! validates a file offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb::config::{AdminState, Config, DatapathKind, Protocol};
use lb::control::client;
use lb::control::protocol::{ReloadView, Request, StatsView, StatusView, WhichView};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Layer-4 TCP/AJP load balancer with an XDP fast path"
)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "LB_SOCKET", default_value = "/run/lb/lb.sock")]
    socket: PathBuf,
    /// Print the daemon's JSON response instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
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
        #[arg(short, long)]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file without starting.
    CheckConfig { file: PathBuf },
    /// Detach the XDP program and remove its pinned maps (drops live XDP connections and affinity).
    Cleanup {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Services, backends and counters.
    Status,
    /// Counters of every backend (connections, bytes, packets, checks, transitions) and of XDP.
    Stats,
    /// Live view of every backend, refreshed every interval (q, Esc or Ctrl-C quits).
    Top {
        /// Refresh interval: "1s", "500ms" or plain seconds (100ms..=1h).
        #[arg(long, default_value = "1s", value_parser = lb::top::parse_interval)]
        interval: std::time::Duration,
    },
    /// Manage backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Which backend a client would reach, and why (CLIENT is IP, or IP:PORT for an open connection).
    Which { service: String, client: String },
    /// Re-read the config file and apply what changed.
    Reload,
}

#[derive(Subcommand)]
enum BackendCmd {
    /// List backends (of one service, or all).
    List { service: Option<String> },
    /// Add a backend.
    Add {
        service: String,
        address: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        /// Hot spare: used only while no primary is healthy.
        #[arg(long)]
        backup: bool,
        #[arg(long, value_parser = parse_state)]
        state: Option<AdminState>,
    },
    /// Remove a backend (its open connections finish).
    Remove { service: String, backend: String },
    /// Take no new clients; clients with affinity and open connections stay.
    Drain { service: String, backend: String },
    /// Back to active.
    Enable { service: String, backend: String },
    /// Maintenance: no clients at all; open connections finish.
    Disable { service: String, backend: String },
    /// Set the weight (0..=256).
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    List,
    /// Add a service (settings not given take the config file's defaults).
    Add {
        name: String,
        #[arg(long)]
        listen: String,
        #[arg(long, value_parser = parse_protocol)]
        protocol: Option<Protocol>,
        #[arg(long, value_parser = parse_datapath)]
        datapath: Option<DatapathKind>,
        /// e.g. "30m"
        #[arg(long)]
        affinity_timeout: Option<String>,
        #[arg(long)]
        max_connections: Option<u32>,
    },
    /// Remove a service (stops listening; open connections finish).
    Remove {
        name: String,
    },
}

fn parse_enum<T: serde::de::DeserializeOwned>(s: &str, allowed: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}` is not allowed; use {allowed}"))
}
fn parse_state(s: &str) -> Result<AdminState, String> {
    parse_enum(s, "active, drain or maintenance")
}
fn parse_protocol(s: &str) -> Result<Protocol, String> {
    parse_enum(s, "tcp or ajp")
}
fn parse_datapath(s: &str) -> Result<DatapathKind, String> {
    parse_enum(s, "proxy, xdp or ajp")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let service_list = matches!(cli.command, Cmd::Service(ServiceCmd::List));
    let request = match cli.command {
        Cmd::Run { config, log_format } => return run_daemon(&config, log_format),
        Cmd::CheckConfig { file } => {
            let c = Config::load(&file)?;
            let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({} services, {} backends)",
                file.display(),
                c.services.len(),
                backends
            );
            return Ok(());
        }
        Cmd::Cleanup { config } => {
            let c = Config::load(&config)?;
            let Some(xdp) = c.xdp else {
                println!("{}: no [xdp] table; nothing to clean up", config.display());
                return Ok(());
            };
            let removed = lb::xdp::cleanup(&xdp.pin_path)?;
            println!(
                "removed {} pinned objects under {}",
                removed.len(),
                xdp.pin_path.display()
            );
            return Ok(());
        }
        Cmd::Top { interval } => {
            lb::top::run(&cli.socket, interval)?;
            return Ok(());
        }
        Cmd::Status => Request::Status {},
        Cmd::Stats => Request::Stats {},
        Cmd::Service(ServiceCmd::List) => Request::Status {},
        Cmd::Backend(BackendCmd::List { service }) => Request::Backends { service },
        Cmd::Backend(BackendCmd::Add {
            service,
            address,
            name,
            weight,
            backup,
            state,
        }) => Request::AddBackend {
            service,
            address,
            name,
            weight,
            backup: backup.then_some(true),
            state,
        },
        Cmd::Backend(BackendCmd::Remove { service, backend }) => Request::RemoveBackend { service, backend },
        Cmd::Backend(BackendCmd::Drain { service, backend }) => Request::SetState {
            service,
            backend,
            state: AdminState::Drain,
        },
        Cmd::Backend(BackendCmd::Enable { service, backend }) => Request::SetState {
            service,
            backend,
            state: AdminState::Active,
        },
        Cmd::Backend(BackendCmd::Disable { service, backend }) => Request::SetState {
            service,
            backend,
            state: AdminState::Maintenance,
        },
        Cmd::Backend(BackendCmd::Weight {
            service,
            backend,
            weight,
        }) => Request::SetWeight {
            service,
            backend,
            weight,
        },
        Cmd::Service(ServiceCmd::Add {
            name,
            listen,
            protocol,
            datapath,
            affinity_timeout,
            max_connections,
        }) => Request::AddService {
            name,
            listen,
            protocol,
            datapath,
            affinity_timeout,
            max_connections,
        },
        Cmd::Service(ServiceCmd::Remove { name }) => Request::RemoveService { service: name },
        Cmd::Which { service, client } => Request::Which { service, client },
        Cmd::Reload => Request::Reload {},
    };
    let response = client::call(&cli.socket, &request)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        if !response.ok {
            std::process::exit(1);
        }
        return Ok(());
    }
    if !response.ok {
        bail!("{}", response.error.unwrap_or_default());
    }
    let result = response.result.unwrap_or_default();
    let out = match (&request, service_list) {
        (Request::Status {}, true) => lb::cli::services(&serde_json::from_value::<StatusView>(result)?),
        (Request::Status {} | Request::Backends { .. }, _) => {
            lb::cli::status(&serde_json::from_value::<StatusView>(result)?)
        }
        (Request::Stats {}, _) => lb::cli::stats(&serde_json::from_value::<StatsView>(result)?),
        (Request::Which { .. }, _) => lb::cli::which(&serde_json::from_value::<WhichView>(result)?),
        (Request::Reload {}, _) => lb::cli::reload(&serde_json::from_value::<ReloadView>(result)?),
        _ => "ok\n".to_string(),
    };
    print!("{out}");
    Ok(())
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
