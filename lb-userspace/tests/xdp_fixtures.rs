//! Packet fixtures for the XDP program, Katran style: input frame → expected verdict, output bytes
//! and counters. State is seeded through the datapath's public API (`State::apply` + `Datapath::apply`,
//! the path every command takes) and the program runs under BPF_PROG_TEST_RUN inside a private
//! network namespace whose dummy interfaces and permanent neighbours give `bpf_fib_lookup` real
//! answers. Needs root and the embedded eBPF object (`cargo xtask test` provides both).

mod common;

use common::Hook;

use common::{
    CLIENT_MAC, LB_BACKEND_SIDE, RING, VIP, XDP_DROP, XDP_PASS, XDP_REDIRECT, backend_ip, backend_mac,
    client, in_fixture_netns,
};

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lb::config::{AdminState, BackendConfig, ServiceConfig};
use lb::datapath::Datapath;
use lb::datapath::affinity::AffinityTable;
use lb::datapath::xdp::XdpDatapath;
use lb::state::{Command, Health, State};
use lb_tests::packet::flags::{ACK, FIN, PSH, RST, SYN};
use lb_tests::packet::{self, IPPROTO_ICMP, Parsed, Tcp, ack_options, arp_request, syn_options};

/// State and kernel, changed together the way the engine does it.
struct Fixture {
    state: State,
    xdp: XdpDatapath,
}

impl Fixture {
    fn new(hook: Hook) -> Fixture {
        let xdp = common::start(hook);
        let mut f = Fixture {
            state: State::new(0, RING),
            xdp,
        };
        f.apply(Command::AddService { service: service() });
        f
    }

    fn apply(&mut self, command: Command) {
        let effect = self.state.apply(command).expect("command applies");
        let snapshot = lb::runtime::Snapshot::new(self.state.clone());
        self.xdp.apply(&effect, &snapshot).expect("datapath applies");
    }

    fn ring_choice(&self, client: Ipv4Addr) -> Ipv4Addr {
        common::ring_choice(&self.state, client)
    }

    fn counter(&self, name: &str) -> u64 {
        common::counter(&self.xdp, name)
    }
}

/// Ethernet + IPv4 (with `options` words) + TCP frame from the client MAC, valid checksums.
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
    Tcp::new(src, dst, flags)
        .macs(CLIENT_MAC, dst_mac)
        .ip_options(options)
        .tcp_options(tcp_options)
        .payload(payload)
        .build()
}

/// (TSval, TSecr) of a frame's timestamp option.
fn timestamps(f: &[u8]) -> (u32, u32) {
    parse(f).timestamps().expect("timestamp option")
}

/// What a frame carries, checksums verified.
fn parse(f: &[u8]) -> Parsed {
    packet::parse(f).unwrap_or_else(|e| panic!("output frame: {e}"))
}

fn xdp_nat_forward_reply_and_affinity(hook: Hook) {
    if !common::ready("xdp_nat_forward_reply_and_affinity") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let mut fx = Fixture::new(hook);
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
        let which = fx.xdp.kernel_which("web", c, None).unwrap();
        assert_eq!(which.reason, "affinity");
        let which = fx.xdp.kernel_which("web", c, Some(40000)).unwrap();
        assert_eq!(which.reason, "conntrack");
    });
}

fn xdp_drain_keeps_known_clients_down_refuses(hook: Hook) {
    if !common::ready("xdp_drain_keeps_known_clients_down_refuses") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let mut fx = Fixture::new(hook);
        // A connection (its handshake completed: affinity is written then); where it went.
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
            let ack = frame((c, port), (VIP, 80), ACK, b"", &[], [0xaa; 6]);
            assert_eq!(fx.xdp.test_run(&ack, client_if, 1).unwrap().0, XDP_REDIRECT);
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

/// What a fixture case expects of the output frame.
enum Out {
    /// Whatever the verdict, the frame leaves as it came.
    Unchanged,
    /// Not looked at (the verdict says enough).
    Any,
    /// Forwarded to a backend's `port`, IPv4 options carried over.
    Forwarded { port: u16, ip_options: &'static [u8] },
}

/// One Katran-style case: input frame → verdict, output, and a counter that goes up by one.
struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    out: Out,
    counts: Option<&'static str>,
}

/// Runs every case in order on `ifindex` and checks its verdict, output and counter.
fn run_cases(fx: &Fixture, ifindex: u32, cases: &[Case]) {
    for case in cases {
        let before = case.counts.map(|n| fx.counter(n));
        let (verdict, out, _) = fx.xdp.test_run(&case.input, ifindex, 1).unwrap();
        assert_eq!(verdict, case.verdict, "{}: verdict", case.name);
        match case.out {
            Out::Unchanged => assert_eq!(out, case.input, "{}: output bytes", case.name),
            Out::Any => {}
            Out::Forwarded { port, ip_options } => {
                let p = parse(&out);
                assert_eq!(p.dst.1, port, "{}: backend port", case.name);
                assert_eq!(p.ip_options, ip_options, "{}: options carried over", case.name);
            }
        }
        if let (Some(name), Some(before)) = (case.counts, before) {
            assert_eq!(fx.counter(name), before + 1, "{}: counter {name}", case.name);
        }
    }
}

fn xdp_passes_or_drops_what_is_not_forwardable(hook: Hook) {
    if !common::ready("xdp_passes_or_drops_what_is_not_forwardable") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        let c = client(1);
        let to = |port: u16, dst: Ipv4Addr, dport: u16, flags: u8| {
            Tcp::new((c, port), (dst, dport), flags).macs(CLIENT_MAC, [0xaa; 6])
        };
        let syn = to(50002, VIP, 80, SYN).build();
        let cases = [
            Case {
                name: "not for a VIP: the host's own traffic (SSH to the LB address)",
                input: to(50000, Ipv4Addr::new(10, 0, 0, 1), 22, SYN).build(),
                verdict: XDP_PASS,
                out: Out::Unchanged,
                counts: Some("passed"),
            },
            Case {
                name: "VIP but another port",
                input: to(50000, VIP, 443, SYN).build(),
                verdict: XDP_PASS,
                out: Out::Any,
                counts: Some("passed"),
            },
            Case {
                name: "ARP",
                input: arp_request(CLIENT_MAC, c, VIP),
                verdict: XDP_PASS,
                out: Out::Unchanged,
                counts: Some("passed"),
            },
            Case {
                name: "ICMP to the VIP",
                input: to(0, VIP, 0, 0).protocol(IPPROTO_ICMP).build(),
                verdict: XDP_PASS,
                out: Out::Any,
                counts: Some("passed"),
            },
            Case {
                name: "a first fragment (MF set) to a VIP's port is dropped and counted (the host would reset the client)",
                input: to(50001, VIP, 80, SYN).more_fragments().build(),
                verdict: XDP_DROP,
                out: Out::Any,
                counts: Some("fragment"),
            },
            Case {
                name: "a first fragment to the VIP on a port with no service is passed and counted",
                input: to(50001, VIP, 443, ACK).more_fragments().build(),
                verdict: XDP_PASS,
                out: Out::Any,
                counts: Some("fragment"),
            },
            Case {
                name: "a later fragment (offset set) to the VIP is passed to wait in reassembly",
                input: {
                    let mut later = to(50001, VIP, 80, ACK);
                    later.frag = 100;
                    later.build()
                },
                verdict: XDP_PASS,
                out: Out::Any,
                counts: Some("fragment"),
            },
            Case {
                name: "truncated TCP header to the VIP",
                input: syn[..14 + 20 + 6].to_vec(),
                verdict: XDP_PASS,
                out: Out::Any,
                counts: Some("truncated"),
            },
            Case {
                name: "a non-SYN without a connection is never sent to a random backend: RST",
                input: to(50003, VIP, 80, ACK).payload(b"x").build(),
                verdict: XDP_REDIRECT,
                out: Out::Any,
                counts: Some("no_conntrack"),
            },
            Case {
                name: "a FIN without a connection: RST",
                input: to(50004, VIP, 80, FIN | ACK).build(),
                verdict: XDP_REDIRECT,
                out: Out::Any,
                counts: Some("rst_sent"),
            },
            Case {
                name: "an RST without a connection is never answered",
                input: to(50004, VIP, 80, RST | ACK).build(),
                verdict: XDP_DROP,
                out: Out::Any,
                counts: Some("dropped"),
            },
            Case {
                name: "IP options are honoured: the TCP header is found after them",
                input: to(50005, VIP, 80, SYN)
                    .ip_options(&[0x01, 0x01, 0x01, 0x00])
                    .build(),
                verdict: XDP_REDIRECT,
                out: Out::Forwarded {
                    port: 8080,
                    ip_options: &[0x01, 0x01, 0x01, 0x00],
                },
                counts: Some("forwarded"),
            },
        ];
        run_cases(&fx, client_if, &cases);
        // Every verdict counted once.
        let packets = fx.counter("packets");
        assert_eq!(packets, cases.len() as u64);
        assert_eq!(
            packets,
            fx.counter("passed") + fx.counter("dropped") + fx.counter("forwarded")
        );
    });
}

