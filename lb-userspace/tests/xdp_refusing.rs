//! Kernel passive health under BPF_PROG_TEST_RUN (issue #12): a backend's RST answering a
//! forwarded SYN is counted as refused and marks the backend refusing; the next SYN whose choice
//! it is goes to another primary (the next ring slots), and once every primary refuses, to the
//! healthy backup. SYN-ACKs are counted as answers, once per connection. A bare ACK of an old
//! connection answering a SYN (TIME_WAIT with no listener) from a backend that answered no SYN-ACK
//! since the SYN left becomes an RST to the client, and the second in a row marks the backend;
//! from a backend that did answer a SYN-ACK since, or to a SYN without timestamps, it is a
//! collision, forwarded as it is, and so is one on a SNAT port with no entry for a minute after a
//! start that made its maps (the backend may hold an earlier instance's connection there). Needs root and the embedded
//! eBPF object (`cargo xtask test` provides both).

mod common;

use common::Hook;

use common::{CLIENT_MAC, LB_BACKEND_SIDE, RING, VIP, XDP_REDIRECT, backend_ip, in_fixture_netns};

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use lb::balancer::Balancer;
use lb::config::{AdminState, BackendConfig};
use lb::datapath::Datapath;
use lb::datapath::xdp::XdpDatapath;
use lb::state::{Command, State};
use lb_common::passive::PassiveCounters;
use lb_tests::packet::flags::{ACK, RST, SYN};
use lb_tests::packet::{self, Tcp};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// b1 and b2 primaries, b3 a backup.
fn service() -> lb::config::ServiceConfig {
    common::xdp_service(
        (1..=3u8)
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                address: format!("{}:8080", backend_ip(i)).parse().unwrap(),
                weight: 1,
                backup: i == 3,
                state: AdminState::Active,
                route: format!("b{i}"),
            })
            .collect(),
    )
}

struct Fixture {
    state: State,
    xdp: XdpDatapath,
    client_if: u32,
    backend_if: u32,
    next_port: u16,
}

impl Fixture {
    fn new(hook: Hook, client_if: u32, backend_if: u32) -> Fixture {
        let xdp = common::start(hook);
        let mut state = State::new(0, RING);
        let effect = state
            .apply(Command::AddService { service: service() })
            .expect("service");
        xdp.apply(&effect, &lb::runtime::Snapshot::new(state.clone()))
            .expect("datapath applies");
        Fixture {
            state,
            xdp,
            client_if,
            backend_if,
            next_port: 41000,
        }
    }

    /// A new connection's SYN from the client: (backend address it went to, SNAT port).
    fn syn(&mut self) -> (Ipv4Addr, u16) {
        self.next_port += 1;
        self.syn_from(self.next_port)
    }

    /// The client's SYN from `port` (the same sequence number each time: a retransmission while
    /// its flow is open).
    fn syn_from(&self, port: u16) -> (Ipv4Addr, u16) {
        let f = Tcp::new((CLIENT, port), (VIP, 80), SYN)
            .macs(CLIENT_MAC, [0xaa; 6])
            .build();
        let (verdict, out, _) = self.xdp.test_run(&f, self.client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "the SYN is forwarded");
        let p = packet::parse(&out).expect("forwarded SYN");
        assert_eq!(p.src.0, LB_BACKEND_SIDE);
        (p.dst.0, p.src.1)
    }

    /// The backend's answer (`flags`) to the SYN sent on `snat_port`: forwarded to the client.
    fn answer(&self, backend: Ipv4Addr, snat_port: u16, flags: u8) {
        let f = Tcp::new((backend, 8080), (LB_BACKEND_SIDE, snat_port), flags)
            .macs([0xbb; 6], [0xcc; 6])
            .build();
        let (verdict, out, _) = self.xdp.test_run(&f, self.backend_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "the answer goes back to the client");
        let p = packet::parse(&out).expect("forwarded answer");
        assert_eq!((p.src, p.dst.0), ((VIP, 80), CLIENT));
    }

