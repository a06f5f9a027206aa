//! Loading: the embedded object into the kernel, maps pinned (or adopted from a previous run),
//! the program attached to each interface (its link pinned), and the kernel's log lines forwarded.

use std::collections::HashMap as StdHashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use lb_common::maps::{BACKEND_PRESENT, BackendValue, GlobalConfig, LAYOUT_VERSION, ServiceKey};
use lb_common::maps::{
    MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_GLOBAL_STATS, MAP_RING,
    MAP_SERVICE_STATS, MAP_SERVICES, MAP_SNAT, MAP_SNAT_ADDRS, MAP_SNAT_LOCKS,
};
use lb_common::passive::{MAP_ALIVE, MAP_FALLBACK, MAP_PASSIVE, MAP_REFUSING};

use tracing::{info, warn};

use crate::config::{Hook, XdpConfig, XdpMode};

use crate::ebpf::{self, TC_PROGRAM, XDP_PROGRAM};

use super::pins::{self, PinDir};
use super::{BPF_FS_MAGIC, Inner, Maps, Walkers, XdpDatapath, XdpError, map_err, take};

/// Forwards the program's aya-log records into tracing (target `lb::datapath::xdp::kernel`).
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "lb::datapath::xdp::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "lb::datapath::xdp::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "lb::datapath::xdp::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "lb::datapath::xdp::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "lb::datapath::xdp::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Starts a task draining the program's log ring buffer (needs a tokio runtime; skipped without).
fn forward_program_logs(ebpf: &mut Ebpf) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "XDP program logs are not forwarded"),
    };
    // SAFETY: the logger owns its ring buffer fd and neither closes nor replaces it while registered.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "XDP program logs are not forwarded"),
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Collects the program's log lines as text (see [`XdpDatapath::read_program_logs`]).
#[derive(Default)]
struct Collect(Mutex<Vec<String>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }

    fn flush(&self) {}
}

/// Mounts bpffs at /sys/fs/bpf if needed and creates the pin directory.
fn ensure_bpffs(dir: &Path) -> Result<(), XdpError> {
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !is_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| XdpError::System(format!("mounting bpffs on /sys/fs/bpf: {e}")))?;
        info!(
            "mounted the BPF filesystem on /sys/fs/bpf; if lb runs in a private mount namespace \
             (e.g. under `ip netns exec`), its pins vanish when it exits and a restart drops connections"
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| XdpError::Pin {
        path: dir.into(),
        message: e.to_string(),
    })
}

/// Every configured interface exists (in this network namespace).
fn check_interfaces(interfaces: &[String]) -> Result<(), XdpError> {
    for name in interfaces {
        if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
            return Err(XdpError::NoInterface(name.clone()));
        }
    }
    Ok(())
}

/// Where the link of `hook` on `interface` is pinned: `link_IFACE` (XDP), `tclink_IFACE` (TC).
fn link_pin(pin_path: &Path, interface: &str, hook: Hook) -> PathBuf {
    match hook {
        Hook::Xdp => pin_path.join(format!("link_{interface}")),
        Hook::Tc => pin_path.join(format!("tclink_{interface}")),
    }
}

/// The hook `config`'s mode runs at on its interfaces. With `auto`: TC ingress when any of them is
/// a veth end and the kernel has TCX links (Linux 6.6), said in the log with the veths named; else
/// XDP, also when the interfaces' kinds cannot be read (a warning says why).
fn hook_on(config: &XdpConfig) -> Hook {
    if config.mode != XdpMode::Auto {
        return config.mode.hook(false);
    }
    if !aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) {
        return Hook::Xdp;
    }
    let veths = match crate::netlink::Rtnetlink::open().and_then(|mut rtnl| rtnl.veths()) {
        Ok(veths) => veths,
        Err(e) => {
            warn!(error = %e, "[xdp] mode auto: cannot read the interfaces' kinds; attaching at XDP");
            return Hook::Xdp;
        }
    };
    let on_veth: Vec<&String> = config
        .interfaces
        .iter()
        .filter(|i| nix::net::if_::if_nametoindex(i.as_str()).is_ok_and(|index| veths.contains(&index)))
        .collect();
    let hook = config.mode.hook(!on_veth.is_empty());
    if hook == Hook::Tc {
        info!(
            veths = ?on_veth,
            "[xdp] mode auto: the TC hook, since veth's native XDP copies every frame and cannot forward \
             one whose checksum is left to offload (mode = \"driver\" forces XDP)"
        );
    }
    hook
}

