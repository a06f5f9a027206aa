//! Packet fixtures for the XDP program, Katran style: input frame → expected verdict, output bytes
//! and counters. State is seeded through the datapath's public API (`State::apply` + `Datapath::apply`,
//! the path every command takes) and the program runs under BPF_PROG_TEST_RUN inside a private
//! network namespace whose dummy interfaces and permanent neighbours give `bpf_fib_lookup` real
//! answers. Needs root and the embedded eBPF object (`cargo xtask test` provides both).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command as Process;
use std::time::Instant;

use lb::balancer::Balancer;
use lb::config::{
    AdminState, BackendConfig, DatapathKind, HealthConfig, HealthKind, OnDown, Protocol, ServiceConfig,
};
use lb::datapath::Datapath;
use lb::state::{Command, Health, State};
use lb::xdp::XdpDatapath;
use lb_common::csum::checksum;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const RING: u32 = 101;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 1, 1 + i)
}
fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, 1 + i]
}
fn client(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i)
}

/// Runs `f` in a thread inside a fresh network namespace holding the fixture topology.
fn in_fixture_netns<T: Send>(f: impl FnOnce(u32, u32) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let sh = |cmd: &str| {
                let out = Process::new("sh").arg("-c").arg(cmd).output().expect("sh");
                assert!(
                    out.status.success(),
                    "{cmd}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            sh("ip link set lo up");
            sh("ip link add fxc type veth peer name fxcp && ip link set fxc up && ip link set fxcp up");
            sh("ip addr add 10.0.0.1/24 dev fxc && ip addr add 10.0.0.100/32 dev fxc");
            sh("ip link add fxb type veth peer name fxbp && ip link set fxb up && ip link set fxbp up");
            sh("ip addr add 10.1.1.1/24 dev fxb");
            sh("sysctl -qw net.ipv4.ip_forward=1");
            for i in 0..3u8 {
                let mac = client_mac_text(&CLIENT_MAC, i);
                sh(&format!(
                    "ip neigh add {} lladdr {mac} dev fxc nud permanent",
                    client(i)
                ));
                let mac = client_mac_text(&backend_mac(i + 1), 0);
                sh(&format!(
                    "ip neigh add {} lladdr {mac} dev fxb nud permanent",
                    backend_ip(i + 1)
                ));
            }
            let index = |name: &str| nix::net::if_::if_nametoindex(name).expect("interface index");
            f(index("fxc"), index("fxb"))
        })
        .join()
        .expect("fixture thread")
    })
}

fn client_mac_text(mac: &[u8; 6], add: u8) -> String {
    let mut m = *mac;
    m[5] += add;
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ready(test: &str) -> bool {
    if lb::ebpf::object().is_none() {
        assert!(
            std::env::var_os("LB_REQUIRE_EBPF").is_none_or(|v| v != "1"),
            "{test}: LB_REQUIRE_EBPF=1 but lb was built without its eBPF object"
        );
        eprintln!("SKIP: {test}: lb built without its eBPF object (use cargo xtask test)");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: {test} needs root");
        return false;
    }
    true
}

fn service() -> ServiceConfig {
    ServiceConfig {
        name: "web".into(),
        listen: "10.0.0.100:80".parse().unwrap(),
        protocol: Protocol::Tcp,
        datapath: DatapathKind::Xdp,
        affinity_timeout: std::time::Duration::from_secs(600),
        max_connections: 100,
        connect_timeout: std::time::Duration::from_secs(1),
        failback: false,
        on_down: OnDown::Keep,
        health: HealthConfig {
            kind: HealthKind::None,
            interval: std::time::Duration::from_secs(2),
            fast_interval: std::time::Duration::from_secs(2),
            timeout: std::time::Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
        },
        backends: (1..=3)
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                address: format!("{}:8080", backend_ip(i)).parse().unwrap(),
                weight: 1,
                backup: false,
                state: AdminState::Active,
            })
            .collect(),
    }
}

/// State and kernel, changed together the way the engine does it.
struct Fixture {
    state: State,
    xdp: XdpDatapath,
}

impl Fixture {
    fn new() -> Fixture {
        let xdp = XdpDatapath::start(None, 0, RING).expect("load XDP program");
        let mut f = Fixture {
            state: State::new(0, RING),
            xdp,
        };
        f.apply(Command::AddService { service: service() });
        f
    }

    fn apply(&mut self, command: Command) {
        let effect = self.state.apply(command).expect("command applies");
        self.xdp.apply(&effect, &self.state).expect("datapath applies");
    }

