//! `lb-microbench`: micro-benchmarks of lb's own code, run by `cargo xtask bench` (which builds it
//! with `--features micro`, release, with the eBPF object embedded). One JSON object per line on
//! stdout: `{"group", "name", "value", "unit", "detail"}`, or `{"group", "name", "unavailable"}`.
//!
//! - XDP ns/packet under BPF_PROG_TEST_RUN (`lb::datapath::xdp::XdpDatapath::test_run`, kernel-measured):
//!   a frame not for any VIP (repeated, and as single runs for reference), an established flow
//!   both ways and new SYNs. The kernel reuses one buffer across `repeat`, so a frame the program
//!   rewrites (every forwarded one) can only be timed one run at a time; those rows include the
//!   per-run overhead that the reference row shows. The maps are seeded through the datapath's
//!   public API (`State::apply` + `Datapath::apply`), inside a private network namespace whose
//!   veth interfaces and permanent neighbours give `bpf_fib_lookup` real answers
//!   (`lb_tests::fixture`, shared with lb-userspace/tests/xdp_fixtures.rs).
//! - XDP datapath cost of runtime changes at 1,000 backends (state with Maglev rebuild, then the
//!   kernel map writes), one add at a time and as one batch.
//! - Maglev table build time (`lb::maglev::build`) for 10, 100 and 1000 backends at M = 65537.
//! - Backend selection (`lb::balancer::Balancer::choose`) per operation: affinity hit and ring
//!   lookup.
//!
//! - Kernel figures (`precise.rs`, on `kernel.rs` and `bpfsys.rs`): ns/packet from BPF_PROG_RUN's
//!   repeat loop (established both ways, new SYN), Mpps on one CPU with live frames beside a
//!   trivial XDP_TX, and ns/packet with 10, 10k and 1M live flows.
//! - Maglev rebuild when one of 100 backends leaves: time, and the share of clients moved.
//!
//! `--quick` runs fewer iterations (and 100k instead of 1M flows); `--kernel` runs only the kernel
//! figures and the Maglev rebuild.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use lb::balancer::{Balancer, Reason};
use lb::config::Config;
use lb::datapath::Datapath;
use lb::datapath::xdp::XdpDatapath;
use lb::runtime::Snapshot;
use lb::state::{Command, State};
use lb_tests::fixture::{FixtureSpec, LB_BACKEND_SIDE, enter_fixture_netns};
use lb_tests::packet::Tcp;
use serde_json::json;

mod bpfsys;
mod kernel;
mod precise;

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const RING: u32 = 65537;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x02];

fn emit(group: &str, name: &str, result: Result<(f64, &str, String), String>) {
    let line = match result {
        Ok((value, unit, detail)) => json!({
            "group": group, "name": name, "value": value, "unit": unit, "detail": detail,
        }),
        Err(why) => json!({"group": group, "name": name, "unavailable": why}),
    };
    println!("{line}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--kernel") {
        precise::run(quick);
        maglev_leave(quick);
        return;
    }
    xdp(quick);
    precise::run(quick);
    xdp_changes();
    maglev(quick);
    maglev_leave(quick);
    selection(quick);
}

// ---- XDP datapath: runtime changes at 1,000 backends ---------------------------------------------

/// Median and p99 of a list (ms).
fn median_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let p99 = v
        .get(((v.len().max(1) - 1) as f64 * 0.99).round() as usize)
        .copied()
        .unwrap_or(f64::NAN);
    (median(v), p99)
}