    /// A new connection's SYN from `port` with sequence number `seq` and a timestamp option, as
    /// Linux sends it: (backend address it went to, SNAT port).
    fn syn_ts(&self, port: u16, seq: u32) -> (Ipv4Addr, u16) {
        let f = Tcp::new((CLIENT, port), (VIP, 80), SYN)
            .macs(CLIENT_MAC, [0xaa; 6])
            .seq(seq)
            .tcp_options(&packet::syn_options(5_000, 0))
            .build();
        let (verdict, out, _) = self.xdp.test_run(&f, self.client_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "the SYN is forwarded");
        let p = packet::parse(&out).expect("forwarded SYN");
        (p.dst.0, p.src.1)
    }

    /// The backend's bare ACK (of an old connection: `ack` not the SYN's) answering the SYN sent
    /// on `snat_port`, with a timestamp echoing the old connection: what reaches the client.
    fn stale_ack(&self, backend: Ipv4Addr, snat_port: u16, ack: u32) -> packet::Parsed {
        let f = Tcp::new((backend, 8080), (LB_BACKEND_SIDE, snat_port), ACK)
            .macs([0xbb; 6], [0xcc; 6])
            .seq(777_777)
            .ack(ack)
            .tcp_options(&packet::ack_options(9_999, 4_321))
            .build();
        let (verdict, out, _) = self.xdp.test_run(&f, self.backend_if, 1).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "the answer goes back to the client");
        let p = packet::parse(&out).expect("forwarded answer");
        assert_eq!((p.src, p.dst.0), ((VIP, 80), CLIENT));
        p
    }

    /// Kernel handshake counters and refusing marks by backend address.
    fn passive(&self) -> HashMap<Ipv4Addr, (PassiveCounters, bool)> {
        let svc = self.state.service("web").unwrap();
        self.xdp
            .passive_counters("web")
            .into_iter()
            .map(|(id, v)| {
                let b = svc.backend_by_id(id).unwrap();
                let IpAddr::V4(ip) = b.config.address.ip() else {
                    unreachable!()
                };
                (ip, v)
            })
            .collect()
    }

    /// Where `lb which` says the client's next connection goes (the kernel's maps), and why.
    fn which(&self) -> (Ipv4Addr, String) {
        let k = self.xdp.kernel_which("web", CLIENT, None).expect("which");
        let svc = self.state.service("web").unwrap();
        let b = svc.backend_by_id(k.backend_id.expect("a backend")).unwrap();
        let IpAddr::V4(ip) = b.config.address.ip() else {
            unreachable!()
        };
        (ip, k.detail)
    }

    fn counter(&self, name: &str) -> u64 {
        common::counter(&self.xdp, name)
    }
}

