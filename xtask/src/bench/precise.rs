//! `lb-microbench`'s kernel figures (mechanism in [`crate::kernel`]), in a fixture namespace of
//! their own with the thread pinned to one CPU:
//!
//! - `xdp-precise`: ns/packet of the program itself, established flow both ways and a new SYN,
//!   from `BPF_PROG_RUN`'s repeat loop through the restore chain, minus the chain's own cost.
//!   Established frames hit a flow opened first (SYN + ACK through the program), with Linux's
//!   timestamp option (so the flow translates timestamps, as real ones do). New SYNs: each batch is
//!   1,024 distinct SYNs (199 client addresses seen before, so affinity hits; new ports) after the
//!   conntrack table was emptied, so every run inserts a new flow (checked: 2 entries per SYN).
//! - `xdp-live`: Mpps on one CPU with live frames: the established client → backend frame, the
//!   program's redirect carried out into a veth whose far end drops (and counts) every frame, so
//!   the figure covers the program, the redirect, the veth transmit and the receiving end's XDP
//!   drop; beside a trivial `XDP_TX` program measured the same way (through the same chain; and
//!   plain, without it).
//! - `xdp-flows`: established ns/packet with 10, 10k and 1M live flows in conntrack (both
//!   directions each), the timed frames spread over all of them.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lb::config::{Config, XdpConfig};
use lb::datapath::Datapath;
use lb::datapath::xdp::XdpDatapath;
use lb::runtime::Snapshot;
use lb::state::{Command, State};
use lb_tests::fixture::LB_BACKEND_SIDE;
use lb_tests::packet::{Tcp, ack_options, syn_options};

use crate::kernel::{self, Chain, Sink, XDP_REDIRECT, XDP_TX};
use crate::{BACKEND_MAC, CLIENT_MAC, VIP, XDP_SERVICE, emit, fixture_netns};

const PRECISE: [&str; 4] = [
    "XDP precise: established flow, client → backend (XDP_REDIRECT)",
    "XDP precise: established flow, backend → client (XDP_REDIRECT)",
    "XDP precise: new SYN, known client (affinity hit, conntrack + SNAT insert)",
    "XDP precise: restore + tail call (the chain's own cost, subtracted above)",
];
const LIVE: [&str; 4] = [
    "XDP live frames, one CPU: lb, established client → backend, redirected into a veth",
    "XDP live frames, one CPU: trivial XDP_TX, through the same restore + tail call",
    "XDP live frames, one CPU: trivial XDP_TX, plain",
    "XDP live frames: lb as a share of the trivial XDP_TX (same way)",
];
/// Katran's published figure for one core.
const KATRAN_MPPS: f64 = 5.2;

fn flows_name(n: usize) -> String {
    let label = match n {
        1_000_000 => "1M".to_string(),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    };
    format!("XDP precise: established client → backend with {label} live flows")
}

/// The client addresses with permanent neighbours in the fixture (10.0.0.10..=10.0.0.209), less
/// the VIP itself (a packet from the VIP is an impossible source).
pub fn clients() -> Vec<Ipv4Addr> {
    (10..210u8)
        .map(|i| Ipv4Addr::new(10, 0, 0, i))
        .filter(|c| *c != VIP)
        .collect()
}

fn mac(base: [u8; 6], last: u8) -> [u8; 6] {
    let mut m = base;
    m[5] = last;
    m
}

/// A client's ACK toward the VIP with Linux's timestamp option (66 bytes).
fn client_ack(c: Ipv4Addr, port: u16) -> Vec<u8> {
    Tcp::new((c, port), (VIP, 80), 0x10)
        .macs(mac(CLIENT_MAC, c.octets()[3]), [0xaa; 6])
        .seq(2)
        .ack(1)
        .tcp_options(&ack_options(1000, 2000))
        .build()
}