fn xdp_no_backend_drops_syn(hook: Hook) {
    if !common::ready("xdp_no_backend_drops_syn") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let mut fx = Fixture::new(hook);
        for i in 1..=3 {
            fx.apply(Command::SetState {
                service: "web".into(),
                backend: format!("b{i}"),
                state: AdminState::Maintenance,
            });
        }
        run_cases(
            &fx,
            client_if,
            &[Case {
                name: "SYN with every backend in maintenance",
                input: frame((client(2), 40000), (VIP, 80), SYN, b"", &[], [0xaa; 6]),
                verdict: XDP_DROP,
                out: Out::Any,
                counts: Some("no_backend"),
            }],
        );
        assert_eq!(fx.counter("no_backend"), 1);
        assert_eq!(
            fx.xdp.kernel_which("web", client(2), None).unwrap().reason,
            "none"
        );
    });
}

fn xdp_translates_tcp_timestamps_toward_the_backend(hook: Hook) {
    if !common::ready("xdp_translates_tcp_timestamps_toward_the_backend") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
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
        let now_ms = (lb::datapath::xdp::monotonic_ns() / 1_000_000) as u32;
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

/// A frame from the client MAC with sequence number `seq`.
fn frame_seq(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, seq: u32) -> Vec<u8> {
    Tcp::new(src, dst, flags)
        .macs(CLIENT_MAC, [0xaa; 6])
        .seq(seq)
        .build()
}

/// A blind attacker knows an established connection's 4-tuple, not its sequence numbers. Its
/// SYN goes to the backend on the flow (whose stack answers with a challenge ACK) instead of
/// replacing it; its RSTs are forwarded for the endpoint to judge, but close the flow only at the
/// exact numbers where a stack takes an RST, from either side and whichever interface they arrive
/// on; its bare ACKs move nothing and its FINs far off mark nothing. A real RST still closes the
/// flow: the client's next SYN then gets a new one.
fn xdp_blind_syn_and_rst_do_not_end_an_established_flow(hook: Hook) {
    if !common::ready("xdp_blind_syn_and_rst_do_not_end_an_established_flow") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
        let client_side = (client(1), 41000);
        let to_vip = |flags, seq: u32, ack: u32, payload: &[u8]| {
            Tcp::new(client_side, (VIP, 80), flags)
                .macs(CLIENT_MAC, [0xaa; 6])
                .seq(seq)
                .ack(ack)
                .payload(payload)
                .build()
        };
        let forwarded = |frame: &[u8], ifindex: u32, what: &str| {
            let (verdict, out, _) = fx.xdp.test_run(frame, ifindex, 1).unwrap();
            assert_eq!(verdict, XDP_REDIRECT, "{what}");
            parse(&out)
        };
        let (c_isn, b_isn) = (1000u32, 0xffff_f000u32); // the backend's numbers wrap
        let first = forwarded(&to_vip(SYN, c_isn, 0, b""), client_if, "SYN");
        let (backend, snat) = (first.dst, first.src);
        let from_backend = |flags, seq: u32, ack: u32, payload: &[u8]| {
            Tcp::new(backend, snat, flags)
                .macs(backend_mac(backend.0.octets()[3] - 1), [0xbb; 6])
                .seq(seq)
                .ack(ack)
                .payload(payload)
                .build()
        };
        forwarded(
            &from_backend(SYN | ACK, b_isn, c_isn + 1, b""),
            backend_if,
            "SYN-ACK",
        );
        forwarded(
            &to_vip(ACK, c_isn + 1, b_isn + 1, b""),
            client_if,
            "handshake ACK",
        );
        let (c_next, b_next) = (c_isn + 1 + 5, b_isn.wrapping_add(1 + 7));
        forwarded(
            &to_vip(ACK | PSH, c_isn + 1, b_isn + 1, b"hello"),
            client_if,
            "request",
        );
        forwarded(
            &from_backend(ACK | PSH, b_isn.wrapping_add(1), c_next, b"welcome"),
            backend_if,
            "answer",
        );
        // Whether the flow is still open: a SYN with a new sequence number stays on it.
        let stays_open = |what: &str| {
            let p = forwarded(&to_vip(SYN, 900_000, 0, b""), client_if, what);
            assert_eq!(
                (p.dst, p.src, p.flags),
                (backend, snat, SYN),
                "{what}: on the flow"
            );
            assert_eq!(fx.counter("new_flows"), 1, "{what}: no new flow");
        };
        stays_open("a blind SYN");

        // RSTs at numbers where no stack takes one: forwarded for the endpoint to judge (it
        // answers with a challenge ACK, or not at all once those are rate-limited) and counted;
        // the flow stays open, whichever side or interface they claim to come from.
        let not_taken = |frame: &[u8], ifindex: u32, what: &str| {
            let before = fx.counter("rst_not_taken");
            let (verdict, _, _) = fx.xdp.test_run(frame, ifindex, 1).unwrap();
            assert_ne!(verdict, XDP_DROP, "{what}: forwarded");
            assert_eq!(fx.counter("rst_not_taken"), before + 1, "{what}: counted");
            stays_open(what);
        };
        not_taken(
            &to_vip(RST, c_next.wrapping_add(1 << 30), 0, b""),
            client_if,
            "client RST far off",
        );
        not_taken(
            &to_vip(RST, c_next + 3, 0, b""),
            client_if,
            "client RST in window",
        );
        not_taken(
            &to_vip(RST, c_next + 5, 0, b""),
            client_if,
            "a second one in window",
        );
        not_taken(
            &to_vip(RST, c_next - 3, 0, b""),
            client_if,
            "client RST below the backend's acknowledgment",
        );
        not_taken(
            &from_backend(RST, b_next.wrapping_sub(1 << 28), 0, b""),
            backend_if,
            "backend RST far off",
        );
        not_taken(
            &from_backend(RST, b_next ^ 0x8000_0000, 0, b""),
            client_if,
            "backend RST spoofed from the client's side",
        );
        // A spoofed bare ACK ahead of the client's number does not move it (it sends nothing):
        // an RST there is not taken either.
        forwarded(
            &to_vip(ACK, c_next + 1000, b_next, b""),
            client_if,
            "a bare ACK ahead",
        );
        not_taken(
            &to_vip(RST, c_next + 1000, 0, b""),
            client_if,
            "client RST where the bare ACK pointed",
        );
        // FINs far from the senders' numbers, from both sides: no FIN of this connection.
        forwarded(
            &to_vip(FIN | ACK, c_next.wrapping_add(1 << 30), b_next, b""),
            client_if,
            "client FIN far off",
        );
        forwarded(
            &from_backend(FIN | ACK, b_next ^ 0x8000_0000, c_next, b""),
            backend_if,
            "backend FIN far off",
        );
        stays_open("after FINs far off");

        forwarded(
            &to_vip(ACK, c_next, b_next, b""),
            client_if,
            "the client acknowledges the answer",
        );
        // The backend sends more, then resets at what the client acknowledged (where the
        // client's stack takes an RST): taken, the flow marked. Its next segment (an endpoint
        // that rejected the RST goes on) opens it again.
        forwarded(
            &from_backend(ACK | PSH, b_next, c_next, b"more"),
            backend_if,
            "more from the backend",
        );
        let p = forwarded(&from_backend(RST, b_next, 0, b""), backend_if, "backend RST");
        assert_eq!((p.dst, p.flags), (client_side, RST));
        assert_eq!(fx.counter("rst_not_taken"), 7, "taken");
        forwarded(
            &from_backend(ACK | PSH, b_next + 4, c_next, b"again"),
            backend_if,
            "the backend goes on",
        );
        stays_open("after the backend went on");
        // A segment past a gap (1-byte segments far ahead are how a blind attacker would drag
        // the number along) does not move it while the client has not acknowledged that far...
        let after_gap = b_next + 9 + 10;
        forwarded(
            &from_backend(ACK | PSH, after_gap, c_next, b"late"),
            backend_if,
            "a segment past a gap",
        );
        not_taken(
            &from_backend(RST, after_gap + 4, 0, b""),
            backend_if,
            "backend RST where that segment ended",
        );
        // ... and does once it has (the gap was reordering before the LB): the backend's FIN
        // after it continues what was sent, and closes its side.
        forwarded(
            &to_vip(ACK, c_next, after_gap + 4, b""),
            client_if,
            "the client acknowledges past the gap",
        );
        forwarded(
            &from_backend(ACK | PSH, after_gap + 4, c_next, b"tail"),
            backend_if,
            "a segment the client acknowledged the start of",
        );
        forwarded(
            &from_backend(FIN | ACK, after_gap + 8, c_next, b""),
            backend_if,
            "the backend's FIN",
        );
        let p = forwarded(&to_vip(SYN, 5_000_000, 0, b""), client_if, "SYN after the FIN");
        assert_ne!(p.src, snat, "a new connection, on a new SNAT port");
        assert_eq!(fx.counter("new_flows"), 2);
    });
}