/// An XDP service grows from 1 to 1,000 backends (10.1.1.2, ports 1001..): per add, the state
/// change (copy + Maglev rebuild at M = 100003) and the datapath's map writes, timed apart; then
/// the same 999 backends as one batch.
fn xdp_changes() {
    const N: u16 = 1000;
    let names = [
        "XDP runtime add-backend at 901..=1000 backends: new state (copy + Maglev, M = 100003)",
        "XDP runtime add-backend at 901..=1000 backends: kernel map writes (changed ring slots + backend)",
        "XDP runtime add-backends, 999 in one batch: new state + kernel map writes",
    ];
    let r = std::thread::spawn(move || -> Result<Vec<(f64, String)>, String> {
        fixture_netns()?;
        let text = XDP_SERVICE.replace("ring_size = 65537", "ring_size = 100003");
        let config = Config::parse(&text, "lb-microbench").map_err(|e| e.to_string())?;
        let xdp = XdpDatapath::start(None, config.seed, config.ring_size)
            .map_err(|e| format!("loading the XDP program: {e}"))?;
        let mut service = config.services[0].clone();
        service.backends.truncate(1);
        let mut state = State::new(config.seed, config.ring_size);
        let apply = |state: &mut State, command: Command| -> Result<(f64, f64), String> {
            let t = Instant::now();
            let mut next = state.clone();
            let effect = next.apply(command).map_err(|e| e.to_string())?;
            let staged = t.elapsed();
            let snapshot = Snapshot::new(next.clone());
            let t = Instant::now();
            xdp.apply(&effect, &snapshot).map_err(|e| e.to_string())?;
            let written = t.elapsed();
            *state = next;
            Ok((staged.as_secs_f64() * 1e3, written.as_secs_f64() * 1e3))
        };
        apply(
            &mut state,
            Command::AddService {
                service: service.clone(),
            },
        )?;
        let backend = |i: u16| {
            let mut b = service.backends[0].clone();
            b.address = std::net::SocketAddr::from((Ipv4Addr::new(10, 1, 1, 2), 1000 + i));
            b.name = format!("x{i}");
            b.route = b.name.clone();
            b
        };
        let (mut stage, mut write) = (Vec::new(), Vec::new());
        for i in 1..N {
            let (s, w) = apply(
                &mut state,
                Command::AddBackend {
                    service: "web".into(),
                    backend: backend(i),
                },
            )?;
            if i > N - 101 {
                stage.push(s);
                write.push(w);
            }
        }
        let (s50, s99) = median_p99(stage);
        let (w50, w99) = median_p99(write);
        apply(
            &mut state,
            Command::RemoveService {
                service: "web".into(),
            },
        )?;
        apply(
            &mut state,
            Command::AddService {
                service: service.clone(),
            },
        )?;
        let (s, w) = apply(
            &mut state,
            Command::AddBackends {
                service: "web".into(),
                backends: (1..N).map(backend).collect(),
            },
        )?;
        let ring = &state.service("web").map_err(|e| e.to_string())?.ring;
        if ring.iter().collect::<std::collections::BTreeSet<_>>().len() != N as usize {
            return Err("the batch did not give every backend ring slots".into());
        }
        Ok(vec![
            (s50, format!("median of the last 100 adds; p99 {s99:.2} ms")),
            (w50, format!("median of the last 100 adds; p99 {w99:.2} ms")),
            (
                s + w,
                format!(
                    "state {s:.2} ms, kernel map writes {w:.2} ms (a new source-address lookup per backend)"
                ),
            ),
        ])
    })
    .join()
    .unwrap_or_else(|_| Err("the benchmark thread panicked".into()));
    match r {
        Ok(v) => {
            for (name, (value, detail)) in names.iter().zip(v) {
                emit("xdp-changes", name, Ok((value, "ms", detail)));
            }
        }
        Err(why) => {
            for name in names {
                emit("xdp-changes", name, Err(why.clone()));
            }
        }
    }
}

// ---- XDP ----------------------------------------------------------------------------------------

/// Ethernet + IPv4 + TCP (no payload) from `src_mac`, valid checksums.
fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, src_mac: [u8; 6]) -> Vec<u8> {
    Tcp::new(src, dst, flags).macs(src_mac, [0xaa; 6]).build()
}

/// Client-side and backend-side interface indexes of the fixture namespace (lb_tests::fixture),
/// entered by the calling thread: VIP on the client side, permanent neighbours for the client
/// addresses 10.0.0.10..=10.0.0.209 and the backends 10.1.1.2..=10.1.1.4.
fn fixture_netns() -> Result<(u32, u32), String> {
    let with_last = |mut m: [u8; 6], last: u8| {
        m[5] = last;
        m
    };
    let spec = FixtureSpec {
        vip: Some(VIP),
        clients: (10..=209u8)
            .map(|i| (Ipv4Addr::new(10, 0, 0, i), with_last(CLIENT_MAC, i)))
            .collect(),
        backends: (2..=4u8)
            .map(|b| (Ipv4Addr::new(10, 1, 1, b), with_last(BACKEND_MAC, b)))
            .collect(),
    };
    let links = enter_fixture_netns(&spec).map_err(|e| e.to_string())?;
    Ok((links.client_if, links.backend_if))
}

