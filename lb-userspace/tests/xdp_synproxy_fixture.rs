//! Packet fixtures for the XDP SYN proxy (`[xdp] syn_cookies = "on"`): the cookie SYN-ACK, a bad
//! cookie ACK (no state), a good one (the SYN toward the backend with the client's ISN), the
//! backend's SYN-ACK turned into its ACK, and data both ways translated. BPF_PROG_TEST_RUN inside a
//! private namespace (lb_tests::fixture) whose neighbours give `bpf_fib_lookup` real answers; state
//! seeded through the datapath's public API. Needs root and the embedded eBPF object.

mod common;

use common::Hook;

use common::{
    CLIENT_MAC, LB_BACKEND_SIDE, RING, VIP, XDP_DROP, XDP_REDIRECT, backend_ip, backend_mac, client,
    in_fixture_netns,
};

use std::net::Ipv4Addr;

use lb::config::{AdminState, BackendConfig, SynCookies, XdpConfig};
use lb::datapath::Datapath;
use lb::datapath::xdp::{KernelState, XdpDatapath};
use lb::state::{Command, State};
use lb_tests::packet::flags::{ACK, PSH, RST, SYN};
use lb_tests::packet::{self, Parsed, Tcp, syn_options};

const LB_MAC: [u8; 6] = [0xaa; 6];

struct Fixture {
    state: State,
    xdp: XdpDatapath,
}

impl Fixture {
    fn new(hook: Hook) -> Fixture {
        Fixture::with(XdpConfig {
            mode: common::mode(hook),
            syn_cookies: SynCookies::On,
            ..XdpConfig::default()
        })
    }

    fn with(sizes: XdpConfig) -> Fixture {
        let xdp = XdpDatapath::start_unattached(&sizes, 0, RING).expect("load XDP program");
        assert!(
            xdp.syn_cookies_on(),
            "syn_cookies = \"on\" switches cookies on at start"
        );
        let mut state = State::new(0, RING);
        let service = common::xdp_service(
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
        );
        let effect = state.apply(Command::AddService { service }).expect("add service");
        let snapshot = lb::runtime::Snapshot::new(state.clone());
        xdp.apply(&effect, &snapshot).expect("datapath applies");
        Fixture { state, xdp }
    }

    fn ring_choice(&self, client: Ipv4Addr) -> Ipv4Addr {
        common::ring_choice(&self.state, client)
    }

    fn counter(&self, name: &str) -> u64 {
        common::counter(&self.xdp, name)
    }

    /// Runs `frame` arriving on `ifindex`: the verdict must be a redirect; the output parsed
    /// (both checksums verified).
    fn run(&self, frame: &[u8], ifindex: u32, what: &str) -> (Parsed, usize) {
        let (verdict, out, _) = self.xdp.test_run(frame, ifindex, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "{what}: verdict");
        let p = packet::parse(&out).unwrap_or_else(|e| panic!("{what}: output frame: {e}"));
        (p, out.len())
    }
}

fn from_client(c: Ipv4Addr, port: u16, flags: u8, seq: u32, ack: u32) -> Tcp {
    let mut t = Tcp::new((c, port), (VIP, 80), flags)
        .macs(CLIENT_MAC, LB_MAC)
        .seq(seq)
        .ack(ack);
    t.window = 502;
    t
}

/// The cookie SYN-ACK answering a SYN from `c`:`port` with initial sequence number `isn`.
fn cookie_syn_ack(fx: &Fixture, client_if: u32, c: Ipv4Addr, port: u16, isn: u32) -> u32 {
    let syn = from_client(c, port, SYN, isn, 0)
        .tcp_options(&syn_options(77, 0))
        .build();
    let (p, len) = fx.run(&syn, client_if, "cookie SYN-ACK");
    assert_eq!(len, 14 + 20 + 24, "Ethernet, IPv4, TCP with the MSS option");
    assert_eq!(
        (p.src, p.dst),
        ((VIP, 80), (c, port)),
        "back to the client from the VIP"
    );
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_MAC), "MACs swapped");
    assert_eq!(p.flags, SYN | ACK);
    assert_eq!(p.ack, isn.wrapping_add(1));
    assert_eq!(
        p.tcp_options,
        [2, 4, 0x05, 0xb4],
        "MSS 1460 only: no SACK, timestamps, window scale"
    );
    assert_eq!(p.window, 65535);
    assert!(p.payload.is_empty());
    p.seq
}

