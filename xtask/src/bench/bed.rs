//! The test bed: the [`Topology`] plus an `iperf3 -s` and an nginx in every backend namespace.
//!
//! Drop order is field order: backend servers, then [`Reaper`] (stops whatever still runs inside
//! our namespaces, e.g. an nginx worker orphaned by a killed master), then the namespaces, then the
//! temp directory. A failed or interrupted run leaves nothing behind.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use lb_tests::TempDir;
use lb_tests::{Child, Netns, Topology, http_get_from};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{CLIENT_CPU, LB_CPU};

/// Port of the HTTP service (nginx on the backends, the VIP's port 80).
pub const HTTP_PORT: u16 = 80;
/// Port of the iperf3 servers and the VIP's iperf3 service.
pub const IPERF_PORT: u16 = 5201;

/// On drop, stops every process still inside the given namespaces (`ip netns pids`), by PID:
/// SIGTERM, then SIGKILL after 2 s. Only bench processes run there (the names carry our PID).
#[derive(Debug)]
pub struct Reaper {
    namespaces: Vec<String>,
}

impl Reaper {
    pub fn new(namespaces: Vec<String>) -> Reaper {
        Reaper { namespaces }
    }

    fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                pids.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
        pids.retain(|p| *p != std::process::id() as i32);
        pids
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let pids = self.pids();
        if pids.is_empty() {
            return;
        }
        eprintln!("bench: stopping leftover processes in the bench namespaces: {pids:?}");
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !self.pids().is_empty() {
            thread::sleep(Duration::from_millis(50));
        }
        for p in self.pids() {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// `SIOCETHTOOL` and the legacy ethtool commands used by [`nic_like`].
const SIOCETHTOOL: nix::libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// One legacy ethtool set command (`ETHTOOL_S*` with a value) on `ifname`, like `ethtool -K`.
fn ethtool_set(ifname: &str, cmd: u32, value: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut v = EthtoolValue { cmd, data: value };
    let mut req = IfReq {
        name: [0; 16],
        data: &raw mut v,
        _pad: [0; 16],
    };
    let n = ifname.len().min(15);
    req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    // SAFETY: `req` is a valid ifreq whose data points at a live ethtool_value for the whole call.
    let rc = unsafe { nix::libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the veth end `ifname` in `ns` behave more like a physical NIC: TX checksum offload off
/// (full checksums on the wire, as a NIC computes them before sending; this also turns TSO off, so
/// every sender puts MTU-sized segments on the link) and GRO on (NAPI receive). Native-mode XDP
/// needs both to redirect frames into veth: a frame with a partial (offloaded) checksum is dropped
/// by the receiver once XDP has turned it into a raw frame, and a veth only accepts redirected
/// frames when its peer runs NAPI. Applied to every veth end alike, so no row gets 64 KiB
/// segments for free where another pays for MTU-sized ones.
fn nic_like(ns: &Netns, ifname: &str) -> io::Result<()> {
    let name = ifname.to_string();
    ns.run(move || -> io::Result<()> {
        ethtool_set(&name, ETHTOOL_STXCSUM, 0)?;
        ethtool_set(&name, ETHTOOL_SGRO, 1)
    })?
    .map_err(|e| io::Error::new(e.kind(), format!("ethtool on {ifname} in {}: {e}", ns.name())))
}

/// What [`Bed::new`] did to the veth peers, for the report.
pub const NIC_NOTE: &str = "every veth end has TX checksum offload (and with it TSO) off and GRO on, so links carry MTU-sized frames with full checksums as between physical NICs, and native-mode XDP can redirect into veth";

/// Topology, backend servers and the temp directory holding every config and log.
pub struct Bed {
    // Field order is drop order.
    servers: Vec<Child>,
    _reaper: Reaper,
    /// `lb_decap` on the backends (a dsr bed).
    decap: Option<lb_tests::decap::Decap>,
    pub topo: Topology,
    pub dir: TempDir,
    /// A bed for `forwarding = "dsr"`: see [`Bed::new_dsr`].
    dsr: bool,
}

fn nginx_backend_conf(dir: &Path, addrs: &[Ipv4Addr], name: &str) -> String {
    let mut listen = String::new();
    for a in addrs {
        let _ = writeln!(listen, "        listen {a}:{HTTP_PORT} backlog=4096;");
    }
    let d = dir.display();
    format!(
        "# nginx backend {name} for cargo xtask bench
daemon off;
master_process on;
worker_processes 2;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
{listen}        default_type text/plain;
        location / {{ return 200 \"{name}\\n\"; }}
    }}
}}
"
    )
}

/// Best-effort socket tuning so short connections do not run out of ports or backlog.
fn tune(ns: &Netns) {
    for (k, v) in [
        ("net.ipv4.ip_local_port_range", "1024 65000"),
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.core.somaxconn", "8192"),
        ("net.ipv4.tcp_max_syn_backlog", "8192"),
    ] {
        let _ = ns.sysctl(k, v);
    }
}

impl Bed {
    pub fn new(prefix: &str, backends: usize, clients: usize) -> Result<Bed> {
        Bed::build(prefix, backends, clients, None)
    }

    /// A bed for `forwarding = "dsr"`: every backend also has the VIP on `lo` (its nginx listens
    /// on it too, its iperf3 only on it), advertises MSS 1440 on its default route (room for the
    /// 20-byte outer header), and decapsulates IPIP with `lb_decap` from the eBPF object `object`
    /// (this kernel may lack the ipip module). The replies go back through the lb namespace's
    /// kernel routing (the backends' default route), as in the `none` row.
    pub fn new_dsr(prefix: &str, backends: usize, clients: usize, object: &Path) -> Result<Bed> {
        Bed::build(prefix, backends, clients, Some(object))
    }

    fn build(prefix: &str, backends: usize, clients: usize, dsr: Option<&Path>) -> Result<Bed> {
        let dir = TempDir::try_in(&std::env::temp_dir(), &format!("{prefix}.d"))
            .with_context(|| format!("creating a temp dir for {prefix}"))?;
        let topo = Topology::new(prefix, backends, clients)
            .with_context(|| format!("creating the network namespaces {prefix}-*"))?;
        let reaper = Reaper::new(topo.namespace_names());
        let mut bed = Bed {
            servers: Vec::new(),
            _reaper: reaper,
            decap: None,
            topo,
            dir,
            dsr: dsr.is_some(),
        };
        tune(bed.topo.client_ns());
        tune(bed.topo.lb_ns());
        nic_like(bed.topo.client_ns(), bed.topo.peer_if())?;
        nic_like(bed.topo.lb_ns(), bed.topo.lb_client_if())?;
        for i in 1..=backends {
            tune(bed.topo.backend_ns(i));
            nic_like(bed.topo.backend_ns(i), bed.topo.peer_if())?;
            nic_like(bed.topo.lb_ns(), &bed.topo.lb_backend_if(i))?;
        }
        if let Some(object) = dsr {
            let vip = bed.topo.vip();
            for i in 1..=backends {
                let gw = bed.topo.lb_backend_side_addr(i);
                bed.topo
                    .backend_ns(i)
                    .ip_batch(&[
                        format!("addr add {vip}/32 dev lo"),
                        format!(
                            "route change default via {gw} dev {} advmss 1440",
                            bed.topo.peer_if()
                        ),
                    ])
                    .with_context(|| format!("dsr setup of backend b{i}"))?;
            }
            let namespaces: Vec<&Netns> = (1..=backends).map(|i| bed.topo.backend_ns(i)).collect();
            bed.decap = Some(
                lb_tests::decap::attach_decap(object, &namespaces, bed.topo.peer_if())
                    .context("lb_decap on the backends")?,
            );
        }
        for i in 1..=backends {
            bed.start_backend(i)?;
        }
        for i in 1..=backends {
            let addr = SocketAddr::new(bed.topo.backend_addr(i).into(), HTTP_PORT);
            bed.wait_http(addr, Duration::from_secs(10))
                .with_context(|| format!("nginx on backend b{i}"))?;
        }
        Ok(bed)
    }

    fn start_backend(&mut self, i: usize) -> Result<()> {
        let name = format!("b{i}");
        let addr = self.topo.backend_addr(i);
        let dir = self.dir.sub(&name)?;
        let conf = dir.join("nginx.conf");
        let vip = self.topo.vip();
        let addrs: &[Ipv4Addr] = if self.dsr { &[addr, vip] } else { &[addr] };
        fs::write(&conf, nginx_backend_conf(&dir, addrs, &name))?;
        let iperf_addr = if self.dsr { vip } else { addr };
        let ns = self.topo.backend_ns(i);
        let nginx = ns
            .spawn(
                "nginx",
                &[
                    OsStr::new("-c"),
                    conf.as_os_str(),
                    OsStr::new("-p"),
                    dir.as_os_str(),
                    OsStr::new("-e"),
                    dir.join("error.log").as_os_str(),
                ],
            )
            .with_context(|| format!("starting nginx in {}", ns.name()))?;
        self.servers.push(nginx);
        let mut iperf = ns
            .spawn(
                "iperf3",
                &[
                    "-s",
                    "-B",
                    &iperf_addr.to_string(),
                    "-p",
                    &IPERF_PORT.to_string(),
                    "--forceflush",
                ],
            )
            .with_context(|| format!("starting iperf3 -s in {}", ns.name()))?;
        iperf
            .wait_for_line(|l| l.contains("Server listening"), Duration::from_secs(10))
            .with_context(|| format!("iperf3 -s in {}", ns.name()))?;
        self.servers.push(iperf);
        Ok(())
    }

    /// Waits until `GET /` to `addr` from the client's primary address answers 200.
    pub fn wait_http(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.get(self.topo.client_primary_addr(), addr) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("no HTTP answer from {addr} within {timeout:?}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// One `GET /` from `src` in the client namespace on a new connection; the trimmed body.
    pub fn get(&self, src: Ipv4Addr, addr: SocketAddr) -> io::Result<String> {
        http_get_from(self.topo.client_ns().name(), src, addr, "/").map(|b| b.trim().to_string())
    }

    /// `ip netns exec <client ns> [taskset -c 0] program args…`.
    pub fn client_command<S: AsRef<OsStr>>(&self, pin: bool, program: &str, args: &[S]) -> Command {
        pinned(self.topo.client_ns(), pin.then_some(CLIENT_CPU), program, args)
    }

    /// `ip netns exec <lb ns> [taskset -c 1] program args…`.
    pub fn lb_command<S: AsRef<OsStr>>(&self, pin: bool, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        pinned(self.topo.lb_ns(), pin.then_some(LB_CPU), program, args)
    }

    /// Backend `i`'s HTTP address.
    pub fn backend_http(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.backend_addr(i), HTTP_PORT)
    }

    /// Backend `i`'s iperf3 address.
    pub fn backend_iperf(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.backend_addr(i), IPERF_PORT)
    }

    /// SIGKILLs backend `i`'s HTTP server (nginx: the master and its workers, so nothing keeps
    /// the port open): the port refuses from then on. Returns when the signals are sent.
    pub fn kill_http(&self, i: usize) -> Result<()> {
        // Started in pairs per backend: nginx, then iperf3.
        let nginx = self
            .servers
            .get((i.max(1) - 1) * 2)
            .with_context(|| format!("no HTTP server for backend b{i}"))?;
        let tree = super::measure::process_tree(&[nginx.pid()]);
        kill(Pid::from_raw(nginx.pid() as i32), Signal::SIGKILL)
            .with_context(|| format!("SIGKILL to nginx (pid {}) of b{i}", nginx.pid()))?;
        for p in tree.into_iter().skip(1) {
            // Workers that went with their master are gone already.
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        Ok(())
    }

    /// The backend servers that exited (they should all still run).
    pub fn dead_servers(&mut self) -> Vec<String> {
        self.servers
            .iter_mut()
            .filter_map(|c| (!c.is_running()).then(|| c.description().to_string()))
            .collect()
    }
}

/// `ip netns exec NS [taskset -c CPU] program args…` (taskset execs, so the PID is the program's).
pub fn pinned<S: AsRef<OsStr>>(
    ns: &Netns,
    cpu: Option<u32>,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = ns.command("taskset", &["-c".to_string(), cpu.to_string()]);
            cmd.arg(program).args(args);
            cmd
        }
        None => ns.command(program, args),
    }
}
