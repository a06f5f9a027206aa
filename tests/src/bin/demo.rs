//! `lb-demo`: the XDP datapath end to end, in network namespaces: sticky clients, drain, `lb which`
//! answering from the kernel's maps, `lb stats` with the kernel's counters, then a restart of `lb`
//! during an open transfer that the transfer survives (the pinned maps and link keep forwarding).
//! Then the deployment lb's users run (module `ajp`): browsers → Apache httpd → AJP → lb → two
//! Tomcat 10, each session on its Tomcat, new browsers spread by address, a drain.
//!
//! Builds the standard topology (prefix `lbdemo`: 3 backends running HTTP on :8080 and echo on :7,
//! 24 client addresses), starts `lb run` in the lb namespace with `datapath = "xdp"` services `web`
//! (10.0.0.100:80) and `echo` (10.0.0.100:7). If XDP cannot attach on this machine, the demo says
//! why and runs the same walkthrough on the `proxy` datapath (no restart step: proxied
//! connections end with the process). Ends with `lb cleanup`, which removes the pins and restores
//! the sysctls lb changed. Needs root and the `lb` / `lb-testsrv` binaries (`cargo xtask build`;
//! override with `LB_BIN`, `LB_TESTSRV`); `--require-xdp` fails instead of falling back. Exits
//! non-zero, with the daemon's log tail, when an expectation fails.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

#[path = "demo/ajp.rs"]
mod ajp;
use lb_tests::netns::netns_exists;
use lb_tests::{
    Daemon, Enter, Pins, Topology, connect_from, http_get_from, lb_bin, run_with_timeout,
    start_echo_backends, start_http_backends, testsrv_bin,
};

/// Namespace prefix; `LB_DEMO_PREFIX` overrides it (the test gives each run its own).
const PREFIX: &str = "lbdemo";
const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7;
const SERVICE: &str = "web";
const VIP_PORT: u16 = 80;
const FIRST_WAVE: usize = 12;
const SECOND_WAVE: usize = 12;
const REQUESTS_PER_CLIENT: usize = 3;
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(10);

fn step(title: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    println!("\n=== Step {}: {title} ===", N.fetch_add(1, Ordering::Relaxed));
    let _ = std::io::stdout().flush();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Datapath {
    Xdp,
    Proxy,
}

impl Datapath {
    fn name(self) -> &'static str {
        match self {
            Datapath::Xdp => "xdp",
            Datapath::Proxy => "proxy",
        }
    }
}

fn config_toml(topo: &Topology, socket: &Path, datapath: Datapath, pins: &Path) -> String {
    let mut cfg = format!(
        "shutdown_timeout = \"1s\"\nring_size = 1009\n\n[control]\nsocket = \"{}\"\n",
        socket.display()
    );
    if datapath == Datapath::Xdp {
        let mut interfaces = vec![format!("\"{}\"", topo.lb_client_if())];
        interfaces.extend((1..=topo.backend_count()).map(|i| format!("\"{}\"", topo.lb_backend_if(i))));
        cfg.push_str(&format!(
            "\n# The program is attached to the lb namespace's ends of the veths (\"the peers\" are\n# the client's and backends' eth0).\n[xdp]\ninterfaces = [{}]\npin_path = \"{}\"\n",
            interfaces.join(", "),
            pins.display()
        ));
    }
    for (name, vip_port, port) in [(SERVICE, VIP_PORT, BACKEND_PORT), ("echo", ECHO_PORT, ECHO_PORT)] {
        cfg.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nlisten = \"{vip}:{vip_port}\"\ndatapath = \"{dp}\"\naffinity_timeout = \"10m\"\n\n[service.health]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"250ms\"\nrise = 1\n",
            vip = topo.vip(),
            dp = datapath.name(),
        ));
        for i in 1..=topo.backend_count() {
            cfg.push_str(&format!(
                "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{port}\"\n",
                topo.backend_addr(i)
            ));
        }
    }
    cfg
}