fn xdp_cookie_syn_ack_and_bad_cookie_acks_keep_no_state(hook: Hook) {
    if !common::ready("xdp_cookie_syn_ack_and_bad_cookie_acks_keep_no_state") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let fx = Fixture::new(hook);
        let c = client(0);
        let empty = KernelState::default();
        let isn = 0x1111_2222;
        let cookie = cookie_syn_ack(&fx, client_if, c, 40000, isn);
        assert_eq!(fx.counter("cookies_sent"), 1);
        assert_eq!(fx.xdp.kernel_state(), empty, "a cookie SYN-ACK keeps no state");
        // The same SYN again (its SYN-ACK was lost): the same cookie.
        assert_eq!(cookie_syn_ack(&fx, client_if, c, 40000, isn), cookie);
        // Another ISN or port: another cookie.
        assert_ne!(cookie_syn_ack(&fx, client_if, c, 40000, isn + 1), cookie);
        assert_ne!(cookie_syn_ack(&fx, client_if, c, 40001, isn), cookie);

        // ACKs whose cookie does not check: an RST each, and still no state.
        let bad = [
            (
                "wrong acknowledgment",
                from_client(c, 40000, ACK, isn + 1, cookie.wrapping_add(2)),
            ),
            (
                "wrong sequence number",
                from_client(c, 40000, ACK, isn + 2, cookie.wrapping_add(1)),
            ),
            (
                "another port",
                from_client(c, 40002, ACK, isn + 1, cookie.wrapping_add(1)),
            ),
            (
                "another client",
                from_client(client(1), 40000, ACK, isn + 1, cookie.wrapping_add(1)),
            ),
        ];
        for (i, (what, t)) in bad.into_iter().enumerate() {
            let ack = t.ack;
            let (p, _) = fx.run(&t.payload(b"GET / HTTP/1.1\r\n\r\n").build(), client_if, what);
            assert_eq!(p.flags, RST, "{what}: answered with an RST");
            assert_eq!(
                p.seq, ack,
                "{what}: the RST's sequence number is the ACK's acknowledgment"
            );
            assert_eq!(fx.counter("cookie_invalid"), i as u64 + 1, "{what}");
            assert_eq!(
                fx.xdp.kernel_state(),
                empty,
                "{what}: no conntrack, affinity or SNAT port"
            );
        }
        assert_eq!(fx.counter("cookie_valid"), 0);
        assert_eq!(fx.counter("new_flows"), 0);

        // A SYN whose IPv4 header carries options (a NOP word): dropped, no state (it used to
        // take the path without cookies and open a flow).
        let with_options = from_client(c, 40003, SYN, isn, 0)
            .ip_options(&[1, 1, 1, 1])
            .tcp_options(&syn_options(77, 0))
            .build();
        let (verdict, _, _) = fx.xdp.test_run(&with_options, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_DROP, "a SYN with IP options while cookies are on");
        assert_eq!(fx.counter("syn_ip_options"), 1);
        assert_eq!(
            fx.xdp.kernel_state(),
            empty,
            "no conntrack, affinity or SNAT port"
        );
        assert_eq!(fx.counter("new_flows"), 0);
    });
}