/// Issue 16: the client reuses the 4-tuple of a connection the LB still holds as open (here
/// half-closed: FIN from the client only, as when the backend's FIN bit was lost). The new SYN (new
/// sequence number) must get a new flow and SNAT port, not go out on the old port, whose reply entry
/// may already belong to nobody; a retransmission of that SYN stays on the new flow; and a backend
/// packet to a SNAT port without a flow is answered with an RST and counted, never passed to the LB's stack.
fn xdp_syn_on_a_reused_tuple_starts_a_new_flow(hook: Hook) {
    if !common::ready("xdp_syn_on_a_reused_tuple_starts_a_new_flow") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
        let c = client(1);
        let client_side = (c, 41000);
        let syn = frame_seq(client_side, (VIP, 80), SYN, 1000);
        let (verdict, out, _) = fx.xdp.test_run(&syn, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let first = parse(&out);
        let (backend, old_port) = (first.dst, first.src.1);
        // The client half-closes; the backend's FIN never marks the flow.
        let fin = frame_seq(client_side, (VIP, 80), FIN | ACK, 1001);
        assert_eq!(fx.xdp.test_run(&fin, client_if, 1).unwrap().0, XDP_REDIRECT);

        // The client reuses its port: a SYN with a new sequence number.
        let syn2 = frame_seq(client_side, (VIP, 80), SYN, 900_000);
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
        let (verdict, out, _) = fx.xdp.test_run(&stray, backend_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_REDIRECT,
            "a reply without a flow never reaches the LB's stack: the backend gets an RST"
        );
        assert_eq!(parse(&out).dst, backend, "the RST goes back to the backend");
        assert_eq!(fx.counter("no_reply_flow"), 1);
        // The same port outside the SNAT range is the host's business: passed.
        let own = frame(backend, (LB_BACKEND_SIDE, 40000), SYN | ACK, b"", &[], [0xbb; 6]);
        assert_eq!(fx.xdp.test_run(&own, backend_if, 1).unwrap().0, XDP_PASS);
    });
}