    /// The backend the user-space selection picks for a new client (no affinity).
    fn ring_choice(&self, client: Ipv4Addr) -> Ipv4Addr {
        let b = Balancer::new(self.state.clone());
        match b
            .choose("web", IpAddr::V4(client), Instant::now(), &[])
            .unwrap()
            .address
            .ip()
        {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => unreachable!(),
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.xdp
            .global_counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap()
    }
}

/// TCP flags.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

/// Ethernet + IPv4 (with `options` words) + TCP frame with valid checksums.
fn frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
    options: &[u8],
    dst_mac: [u8; 6],
) -> Vec<u8> {
    frame_with(src, dst, flags, payload, options, &[], dst_mac)
}

/// Like [`frame`], with TCP options (a multiple of 4 bytes).
fn frame_with(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
    options: &[u8],
    tcp_options: &[u8],
    dst_mac: [u8; 6],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let doff = 5 + tcp_options.len() / 4;
    let total = ihl * 4 + doff * 4 + payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x40 | ihl as u8, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    ip.extend_from_slice(options);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&src.1.to_be_bytes());
    tcp.extend_from_slice(&dst.1.to_be_bytes());
    tcp.extend_from_slice(&[
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        (doff as u8) << 4,
        flags,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    tcp.extend_from_slice(tcp_options);
    tcp.extend_from_slice(payload);
    let c = checksum(&tcp, pseudo_sum(src.0, dst.0, tcp.len()));
    tcp[16..18].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// SYN options as Linux sends them: MSS, SACK permitted, timestamps, NOP, window scale.
fn syn_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o.extend_from_slice(&[1, 3, 3, 7]);
    o
}

/// Options of an established segment: NOP, NOP, timestamps.
fn ack_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// (TSval, TSecr) of a frame's timestamp option, found where [`syn_options`] or [`ack_options`] put it.
fn timestamps(f: &[u8]) -> (u32, u32) {
    let tcp = 14 + (f[14] & 0x0f) as usize * 4;
    let at = if f[tcp + 20] == 2 { tcp + 28 } else { tcp + 24 };
    let word = |i: usize| u32::from_be_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
    (word(at), word(at + 4))
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2).map(|c| u16::from_ne_bytes([c[0], c[1]]) as u32).sum()
}

/// What a frame carries, checksums verified.
#[derive(Debug, PartialEq)]
struct Parsed {
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: Vec<u8>,
}