fn xdp_cookie_handshake_and_translated_data_both_ways(hook: Hook) {
    if !common::ready("xdp_cookie_handshake_and_translated_data_both_ways") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook);
        let c = client(0);
        let want = fx.ring_choice(c);
        let want_mac = backend_mac(want.octets()[3] - 1);
        let isn = 0xffff_fff0; // wraps within the test
        let cookie = cookie_syn_ack(&fx, client_if, c, 40000, isn);

        // The client's ACK (54 bytes: the frame grows by the MSS option) becomes the SYN toward
        // the backend, with an initial sequence number from the LB's clock (TIME_WAIT on the
        // backend accepts it) instead of the client's.
        let ack = from_client(c, 40000, ACK, isn.wrapping_add(1), cookie.wrapping_add(1)).build();
        let (p, len) = fx.run(&ack, client_if, "cookie ACK");
        assert_eq!(len, 14 + 20 + 24);
        assert_eq!(p.dst, (want, 8080), "the ring's backend");
        assert_eq!(p.src.0, LB_BACKEND_SIDE);
        assert!((10000..=29999).contains(&p.src.1));
        assert_eq!(p.dst_mac, want_mac);
        assert_eq!((p.flags, p.ack), (SYN, 0), "a SYN");
        let isn_b = p.seq;
        assert_ne!(isn_b, isn, "the LB's ISN toward the backend, not the client's");
        assert_eq!(
            p.tcp_options,
            [2, 4, 0x05, 0xb4],
            "the client's MSS from the cookie"
        );
        assert_eq!(p.window, 502, "the client's window");
        let snat = p.src;
        assert_eq!(fx.counter("cookie_valid"), 1);
        assert_eq!(fx.counter("new_flows"), 1);
        let st = fx.xdp.kernel_state();
        assert_eq!(
            (st.conntrack, st.affinity),
            (2, 1),
            "both entries and the affinity"
        );

        // Client data before the backend answered: the SYN once more, data dropped.
        let early = from_client(c, 40000, ACK | PSH, isn.wrapping_add(1), cookie.wrapping_add(1))
            .payload(b"early")
            .build();
        let (p, _) = fx.run(&early, client_if, "early data");
        assert_eq!((p.dst, p.src, p.flags, p.seq), ((want, 8080), snat, SYN, isn_b));
        assert!(p.payload.is_empty());
        assert_eq!(fx.counter("cookie_syn_resent"), 1);

        // The backend still holds an earlier connection on this SNAT 4-tuple and answers the SYN
        // with a bare ACK: the LB resets that connection (an RST from the ACK's own numbers, back
        // to the backend) and the flow stays half-open for the SYN's next try.
        let stale_ack = 0x7777_0000u32;
        let bare = Tcp::new((want, 8080), snat, ACK)
            .macs(want_mac, LB_MAC)
            .seq(0x0123_4567)
            .ack(stale_ack)
            .build();
        let (p, len) = fx.run(&bare, backend_if, "backend's bare ACK to the SYN");
        assert_eq!(len, 14 + 20 + 20);
        assert_eq!((p.src, p.dst, p.dst_mac), (snat, (want, 8080), want_mac));
        assert_eq!(
            (p.flags, p.seq),
            (RST, stale_ack),
            "an RST with the ACK's own number"
        );
        assert_eq!(fx.counter("stale_collision"), 1);
        let (p, _) = fx.run(&early, client_if, "early data once more");
        assert_eq!((p.dst, p.src, p.flags, p.seq), ((want, 8080), snat, SYN, isn_b));
        assert_eq!(fx.counter("cookie_syn_resent"), 2);

        // The backend's SYN-ACK becomes its ACK, sent back where it came from.
        let backend_isn = 0x0000_0100u32;
        let syn_ack = Tcp::new((want, 8080), snat, SYN | ACK)
            .macs(want_mac, LB_MAC)
            .seq(backend_isn)
            .ack(isn_b.wrapping_add(1))
            .tcp_options(&syn_options(5, 77))
            .build();
        let (p, len) = fx.run(&syn_ack, backend_if, "backend SYN-ACK");
        assert_eq!(len, 14 + 20 + 20, "no options");
        assert_eq!((p.src, p.dst), (snat, (want, 8080)));
        assert_eq!((p.dst_mac, p.src_mac), (want_mac, LB_MAC));
        assert_eq!(p.flags, ACK);
        assert_eq!(
            (p.seq, p.ack),
            (isn_b.wrapping_add(1), backend_isn.wrapping_add(1))
        );
        assert_eq!(p.window, 502);
        assert!(p.tcp_options.is_empty() && p.payload.is_empty());

        // Client → backend: both numbers move into the backend side's sequence spaces.
        let request = b"GET / HTTP/1.1\r\n\r\n";
        let data = from_client(c, 40000, ACK | PSH, isn.wrapping_add(1), cookie.wrapping_add(1))
            .payload(request)
            .build();
        let (p, _) = fx.run(&data, client_if, "client data");
        assert_eq!((p.src, p.dst), (snat, (want, 8080)));
        assert_eq!(
            (p.seq, p.ack),
            (isn_b.wrapping_add(1), backend_isn.wrapping_add(1))
        );
        assert_eq!(p.payload, request);

        // Backend → client: back into the cookie's and the client's.
        let answer = b"HTTP/1.1 200 OK\r\n\r\n";
        let reply = Tcp::new((want, 8080), snat, ACK | PSH)
            .macs(want_mac, LB_MAC)
            .seq(backend_isn.wrapping_add(1))
            .ack(isn_b.wrapping_add(1 + request.len() as u32))
            .payload(answer)
            .build();
        let (p, _) = fx.run(&reply, backend_if, "backend data");
        assert_eq!((p.src, p.dst), ((VIP, 80), (c, 40000)));
        assert_eq!(
            (p.seq, p.ack),
            (cookie.wrapping_add(1), isn.wrapping_add(1 + request.len() as u32))
        );
        assert_eq!(p.payload, answer);
        assert_eq!(fx.counter("new_flows"), 1, "one connection");

        // Blind RSTs far from either sender's next sequence number (each in its own space: the
        // client's, the backend's) are forwarded for the endpoints to judge, and end nothing here.
        let c_next = isn.wrapping_add(1 + request.len() as u32);
        let b_next = backend_isn.wrapping_add(1 + answer.len() as u32);
        let blind_client = from_client(c, 40000, RST, c_next.wrapping_sub(1 << 20), 0).build();
        let blind_backend = Tcp::new((want, 8080), snat, RST)
            .macs(want_mac, LB_MAC)
            .seq(b_next.wrapping_sub(1 << 20))
            .build();
        for (frame, ifindex, what) in [
            (&blind_client, client_if, "client RST 1 MiB behind"),
            (&blind_backend, backend_if, "backend RST 1 MiB behind"),
            (
                &blind_backend,
                client_if,
                "backend RST spoofed from the client's side",
            ),
        ] {
            assert_ne!(fx.xdp.test_run(frame, ifindex, 1).unwrap().0, XDP_DROP, "{what}");
        }
        assert_eq!(fx.counter("rst_not_taken"), 3);
        let (p, _) = fx.run(&reply, backend_if, "backend data after the blind RSTs");
        assert_eq!(p.dst, (c, 40000), "still translated on the flow");

        // A SYN with another ISN on the open connection (a blind attacker's, or a client that
        // lost its side): it goes to the backend on the flow, whose stack answers with a
        // challenge ACK; no cookie, no new flow.
        let isn2 = 0x4444_0000;
        let syn2 = from_client(c, 40000, SYN, isn2, 0)
            .tcp_options(&syn_options(77, 0))
            .build();
        let (p, _) = fx.run(&syn2, client_if, "SYN on the open connection");
        assert_eq!((p.src, p.dst, p.flags), (snat, (want, 8080), SYN));
        assert_eq!(fx.counter("cookies_sent"), 1, "no cookie for it");
        // The client answers the challenge with an RST: the connection is over.
        let rst = from_client(c, 40000, RST, isn.wrapping_add(1 + request.len() as u32), 0).build();
        fx.run(&rst, client_if, "the client's RST");

        // The client reuses its port for a new connection (a new ISN): its cookie ACK sets up a
        // new flow (a SYN toward a backend) instead of riding the old one.
        let cookie2 = cookie_syn_ack(&fx, client_if, c, 40000, isn2);
        let ack2 = from_client(c, 40000, ACK, isn2 + 1, cookie2.wrapping_add(1)).build();
        let (p, _) = fx.run(&ack2, client_if, "cookie ACK on a reused 4-tuple");
        assert_eq!(
            (p.dst, p.flags, p.ack),
            ((want, 8080), SYN, 0),
            "a new SYN to the backend"
        );
        assert_ne!(p.src, snat, "on a new SNAT port");
        assert_eq!(fx.counter("new_flows"), 2);
    });
}