/// A client that reuses the 4-tuple of a connection closed both ways: its new SYN's flow replaces
/// the old client → backend entry (no entry added). The entry then carries the new SNAT port (the
/// client's next packets leave on it), the next hop is right (same backend), the old port's reply
/// entry is left to age out, not reused, and the new flow runs both ways.
fn xdp_syn_on_a_closed_reused_tuple_replaces_its_entry(hook: Hook) {
    if !common::ready("xdp_syn_on_a_closed_reused_tuple_replaces_its_entry") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
        let c = client(1);
        let client_side = (c, 41500);
        let backend_packet = |backend: (Ipv4Addr, u16), port: u16, flags: u8, seq: u32, ack: u32| {
            Tcp::new(backend, (LB_BACKEND_SIDE, port), flags)
                .macs([0xbb; 6], [0xaa; 6])
                .seq(seq)
                .ack(ack)
                .build()
        };
        let client_packet = |flags: u8, seq: u32, ack: u32| {
            Tcp::new(client_side, (VIP, 80), flags)
                .macs(CLIENT_MAC, [0xaa; 6])
                .seq(seq)
                .ack(ack)
                .build()
        };
        // First connection: handshake, then FIN both ways.
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq(client_side, (VIP, 80), SYN, 1000), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let first = parse(&out);
        let (backend, old_port) = (first.dst, first.src.1);
        let index = (1..=3)
            .find(|i| backend_ip(*i) == backend.0)
            .expect("a fixture backend");
        assert_eq!(first.dst_mac, backend_mac(index));
        let steps = [
            (
                backend_packet(backend, old_port, SYN | ACK, 7000, 1001),
                backend_if,
            ),
            (client_packet(ACK, 1001, 7001), client_if),
            (client_packet(FIN | ACK, 1001, 7001), client_if),
            (
                backend_packet(backend, old_port, FIN | ACK, 7001, 1002),
                backend_if,
            ),
            (client_packet(ACK, 1002, 7002), client_if),
        ];
        for (frame, ifindex) in &steps {
            assert_eq!(fx.xdp.test_run(frame, *ifindex, 1).unwrap().0, XDP_REDIRECT);
        }
        let entries = fx.xdp.kernel_state().conntrack;
        assert_eq!(entries, 2, "one closed connection: two entries");

        // The client reuses its port at once (the backend closed first: its TIME_WAIT is on the
        // old SNAT port, so the new flow needs a new one).
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq(client_side, (VIP, 80), SYN, 900_000), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let second = parse(&out);
        assert_eq!(second.dst, backend, "same backend (affinity)");
        assert_eq!(second.dst_mac, backend_mac(index), "the next hop of that backend");
        let new_port = second.src.1;
        assert_ne!(new_port, old_port, "a new SNAT port");
        assert_eq!(fx.counter("new_flows"), 2);
        assert_eq!(
            fx.xdp.kernel_state().conntrack,
            3,
            "the client → backend entry was replaced, not added: the old reply entry and the new flow's two"
        );
        let which = fx
            .xdp
            .kernel_which("web", c, Some(client_side.1))
            .expect("kernel choice");
        assert_eq!(which.reason, "conntrack", "{which:?}");

        // The new flow both ways: SYN-ACK on the new port to the client, then the client's ACK and
        // data leave on the new port.
        let (verdict, out, _) = fx
            .xdp
            .test_run(
                &backend_packet(backend, new_port, SYN | ACK, 50_000, 900_001),
                backend_if,
                1,
            )
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(parse(&out).dst, client_side);
        for flags in [ACK, PSH | ACK] {
            let (verdict, out, _) = fx
                .xdp
                .test_run(&client_packet(flags, 900_001, 50_001), client_if, 1)
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            let p = parse(&out);
            assert_eq!(
                (p.dst, p.src.1),
                (backend, new_port),
                "the client's packets leave on the new port"
            );
        }
        // A retransmission of the new SYN is not a new flow, and stays on the new port.
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq(client_side, (VIP, 80), SYN, 900_000), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(parse(&out).src.1, new_port);
        assert_eq!(fx.counter("new_flows"), 2);
        // A late packet of the old connection to its old port is still translated toward the
        // client (its entry ages out as closed), never onto the new flow's port.
        let (verdict, out, _) = fx
            .xdp
            .test_run(&backend_packet(backend, old_port, ACK, 7002, 1002), backend_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(parse(&out).dst, client_side);
        // A late RST of the old connection closes the old flow only: the new flow, which holds the
        // client's 4-tuple now, is not marked (a closed flow is gone after closed_timeout, 1 s).
        let _ = fx
            .xdp
            .test_run(
                &backend_packet(backend, old_port, RST | ACK, 7002, 1002),
                backend_if,
                1,
            )
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let (verdict, _, _) = fx
            .xdp
            .test_run(&client_packet(PSH | ACK, 900_001, 50_001), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let which = fx
            .xdp
            .kernel_which("web", c, Some(client_side.1))
            .expect("kernel choice");
        assert_eq!(which.reason, "conntrack", "the new flow is still open: {which:?}");
    });
}