fn parse(f: &[u8]) -> Parsed {
    let ihl = (f[14] & 0x0f) as usize * 4;
    let ip = &f[14..14 + ihl];
    assert_eq!(checksum(ip, 0), 0, "IPv4 header checksum");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = &f[14 + ihl..];
    assert_eq!(checksum(tcp, pseudo_sum(src, dst, tcp.len())), 0, "TCP checksum");
    Parsed {
        dst_mac: f[0..6].try_into().unwrap(),
        src: (src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: (dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        payload: tcp[20..].to_vec(),
    }
}

#[test]
fn xdp_nat_forward_reply_and_affinity() {
    if !ready("xdp_nat_forward_reply_and_affinity") {
        return;
    }
    in_fixture_netns(|client_if, backend_if| {
        let mut fx = Fixture::new();
        let c = client(0);
        let want = fx.ring_choice(c);
        let want_mac = backend_mac(want.octets()[3] - 1);
        // SYN to the VIP → rewritten to the Maglev-chosen backend, from the LB's SNAT address.
        let syn = frame((c, 40000), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        let (verdict, out, _) = fx.xdp.test_run(&syn, client_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_REDIRECT,
            "SYN to the VIP is redirected toward the backend"
        );
        let p = parse(&out);
        assert_eq!(p.dst, (want, 8080), "Maglev-chosen backend");
        assert_eq!(
            p.src.0, LB_BACKEND_SIDE,
            "SNAT source is the LB's address toward the backend"
        );
        assert!(
            (10000..=29999).contains(&p.src.1),
            "SNAT port {} in the default range",
            p.src.1
        );
        assert_eq!(p.dst_mac, want_mac, "next hop MAC from the neighbour table");
        let snat_port = p.src.1;

        // The same flow's next packet takes the conntrack path to the same place.
        let data = frame(
            (c, 40000),
            (VIP, 80),
            ACK,
            b"GET / HTTP/1.1\r\n\r\n",
            &[],
            [0xaa; 6],
        );
        let (verdict, out, _) = fx.xdp.test_run(&data, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse(&out);
        assert_eq!((p.dst, p.src), ((want, 8080), (LB_BACKEND_SIDE, snat_port)));
        assert_eq!(p.payload, b"GET / HTTP/1.1\r\n\r\n", "payload untouched");

        // Reply from the backend → rewritten back to VIP → client.
        let reply = frame(
            (want, 8080),
            (LB_BACKEND_SIDE, snat_port),
            SYN | ACK,
            b"",
            &[],
            [0xbb; 6],
        );
        let (verdict, out, _) = fx.xdp.test_run(&reply, backend_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "reply redirected toward the client");
        let p = parse(&out);
        assert_eq!((p.src, p.dst), ((VIP, 80), (c, 40000)));
        assert_eq!(p.dst_mac, CLIENT_MAC);

        // Affinity: new connections from the same client reach the same backend, even after
        // the ring changes under it (weight change).
        for other in (1..=3u8).map(backend_ip).filter(|b| *b != want) {
            let name = format!("b{}", other.octets()[3] - 1);
            fx.apply(Command::SetWeight {
                service: "web".into(),
                backend: name,
                weight: 7,
            });
        }
        for port in 40001..40010 {
            let syn = frame((c, port), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
            let (verdict, out, _) = fx.xdp.test_run(&syn, client_if, 1).unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(
                parse(&out).dst.0,
                want,
                "affinity keeps the client on its backend"
            );
        }
        assert_eq!(fx.counter("new_flows"), 10);
        assert_eq!(fx.counter("forwarded"), 12);
        let which = fx.xdp.which("web", c, None).unwrap();
        assert_eq!(which.reason, "affinity");
        let which = fx.xdp.which("web", c, Some(40000)).unwrap();
        assert_eq!(which.reason, "conntrack");
    });
}

#[test]
fn xdp_drain_keeps_known_clients_down_refuses() {
    if !ready("xdp_drain_keeps_known_clients_down_refuses") {
        return;
    }
    in_fixture_netns(|client_if, _| {
        let mut fx = Fixture::new();
        let dst_of = |fx: &Fixture, c: Ipv4Addr, port: u16| {
            let (verdict, out, _) = fx
                .xdp
                .test_run(
                    &frame((c, port), (VIP, 80), SYN, b"", &[], [0xaa; 6]),
                    client_if,
                    1,
                )
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            parse(&out).dst.0
        };
        let known = client(0);
        let target = dst_of(&fx, known, 41000);
        let name = format!("b{}", target.octets()[3] - 1);
        fx.apply(Command::SetState {
            service: "web".into(),
            backend: name.clone(),
            state: AdminState::Drain,
        });
        assert_eq!(
            dst_of(&fx, known, 41001),
            target,
            "drained backend keeps its known client"
        );
        // New clients (no affinity) never reach the drained backend.
        for i in 0..200u32 {
            let fresh = Ipv4Addr::from(0x0b00_0000 + i);
            assert_ne!(
                dst_of(&fx, fresh, 42000),
                target,
                "new client {fresh} sent to a drained backend"
            );
        }
        // Down: not even the known client goes there any more.
        fx.apply(Command::SetHealth {
            service: "web".into(),
            backend: name,
            health: Health::Down,
        });
        let moved = dst_of(&fx, known, 41002);
        assert_ne!(moved, target, "down backend refused");
        // …and the client now sticks to its new backend.
        assert_eq!(dst_of(&fx, known, 41003), moved);
    });
}

#[test]
fn xdp_passes_or_drops_what_is_not_forwardable() {
    if !ready("xdp_passes_or_drops_what_is_not_forwardable") {
        return;
    }
    in_fixture_netns(|client_if, _| {
        let fx = Fixture::new();
        let c = client(1);
        let run = |f: &[u8]| fx.xdp.test_run(f, client_if, 1).unwrap();
        // Not for a VIP: the host's own traffic (e.g. SSH to the LB address) passes untouched.
        let ssh = frame(
            (c, 50000),
            (Ipv4Addr::new(10, 0, 0, 1), 22),
            SYN,
            b"",
            &[],
            [0xaa; 6],
        );
        assert_eq!(run(&ssh).0, XDP_PASS);
        assert_eq!(run(&ssh).1, ssh);
        // VIP but another port.
        let other_port = frame((c, 50000), (VIP, 443), SYN, b"", &[], [0xaa; 6]);
        assert_eq!(run(&other_port).0, XDP_PASS);
        // ARP.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0; 20]);
        let (verdict, out, _) = run(&arp);
        assert_eq!((verdict, out), (XDP_PASS, arp.clone()));
        // ICMP echo to the VIP.
        let mut icmp = frame((c, 0), (VIP, 0), 0, b"", &[], [0xaa; 6]);
        icmp[14 + 9] = 1;
        assert_eq!(run(&icmp).0, XDP_PASS);
        // A fragment (MF set) to the VIP is passed to the kernel and counted.
        let mut frag = frame((c, 50001), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        frag[14 + 6] |= 0x20;
        assert_eq!(run(&frag).0, XDP_PASS);
        assert_eq!(fx.counter("fragment"), 1);
        // Truncated TCP header to the VIP.
        let syn = frame((c, 50002), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        assert_eq!(run(&syn[..14 + 20 + 6]).0, XDP_PASS);
        assert_eq!(fx.counter("truncated"), 1);
        // A non-SYN without a connection is never sent to a random backend.
        let stray = frame((c, 50003), (VIP, 80), ACK, b"x", &[], [0xaa; 6]);
        assert_eq!(run(&stray).0, XDP_DROP);
        assert_eq!(fx.counter("no_conntrack"), 1);
        let fin = frame((c, 50004), (VIP, 80), FIN | ACK, b"", &[], [0xaa; 6]);
        assert_eq!(run(&fin).0, XDP_DROP);
        // IP options are honoured: the TCP header is found after them and the flow is forwarded.
        let with_options = frame(
            (c, 50005),
            (VIP, 80),
            SYN,
            b"",
            &[0x01, 0x01, 0x01, 0x00],
            [0xaa; 6],
        );
        let (verdict, out, _) = run(&with_options);
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse(&out);
        assert_eq!(p.dst.1, 8080);
        assert_eq!(
            out[14 + 20..14 + 24],
            [0x01, 0x01, 0x01, 0x00],
            "options carried over"
        );
        // Every verdict counted once.
        let packets = fx.counter("packets");
        assert_eq!(
            packets,
            fx.counter("passed") + fx.counter("dropped") + fx.counter("forwarded")
        );
    });
}

#[test]
fn xdp_no_backend_drops_syn() {
    if !ready("xdp_no_backend_drops_syn") {
        return;
    }
    in_fixture_netns(|client_if, _| {
        let mut fx = Fixture::new();
        for i in 1..=3 {
            fx.apply(Command::SetState {
                service: "web".into(),
                backend: format!("b{i}"),
                state: AdminState::Maintenance,
            });
        }
        let syn = frame((client(2), 40000), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        assert_eq!(fx.xdp.test_run(&syn, client_if, 1).unwrap().0, XDP_DROP);
        assert_eq!(fx.counter("no_backend"), 1);
        assert_eq!(fx.xdp.which("web", client(2), None).unwrap().reason, "none");
    });
}

#[test]
fn xdp_translates_tcp_timestamps_toward_the_backend() {
    if !ready("xdp_translates_tcp_timestamps_toward_the_backend") {
        return;
    }
    in_fixture_netns(|client_if, backend_if| {
        let fx = Fixture::new();
        let c = client(2);
        // A client timestamp far from the LB's clock, as Linux's per-connection random offsets give.
        let client_ts = 0xf000_0000u32;
        let syn = frame_with(
            (c, 45000),
            (VIP, 80),
            SYN,
            b"",
            &[],
            &syn_options(client_ts, 0),
            [0xaa; 6],
        );
        let (verdict, out, _) = fx.xdp.test_run(&syn, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse(&out); // checksums verified
        let (tsval, tsecr) = timestamps(&out);
        assert_ne!(tsval, client_ts, "TSval moved onto the LB's clock");
        assert_eq!(tsecr, 0);
        let delta = tsval.wrapping_sub(client_ts);
        let now_ms = (lb::xdp::monotonic_ns() / 1_000_000) as u32;
        assert!(
            now_ms.wrapping_sub(tsval) < 5_000,
            "TSval {tsval} follows the LB's clock ({now_ms} ms)"
        );
        // Later segments of the flow get the same shift.
        let ack = frame_with(
            (c, 45000),
            (VIP, 80),
            ACK,
            b"hi",
            &[],
            &ack_options(client_ts + 7, 99),
            [0xaa; 6],
        );
        let (_, out, _) = fx.xdp.test_run(&ack, client_if, 1).unwrap();
        parse(&out);
        assert_eq!(
            timestamps(&out),
            (client_ts.wrapping_add(7).wrapping_add(delta), 99)
        );
        // The backend echoes the shifted value; the client gets its own value back.
        let reply = frame_with(
            (p.dst.0, p.dst.1),
            (p.src.0, p.src.1),
            SYN | ACK,
            b"",
            &[],
            &ack_options(555, tsval),
            [0xbb; 6],
        );
        let (verdict, out, _) = fx.xdp.test_run(&reply, backend_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let back = parse(&out);
        assert_eq!(back.dst, (c, 45000));
        assert_eq!(
            timestamps(&out),
            (555, client_ts),
            "TSecr restored for the client"
        );
    });
}

/// `f` with TCP sequence number `seq` (TCP checksum fixed).
fn with_seq(mut f: Vec<u8>, seq: u32) -> Vec<u8> {
    let ihl = (f[14] & 0x0f) as usize * 4;
    let t = 14 + ihl;
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    f[t + 16..t + 18].copy_from_slice(&[0, 0]);
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let c = checksum(&f[t..], pseudo_sum(src, dst, f.len() - t));
    f[t + 16..t + 18].copy_from_slice(&c.to_ne_bytes());
    f
}

/// Issue 16: the client reuses the 4-tuple of a connection the LB still holds as open (here
/// half-closed: FIN from the client only, as when the backend's FIN bit was lost). The new SYN (new
/// sequence number) must get a new flow and SNAT port, not go out on the old port, whose reply entry
/// may already belong to nobody; a retransmission of that SYN stays on the new flow; and a backend
/// packet to a SNAT port without a flow is dropped and counted, never passed to the LB's stack.
#[test]
fn xdp_syn_on_a_reused_tuple_starts_a_new_flow() {
    if !ready("xdp_syn_on_a_reused_tuple_starts_a_new_flow") {
        return;
    }
    in_fixture_netns(|client_if, backend_if| {
        let fx = Fixture::new();
        let c = client(1);
        let client_side = (c, 41000);
        let syn = with_seq(frame(client_side, (VIP, 80), SYN, b"", &[], [0xaa; 6]), 1000);
        let (verdict, out, _) = fx.xdp.test_run(&syn, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let first = parse(&out);
        let (backend, old_port) = (first.dst, first.src.1);
        // The client half-closes; the backend's FIN never marks the flow.
        let fin = with_seq(
            frame(client_side, (VIP, 80), FIN | ACK, b"", &[], [0xaa; 6]),
            1001,
        );
        assert_eq!(fx.xdp.test_run(&fin, client_if, 1).unwrap().0, XDP_REDIRECT);

        // The client reuses its port: a SYN with a new sequence number.
        let syn2 = with_seq(frame(client_side, (VIP, 80), SYN, b"", &[], [0xaa; 6]), 900_000);
        let (verdict, out, _) = fx.xdp.test_run(&syn2, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let second = parse(&out);
        assert_eq!(second.dst, backend, "same backend (affinity)");
        assert_ne!(
            second.src.1, old_port,
            "a new connection on a reused 4-tuple gets a new SNAT port, not the old flow's"
        );
        assert_eq!(fx.counter("new_flows"), 2);

        // Its SYN-ACK, to the new port, reaches the client.
        let syn_ack = frame(
            backend,
            (LB_BACKEND_SIDE, second.src.1),
            SYN | ACK,
            b"",
            &[],
            [0xbb; 6],
        );
        let (verdict, out, _) = fx.xdp.test_run(&syn_ack, backend_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_REDIRECT,
            "the SYN-ACK of the new connection is translated"
        );
        assert_eq!(parse(&out).dst, client_side);

        // A retransmission of the new SYN stays on the new flow.
        let (verdict, out, _) = fx.xdp.test_run(&syn2, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            parse(&out).src.1,
            second.src.1,
            "retransmitted SYN keeps its SNAT port"
        );
        assert_eq!(fx.counter("new_flows"), 2, "a retransmission is not a new flow");

        // A backend packet to a SNAT port nobody holds: dropped and counted, not passed.
        let free_port = if second.src.1 == 29999 { 29998 } else { 29999 };
        let stray = frame(
            backend,
            (LB_BACKEND_SIDE, free_port),
            SYN | ACK,
            b"",
            &[],
            [0xbb; 6],
        );
        let (verdict, _, _) = fx.xdp.test_run(&stray, backend_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_DROP,
            "a reply without a flow never reaches the LB's stack"
        );
        assert_eq!(fx.counter("no_reply_flow"), 1);
        // The same port outside the SNAT range is the host's business: passed.
        let own = frame(backend, (LB_BACKEND_SIDE, 40000), SYN | ACK, b"", &[], [0xbb; 6]);
        assert_eq!(fx.xdp.test_run(&own, backend_if, 1).unwrap().0, XDP_PASS);
    });
}