/// A client's SYN toward the VIP with Linux's options (74 bytes).
fn client_syn(c: Ipv4Addr, port: u16, tsval: u32) -> Vec<u8> {
    Tcp::new((c, port), (VIP, 80), 0x02)
        .macs(mac(CLIENT_MAC, c.octets()[3]), [0xaa; 6])
        .tcp_options(&syn_options(tsval, 0))
        .build()
}

/// `FlowKey` bytes (network-order fields, proto 6).
fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&src.octets());
    k[4..8].copy_from_slice(&dst.octets());
    k[8..10].copy_from_slice(&sport.to_be_bytes());
    k[10..12].copy_from_slice(&dport.to_be_bytes());
    k[12] = 6;
    k
}

struct Bed {
    xdp: XdpDatapath,
    prog: OwnedFd,
    conntrack: OwnedFd,
    client_if: u32,
    backend_if: u32,
}

/// An opened flow: its frames both ways and its conntrack keys.
struct Flow {
    ack: Vec<u8>,
    reply: Vec<u8>,
    forward_key: [u8; 16],
    reverse_key: [u8; 16],
}

impl Bed {
    fn new(conntrack_entries: u32) -> Result<Bed, String> {
        let (client_if, backend_if) = fixture_netns()?;
        let config = Config::parse(XDP_SERVICE, "lb-microbench").map_err(|e| e.to_string())?;
        let sizes = XdpConfig {
            conntrack_entries,
            ..XdpConfig::default()
        };
        let xdp = XdpDatapath::start_unattached(&sizes, config.seed, config.ring_size)
            .map_err(|e| format!("loading the XDP program: {e}"))?;
        let mut state = State::new(config.seed, config.ring_size);
        for service in config.services {
            let effect = state
                .apply(Command::AddService { service })
                .map_err(|e| e.to_string())?;
            xdp.apply(&effect, &Snapshot::new(state.clone()))
                .map_err(|e| e.to_string())?;
        }
        let prog = xdp.program_fd().map_err(|e| e.to_string())?;
        let conntrack = crate::bpfsys::program_maps(prog.as_fd())?
            .into_iter()
            .find(|(name, _)| name == lb_common::maps::MAP_CONNTRACK)
            .map(|(_, fd)| fd)
            .ok_or("the program has no conntrack map")?;
        Ok(Bed {
            xdp,
            prog,
            conntrack,
            client_if,
            backend_if,
        })
    }

    fn forwarded(&self) -> u64 {
        self.xdp
            .kernel_counters()
            .iter()
            .find(|(n, _)| *n == "forwarded")
            .map_or(0, |(_, v)| *v)
    }

    /// SYN then ACK from `c:port` through the program; the flow is established.
    fn open(&self, c: Ipv4Addr, port: u16) -> Result<Flow, String> {
        let (verdict, fwd, _) = self
            .xdp
            .test_run(&client_syn(c, port, 1000), self.client_if, 1)
            .map_err(|e| format!("test run: {e}"))?;
        if verdict != XDP_REDIRECT {
            return Err(format!(
                "a SYN to the VIP got verdict {verdict}, expected XDP_REDIRECT"
            ));
        }
        let backend = Ipv4Addr::new(fwd[30], fwd[31], fwd[32], fwd[33]);
        let snat = u16::from_be_bytes([fwd[34], fwd[35]]);
        let ack = client_ack(c, port);
        let (verdict, _, _) = self
            .xdp
            .test_run(&ack, self.client_if, 1)
            .map_err(|e| format!("test run: {e}"))?;
        if verdict != XDP_REDIRECT {
            return Err(format!(
                "the client's ACK got verdict {verdict}, expected XDP_REDIRECT"
            ));
        }
        let reply = Tcp::new((backend, 8080), (LB_BACKEND_SIDE, snat), 0x10)
            .macs(mac(BACKEND_MAC, backend.octets()[3]), [0xaa; 6])
            .seq(1)
            .ack(2)
            .tcp_options(&ack_options(5000, 1000))
            .build();
        Ok(Flow {
            ack,
            reply,
            forward_key: flow_key(c, port, VIP, 80),
            reverse_key: flow_key(backend, 8080, LB_BACKEND_SIDE, snat),
        })
    }