/// A SYN that hits its client's affinity entry refreshes the entry's last_seen in place, and only
/// once the entry is a step old (1 s with this service's 600 s affinity_timeout): a hit within the
/// step leaves the entry as it was; the client keeps its backend either way.
fn xdp_affinity_hit_refreshes_last_seen_after_a_step(hook: Hook) {
    if !common::ready("xdp_affinity_hit_refreshes_last_seen_after_a_step") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        let c = client(2);
        let svc = fx.state.service("web").expect("service");
        let entry = || {
            let e = fx.xdp.entries(svc);
            assert_eq!(e.len(), 1, "{e:?}");
            e[0].clone()
        };
        // A SYN and its handshake's ACK (a new client's entry is written at the ACK).
        let syn = |port: u16| {
            let (verdict, out, _) = fx
                .xdp
                .test_run(&frame_seq((c, port), (VIP, 80), SYN, 1000), client_if, 1)
                .unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            let ack = frame_seq((c, port), (VIP, 80), ACK, 1001);
            assert_eq!(fx.xdp.test_run(&ack, client_if, 1).unwrap().0, XDP_REDIRECT);
            parse(&out).dst.0
        };
        let backend = syn(42000);
        let first = entry();
        assert!(first.idle < Duration::from_millis(500), "{first:?}");
        std::thread::sleep(Duration::from_millis(400));
        // Within the step: a hit, the entry untouched (idle keeps growing from the first SYN).
        assert_eq!(syn(42001), backend);
        let within = entry();
        // Refreshed, it would be a few ms idle; not, about 400 ms (the clocks of the sleep and of
        // the entry's stamp differ by a little: 399.99999 ms was seen).
        assert!(
            within.idle >= Duration::from_millis(300),
            "not refreshed within the step: {within:?}"
        );
        assert_eq!(within.backend_id, first.backend_id);
        std::thread::sleep(Duration::from_millis(800));
        // Past the step: refreshed.
        assert_eq!(syn(42002), backend);
        let after = entry();
        assert!(
            after.idle < Duration::from_millis(400),
            "refreshed after the step: {after:?}"
        );
        assert_eq!(after.backend_id, first.backend_id);
        assert_eq!(after.home, None);
    });
}

/// A non-SYN packet to the VIP without a connection comes back as an RST (RFC 793 numbers): every
/// field of the output frame is read back and both checksums verified. IPv4 and TCP options and
/// the payload are trimmed away; the frame goes back out toward the sender's MAC.
fn xdp_answers_a_packet_without_connection_with_rst(hook: Hook) {
    if !common::ready("xdp_answers_a_packet_without_connection_with_rst") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        let c = client(1);
        let lb_mac = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01];
        // An established connection's data segment (ACK set): the RST's sequence number is the
        // segment's acknowledgment, and it carries no ACK.
        let input = Tcp::new((c, 40100), (VIP, 80), ACK | PSH)
            .macs(CLIENT_MAC, lb_mac)
            .seq(5000)
            .ack(0x1234_5678)
            .ip_options(&[0x01, 0x01, 0x01, 0x00])
            .tcp_options(&ack_options(77, 88))
            .payload(&[b'x'; 100])
            .build();
        let (verdict, out, _) = fx.xdp.test_run(&input, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "sent back out the interface it came in on");
        assert_eq!(out.len(), 54, "trimmed to Ethernet + IPv4 + TCP headers");
        assert_eq!(&out[12..14], &[0x08, 0x00], "EtherType IPv4");
        assert_eq!(out[14], 0x45, "IPv4, no options");
        let p = parse(&out);
        assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, lb_mac), "MACs swapped");
        assert_eq!(
            (p.src, p.dst),
            ((VIP, 80), (c, 40100)),
            "addresses and ports swapped"
        );
        assert_eq!((p.tot_len, p.id, p.frag, p.ttl), (40, 0, 0x4000, 64));
        assert_eq!((p.seq, p.ack, p.flags), (0x1234_5678, 0, RST));
        assert_eq!((p.window, p.urgent), (0, 0));
        assert!(p.ip_options.is_empty() && p.tcp_options.is_empty() && p.payload.is_empty());
        assert_eq!((fx.counter("no_conntrack"), fx.counter("rst_sent")), (1, 1));
        assert_eq!(fx.counter("forwarded"), 1, "an RST sent is a transmitted packet");

        // Without ACK: sequence 0, acknowledging the data and the FIN (wrapping around 2^32).
        let input = Tcp::new((c, 40101), (VIP, 80), FIN)
            .macs(CLIENT_MAC, lb_mac)
            .seq(0xffff_fffe)
            .payload(b"abc")
            .build();
        let (verdict, out, _) = fx.xdp.test_run(&input, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse(&out);
        assert_eq!((p.src, p.dst), ((VIP, 80), (c, 40101)));
        assert_eq!((p.seq, p.ack, p.flags), (0, 2, RST | ACK));
        assert_eq!(fx.counter("rst_sent"), 2);
    });
}

/// Resets are rate-limited per CPU: a burst goes out, the rest is dropped and counted.
fn xdp_resets_are_rate_limited(hook: Hook) {
    if !common::ready("xdp_resets_are_rate_limited") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        // Far more than the burst, sent much faster than the rate refills it.
        let n = 2000u64;
        for i in 0..n {
            let input = frame(
                (client(2), 10_000 + i as u16),
                (VIP, 80),
                ACK,
                b"",
                &[],
                [0xaa; 6],
            );
            let (verdict, _, _) = fx.xdp.test_run(&input, client_if, 1).unwrap();
            assert!(
                verdict == XDP_REDIRECT || verdict == XDP_DROP,
                "verdict {verdict}"
            );
        }
        let (sent, limited) = (fx.counter("rst_sent"), fx.counter("rst_limited"));
        assert_eq!(sent + limited, n, "each answered or limited");
        assert_eq!(fx.counter("no_conntrack"), n);
        assert!(sent >= lb_common::rst::RST_BURST, "the burst goes out: {sent}");
        assert!(limited > 0, "the rest is limited: sent {sent}, limited {limited}");
    });
}

