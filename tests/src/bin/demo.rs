//! `lb-demo`: sticky sessions and drain, end to end, in network namespaces.
//!
//! Builds the standard topology (prefix `lbdemo`: 3 HTTP backends, 24 client addresses), starts
//! `lb run` in the lb namespace with a proxy-datapath service on 10.0.0.100:80, then shows that
//! every client keeps reaching the same backend, drains one backend with
//! `lb backend drain web b1`, and shows that new clients avoid it while its existing clients stay.
//! Needs root and the `lb` / `lb-testsrv` binaries (`cargo xtask build`; override with `LB_BIN`,
//! `LB_TESTSRV`). Exits non-zero, with the daemon's log tail, when an expectation fails.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::netns::netns_exists;
use lb_tests::{
    Child, TempDir, Topology, http_get_from, lb_bin, run_with_timeout, start_http_backends, testsrv_bin,
};

const PREFIX: &str = "lbdemo";
const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
const SERVICE: &str = "web";
const VIP_PORT: u16 = 80;
const FIRST_WAVE: usize = 12;
const SECOND_WAVE: usize = 12;
const REQUESTS_PER_CLIENT: usize = 3;
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

fn step(n: u32, title: &str) {
    println!("\n=== Step {n}: {title} ===");
    let _ = std::io::stdout().flush();
}

fn config_toml(topo: &Topology, socket: &Path) -> String {
    let mut cfg = format!(
        r#"[control]
socket = "{socket}"

[[service]]
name = "{SERVICE}"
listen = "{vip}:{VIP_PORT}"
datapath = "proxy"
affinity_timeout = "10m"

[service.health]
kind = "tcp"
interval = "500ms"
timeout = "400ms"
"#,
        socket = socket.display(),
        vip = topo.vip(),
    );
    for i in 1..=topo.backend_count() {
        cfg.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{BACKEND_PORT}\"\n",
            topo.backend_addr(i)
        ));
    }
    cfg
}