const XDP_SERVICE: &str = r#"
ring_size = 65537
[xdp]
interfaces = ["fxc", "fxb"]
[[service]]
name = "web"
listen = "10.0.0.100:80"
datapath = "xdp"
[service.health]
kind = "none"
[[service.backend]]
name = "b1"
address = "10.1.1.2:8080"
[[service.backend]]
name = "b2"
address = "10.1.1.3:8080"
[[service.backend]]
name = "b3"
address = "10.1.1.4:8080"
"#;

struct XdpBench {
    xdp: XdpDatapath,
    client_if: u32,
    backend_if: u32,
}

impl XdpBench {
    fn new() -> Result<XdpBench, String> {
        let (client_if, backend_if) = fixture_netns()?;
        let config = Config::parse(XDP_SERVICE, "lb-microbench").map_err(|e| e.to_string())?;
        let xdp = XdpDatapath::start(None, config.seed, config.ring_size)
            .map_err(|e| format!("loading the XDP program: {e}"))?;
        let mut state = State::new(config.seed, config.ring_size);
        for service in config.services {
            let effect = state
                .apply(Command::AddService { service })
                .map_err(|e| e.to_string())?;
            xdp.apply(&effect, &Snapshot::new(state.clone()))
                .map_err(|e| e.to_string())?;
        }
        Ok(XdpBench {
            xdp,
            client_if,
            backend_if,
        })
    }

    /// Kernel-measured ns per run, median of `rounds` runs of `repeat` repetitions.
    fn per_packet(
        &self,
        f: &[u8],
        ifindex: u32,
        repeat: u32,
        rounds: usize,
        want: u32,
    ) -> Result<f64, String> {
        let mut v = Vec::new();
        for _ in 0..rounds {
            let (verdict, _, d) = self
                .xdp
                .test_run(f, ifindex, repeat)
                .map_err(|e| format!("test run: {e}"))?;
            if verdict != want {
                return Err(format!("verdict {verdict}, expected {want}"));
            }
            v.push(d.as_nanos() as f64);
        }
        Ok(median(v))
    }
}