/// `on_down = "reset"` / `disable --reset` in the kernel: the backend's open connections are
/// marked, and the next packet of either end is answered with an RST toward that end (sequence
/// number from the packet). Connections opened afterwards are forwarded as usual.
fn xdp_reset_backend_answers_both_ends_with_rst(hook: Hook) {
    if !common::ready("xdp_reset_backend_answers_both_ends_with_rst") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
        let c = client(0);
        let client_side = (c, 43000);
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq(client_side, (VIP, 80), SYN, 1000), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let syn = parse(&out);
        let (backend, snat) = (syn.dst, syn.src);
        let syn_ack = Tcp::new(backend, snat, SYN | ACK)
            .macs(backend_mac(backend.0.octets()[3] - 1), [0xbb; 6])
            .seq(7000)
            .ack(1001)
            .build();
        assert_eq!(fx.xdp.test_run(&syn_ack, backend_if, 1).unwrap().0, XDP_REDIRECT);

        let svc = fx.state.service("web").unwrap();
        let be = svc
            .backends
            .iter()
            .find(|b| b.config.address == std::net::SocketAddr::from(backend))
            .unwrap();
        assert_eq!(
            fx.xdp
                .reset_backend(svc, be, &lb::runtime::BackendRuntime::default()),
            1,
            "one open connection marked"
        );
        let active = |fx: &Fixture| fx.xdp.backend_traffic("web")[&be.id].active;
        assert_eq!(active(&fx), 0, "a marked connection is no longer counted open");
        let which = fx.xdp.kernel_which("web", c, Some(43000)).unwrap();
        assert!(
            which.detail.ends_with("reset: its next packet gets an RST"),
            "{which:?}"
        );

        // The client speaks first: it gets the RST, from the VIP.
        let data = Tcp::new(client_side, (VIP, 80), ACK | PSH)
            .macs(CLIENT_MAC, [0xaa; 6])
            .seq(1001)
            .ack(7001)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        let (verdict, out, _) = fx.xdp.test_run(&data, client_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_REDIRECT,
            "the client's packet is answered, not forwarded"
        );
        let p = parse(&out);
        assert_eq!((p.src, p.dst, p.dst_mac), ((VIP, 80), client_side, CLIENT_MAC));
        assert_eq!((p.seq, p.flags), (7001, RST));
        // The backend's next packet gets its RST too, from the SNAT address and port.
        let late = Tcp::new(backend, snat, ACK | PSH)
            .macs(backend_mac(backend.0.octets()[3] - 1), [0xbb; 6])
            .seq(7001)
            .ack(1001)
            .payload(b"late")
            .build();
        let (verdict, out, _) = fx.xdp.test_run(&late, backend_if, 1).unwrap();
        assert_eq!(
            verdict, XDP_REDIRECT,
            "the backend's packet is answered, not forwarded"
        );
        let p = parse(&out);
        assert_eq!((p.src, p.dst), (snat, backend));
        assert_eq!((p.seq, p.flags), (1001, RST));
        assert_eq!(fx.counter("reset_flow"), 2);
        assert_eq!(
            fx.xdp
                .reset_backend(svc, be, &lb::runtime::BackendRuntime::default()),
            0,
            "nothing left to reset"
        );

        // A new connection from the same client is forwarded as usual.
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq((c, 43001), (VIP, 80), SYN, 50), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let fresh = parse(&out).src;
        let ack = frame_seq((c, 43001), (VIP, 80), ACK, 51);
        assert_eq!(fx.xdp.test_run(&ack, client_if, 1).unwrap().0, XDP_REDIRECT);
        assert_ne!(fresh, snat);
    });
}

/// `frame` after `edit`, with its IPv4 header checksum computed again (so only the edited field is
/// wrong, as a crafted packet would be).
fn edited(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    let ihl = (usize::from(f[14] & 0x0f).max(5) * 4).min(f.len() - 14);
    f[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&f[14..14 + ihl], 0);
    f[24..26].copy_from_slice(&c.to_ne_bytes());
    f
}

fn set_total_length(f: &mut [u8], len: u16) {
    f[16..18].copy_from_slice(&len.to_be_bytes());
}