fn xdp_cookie_ack_without_a_snat_port_is_reset(hook: Hook) {
    if !common::ready("xdp_cookie_ack_without_a_snat_port_is_reset") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let sizes = XdpConfig {
            mode: common::mode(hook),
            syn_cookies: SynCookies::On,
            snat_ports: (20000, 20000),
            ..XdpConfig::default()
        };
        let xdp = XdpDatapath::start_unattached(&sizes, 0, RING).expect("load XDP program");
        let mut state = State::new(0, RING);
        let service = common::xdp_service(vec![BackendConfig {
            name: "b1".into(),
            address: format!("{}:8080", backend_ip(1)).parse().unwrap(),
            weight: 1,
            backup: false,
            state: AdminState::Active,
            route: "b1".into(),
        }]);
        let effect = state.apply(Command::AddService { service }).unwrap();
        xdp.apply(&effect, &lb::runtime::Snapshot::new(state.clone()))
            .unwrap();
        let fx = Fixture { state, xdp };
        // The one SNAT port goes to the first client's connection.
        let first = cookie_syn_ack(&fx, client_if, client(0), 40000, 1000);
        let ack = from_client(client(0), 40000, ACK, 1001, first.wrapping_add(1)).build();
        let (p, _) = fx.run(&ack, client_if, "first cookie ACK");
        assert_eq!((p.flags, p.src.1), (SYN, 20000));
        let before = fx.xdp.kernel_state();
        // The second client's handshake completed on its side: with no port it learns by an RST
        // at once instead of a connection that never answers.
        let second = cookie_syn_ack(&fx, client_if, client(1), 40000, 2000);
        let ack = from_client(client(1), 40000, ACK, 2001, second.wrapping_add(1)).build();
        let (p, _) = fx.run(&ack, client_if, "second cookie ACK");
        assert_eq!(
            (p.flags, p.dst, p.seq),
            (RST, (client(1), 40000), second.wrapping_add(1))
        );
        assert_eq!(fx.counter("snat_exhausted"), 1);
        assert_eq!(
            fx.xdp.kernel_state().conntrack,
            before.conntrack,
            "no entry for it"
        );
    });
}