fn a_refused_syn_marks_the_backend_and_the_next_syns_avoid_it_down_to_the_backup(hook: Hook) {
    if !common::ready("a_refused_syn_marks_the_backend_and_the_next_syns_avoid_it_down_to_the_backup") {
        return;
    }
    in_fixture_netns(1, 3, |client_if, backend_if| {
        let mut fx = Fixture::new(hook, client_if, backend_if);
        if let Some(n) = fx.xdp.verified_instructions() {
            eprintln!("MEASURED xdp program: {n} instructions verified (limit 1000000)");
        }
        let home = {
            let b = Balancer::new(fx.state.clone());
            match b
                .choose("web", IpAddr::V4(CLIENT), Instant::now(), &[])
                .unwrap()
                .address
                .ip()
            {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => unreachable!(),
            }
        };
        assert_ne!(home, backend_ip(3), "the ring holds the primaries");
        let other = if home == backend_ip(1) {
            backend_ip(2)
        } else {
            backend_ip(1)
        };

        // A SYN left unanswered, retransmitted: the same flow (SNAT port), not counted again.
        let slow = 40000;
        let (b, slow_port) = fx.syn_from(slow);
        assert_eq!(b, home);
        assert_eq!(
            fx.syn_from(slow),
            (home, slow_port),
            "a retransmission follows its flow"
        );

        // A SYN-ACK is an answer, counted once even when the backend retransmits it.
        let (b, port) = fx.syn();
        assert_eq!(b, home);
        fx.answer(home, port, SYN | ACK);
        fx.answer(home, port, SYN | ACK);
        let p = fx.passive();
        assert_eq!(
            (p[&home].0.syns, p[&home].0.answered, p[&home].0.refused),
            (2, 1, 0)
        );
        assert!(!p[&home].1, "answering marks nothing");

        // The home backend answers the next SYN with an RST: refused, and marked refusing.
        let (b, port) = fx.syn();
        assert_eq!(b, home, "affinity keeps the client home");
        fx.answer(home, port, RST | ACK);
        let p = fx.passive();
        assert_eq!((p[&home].0.syns, p[&home].0.refused), (3, 1));
        assert!(p[&home].1, "{home} is marked refusing");
        assert_eq!(fx.counter("refusing_avoided"), 0);

        // The next SYN avoids it: the other primary (a later ring slot), counted. `lb which` says so.
        let (w, detail) = fx.which();
        assert_eq!(w, other, "{detail}");
        assert!(detail.contains("refusing"), "{detail}");
        let (b, port) = fx.syn();
        assert_eq!(b, other, "the SYN after the RST goes to the other primary");
        assert_eq!(fx.counter("refusing_avoided"), 1);
        assert_eq!(fx.passive()[&home].0.avoided, 1);
        assert_eq!(fx.passive()[&home].0.syns, 3, "no SYN reached {home} again");

        // The unanswered SYN's retransmission no longer follows its flow to the refusing backend:
        // it is a new flow, chosen again (the client's affinity now names the other primary).
        let (b, _) = fx.syn_from(slow);
        assert_eq!(b, other, "a retransmitted SYN leaves a refusing backend");
        assert_eq!(fx.passive()[&other].0.syns, 2);

        // The other primary refuses too: with both marked, the backup takes the client.
        fx.answer(other, port, RST | ACK);
        let p = fx.passive();
        assert!(p[&home].1 && p[&other].1, "both primaries refusing");
        let (w, detail) = fx.which();
        assert_eq!(w, backend_ip(3), "{detail}");
        assert!(detail.contains("a backup"), "{detail}");
        let (b, port) = fx.syn();
        assert_eq!(b, backend_ip(3), "every primary refuses: the backup");
        fx.answer(b, port, SYN | ACK);
        let (b, _) = fx.syn();
        assert_eq!(b, backend_ip(3), "and again");
        let p = fx.passive();
        assert_eq!(
            (p[&home].0.syns, p[&other].0.syns),
            (3, 2),
            "no SYN to a refusing primary"
        );
        assert_eq!(p[&backend_ip(3)].0.answered, 1);
        // The client's affinity now names the backup: nothing left to avoid.
        assert_eq!(fx.counter("refusing_avoided"), 2);
    });
}

fn a_bare_ack_from_time_wait_fails_its_client_at_once_and_the_second_marks_the_backend(hook: Hook) {
    if !common::ready("a_bare_ack_from_time_wait_fails_its_client_at_once_and_the_second_marks_the_backend") {
        return;
    }
    in_fixture_netns(1, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook, client_if, backend_if);
        let (home, _) = fx.which();
        let other = if home == backend_ip(1) {
            backend_ip(2)
        } else {
            backend_ip(1)
        };

        // The home backend answers a SYN with a SYN-ACK: alive until then.
        let (b, port) = fx.syn_ts(42001, 1_000);
        assert_eq!(b, home);
        fx.answer(home, port, SYN | ACK);

        // Killed: the next SYN meets TIME_WAIT there, answered by a bare ACK of the old
        // connection. No SYN-ACK since the SYN left: the client gets an RST acknowledging its
        // SYN, its timestamp echo cleared (the old connection's would make it drop the RST).
        let (b, port) = fx.syn_ts(42002, 2_000);
        assert_eq!(b, home);
        let p = fx.stale_ack(home, port, 55_555);
        assert_eq!(p.flags & (RST | ACK), RST | ACK, "the client gets an RST");
        assert_eq!(p.ack, 2_001, "acknowledging its SYN");
        assert_eq!(p.timestamps(), Some((9_999, 0)), "echo cleared");
        let pc = fx.passive();
        assert_eq!((pc[&home].0.stale, pc[&home].0.refused), (1, 0));
        assert!(!pc[&home].1, "one stale answer marks nothing");
        assert_eq!(fx.counter("stale_answer"), 1);

        // The second in a row, still no SYN-ACK: refused, and the backend marked refusing.
        let (b, port) = fx.syn_ts(42003, 3_000);
        assert_eq!(b, home, "not marked yet");
        let p = fx.stale_ack(home, port, 55_556);
        assert_eq!((p.flags & RST, p.ack), (RST, 3_001));
        let pc = fx.passive();
        assert_eq!((pc[&home].0.stale, pc[&home].0.refused), (1, 1));
        assert!(pc[&home].1, "{home} is marked refusing");
        assert_eq!(fx.counter("stale_answer"), 2);
        let (b, _) = fx.syn_ts(42004, 4_000);
        assert_eq!(b, other, "the next SYN avoids it");
        assert_eq!(fx.counter("refusing_avoided"), 1);

        // A live backend: it answers another SYN with a SYN-ACK after this SYN left, so its bare
        // ACK comes from a connection it still holds on the 4-tuple: forwarded as it is.
        let (b, first) = fx.syn_ts(42005, 5_000);
        assert_eq!(b, other);
        let (b, second) = fx.syn_ts(42006, 6_000);
        assert_eq!(b, other);
        fx.answer(other, first, SYN | ACK);
        let p = fx.stale_ack(other, second, 66_666);
        assert_eq!(
            (p.flags & (RST | ACK), p.ack),
            (ACK, 66_666),
            "forwarded unchanged"
        );
        assert_eq!(fx.counter("stale_collision"), 1);

        // A SYN without timestamps: a live TIME_WAIT may answer it so; a collision too.
        let (b, port) = fx.syn_from(42007);
        assert_eq!(b, other);
        let p = fx.stale_ack(other, port, 77_777);
        assert_eq!(p.flags & RST, 0, "forwarded unchanged");
        assert_eq!(fx.counter("stale_collision"), 2);
        let pc = fx.passive();
        assert_eq!((pc[&other].0.collided, pc[&other].0.refused), (2, 0));
        assert!(!pc[&other].1, "collisions mark nothing");
        assert_eq!(fx.counter("stale_answer"), 2);
    });
}