/// The name of the entry point run at `hook`.
pub(super) fn entry_point(hook: Hook) -> &'static str {
    match hook {
        Hook::Xdp => XDP_PROGRAM,
        Hook::Tc => TC_PROGRAM,
    }
}

fn pin_err(path: &Path) -> impl Fn(String) -> XdpError + '_ {
    move |message| XdpError::Pin {
        path: path.into(),
        message,
    }
}

/// Pins the link `link` (just attached) at `pin`.
fn pin_link(link: FdLink, pin: &Path) -> Result<(), XdpError> {
    link.pin(pin).map(|_| ()).map_err(|e| pin_err(pin)(e.to_string()))
}

/// Attaches the XDP program (or, when a pinned link exists, swaps the program inside it) and pins
/// the link.
fn attach_xdp(program: &mut Xdp, interface: &str, mode: XdpMode, pin_path: &Path) -> Result<(), XdpError> {
    let pin = link_pin(pin_path, interface, Hook::Xdp);
    if pin.exists() {
        let pinned = PinnedLink::from_pin(&pin).map_err(|e| pin_err(&pin)(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(&pin)(e.to_string()))?;
        program.attach_to_link(link)?;
        info!(
            interface,
            "XDP program replaced inside the pinned link; forwarding never stopped"
        );
        return Ok(());
    }
    let tries: &[(AyaXdpMode, &'static str)] = match mode {
        XdpMode::Driver => &[(AyaXdpMode::Driver, "driver")],
        XdpMode::Skb => &[(AyaXdpMode::Skb, "skb")],
        XdpMode::Auto => &[(AyaXdpMode::Driver, "driver"), (AyaXdpMode::Skb, "skb")],
        XdpMode::Tc => unreachable!("mode tc attaches at TC ingress"),
    };
    let mut last = None;
    for (aya_mode, name) in tries {
        match program.attach(interface, *aya_mode) {
            Ok(id) => {
                let link =
                    FdLink::try_from(program.take_link(id)?).map_err(|e| pin_err(&pin)(e.to_string()))?;
                pin_link(link, &pin)?;
                info!(interface, mode = name, "XDP program attached");
                return Ok(());
            }
            Err(source) => {
                if tries.len() > 1 && *name == "driver" {
                    warn!(interface, error = %source, "attach failed in driver mode; retrying in skb mode");
                }
                last = Some(XdpError::Attach {
                    interface: interface.to_string(),
                    mode: name,
                    source,
                });
            }
        }
    }
    Err(last.expect("at least one mode tried"))
}

/// Attaches the TC program at `interface`'s ingress by a TCX link (or, when a pinned link exists,
/// swaps the program inside it) and pins the link.
fn attach_tc(program: &mut SchedClassifier, interface: &str, pin_path: &Path) -> Result<(), XdpError> {
    let pin = link_pin(pin_path, interface, Hook::Tc);
    if pin.exists() {
        let pinned = PinnedLink::from_pin(&pin).map_err(|e| pin_err(&pin)(e.to_string()))?;
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(&pin)(e.to_string()))?;
        program.attach_to_link(link)?;
        info!(
            interface,
            "TC program replaced inside the pinned TCX link; forwarding never stopped"
        );
        return Ok(());
    }
    let id = program
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| XdpError::Attach {
            interface: interface.to_string(),
            mode: "tc",
            source,
        })?;
    let link = FdLink::try_from(program.take_link(id)?).map_err(|e| pin_err(&pin)(e.to_string()))?;
    pin_link(link, &pin)?;
    info!(
        interface,
        mode = "tc",
        "TC program attached at ingress (TCX link)"
    );
    Ok(())
}