/// Run the `lb` CLI (root namespace; it only talks to the unix socket) and print what it says.
fn lb_cli(socket: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(lb_bin());
    cmd.arg("--socket").arg(socket).args(args);
    let shown = format!("lb --socket {} {}", socket.display(), args.join(" "));
    println!("$ {shown}");
    let out = run_with_timeout(cmd, CLI_TIMEOUT).with_context(|| format!("running `{shown}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stdout.lines() {
        println!("  {l}");
    }
    for l in stderr.lines() {
        println!("  (stderr) {l}");
    }
    ensure!(out.status.success(), "`{shown}` failed ({})", out.status);
    Ok(stdout)
}

/// `REQUESTS_PER_CLIENT` requests (each on a new connection) from every client; the backend names.
fn wave(topo: &Topology, clients: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, Vec<String>>> {
    let vip = SocketAddr::new(topo.vip().into(), VIP_PORT);
    let ns = topo.client_ns().name();
    let mut seen = BTreeMap::new();
    for &c in clients {
        let mut names = Vec::with_capacity(REQUESTS_PER_CLIENT);
        for _ in 0..REQUESTS_PER_CLIENT {
            let body =
                http_get_from(ns, c, vip, "/").with_context(|| format!("GET http://{vip}/ from {c}"))?;
            names.push(body.trim().to_string());
        }
        seen.insert(c, names);
    }
    Ok(seen)
}

/// Print a "client → backend" table; returns each client's backend, failing on a client that
/// reached more than one backend.
fn print_table(seen: &BTreeMap<Ipv4Addr, Vec<String>>) -> Result<BTreeMap<Ipv4Addr, String>> {
    println!("  {:<12} → backend per request   sticky", "client");
    let mut sticky = BTreeMap::new();
    let mut broken = Vec::new();
    for (c, names) in seen {
        let same = names.iter().all(|n| *n == names[0]);
        println!(
            "  {:<12} → {:<22} {}",
            c.to_string(),
            names.join(" "),
            if same { "yes" } else { "NO" }
        );
        if same {
            sticky.insert(*c, names[0].clone());
        } else {
            broken.push(c.to_string());
        }
    }
    ensure!(
        broken.is_empty(),
        "clients reached more than one backend: {}",
        broken.join(", ")
    );
    Ok(sticky)
}

fn print_distribution(sticky: &BTreeMap<Ipv4Addr, String>, backends: usize) {
    println!("  distribution:");
    for i in 1..=backends {
        let name = format!("b{i}");
        let n = sticky.values().filter(|b| **b == name).count();
        println!("    {name}: {n:>2} client(s) {}", "#".repeat(n));
    }
}

fn wait_for_socket(lb: &mut Child, socket: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !socket.exists() {
        if let Some(status) = lb.try_wait()? {
            bail!("lb exited ({status}) before creating {}", socket.display());
        }
        ensure!(
            Instant::now() < deadline,
            "lb did not create its control socket {} within {timeout:?}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_for_service(topo: &Topology, timeout: Duration) -> Result<()> {
    let vip = SocketAddr::new(topo.vip().into(), VIP_PORT);
    let src = topo.client_primary_addr();
    let deadline = Instant::now() + timeout;
    loop {
        match http_get_from(topo.client_ns().name(), src, vip, "/") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                bail!("service web at {vip} did not answer within {timeout:?}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lb-demo needs root (it creates network namespaces); run it as root");
        return ExitCode::from(2);
    }
    match run() {
        Ok(()) => {
            println!("\nlb-demo: all expectations met.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nlb-demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Fail early, before building anything, if a binary is missing.
    let (lb, srv) = (lb_bin(), testsrv_bin());
    println!("lb: {}\nlb-testsrv: {}", lb.display(), srv.display());

    step(1, "network namespaces");
    // Locals drop in reverse order: lb daemon, temp dir, backends, then the namespaces.
    let topo = Topology::new(PREFIX, BACKENDS, FIRST_WAVE + SECOND_WAVE)
        .context("creating the namespace topology")?;
    let names = topo.namespace_names();
    println!("  namespaces: {}", names.join(", "));
    println!(
        "  client {} (+{} addresses {}..), VIP {}, backends {}",
        topo.client_ns().name(),
        topo.client_addrs().len(),
        topo.client_addrs()[0],
        topo.vip(),
        (1..=BACKENDS)
            .map(|i| format!("b{i}={}", topo.backend_addr(i)))
            .collect::<Vec<_>>()
            .join(" ")
    );

    step(2, "HTTP backends");
    let backends = start_http_backends(&topo, BACKEND_PORT).context("starting http backends")?;
    for (i, b) in backends.iter().enumerate() {
        println!(
            "  b{} listening on {}:{BACKEND_PORT} (pid {})",
            i + 1,
            topo.backend_addr(i + 1),
            b.pid()
        );
    }

    step(3, "configuration");
    let dir = TempDir::try_new("demo").context("creating the demo directory")?;
    let socket = dir.path().join("lb.sock");
    let cfg_path = dir.path().join("lb.toml");
    let cfg = config_toml(&topo, &socket);
    fs::write(&cfg_path, &cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    println!("  {}:", cfg_path.display());
    for l in cfg.lines() {
        println!("    {l}");
    }

    step(4, "start the load balancer");
    let cfg_arg = cfg_path.to_string_lossy().into_owned();
    println!("  (in {}) lb run -c {cfg_arg}", topo.lb_ns().name());
    let mut daemon = topo
        .lb_ns()
        .spawn(&lb, &["run", "-c", cfg_arg.as_str()])
        .context("spawning `lb run`")?;

    let result = scenario(&topo, &socket, &mut daemon);
    if result.is_err() {
        let log = daemon.stderr_lines();
        let tail = &log[log.len().saturating_sub(40)..];
        eprintln!("\n--- lb daemon log (last {} lines) ---", tail.len());
        for l in tail {
            eprintln!("{l}");
        }
    }
    result?;

    step(10, "tear down");
    let status = daemon.stop().context("stopping lb")?;
    println!("  lb stopped ({status})");
    drop(daemon);
    drop(dir);
    drop(backends);
    println!("  backends stopped");
    drop(topo);
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    println!("  namespaces deleted");
    Ok(())
}

fn scenario(topo: &Topology, socket: &Path, daemon: &mut Child) -> Result<()> {
    wait_for_socket(daemon, socket, Duration::from_secs(10))?;
    println!(
        "  control socket {} is up (pid {})",
        socket.display(),
        daemon.pid()
    );
    wait_for_service(topo, Duration::from_secs(10))?;
    // Let a few health-check rounds (500 ms) pass so every backend is up before clients arrive.
    thread::sleep(Duration::from_millis(1500));
    println!("  {}:{VIP_PORT} answers", topo.vip());

    let clients = topo.client_addrs();
    let (first, second) = clients.split_at(FIRST_WAVE);

    step(
        5,
        &format!(
            "{FIRST_WAVE} clients, {REQUESTS_PER_CLIENT} new connections each, to {}:{VIP_PORT}",
            topo.vip()
        ),
    );
    let before = print_table(&wave(topo, first)?)?;
    print_distribution(&before, BACKENDS);
    println!("  every client stayed on one backend (source-IP affinity)");

    // Drain b1 as the brief says; should no first-wave client sit on b1 (possible with 12 clients),
    // drain the busiest backend instead so the demo still has existing clients to follow.
    let mut target = "b1".to_string();
    if !before.values().any(|b| *b == target) {
        let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
        for b in before.values() {
            *counts.entry(b).or_default() += 1;
        }
        let busiest = counts.iter().max_by_key(|(_, n)| **n).map(|(b, _)| (*b).clone());
        target = busiest.context("no client reached any backend")?;
        println!("  (no client landed on b1; draining the busiest backend, {target}, instead)");
    }

    step(6, &format!("drain {target}"));
    lb_cli(socket, &["backend", "drain", SERVICE, &target])?;

    step(
        7,
        &format!("{SECOND_WAVE} new clients after the drain: none may reach {target}"),
    );
    let new = print_table(&wave(topo, second)?)?;
    print_distribution(&new, BACKENDS);
    let leaked: Vec<String> = new
        .iter()
        .filter(|(_, b)| **b == target)
        .map(|(c, _)| c.to_string())
        .collect();
    ensure!(
        leaked.is_empty(),
        "new clients reached drained backend {target}: {}",
        leaked.join(", ")
    );
    println!("  no new client reached {target}");

    step(
        8,
        "the first clients come back: all keep their backend, drained or not",
    );
    let old_on_target: Vec<Ipv4Addr> = before
        .iter()
        .filter(|(_, b)| **b == target)
        .map(|(c, _)| *c)
        .collect();
    let again = print_table(&wave(topo, first)?)?;
    let mut moved = Vec::new();
    for (c, b) in &before {
        if again.get(c) != Some(b) {
            moved.push(format!("{c}: {b} -> {}", again.get(c).map_or("?", |s| s)));
        }
    }
    ensure!(
        moved.is_empty(),
        "existing clients lost their backend after the drain: {}",
        moved.join(", ")
    );
    println!(
        "  clients that were on {target} are still there: {}",
        old_on_target
            .iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );

    step(9, "lb status");
    lb_cli(socket, &["status"])?;
    Ok(())
}