/// Issue 11 item 4: invalid packets are judged before any state. Each case is passed or dropped by
/// the stated rule (lengths that disagree: passed untouched, `malformed`, or `truncated` when the
/// frame is shorter than it claims; SYN with RST or FIN and impossible sources: dropped,
/// `bad_tcp_flags` / `bad_source`), its counter moves by one, and the conntrack and affinity maps
/// stay empty and no SNAT port is claimed. A valid SYN at the end does create all three (so the
/// emptiness checks can fail).
fn xdp_invalid_packets_create_no_state(hook: Hook) {
    if !common::ready("xdp_invalid_packets_create_no_state") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        let c = client(0);
        let from = |src: Ipv4Addr, flags: u8| {
            Tcp::new((src, 40000), (VIP, 80), flags)
                .macs(CLIENT_MAC, [0xaa; 6])
                .build()
        };
        let syn = from(c, SYN);
        let empty = lb::datapath::xdp::KernelState::default();
        assert_eq!(fx.xdp.kernel_state(), empty, "nothing before the first packet");
        let pass = |name: &'static str, input: Vec<u8>, counts: &'static str| Case {
            name,
            input,
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: Some(counts),
        };
        let drop = |name: &'static str, input: Vec<u8>, counts: &'static str| Case {
            name,
            input,
            verdict: XDP_DROP,
            out: Out::Any,
            counts: Some(counts),
        };
        let cases = [
            pass(
                "IP total length larger than the frame",
                edited(&syn, |f| set_total_length(f, 40 + 100)),
                "truncated",
            ),
            pass(
                "IP total length smaller than the IP header",
                edited(&syn, |f| set_total_length(f, 16)),
                "malformed",
            ),
            pass(
                "IP total length with no room for the TCP header",
                edited(&syn, |f| set_total_length(f, 30)),
                "malformed",
            ),
            pass("IHL below 5", edited(&syn, |f| f[14] = 0x44), "malformed"),
            pass(
                "IHL beyond the total length",
                edited(&syn, |f| f[14] = 0x4f),
                "malformed",
            ),
            pass(
                "TCP data offset beyond the packet",
                edited(&syn, |f| f[14 + 20 + 12] = 15 << 4),
                "malformed",
            ),
            pass(
                "TCP data offset beyond the IP total length (bytes after it are padding)",
                edited(&syn, |f| {
                    f[14 + 20 + 12] = 8 << 4;
                    f.extend_from_slice(&[1; 12]);
                }),
                "malformed",
            ),
            pass(
                "TCP data offset below 5",
                edited(&syn, |f| f[14 + 20 + 12] = 4 << 4),
                "malformed",
            ),
            drop("SYN+RST", from(c, SYN | RST), "bad_tcp_flags"),
            drop("SYN+FIN", from(c, SYN | FIN), "bad_tcp_flags"),
            drop("SYN+ACK+FIN", from(c, SYN | ACK | FIN), "bad_tcp_flags"),
            drop(
                "SYN+FIN to the host's own address (not a VIP) is dropped too",
                Tcp::new((c, 40000), (Ipv4Addr::new(10, 0, 0, 1), 22), SYN | FIN)
                    .macs(CLIENT_MAC, [0xaa; 6])
                    .build(),
                "bad_tcp_flags",
            ),
            drop("source 0.0.0.0", from(Ipv4Addr::UNSPECIFIED, SYN), "bad_source"),
            drop(
                "source in 0.0.0.0/8",
                from(Ipv4Addr::new(0, 1, 2, 3), SYN),
                "bad_source",
            ),
            drop(
                "source 255.255.255.255",
                from(Ipv4Addr::BROADCAST, SYN),
                "bad_source",
            ),
            drop(
                "source multicast 224.0.0.1",
                from(Ipv4Addr::new(224, 0, 0, 1), SYN),
                "bad_source",
            ),
            drop(
                "source multicast 239.255.255.250",
                from(Ipv4Addr::new(239, 255, 255, 250), SYN),
                "bad_source",
            ),
            drop(
                "source loopback 127.0.0.1",
                from(Ipv4Addr::LOCALHOST, SYN),
                "bad_source",
            ),
            drop(
                "source loopback 127.9.9.9",
                from(Ipv4Addr::new(127, 9, 9, 9), SYN),
                "bad_source",
            ),
            drop("source the VIP itself", from(VIP, SYN), "bad_source"),
        ];
        for case in &cases {
            run_cases(&fx, client_if, std::slice::from_ref(case));
            assert_eq!(
                fx.xdp.kernel_state(),
                empty,
                "{}: no conntrack, affinity or SNAT state",
                case.name
            );
        }
        assert_eq!(fx.counter("new_flows"), 0);
        // The packets that may pass here are only the host's: none was forwarded.
        assert_eq!(fx.counter("forwarded"), 0);

        // A valid SYN, Ethernet-padded (frame longer than the IP total length, as on the wire):
        // forwarded, and now there is state.
        let mut padded = syn.clone();
        padded.resize(60, 0);
        let (verdict, _, _) = fx.xdp.test_run(&padded, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "a valid padded SYN is forwarded");
        let state = fx.xdp.kernel_state();
        assert_eq!(state.conntrack, 2, "both directions recorded: {state:?}");
        assert_eq!(
            state.affinity, 0,
            "no affinity before the handshake completes: {state:?}"
        );
        assert!(state.snat_cursors >= 1, "a SNAT port claimed: {state:?}");
        // The client's ACK completes the handshake: now its affinity entry is written.
        assert_eq!(
            fx.xdp.test_run(&from(c, ACK), client_if, 1).unwrap().0,
            XDP_REDIRECT
        );
        let state = fx.xdp.kernel_state();
        assert_eq!(state.affinity, 1, "{state:?}");
        // SYNs from addresses that never complete a handshake (spoofed) add no affinity entry, so
        // they cannot push real clients' entries out of the LRU map.
        for i in 0..50u32 {
            let spoofed = from(Ipv4Addr::from(0x0b63_0000 + i), SYN);
            assert_eq!(fx.xdp.test_run(&spoofed, client_if, 1).unwrap().0, XDP_REDIRECT);
        }
        assert_eq!(fx.xdp.kernel_state().affinity, 1);
        let state = fx.xdp.kernel_state();
        // An invalid packet of that same connection still changes nothing: SYN+FIN on its tuple
        // is dropped before the conntrack lookup.
        let (verdict, _, _) = fx.xdp.test_run(&from(c, SYN | FIN), client_if, 1).unwrap();
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(fx.xdp.kernel_state(), state);
    });
}

/// The suppressed count of a rate-limited kernel log line.
fn suppressed_in(line: &str) -> u64 {
    let head = line
        .split(" such lines suppressed")
        .next()
        .filter(|h| h.len() < line.len())
        .unwrap_or_else(|| panic!("no suppressed count in {line:?}"));
    head.rsplit([' ', '(', ';'])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suppressed count in {line:?}"))
}