/// The pinned links of the hook other than `hook` on `interfaces` (left by a run in the other
/// mode): to remove once this start is committed.
fn other_hook_links(pin_path: &Path, interfaces: &[String], hook: Hook) -> Vec<PathBuf> {
    let other = match hook {
        Hook::Xdp => Hook::Tc,
        Hook::Tc => Hook::Xdp,
    };
    interfaces
        .iter()
        .map(|i| link_pin(pin_path, i, other))
        .filter(|p| p.exists())
        .collect()
}

/// The loaded entry point, typed.
enum Entry<'a> {
    Xdp(&'a Xdp),
    Tc(&'a SchedClassifier),
}

fn entry(ebpf: &Ebpf, hook: Hook) -> Result<Entry<'_>, XdpError> {
    let name = entry_point(hook);
    let program = ebpf
        .program(name)
        .ok_or_else(|| XdpError::System(format!("program {name} missing from the object")))?;
    Ok(match hook {
        Hook::Xdp => Entry::Xdp(program.try_into()?),
        Hook::Tc => Entry::Tc(program.try_into()?),
    })
}

/// struct __sk_buff (uapi/linux/bpf.h): its size, and the offsets of the two fields set for a test
/// run (everything else must be zero for BPF_PROG_TEST_RUN).
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// TC action codes (uapi/linux/pkt_cls.h) and the XDP verdicts they are reported as.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// A TC program's return code in the XDP verdict vocabulary: OK → PASS, SHOT → DROP,
/// REDIRECT → REDIRECT (a TC program sends a frame back out its interface by redirecting, where
/// XDP returns TX); any other code → ABORTED.
pub fn tc_verdict(code: u32) -> u32 {
    match code {
        TC_ACT_OK => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT => XDP_REDIRECT,
        _ => XDP_ABORTED,
    }
}

impl XdpDatapath {
    /// Loads the program and its maps. With `config`, maps and links are pinned (adopting pinned
    /// ones) and the program is attached to the configured interfaces; without, nothing is pinned
    /// or attached (packet-fixture tests and benchmarks drive it through [`XdpDatapath::test_run`]).
    pub fn start(config: Option<&XdpConfig>, seed: u32, ring_size: u32) -> Result<XdpDatapath, XdpError> {
        XdpDatapath::start_sized(config, None, seed, ring_size)
    }

    /// [`XdpDatapath::start`] without a config (nothing pinned or attached) but with the map
    /// sizes of `sizes` (benchmarks that need a bigger conntrack table) and its mode's hook: with
    /// `mode = "tc"` the TC entry point is loaded and [`XdpDatapath::test_run`] runs it.
    pub fn start_unattached(sizes: &XdpConfig, seed: u32, ring_size: u32) -> Result<XdpDatapath, XdpError> {
        XdpDatapath::start_sized(None, Some(sizes), seed, ring_size)
    }