/// Run the `lb` CLI (root namespace; it finds the daemon through `-c CONFIG`) and print what it
/// says.
fn lb_cli(config: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(lb_bin());
    cmd.args(args).arg("-c").arg(config);
    let shown = format!("lb {} -c {}", args.join(" "), config.display());
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

/// Waits until the daemon answers `status`; `Err` with its log when it exits first.
fn wait_ready(lb: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if lb.try_status().is_ok() {
            return Ok(());
        }
        if let Some(status) = lb.child.try_wait()? {
            bail!("lb exited ({status}): {}", lb.log_tail(8).trim());
        }
        ensure!(
            Instant::now() < deadline,
            "lb did not answer within {START_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every backend of every service passed a health check.
fn wait_healthy(lb: &Daemon) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let st = lb.try_status().map_err(anyhow::Error::msg)?;
        let down: Vec<String> = st["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| {
                s["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|b| b["health"] != "up")
                    .map(move |b| format!("{}/{}", s["name"], b["name"]))
            })
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "backends not up after {START_TIMEOUT:?}: {}",
            down.join(", ")
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// GRO on the peers' eth0 (and no TX checksum offload), so XDP_REDIRECT into the veths is accepted.
fn prepare_peers(topo: &Topology) -> Result<()> {
    let mut names = vec![topo.client_ns().name().to_string()];
    names.extend((1..=topo.backend_count()).map(|i| topo.backend_ns(i).name().to_string()));
    for ns in names {
        let out = topo.exec_in(&ns, &["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])?;
        ensure!(
            out.status.success(),
            "ethtool in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lb-demo needs root (it creates network namespaces); run it as root");
        return ExitCode::from(2);
    }
    let require_xdp = std::env::args().any(|a| a == "--require-xdp");
    let started = Instant::now();
    match run(require_xdp) {
        Ok(datapath) => {
            println!(
                "\nlb-demo: all expectations met on the {} datapath, and behind Apache on the ajp datapath ({:.1}s).",
                datapath.name(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nlb-demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(require_xdp: bool) -> Result<Datapath> {
    // Fail early, before building anything, if a binary is missing.
    let (lb, srv) = (lb_bin(), testsrv_bin());
    println!("lb: {}\nlb-testsrv: {}", lb.display(), srv.display());

    step("network namespaces");
    // Locals drop in reverse order: lb daemon, backends, then the namespaces.
    let prefix = std::env::var("LB_DEMO_PREFIX").unwrap_or_else(|_| PREFIX.to_string());
    let topo = Topology::new(&prefix, BACKENDS, FIRST_WAVE + SECOND_WAVE)
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
    prepare_peers(&topo)?;

    step("backends: HTTP on :8080 (answers its name), echo on :7");
    let mut backends = start_http_backends(&topo, BACKEND_PORT).context("starting http backends")?;
    backends.extend(start_echo_backends(&topo, ECHO_PORT).context("starting echo backends")?);
    println!("  {} servers in {} backend namespaces", backends.len(), BACKENDS);

    step("configuration and start, XDP first");
    let pins = Pins::new(PathBuf::from(format!(
        "/sys/fs/bpf/{PREFIX}-{}",
        std::process::id()
    )));
    let mut datapath = Datapath::Xdp;
    let mut daemon = start(&topo, datapath, &pins.0)?;
    if let Err(e) = wait_ready(&mut daemon) {
        println!("  XDP could not start here: {e:#}");
        ensure!(!require_xdp, "--require-xdp given and XDP could not start: {e:#}");
        println!("  falling back to the proxy datapath (same walkthrough, no restart step)");
        datapath = Datapath::Proxy;
        drop(daemon);
        daemon = start(&topo, datapath, &pins.0)?;
        wait_ready(&mut daemon)?;
    }
    println!(
        "  lb is up (pid {}), datapath {}",
        daemon.child.pid(),
        datapath.name()
    );

    let result = scenario(&topo, &mut daemon, datapath);
    if result.is_err() {
        eprintln!("\n--- lb daemon log (last 40 lines) ---\n{}", daemon.log_tail(40));
    }
    result?;

    step("stop lb, then `lb cleanup`: pins removed, sysctls put back");
    let status = daemon.stop().context("stopping lb")?;
    println!("  lb stopped ({status})");
    if datapath == Datapath::Xdp {
        let cfg = daemon.config.to_string_lossy().into_owned();
        println!("$ (in {}) lb cleanup -c {cfg}", topo.lb_ns().name());
        let out = topo
            .lb_ns()
            .command_net_only(&lb, &["cleanup", "-c", cfg.as_str()])
            .output()
            .context("running lb cleanup")?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {l}");
        }
        ensure!(
            out.status.success(),
            "lb cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !pins.0.exists(),
            "{} still exists after lb cleanup",
            pins.0.display()
        );
    }
    drop(daemon);
    drop(backends);
    println!("  backends stopped");
    drop(topo);
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    println!("  namespaces deleted");

    ajp::run(&format!("{prefix}a"))?;
    Ok(datapath)
}

/// `lb run` in the lb namespace with the config `config` writes for its socket, shown up to the
/// first backend (`elided` says what follows).
fn spawn_shown(topo: &Topology, tag: &str, config: impl FnOnce(&Path) -> String, elided: &str) -> Daemon {
    let mut shown = String::new();
    let daemon = Daemon::spawn(topo.lb_ns(), Enter::NetOnly, tag, &[], |socket| {
        shown = config(socket);
        shown.clone()
    });
    println!("  {}:", daemon.config.display());
    for l in shown
        .lines()
        .take_while(|l| !l.starts_with("[[service.backend]]"))
    {
        println!("    {l}");
    }
    println!("    … ({elided})");
    daemon
}

fn start(topo: &Topology, datapath: Datapath, pins: &Path) -> Result<Daemon> {
    let daemon = spawn_shown(
        topo,
        "demo",
        |socket| config_toml(topo, socket, datapath, pins),
        &format!("b1..b{BACKENDS} for both services"),
    );
    println!(
        "  (in {}, network namespace only) lb run -c {}",
        topo.lb_ns().name(),
        daemon.config.display()
    );
    Ok(daemon)
}

/// The backend `lb which` names in its answer (`CLIENT → NAME (ADDR) by REASON: …`).
fn which_backend(text: &str) -> Option<(String, String)> {
    let rest = text.split(" → ").nth(1)?;
    let name = rest.split_whitespace().next()?.to_string();
    let reason = rest.split(" by ").nth(1)?.split(':').next()?.trim().to_string();
    Some((name, reason))
}

fn echo_roundtrip(s: &mut TcpStream, payload: &[u8]) -> Result<()> {
    s.write_all(payload).context("echo write")?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).context("echo read")?;
    ensure!(back == payload, "echo answered different bytes");
    Ok(())
}

fn scenario(topo: &Topology, daemon: &mut Daemon, datapath: Datapath) -> Result<()> {
    wait_healthy(daemon)?;
    let cfg = daemon.config.clone();
    let clients = topo.client_addrs();
    let (first, second) = clients.split_at(FIRST_WAVE);

    step(&format!(
        "{FIRST_WAVE} clients, {REQUESTS_PER_CLIENT} new connections each, to {}:{VIP_PORT}",
        topo.vip()
    ));
    let before = print_table(&wave(topo, first)?)?;
    print_distribution(&before, BACKENDS);
    println!("  every client stayed on one backend (source-IP affinity)");

    step("`lb which`: where a client goes and why");
    for c in &first[..3] {
        let out = lb_cli(&cfg, &["which", SERVICE, &c.to_string()])?;
        let (name, reason) = which_backend(&out).with_context(|| format!("unreadable `lb which`: {out}"))?;
        ensure!(
            before.get(c) == Some(&name),
            "lb which says {c} → {name}, but it reached {:?}",
            before.get(c)
        );
        ensure!(
            reason == "affinity",
            "{c} is known: expected `by affinity`, got {reason}"
        );
    }
    if datapath == Datapath::Xdp {
        println!("  answered from the kernel's affinity map: what the XDP program will do");
    }

    // Drain the busiest backend: it has existing clients to follow.
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for b in before.values() {
        *counts.entry(b).or_default() += 1;
    }
    let target = counts
        .iter()
        .max_by_key(|(b, n)| (**n, std::cmp::Reverse(*b)))
        .map(|(b, _)| (*b).clone())
        .context("no client reached any backend")?;

    step(&format!("drain {target}"));
    lb_cli(&cfg, &["backend", "drain", SERVICE, &target])?;

    step(&format!(
        "{SECOND_WAVE} new clients after the drain: none may reach {target}"
    ));
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

    step("the first clients come back: all keep their backend, drained or not");
    let again = print_table(&wave(topo, first)?)?;
    let moved: Vec<String> = before
        .iter()
        .filter(|(c, b)| again.get(c) != Some(b))
        .map(|(c, b)| format!("{c}: {b} -> {}", again.get(c).map_or("?", |s| s)))
        .collect();
    ensure!(
        moved.is_empty(),
        "existing clients lost their backend after the drain: {}",
        moved.join(", ")
    );
    println!("  clients of {target} are still there");

    step("`lb stats`: per-backend counters and the kernel's counters");
    let stats = lb_cli(&cfg, &["stats"])?;
    if datapath == Datapath::Xdp {
        let xdp = stats
            .lines()
            .find(|l| l.starts_with("xdp: "))
            .context("`lb stats` shows no xdp counters")?;
        let forwarded: u64 = xdp
            .split("forwarded ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no forwarded count in `{xdp}`"))?;
        ensure!(forwarded > 0, "the kernel forwarded no packet: {xdp}");
        println!("  the XDP program forwarded {forwarded} packets in the kernel");
    }

    if datapath == Datapath::Proxy {
        println!("\n(restart step skipped: proxied connections end with the lb process)");
        return Ok(());
    }

    step("restart lb during an open transfer: the transfer survives");
    let echo = SocketAddr::new(topo.vip().into(), ECHO_PORT);
    let src = *clients.last().context("no clients")?;
    let mut s = connect_from(topo.client_ns().name(), src, echo, Duration::from_secs(5))
        .with_context(|| format!("connecting to echo {echo} from {src}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    echo_roundtrip(&mut s, b"before the restart")?;
    println!("  {src} → {echo}: connection open, echo answers");
    let status = daemon.stop().context("stopping lb")?;
    println!("  lb stopped ({status}); the pinned program and maps keep forwarding");
    for i in 0..10 {
        echo_roundtrip(&mut s, format!("while lb is down {i}").as_bytes())
            .context("the transfer broke while lb was down")?;
    }
    println!("  10 round trips while lb was down: all answered");
    daemon.run_again(topo.lb_ns());
    ensure!(
        daemon.log().contains("adopting pinned XDP maps"),
        "the new lb did not adopt the pinned maps"
    );
    println!(
        "  lb started again (pid {}) and adopted the pinned maps",
        daemon.child.pid()
    );
    let bulk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    echo_roundtrip(&mut s, &bulk).context("the transfer broke after the restart")?;
    println!("  1 MiB echoed byte for byte on the same connection after the restart");
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    ensure!(rest.is_empty(), "unexpected bytes after half-close");
    let after = print_table(&wave(topo, &first[..4])?)?;
    for (c, b) in &after {
        ensure!(
            before.get(c) == Some(b),
            "{c} lost its backend across the restart"
        );
    }
    println!("  and clients keep their backends across the restart");
    Ok(())
}