fn xdp(quick: bool) {
    let repeat = if quick { 100_000 } else { 1_000_000 };
    let rounds = if quick { 3 } else { 7 };
    let singles = if quick { 500 } else { 5000 };
    let names = [
        "XDP: frame not for a VIP (XDP_PASS), repeated",
        "XDP: frame not for a VIP (XDP_PASS), single runs (reference for the rows below)",
        "XDP: established flow, client → backend (XDP_REDIRECT), single runs",
        "XDP: established flow, backend → client (XDP_REDIRECT), single runs",
        "XDP: new SYN, known client (affinity hit, conntrack + SNAT insert), single runs",
    ];
    // The namespace is the thread's own: it goes away with the thread.
    let results = std::thread::spawn(move || -> Result<Vec<(f64, String)>, String> {
        let b = XdpBench::new()?;
        let mut out = Vec::new();
        // Median of `singles` runs of one packet each, verdict checked.
        let single = |f: &dyn Fn(usize) -> Vec<u8>, ifindex: u32, want: u32| -> Result<f64, String> {
            let mut v = Vec::with_capacity(singles);
            for k in 0..singles {
                let (verdict, _, d) = b
                    .xdp
                    .test_run(&f(k), ifindex, 1)
                    .map_err(|e| format!("test run: {e}"))?;
                if verdict != want {
                    return Err(format!("run {k}: verdict {verdict}, expected {want}"));
                }
                v.push(d.as_nanos() as f64);
            }
            Ok(median(v))
        };
        let c = Ipv4Addr::new(10, 0, 0, 10);
        // Not for a VIP: the lb namespace's own address. The program leaves it unchanged, so
        // BPF_PROG_TEST_RUN's `repeat` (which reuses the same, possibly rewritten, buffer) is valid.
        let plain = frame((c, 40000), (Ipv4Addr::new(10, 0, 0, 1), 22), 0x10, CLIENT_MAC);
        out.push((
            b.per_packet(&plain, b.client_if, repeat, rounds, XDP_PASS)?,
            format!("kernel average over repeat {repeat}, median of {rounds}"),
        ));
        let single_detail = format!(
            "median of {singles} runs of one packet each (the program rewrites the frame, so it \
             cannot be repeated in place); includes the per-run overhead (see the reference row)"
        );
        out.push((
            single(&|_| plain.clone(), b.client_if, XDP_PASS)?,
            format!(
                "median of {singles} runs of one packet each; the difference to the row above is \
                 the per-run overhead of BPF_PROG_TEST_RUN, included in the single-run rows below"
            ),
        ));
        // Open one flow, then time its next packets both ways.
        let syn = frame((c, 40000), (VIP, 80), 0x02, CLIENT_MAC);
        let (verdict, fwd, _) = b
            .xdp
            .test_run(&syn, b.client_if, 1)
            .map_err(|e| format!("test run: {e}"))?;
        if verdict != XDP_REDIRECT {
            return Err(format!(
                "a SYN to the VIP got verdict {verdict}, expected XDP_REDIRECT ({XDP_REDIRECT})"
            ));
        }
        let backend = Ipv4Addr::new(fwd[30], fwd[31], fwd[32], fwd[33]);
        let snat_port = u16::from_be_bytes([fwd[34], fwd[35]]);
        let ack = frame((c, 40000), (VIP, 80), 0x10, CLIENT_MAC);
        out.push((
            single(&|_| ack.clone(), b.client_if, XDP_REDIRECT)?,
            single_detail.clone(),
        ));
        let reply = frame((backend, 8080), (LB_BACKEND_SIDE, snat_port), 0x10, BACKEND_MAC);
        out.push((
            single(&|_| reply.clone(), b.backend_if, XDP_REDIRECT)?,
            single_detail.clone(),
        ));
        // Every SYN a new flow: 199 client addresses (all seen before: affinity hits; not the VIP,
        // an impossible source), new ports.
        let clients = precise::clients();
        let new_syn = |k: usize| {
            let client = clients[k % clients.len()];
            frame(
                (client, 41000 + (k / clients.len()) as u16),
                (VIP, 80),
                0x02,
                CLIENT_MAC,
            )
        };
        for &client in &clients {
            // Warm the affinity table so every timed SYN is the common case.
            b.xdp
                .test_run(
                    &frame((client, 39000), (VIP, 80), 0x02, CLIENT_MAC),
                    b.client_if,
                    1,
                )
                .map_err(|e| format!("test run: {e}"))?;
        }
        out.push((single(&new_syn, b.client_if, XDP_REDIRECT)?, single_detail));
        Ok(out)
    })
    .join()
    .unwrap_or_else(|_| Err("the XDP benchmark thread panicked".to_string()));
    match results {
        Ok(rs) => {
            for (name, (v, d)) in names.iter().zip(rs) {
                emit("xdp", name, Ok((v, "ns/packet", d)));
            }
        }
        Err(why) => {
            for name in names {
                emit("xdp", name, Err(why.clone()));
            }
        }
    }
}

// ---- Maglev -------------------------------------------------------------------------------------

fn maglev(quick: bool) {
    for n in [10usize, 100, 1000] {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", 1 + i / 62500, (i / 250) % 250, i % 250 + 2))
            .collect();
        let members: Vec<lb::maglev::Member<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| lb::maglev::Member {
                id: i as u32,
                key: k.as_bytes(),
                weight: 1,
            })
            .collect();
        let reps = if quick { 3 } else { 11 };
        let mut v = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let table = lb::maglev::build(black_box(&members), RING, 0);
            v.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(table.len(), RING as usize);
            black_box(table);
        }
        emit(
            "maglev",
            &format!("Maglev table build, {n} backends, M = {RING}"),
            Ok((median(v), "ms", format!("median of {reps}"))),
        );
    }
}