    fn start_sized(
        config: Option<&XdpConfig>,
        sizes: Option<&XdpConfig>,
        seed: u32,
        ring_size: u32,
    ) -> Result<XdpDatapath, XdpError> {
        let object = ebpf::object().ok_or(ebpf::LoadError::NotEmbedded)?;
        let defaults = XdpConfig::default();
        let cfg = config.or(sizes).unwrap_or(&defaults);
        let pin_path = config.map(|c| c.pin_path.clone());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, cfg.max_services)
            .map_max_entries(MAP_SERVICE_STATS, cfg.max_services)
            .map_max_entries(MAP_BACKENDS, cfg.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, cfg.max_backends)
            .map_max_entries(MAP_RING, cfg.max_services * ring_size)
            .map_max_entries(MAP_CONNTRACK, cfg.conntrack_entries)
            .map_max_entries(MAP_AFFINITY, cfg.affinity_entries)
            .map_max_entries(MAP_PASSIVE, cfg.max_backends)
            .map_max_entries(MAP_REFUSING, cfg.max_backends)
            .map_max_entries(MAP_ALIVE, cfg.max_backends)
            .map_max_entries(MAP_FALLBACK, cfg.max_services);
        let names = [
            MAP_GLOBAL_STATS,
            MAP_CONFIG,
            MAP_SERVICES,
            MAP_BACKENDS,
            MAP_RING,
            MAP_CONNTRACK,
            MAP_AFFINITY,
            MAP_SNAT,
            MAP_SNAT_ADDRS,
            MAP_SNAT_LOCKS,
            MAP_SERVICE_STATS,
            MAP_BACKEND_STATS,
            MAP_PASSIVE,
            MAP_REFUSING,
            MAP_FALLBACK,
            MAP_ALIVE,
        ];
        if let Some(config) = config {
            // First, before anything is made: a typo here must not leave pins or sysctls behind.
            check_interfaces(&config.interfaces)?;
        }
        let pins = match &pin_path {
            Some(dir) => {
                let dir_created = !dir.exists();
                ensure_bpffs(dir)?;
                let locked = PinDir::lock(dir, dir_created);
                // Not when another daemon holds it: it may have made the directory just now.
                if dir_created && matches!(&locked, Err(e) if !matches!(e, pins::PinError::InUse(_))) {
                    let _ = std::fs::remove_dir(dir);
                }
                let pins = locked?;
                for name in names {
                    loader.map_pin_path(name, dir.join(name));
                }
                Some(pins)
            }
            None => None,
        };
        let mut ebpf = loader.load(object)?;
        if pins.is_some() {
            pins::test_stop_point("maps");
        }
        let mut maps = Maps {
            config: take(&mut ebpf, MAP_CONFIG)?,
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            conntrack: take(&mut ebpf, MAP_CONNTRACK)?,
            affinity: take(&mut ebpf, MAP_AFFINITY)?,
            global: take(&mut ebpf, MAP_GLOBAL_STATS)?,
            service_stats: take(&mut ebpf, MAP_SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            snat_addrs: take(&mut ebpf, MAP_SNAT_ADDRS)?,
        };
        let passive = super::passive::PassiveMaps::take(&mut ebpf)?;
        let max_services = maps.service_stats.len();
        let max_backends = maps.backends.len();
        let old = maps.config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        let adopting = old.layout_version != 0;
        if adopting
            && (old.layout_version != LAYOUT_VERSION
                || old.ring_size != ring_size
                || maps.ring.len() != max_services * ring_size)
        {
            return Err(XdpError::Layout {
                path: pin_path.clone().unwrap_or_default(),
                found: old.layout_version,
                want: LAYOUT_VERSION,
                found_ring: old.ring_size,
                want_ring: ring_size,
            });
        }
        let global = GlobalConfig {
            layout_version: LAYOUT_VERSION,
            seed,
            ring_size,
            snat_port_lo: cfg.snat_ports.0,
            snat_port_hi: cfg.snat_ports.1,
            cpus: aya::util::nr_cpus().map_err(|(_, e)| XdpError::System(format!("counting CPUs: {e}")))?
                as u32,
            // A real start that made its maps cannot know what earlier connections the backends
            // still hold (a restart that adopts the pins knows, and keeps any window left).
            collisions_until: if adopting {
                old.collisions_until
            } else if config.is_some() {
                collisions_until(Duration::from_nanos(lb_common::passive::FRESH_MAPS_HELD_NS))
            } else {
                0
            },
            idle_timeout_ns: cfg.idle_timeout.as_nanos() as u64,
            closed_timeout_ns: cfg.closed_timeout.as_nanos() as u64,
            syn_timeout_ns: cfg.syn_timeout.as_nanos() as u64,
        };
        maps.config.set(0, global, 0).map_err(map_err(MAP_CONFIG))?;

        let mut adopt_services = StdHashMap::new();
        let mut adopt_backends = StdHashMap::new();
        if adopting {
            for entry in &maps.services {
                let (k, v) = entry.map_err(map_err(MAP_SERVICES))?;
                adopt_services.insert(k, v.slot);
            }
            for i in 0..max_backends {
                let b = maps.backends.get(&i, 0).map_err(map_err(MAP_BACKENDS))?;
                if b.flags & BACKEND_PRESENT != 0 {
                    adopt_backends.insert((b.service_slot, b.addr_be, b.port_be), i);
                }
            }
            info!(
                path = %pin_path.as_deref().unwrap_or(Path::new("")).display(),
                services = adopt_services.len(),
                backends = adopt_backends.len(),
                "adopting pinned XDP maps: live connections and affinity carry on"
            );
        }
        let taken_slots: Vec<u32> = adopt_services.values().copied().collect();
        let taken_backends: Vec<u32> = adopt_backends.values().copied().collect();

        let hook = match config {
            Some(config) => hook_on(config),
            None => cfg.mode.hook(false),
        };
        let synproxy = super::synproxy::SynProxy::load(&mut ebpf, cfg.syn_cookies, hook)?;
        let name = entry_point(hook);
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| XdpError::System(format!("program {name} missing from the object")))?;
        // Only the entry point in use is loaded (the verifier's time is not spent on the other).
        let mut stale_links = Vec::new();
        match hook {
            Hook::Xdp => <&mut Xdp>::try_from(program)?.load()?,
            Hook::Tc => <&mut SchedClassifier>::try_from(program)?.load()?,
        }
        if let Some(config) = config {
            if let (Some(pins), false) = (&pins, adopting) {
                pins.sysctls_changed();
            }
            super::host::prepare(&config.pin_path, &config.interfaces, config.snat_ports, adopting)?;
            let program = ebpf.program_mut(name).expect("loaded above");
            match hook {
                Hook::Xdp => {
                    let program: &mut Xdp = program.try_into()?;
                    for interface in &config.interfaces {
                        attach_xdp(program, interface, config.mode, &config.pin_path)?;
                    }
                }
                Hook::Tc => {
                    let program: &mut SchedClassifier = program.try_into()?;
                    for interface in &config.interfaces {
                        attach_tc(program, interface, &config.pin_path)?;
                    }
                    if config.redirect_peer {
                        super::peers::PeerIfaces::take(&mut ebpf)?.keep();
                    }
                }
            }
            stale_links = other_hook_links(&config.pin_path, &config.interfaces, hook);
            forward_program_logs(&mut ebpf);
        }
        let walkers = Mutex::new(Walkers {
            conntrack: walker(&maps.conntrack, MAP_CONNTRACK)?,
            affinity: walker(&maps.affinity, MAP_AFFINITY)?,
        });
        let inner = std::sync::Arc::new(Mutex::new(Inner {
            ebpf,
            maps,
            ring_size,
            max_services,
            services: StdHashMap::new(),
            free_slots: (0..max_services).filter(|s| !taken_slots.contains(s)).collect(),
            free_backends: (0..max_backends)
                .filter(|b| !taken_backends.contains(b))
                .collect(),
            adopt_services,
            adopt_backends,
            passive,
            synproxy,
            hook,
        }));
        if config.is_some() {
            XdpDatapath::watch_syn_pressure(&inner);
        }
        Ok(XdpDatapath {
            inner,
            walkers,
            pin_path,
            pins,
            stale_links,
        })
    }

    /// After a committed start: removes the pinned links of the hook not in use (the mode changed
    /// across the restart), which detaches them; the new hook's links forward already.
    pub(super) fn remove_stale_links(&self) {
        for pin in &self.stale_links {
            match std::fs::remove_file(pin) {
                Ok(()) => info!(
                    link = %pin.display(),
                    "[xdp] mode changed: the other hook's pinned link removed (detached); the new one forwards"
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(
                    link = %pin.display(),
                    error = %e,
                    "[xdp] mode changed but the other hook's pinned link cannot be removed; it still runs before \
                     or after the new one (`lb cleanup` removes it)"
                ),
            }
        }
    }

    /// For `d` from now, new flows that take a SNAT port with no entry are marked held (a bare
    /// ACK answering the SYN is a collision): what a start that made its maps does for
    /// [`lb_common::passive::FRESH_MAPS_HELD_NS`]. Zero ends the window.
    pub fn hold_unknown_ports_for(&self, d: Duration) -> Result<(), XdpError> {
        let mut inner = self.inner.lock().unwrap();
        let mut global = inner.maps.config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        global.collisions_until = if d.is_zero() { 0 } else { collisions_until(d) };
        inner.maps.config.set(0, global, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Where the program runs.
    pub fn hook(&self) -> Hook {
        self.inner.lock().unwrap().hook
    }

    /// Runs the program once (or `repeat` times) on `frame` as if it arrived on `ingress_ifindex`:
    /// (verdict, output frame, average time per run). The TC program runs on an skb whose device
    /// is `ingress_ifindex` (it must exist in this network namespace); its return code is reported
    /// as an XDP verdict ([`tc_verdict`]).
    pub fn test_run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration), XdpError> {
        let inner = self.inner.lock().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = match entry(&inner.ebpf, inner.hook)? {
            Entry::Xdp(program) => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
                let mut ctx = [0u8; 24];
                ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                program.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                })?
            }
            Entry::Tc(program) => {
                let mut ctx = [0u8; SK_BUFF_SIZE];
                let index = ingress_ifindex.to_ne_bytes();
                ctx[SK_BUFF_INGRESS_IFINDEX..SK_BUFF_INGRESS_IFINDEX + 4].copy_from_slice(&index);
                ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&index);
                let mut r = program.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                })?;
                r.return_value = tc_verdict(r.return_value);
                r
            }
        };
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// A new descriptor of the loaded program (benchmarks chain it behind their own programs
    /// with a tail call, and find its maps through it).
    pub fn program_fd(&self) -> Result<std::os::fd::OwnedFd, XdpError> {
        let inner = self.inner.lock().unwrap();
        let fd = match entry(&inner.ebpf, inner.hook)? {
            Entry::Xdp(p) => p.fd()?,
            Entry::Tc(p) => p.fd()?,
        };
        std::os::fd::AsFd::as_fd(fd)
            .try_clone_to_owned()
            .map_err(|e| XdpError::System(format!("duplicating the program's descriptor: {e}")))
    }

    /// The program's log lines not read yet, oldest first: for a datapath started without a
    /// config (packet fixtures), whose lines are not forwarded into tracing.
    pub fn read_program_logs(&self) -> Result<Vec<String>, XdpError> {
        let inner = self.inner.lock().unwrap();
        let id = match entry(&inner.ebpf, inner.hook)? {
            Entry::Xdp(p) => p.info()?.id(),
            Entry::Tc(p) => p.info()?.id(),
        };
        let collect = Collect::default();
        // A fresh reader per call: the ring buffer's read position lives in the kernel.
        let mut logger = aya_log::EbpfLogger::init_from_id_with_logger(id, &collect)
            .map_err(|e| XdpError::System(format!("reading the datapath program's log: {e}")))?;
        logger.flush();
        drop(logger);
        Ok(collect.0.into_inner().unwrap())
    }

    /// After the config's services are synced: removes pinned services and backends that no
    /// service claimed (they were removed from the config while `lb` was down).
    pub fn finish_adoption(&self) -> Result<(), XdpError> {
        let mut inner = self.inner.lock().unwrap();
        let services: Vec<(ServiceKey, u32)> = inner.adopt_services.drain().collect();
        for (key, slot) in services {
            let _ = inner.maps.services.remove(&key);
            inner.free_slots.push_back(slot);
            info!(slot, "removed a pinned XDP service that is no longer configured");
        }
        let backends: Vec<u32> = inner.adopt_backends.drain().map(|(_, index)| index).collect();
        for index in backends {
            inner
                .maps
                .backends
                .set(index, BackendValue::default(), 0)
                .map_err(map_err(MAP_BACKENDS))?;
            inner.free_backends.push_back(index);
        }
        Ok(())
    }

    pub fn pin_path(&self) -> Option<&Path> {
        self.pin_path.as_deref()
    }
}

/// [`GlobalConfig::collisions_until`] for a window of `d` from now, rounded up to the next
/// [`lb_common::maps::second_stamp`].
fn collisions_until(d: Duration) -> u32 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    let now = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
    lb_common::maps::second_stamp(now + d.as_nanos() as u64) + 1
}

/// A second handle on the hash map `of` (see [`Walkers`]).
fn walker<K: aya::Pod, V: aya::Pod>(
    of: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
) -> Result<aya::maps::HashMap<aya::maps::MapData, K, V>, XdpError> {
    use aya::maps::{IterableMap, Map, MapData};
    use std::os::fd::AsFd;
    // A duplicate of the descriptor: the same map, and no privilege beyond what opened it (a map
    // opened by id would need CAP_SYS_ADMIN).
    let fd = IterableMap::map(of)
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| XdpError::System(format!("eBPF map {name}: a second descriptor: {e}")))?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    aya::maps::HashMap::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}