fn after_a_start_that_made_its_maps_a_bare_ack_on_an_unknown_port_is_a_collision(hook: Hook) {
    if !common::ready("after_a_start_that_made_its_maps_a_bare_ack_on_an_unknown_port_is_a_collision") {
        return;
    }
    in_fixture_netns(1, 3, |client_if, backend_if| {
        let fx = Fixture::new(hook, client_if, backend_if);
        let (home, _) = fx.which();
        // As `lb run` does when it made its maps: the backends may hold connections of an earlier
        // instance on any SNAT 4-tuple lb has no entry for (a TIME_WAIT without timestamps, a
        // connection lb lost). These SYNs take such ports.
        fx.xdp
            .hold_unknown_ports_for(Duration::from_secs(60))
            .expect("window set");
        for (i, port) in (43001..43003u16).enumerate() {
            let (b, snat) = fx.syn_ts(port, 10_000 * (i as u32 + 1));
            assert_eq!(b, home);
            let p = fx.stale_ack(home, snat, 88_000 + i as u32);
            assert_eq!(
                (p.flags & (RST | ACK), p.ack),
                (ACK, 88_000 + i as u32),
                "forwarded unchanged: the client resets it and retransmits its SYN"
            );
        }
        let pc = fx.passive();
        assert_eq!(
            (pc[&home].0.collided, pc[&home].0.stale, pc[&home].0.refused),
            (2, 0, 0)
        );
        assert!(!pc[&home].1, "not marked refusing");
        assert_eq!(
            (fx.counter("stale_collision"), fx.counter("stale_answer")),
            (2, 0)
        );

        // Once the window is over, a port with no entry is not held: an RST to the client.
        fx.xdp
            .hold_unknown_ports_for(Duration::ZERO)
            .expect("window ended");
        let (b, snat) = fx.syn_ts(43003, 30_000);
        assert_eq!(b, home);
        let p = fx.stale_ack(home, snat, 88_100);
        assert_eq!((p.flags & RST, p.ack), (RST, 30_001));
        assert_eq!(fx.counter("stale_answer"), 1);
    });
}

lb_tests::per_hook!(
    a_refused_syn_marks_the_backend_and_the_next_syns_avoid_it_down_to_the_backup,
    a_bare_ack_from_time_wait_fails_its_client_at_once_and_the_second_marks_the_backend,
    after_a_start_that_made_its_maps_a_bare_ack_on_an_unknown_port_is_a_collision,
);