    fn clear_conntrack(&self) -> Result<(), String> {
        crate::bpfsys::map_clear(self.conntrack.as_fd(), 16).map(drop)
    }

    fn conntrack_len(&self) -> Result<usize, String> {
        crate::bpfsys::map_keys(self.conntrack.as_fd(), 16).map(|k| k.len())
    }
}

/// The `forwarded` counter's growth between two readings.
fn forwarded_between(before: &[(&str, u64)], after: &[(&str, u64)]) -> u64 {
    let get = |v: &[(&str, u64)]| v.iter().find(|(n, _)| *n == "forwarded").map_or(0, |(_, c)| *c);
    get(after) - get(before)
}

/// Rounds of (lb, chain) samples: each round times `repeat` runs of the chain ending in `lb`, then
/// in `constant`, over the same frames; every lb run must be forwarded.
#[allow(clippy::too_many_arguments)]
fn paired(
    bed: &Bed,
    chain: &Chain,
    constant: BorrowedFd<'_>,
    frames: &[Vec<u8>],
    ifindex: u32,
    repeat: u32,
    rounds: usize,
    before_each: &dyn Fn() -> Result<(), String>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    chain.frames(frames)?;
    let (mut lb, mut overhead) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        before_each()?;
        chain.target(bed.prog.as_fd())?;
        chain.rewind(frames.len() as u32)?;
        let before = bed.xdp.kernel_counters();
        let (verdict, ns) = chain.run(ifindex, repeat, false)?;
        let after = bed.xdp.kernel_counters();
        let forwarded = forwarded_between(&before, &after);
        if verdict != XDP_REDIRECT || forwarded != u64::from(repeat) {
            let changed: Vec<String> = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| a.1 != b.1)
                .map(|(b, a)| format!("{} +{}", b.0, a.1 - b.1))
                .collect();
            return Err(format!(
                "{forwarded} of {repeat} runs forwarded (last verdict {verdict}; counters {})",
                changed.join(", ")
            ));
        }
        lb.push(ns);
        chain.target(constant)?;
        chain.rewind(frames.len() as u32)?;
        let (_, ns) = chain.run(ifindex, repeat, false)?;
        overhead.push(ns);
    }
    Ok((lb, overhead))
}

/// "median (min–max over rounds)" of the per-round differences.
fn net(lb: &[f64], overhead: &[f64]) -> (f64, String) {
    let diffs: Vec<f64> = lb.iter().zip(overhead).map(|(a, b)| a - b).collect();
    let (m, lo, hi) = kernel::spread(&diffs);
    let (lm, _, _) = kernel::spread(lb);
    let (om, _, _) = kernel::spread(overhead);
    (
        m,
        format!(
            "median of {} rounds, range {lo:.1}–{hi:.1}; chain + lb {lm:.1} ns minus chain alone {om:.1} ns",
            diffs.len()
        ),
    )
}