/// A SYN-cookie connection's SYN toward the backend carries no timestamps, so the backend's
/// TIME_WAIT on that SNAT 4-tuple judges the next SYN by its sequence number alone and turns down
/// about half of them with a bare ACK (seen after SYN floods: a refused connect). The next flow on
/// the port is held: that bare ACK is a collision, passed to the client (whose RST clears the
/// TIME_WAIT for its SYN's next try), never an RST that refuses it.
fn xdp_a_port_a_cookie_connection_used_is_held_for_the_next_flow(hook: Hook) {
    if !common::ready("xdp_a_port_a_cookie_connection_used_is_held_for_the_next_flow") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, backend_if| {
        // One SNAT port, so the second connection takes the first one's.
        let fx = Fixture::with(XdpConfig {
            mode: common::mode(hook),
            syn_cookies: SynCookies::On,
            snat_ports: (10000, 10000),
            ..XdpConfig::default()
        });
        let c = client(0);
        let want = fx.ring_choice(c);
        let want_mac = backend_mac(want.octets()[3] - 1);
        let isn = 5000;
        let cookie = cookie_syn_ack(&fx, client_if, c, 40000, isn);
        let ack = from_client(c, 40000, ACK, isn + 1, cookie.wrapping_add(1)).build();
        let (p, _) = fx.run(&ack, client_if, "cookie ACK");
        let (snat, isn_b) = (p.src, p.seq);
        assert_eq!(snat.1, 10000);
        let syn_ack = Tcp::new((want, 8080), snat, SYN | ACK)
            .macs(want_mac, LB_MAC)
            .seq(700)
            .ack(isn_b.wrapping_add(1))
            .build();
        fx.run(&syn_ack, backend_if, "backend SYN-ACK");
        // The client ends it; its port is lent 100 ms after the reset.
        fx.run(
            &from_client(c, 40000, RST, isn + 1, 0).build(),
            client_if,
            "client RST",
        );
        std::thread::sleep(std::time::Duration::from_millis(200));

        fx.xdp.set_syn_cookies(false).unwrap();
        let syn = from_client(c, 40001, SYN, 9, 0)
            .tcp_options(&syn_options(1, 0))
            .build();
        let (p, _) = fx.run(&syn, client_if, "SYN without cookies");
        assert_eq!(
            (p.src, p.dst, p.flags),
            (snat, (want, 8080), SYN),
            "on the same port"
        );
        // The backend's TIME_WAIT of the cookie connection turns it down.
        let bare = Tcp::new((want, 8080), snat, ACK)
            .macs(want_mac, LB_MAC)
            .seq(701)
            .ack(isn_b.wrapping_add(1))
            .build();
        let (p, _) = fx.run(&bare, backend_if, "backend's bare ACK");
        assert_eq!(p.dst, (c, 40001));
        assert_eq!(
            p.flags, ACK,
            "passed on as a collision, not an RST that refuses the client"
        );
        assert_eq!(fx.counter("stale_collision"), 1);
    });
}