/// One of 100 backends leaves: the rebuild's time and the share of clients (ring slots) that move,
/// all of them and those that were not on the leaving backend (Maglev's ideal: 1 % and 0 %).
fn maglev_leave(quick: bool) {
    const N: usize = 100;
    let keys: Vec<String> = (0..N)
        .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250 + 2))
        .collect();
    let members: Vec<lb::maglev::Member<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| lb::maglev::Member {
            id: i as u32,
            key: k.as_bytes(),
            weight: 1,
        })
        .collect();
    let leaving = (N / 2) as u32;
    let rest: Vec<lb::maglev::Member<'_>> = members.iter().filter(|m| m.id != leaving).cloned().collect();
    let before = lb::maglev::build(&members, RING, 0);
    let reps = if quick { 3 } else { 11 };
    let mut times = Vec::new();
    let mut after = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        after = lb::maglev::build(black_box(&rest), RING, 0);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let moved_other = before
        .iter()
        .zip(&after)
        .filter(|(a, b)| **a != leaving && a != b)
        .count();
    let share = |n: usize| n as f64 * 100.0 / f64::from(RING);
    emit(
        "maglev",
        &format!("Maglev rebuild, one of {N} backends leaves, M = {RING}"),
        Ok((median(times), "ms", format!("median of {reps}"))),
    );
    emit(
        "maglev",
        &format!("Clients moved when one of {N} backends leaves"),
        Ok((
            share(moved),
            "%",
            format!(
                "share of the {RING} ring slots whose backend changed (ideal {:.2} %); {:.3} % were not on the leaving backend (ideal 0)",
                100.0 / N as f64,
                share(moved_other)
            ),
        )),
    );
}

// ---- Selection ----------------------------------------------------------------------------------

const PROXY_SERVICE: &str = r#"
ring_size = 65537
[[service]]
name = "web"
listen = "10.0.0.100:80"
[service.health]
kind = "none"
[[service.backend]]
name = "b1"
address = "10.1.1.2:80"
[[service.backend]]
name = "b2"
address = "10.1.2.2:80"
[[service.backend]]
name = "b3"
address = "10.1.3.2:80"
"#;

fn selection(quick: bool) {
    let r = (|| -> Result<(f64, f64), String> {
        let config = Config::parse(PROXY_SERVICE, "lb-microbench").map_err(|e| e.to_string())?;
        let state = State::from_config(&config).map_err(|e| e.to_string())?;
        let bal = Balancer::new(state);
        let clients: Vec<IpAddr> = (0..4096u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a02_0000 + i)))
            .collect();
        let ops = if quick { 200_000 } else { 2_000_000 };
        let now = Instant::now();
        let time = |bal: &Balancer, want: Reason| -> Result<f64, String> {
            let c = bal
                .choose("web", clients[0], now, &[])
                .map_err(|e| e.to_string())?;
            if c.reason != want {
                return Err(format!("selection reason {:?}, expected {want:?}", c.reason));
            }
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for i in 0..ops {
                    let c = bal.choose("web", black_box(clients[i % clients.len()]), now, &[]);
                    black_box(c.ok());
                }
                best = best.min(t.elapsed());
            }
            Ok(best.as_nanos() as f64 / ops as f64)
        };
        let ring = time(&bal, Reason::Ring)?;
        for &c in &clients {
            let choice = bal.choose("web", c, now, &[]).map_err(|e| e.to_string())?;
            bal.confirm("web", c, choice.chosen(), now);
        }
        let affinity = time(&bal, Reason::Affinity)?;
        Ok((affinity, ring))
    })();
    let detail = "3 backends, 4096 client addresses; best of 3 loops";
    match r {
        Ok((affinity, ring)) => {
            emit(
                "select",
                "Balancer::choose, affinity hit",
                Ok((affinity, "ns/op", detail.to_string())),
            );
            emit(
                "select",
                "Balancer::choose, ring lookup (no affinity entry)",
                Ok((ring, "ns/op", detail.to_string())),
            );
        }
        Err(why) => {
            emit("select", "Balancer::choose, affinity hit", Err(why.clone()));
            emit(
                "select",
                "Balancer::choose, ring lookup (no affinity entry)",
                Err(why),
            );
        }
    }
}