type Figure = (String, Result<(f64, &'static str, String), String>);

pub fn run(quick: bool) {
    let sizes: Vec<usize> = if quick {
        vec![10, 10_000, 100_000]
    } else {
        vec![10, 10_000, 1_000_000]
    };
    let mut expected: Vec<(&str, String)> = PRECISE.iter().map(|n| ("xdp-precise", n.to_string())).collect();
    expected.extend(LIVE.iter().map(|n| ("xdp-live", n.to_string())));
    expected.extend(sizes.iter().map(|&n| ("xdp-flows", flows_name(n))));
    let sizes2 = sizes.clone();
    let r = std::thread::spawn(move || figures(quick, &sizes2))
        .join()
        .unwrap_or_else(|_| Err("the kernel-figures thread panicked".into()));
    match r {
        Ok(figs) => {
            for (group, name) in &expected {
                match figs.iter().find(|(n, _)| n == name) {
                    Some((_, res)) => emit(group, name, res.clone()),
                    None => emit(group, name, Err("not measured (an earlier step failed)".into())),
                }
            }
            for (name, res) in &figs {
                if let Err(e) = res
                    && !expected.iter().any(|(_, n)| n == name)
                {
                    emit("xdp-precise", name, Err(e.clone()));
                }
            }
        }
        Err(why) => {
            for (group, name) in &expected {
                emit(group, name, Err(why.clone()));
            }
        }
    }
}

fn figures(quick: bool, sizes: &[usize]) -> Result<Vec<Figure>, String> {
    let cpu = kernel::pin_to_one_cpu()?;
    let largest = *sizes.iter().max().unwrap_or(&10);
    // Both directions of every flow, and room so the LRU never evicts.
    let bed = Bed::new(((largest * 2) as u32 + 400_000).max(lb_common::maps::DEFAULT_CONNTRACK_ENTRIES))?;
    let mut out: Vec<Figure> = Vec::new();
    let (repeat, rounds) = if quick { (100_000, 3) } else { (1_000_000, 7) };
    let nothing = || -> Result<(), String> { Ok(()) };

    // Established, both ways.
    let flow = bed.open(Ipv4Addr::new(10, 0, 0, 10), 40000)?;
    let chain = Chain::new(bed.prog.as_fd(), flow.ack.len(), 1)?;
    let tx = chain.constant(bpfsys_tx(), "kb_tx")?;
    match paired(
        &bed,
        &chain,
        tx.as_fd(),
        std::slice::from_ref(&flow.ack),
        bed.client_if,
        repeat,
        rounds,
        &nothing,
    ) {
        Ok((lb, over)) => {
            let (v, d) = net(&lb, &over);
            out.push((
                PRECISE[0].into(),
                Ok((v, "ns/packet", format!("{d}; repeat {repeat}; CPU {cpu}"))),
            ));
            let (m_over, lo, hi) = kernel::spread(&over);
            out.push((
                PRECISE[3].into(),
                Ok((
                    m_over,
                    "ns/packet",
                    format!("median of {rounds} rounds, range {lo:.1}–{hi:.1}"),
                )),
            ));
        }
        Err(e) => out.push((PRECISE[0].into(), Err(e))),
    }
    let fig = paired(
        &bed,
        &chain,
        tx.as_fd(),
        std::slice::from_ref(&flow.reply),
        bed.backend_if,
        repeat,
        rounds,
        &nothing,
    )
    .map(|(lb, over)| {
        let (v, d) = net(&lb, &over);
        (v, "ns/packet", format!("{d}; repeat {repeat}"))
    });
    out.push((PRECISE[1].into(), fig));

    // Live frames: lb, the chained XDP_TX, the plain XDP_TX.
    match live(&bed, &chain, tx.as_fd(), &flow, quick) {
        Ok(figs) => out.extend(figs),
        Err(e) => out.extend(LIVE.iter().map(|n| (n.to_string(), Err(e.clone())))),
    }

    out.push((PRECISE[2].into(), new_syns(&bed, quick)));

    // Growing conntrack.
    for &n in sizes {
        let fig = flows(&bed, n, repeat, if quick { 3 } else { 5 }).map(|(v, d)| (v, "ns/packet", d));
        out.push((flows_name(n), fig));
    }
    Ok(out)
}

/// New SYNs: 1,024 distinct per batch, conntrack emptied before each.
fn new_syns(bed: &Bed, quick: bool) -> Result<(f64, &'static str, String), String> {
    let clients = clients();
    for &c in &clients {
        // Seen before: every timed SYN is an affinity hit.
        bed.xdp
            .test_run(&client_syn(c, 39000, 1), bed.client_if, 1)
            .map_err(|e| format!("test run: {e}"))?;
    }
    const K: usize = 1024;
    let syns: Vec<Vec<u8>> = (0..K)
        .map(|k| {
            client_syn(
                clients[k % clients.len()],
                41000 + (k / clients.len()) as u16,
                7000 + k as u32,
            )
        })
        .collect();
    let syn_chain = Chain::new(bed.prog.as_fd(), syns[0].len(), K as u32)?;
    let syn_tx = syn_chain.constant(bpfsys_tx(), "kb_tx")?;
    let syn_rounds = if quick { 5 } else { 31 };
    let clear = || bed.clear_conntrack();
    let (lb, over) = paired(
        bed,
        &syn_chain,
        syn_tx.as_fd(),
        &syns,
        bed.client_if,
        K as u32,
        syn_rounds,
        &clear,
    )?;
    let entries = bed.conntrack_len()?;
    if entries != 2 * K {
        return Err(format!(
            "after a batch of {K} new SYNs conntrack holds {entries} entries, expected {}",
            2 * K
        ));
    }
    let (v, d) = net(&lb, &over);
    Ok((
        v,
        "ns/packet",
        format!(
            "{d}; batches of {K} distinct SYNs, conntrack emptied before each (2 entries per SYN checked)"
        ),
    ))
}

fn bpfsys_tx() -> i32 {
    XDP_TX as i32
}

fn live(
    bed: &Bed,
    chain: &Chain,
    tx: BorrowedFd<'_>,
    flow: &Flow,
    quick: bool,
) -> Result<Vec<Figure>, String> {
    let peer =
        |name: &str| nix::net::if_::if_nametoindex(name).map_err(|e| format!("if_nametoindex({name}): {e}"));
    let sink_b = Sink::attach(peer("fxbp")?)?;
    let sink_c = Sink::attach(peer("fxcp")?)?;
    let frames = if quick { 200_000 } else { 2_000_000 };
    let rounds = 3;
    chain.frames(std::slice::from_ref(&flow.ack))?;
    let (mut lb, mut chained, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    // The far end's ring (veth: 256 frames) drops what its NAPI poll has not taken yet; a frame
    // dropped there was not forwarded, so a rate counts the frames that arrived. More than 1% lost
    // means something other than a full ring.
    let mut fewest = u64::from(frames);
    let mut arrived = |sink: &Sink, before: u64, ns: f64, what: &str| -> Result<f64, String> {
        let got = sink.count()? - before;
        if got * 100 < u64::from(frames) * 99 {
            return Err(format!(
                "{what}: {got} of {frames} frames reached the far end of the veth"
            ));
        }
        fewest = fewest.min(got);
        Ok(ns * f64::from(frames) / got as f64)
    };
    for _ in 0..rounds {
        chain.target(bed.prog.as_fd())?;
        chain.rewind(1)?;
        let (f0, s0) = (bed.forwarded(), sink_b.count()?);
        let (_, ns) = chain.run(bed.client_if, frames, true)?;
        let fwd = bed.forwarded() - f0;
        if fwd != u64::from(frames) {
            return Err(format!("live frames: lb forwarded {fwd} of {frames}"));
        }
        lb.push(arrived(&sink_b, s0, ns, "lb")?);

        chain.target(tx)?;
        chain.rewind(1)?;
        let s0 = sink_c.count()?;
        let (_, ns) = chain.run(bed.client_if, frames, true)?;
        chained.push(arrived(&sink_c, s0, ns, "chained XDP_TX")?);

        let s0 = sink_c.count()?;
        let (_, ns) = crate::bpfsys::test_run(
            tx,
            &flow.ack,
            bed.client_if,
            frames,
            crate::bpfsys::F_LIVE_FRAMES,
            64,
        )?;
        plain.push(arrived(&sink_c, s0, f64::from(ns), "plain XDP_TX")?);
    }
    let mpps = |v: &[f64]| -> (f64, String) {
        let m: Vec<f64> = v.iter().map(|ns| 1e3 / ns).collect();
        let (med, lo, hi) = kernel::spread(&m);
        let (ns, _, _) = kernel::spread(v);
        (
            med,
            format!(
                "median of {rounds} rounds of {frames} frames, range {lo:.2}–{hi:.2}; {ns:.0} ns per frame that reached the far end (at least {fewest} of {frames} did in every run)"
            ),
        )
    };
    let (l, ld) = mpps(&lb);
    let (c, cd) = mpps(&chained);
    let (p, pd) = mpps(&plain);
    let ratios: Vec<f64> = lb.iter().zip(&chained).map(|(a, b)| b / a).collect();
    let (r, rlo, rhi) = kernel::spread(&ratios);
    Ok(vec![
        (
            LIVE[0].into(),
            Ok((
                l,
                "Mpps",
                format!(
                    "{ld}; Katran publishes {KATRAN_MPPS} Mpps per core (other hardware): {:.2}×",
                    l / KATRAN_MPPS
                ),
            )),
        ),
        (LIVE[1].into(), Ok((c, "Mpps", cd))),
        (LIVE[2].into(), Ok((p, "Mpps", pd))),
        (
            LIVE[3].into(),
            Ok((
                r,
                "×",
                format!(
                    "per-round ratio lb / chained XDP_TX, range {rlo:.2}–{rhi:.2}; both redirect into a veth whose far end drops"
                ),
            )),
        ),
    ])
}

/// Established ns/packet with `n` live flows: conntrack emptied, one flow opened through the
/// program, `n - 1` more written beside it (both directions, copies of the real entries with their
/// own keys), then client ACKs spread over all `n` flows.
fn flows(bed: &Bed, n: usize, repeat: u32, rounds: usize) -> Result<(f64, String), String> {
    bed.clear_conntrack()?;
    let first = bed.open(Ipv4Addr::new(10, 0, 0, 10), 40000)?;
    let mut fwd_value = [0u8; 64];
    let mut rev_value = [0u8; 64];
    let ct = bed.conntrack.as_fd();
    if !crate::bpfsys::map_lookup(ct, &first.forward_key, &mut fwd_value)?
        || !crate::bpfsys::map_lookup(ct, &first.reverse_key, &mut rev_value)?
    {
        return Err("the opened flow is not in conntrack".into());
    }
    let mut frames = vec![first.ack.clone()];
    let clients = clients();
    for i in 1..n {
        let c = clients[i % clients.len()];
        let port = 1024 + (i / clients.len()) as u16;
        crate::bpfsys::map_update(ct, &flow_key(c, port, VIP, 80), &fwd_value)?;
        let src = Ipv4Addr::new(10, 2 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        crate::bpfsys::map_update(ct, &flow_key(src, 8080, LB_BACKEND_SIDE, 1024), &rev_value)?;
        frames.push(client_ack(c, port));
    }
    let entries = bed.conntrack_len()?;
    if entries != 2 * n {
        return Err(format!(
            "conntrack holds {entries} entries for {n} flows, expected {}",
            2 * n
        ));
    }
    let chain = Chain::new(bed.prog.as_fd(), frames[0].len(), n as u32)?;
    let tx = chain.constant(bpfsys_tx(), "kb_tx")?;
    let repeat = repeat.max(n as u32);
    let (lb, over) = paired(
        bed,
        &chain,
        tx.as_fd(),
        &frames,
        bed.client_if,
        repeat,
        rounds,
        &|| -> Result<(), String> { Ok(()) },
    )?;
    let (v, d) = net(&lb, &over);
    Ok((
        v,
        format!(
            "{d}; {} conntrack entries; {repeat} runs per round over all flows in turn",
            2 * n
        ),
    ))
}