/// Issue 11 item 3 (logs): a flood of packets that each have a reason to log (here no route
/// toward the backend) writes a few lines a second, not one per packet; the next line written
/// reports how many were held back. Every packet is accounted for: lines written + the counts they
/// report = packets. The test's thread stays on one CPU (the limit's state is per CPU).
fn xdp_kernel_log_lines_are_rate_limited(hook: Hook) {
    if !common::ready("xdp_kernel_log_lines_are_rate_limited") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let mut cpu = nix::sched::CpuSet::new();
        cpu.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).expect("pin to CPU 0");
        let fx = Fixture::new(hook);
        // The backends become unreachable: every SYN's FIB lookup fails.
        let out = std::process::Command::new("ip")
            .args(["route", "add", "unreachable", "10.1.1.0/28"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let _ = fx.xdp.read_program_logs().unwrap();
        const FLOOD: u16 = 500;
        let started = Instant::now();
        for port in 0..FLOOD {
            let syn = frame((client(1), 20000 + port), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
            assert_eq!(fx.xdp.test_run(&syn, client_if, 1).unwrap().0, XDP_DROP);
        }
        let elapsed = started.elapsed();
        assert_eq!(fx.counter("fib_failed"), u64::from(FLOOD));
        let burst = fx.xdp.read_program_logs().unwrap();
        let cpus = aya::util::nr_cpus().expect("CPU count") as u64;
        let interval = std::time::Duration::from_millis(250 * cpus);
        eprintln!(
            "{FLOOD} packets in {elapsed:?}: {} lines (one per {interval:?} per CPU)\n{}",
            burst.len(),
            burst.join("\n")
        );
        assert!(!burst.is_empty(), "the first packet's line is written");
        let allowed = 1 + (elapsed.as_millis() / interval.as_millis()) as usize;
        assert!(
            burst.len() <= allowed,
            "{} lines for {FLOOD} packets in {elapsed:?} (at most {allowed})",
            burst.len()
        );
        assert!(
            burst
                .iter()
                .all(|l| l.contains("no route for rewritten packet to 10.1.1."))
        );
        // After the interval one more packet writes a line carrying the count held back.
        std::thread::sleep(interval + std::time::Duration::from_millis(100));
        let syn = frame((client(1), 19999), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        assert_eq!(fx.xdp.test_run(&syn, client_if, 1).unwrap().0, XDP_DROP);
        let next = fx.xdp.read_program_logs().unwrap();
        assert_eq!(next.len(), 1, "{next:?}");
        let lines: Vec<&String> = burst.iter().chain(&next).collect();
        let reported: u64 = lines.iter().map(|l| suppressed_in(l)).sum();
        assert!(
            suppressed_in(&next[0]) > 0,
            "the next line reports the held-back lines: {}",
            next[0]
        );
        assert_eq!(
            reported + lines.len() as u64,
            u64::from(FLOOD) + 1,
            "every packet is either a line or counted in one: {lines:?}"
        );
    });
}

/// New flows share their CPU's recent FIB answers (lb-ebpf's `hop`): a neighbour that changed is
/// still reached at its old address by a new flow within the second an answer is trusted (the same
/// second a flow trusts its own copy), and at its new one by new and established flows after it.
fn xdp_new_flows_follow_a_changed_neighbour_after_the_cache_time(hook: Hook) {
    if !common::ready("xdp_new_flows_follow_a_changed_neighbour_after_the_cache_time") {
        return;
    }
    in_fixture_netns(1, 3, |client_if, _| {
        // The test runs share one CPU's answers.
        common::pin_to_one_cpu();
        let fx = Fixture::new(hook);
        let c = client(0);
        let backend = fx.ring_choice(c);
        let old_mac = backend_mac(backend.octets()[3] - 1);
        let new_mac = [0x02, 0, 0, 0, 9, 9];
        let syn = |port: u16| frame((c, port), (VIP, 80), SYN, b"", &[], [0xaa; 6]);
        let to_backend = |f: &[u8]| {
            let (verdict, out, _) = fx.xdp.test_run(f, client_if, 1).unwrap();
            assert_eq!(verdict, XDP_REDIRECT);
            let p = parse(&out);
            assert_eq!(p.dst.0, backend, "the ring's backend");
            p.dst_mac
        };
        let asked = std::time::Instant::now();
        assert_eq!(to_backend(&syn(41000)), old_mac, "the neighbour table's answer");
        let replaced = std::process::Command::new("ip")
            .args(["neigh", "replace", &backend.to_string(), "lladdr"])
            .arg(lb_tests::fixture::mac_text(new_mac))
            .args(["dev", lb_tests::fixture::BACKEND_LINK, "nud", "permanent"])
            .status()
            .expect("ip neigh replace");
        assert!(replaced.success(), "ip neigh replace: {replaced}");
        let second = to_backend(&syn(41001));
        // `ip` waits for the kernel's rtnl lock, which a namespace torn down by another test can
        // hold for over a second: past the answer's second the check cannot be judged.
        if asked.elapsed() < Duration::from_millis(800) {
            assert_eq!(
                second, old_mac,
                "a new flow takes the CPU's answer of a moment ago"
            );
        } else {
            eprintln!(
                "NOTE: `ip neigh replace` took {:?}; the cached answer may have expired, not judged",
                asked.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(
            to_backend(&syn(41002)),
            new_mac,
            "a new flow asks again after a second"
        );
        let ack = frame((c, 41000), (VIP, 80), ACK, b"", &[], [0xaa; 6]);
        assert_eq!(to_backend(&ack), new_mac, "an established flow too");
    });
}

/// A backend added on the kernel index of one removed before it (here the only free one) starts
/// with its counters at 0, not at the totals of the one that had the index.
fn xdp_a_backend_on_a_reused_index_starts_with_zero_counters(hook: Hook) {
    if !common::ready("xdp_a_backend_on_a_reused_index_starts_with_zero_counters") {
        return;
    }
    in_fixture_netns(1, 4, |client_if, _| {
        let sizes = lb::config::XdpConfig {
            max_backends: 3,
            ..common::sizes(hook)
        };
        let mut fx = Fixture {
            state: State::new(0, RING),
            xdp: XdpDatapath::start_unattached(&sizes, 0, RING).expect("load the datapath program"),
        };
        fx.apply(Command::AddService { service: service() });
        let (verdict, out, _) = fx
            .xdp
            .test_run(&frame_seq((client(0), 43000), (VIP, 80), SYN, 1000), client_if, 1)
            .unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let used = std::net::SocketAddr::from((parse(&out).dst.0, 8080));
        let id_of = |fx: &Fixture, address: std::net::SocketAddr| {
            let svc = fx.state.service("web").unwrap();
            svc.backends
                .iter()
                .find(|b| b.config.address == address)
                .unwrap()
                .id
        };
        let before = fx.xdp.backend_traffic("web")[&id_of(&fx, used)].traffic;
        assert_eq!(
            (before.packets_in, before.new_flows),
            (1, 1),
            "the SYN is counted"
        );
        fx.apply(Command::RemoveBackend {
            service: "web".into(),
            backend: used.to_string(),
        });
        let b4: std::net::SocketAddr = format!("{}:8080", backend_ip(4)).parse().unwrap();
        fx.apply(Command::AddBackend {
            service: "web".into(),
            backend: BackendConfig {
                name: "b4".into(),
                address: b4,
                weight: 1,
                backup: false,
                state: AdminState::Active,
                route: "b4".into(),
            },
        });
        let after = fx.xdp.backend_traffic("web")[&id_of(&fx, b4)].traffic;
        assert_eq!(
            after,
            lb_common::maps::TrafficCounters::default(),
            "b4 starts at 0"
        );
    });
}

fn service() -> ServiceConfig {
    common::xdp_service(
        (1..=3)
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                address: format!("{}:8080", backend_ip(i)).parse().unwrap(),
                weight: 1,
                backup: false,
                state: AdminState::Active,
                route: format!("b{i}"),
            })
            .collect(),
    )
}

lb_tests::per_hook!(
    xdp_nat_forward_reply_and_affinity,
    xdp_drain_keeps_known_clients_down_refuses,
    xdp_passes_or_drops_what_is_not_forwardable,
    xdp_no_backend_drops_syn,
    xdp_translates_tcp_timestamps_toward_the_backend,
    xdp_syn_on_a_reused_tuple_starts_a_new_flow,
    xdp_blind_syn_and_rst_do_not_end_an_established_flow,
    xdp_syn_on_a_closed_reused_tuple_replaces_its_entry,
    xdp_affinity_hit_refreshes_last_seen_after_a_step,
    xdp_answers_a_packet_without_connection_with_rst,
    xdp_resets_are_rate_limited,
    xdp_reset_backend_answers_both_ends_with_rst,
    xdp_a_backend_on_a_reused_index_starts_with_zero_counters,
    xdp_invalid_packets_create_no_state,
    xdp_kernel_log_lines_are_rate_limited,
    xdp_new_flows_follow_a_changed_neighbour_after_the_cache_time,
);