fn xdp_cookies_off_answers_nothing_from_xdp(hook: Hook) {
    if !common::ready("xdp_cookies_off_answers_nothing_from_xdp") {
        return;
    }
    in_fixture_netns(3, 3, |client_if, _| {
        let sizes = XdpConfig {
            mode: common::mode(hook),
            syn_cookies: SynCookies::Auto,
            ..XdpConfig::default()
        };
        // "auto" starts off: a SYN is forwarded to a backend as without cookies.
        let xdp = XdpDatapath::start_unattached(&sizes, 0, RING).expect("load XDP program");
        assert!(!xdp.syn_cookies_on());
        let mut state = State::new(0, RING);
        let service = common::xdp_service(vec![BackendConfig {
            name: "b1".into(),
            address: format!("{}:8080", backend_ip(1)).parse().unwrap(),
            weight: 1,
            backup: false,
            state: AdminState::Active,
            route: "b1".into(),
        }]);
        let effect = state.apply(Command::AddService { service }).unwrap();
        xdp.apply(&effect, &lb::runtime::Snapshot::new(state.clone()))
            .unwrap();
        let syn = from_client(client(0), 40000, SYN, 9, 0)
            .tcp_options(&syn_options(1, 0))
            .build();
        let (verdict, out, _) = xdp.test_run(&syn, client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT);
        let p = packet::parse(&out).unwrap();
        assert_eq!((p.dst, p.flags, p.seq), ((backend_ip(1), 8080), SYN, 9));
        assert_eq!(
            p.tcp_options,
            syn_options(p.timestamps().unwrap().0, 0),
            "options kept"
        );
    });
}

lb_tests::per_hook!(
    xdp_cookie_syn_ack_and_bad_cookie_acks_keep_no_state,
    xdp_cookie_handshake_and_translated_data_both_ways,
    xdp_cookie_ack_without_a_snat_port_is_reset,
    xdp_cookies_off_answers_nothing_from_xdp,
    xdp_a_port_a_cookie_connection_used_is_held_for_the_next_flow,
);
