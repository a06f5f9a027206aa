//! `forwarding = "dsr"` in the XDP program, under BPF_PROG_TEST_RUN: the client's frame leaves
//! IPIP-encapsulated toward its backend (outer header from the LB's address toward the backend to
//! the backend, protocol 4, valid checksum, DF copied; the inner packet byte-identical), and a
//! mid-flow packet without an entry is forwarded the same way (counted `dsr_mid_flow`), never
//! answered with an RST; a one-armed node (packets in and out one interface) sends by XDP_TX.
//! Needs root and the embedded eBPF object.

mod common;

use common::Hook;

use common::{CLIENT_MAC, LB_BACKEND_SIDE, RING, VIP, XDP_DROP, XDP_REDIRECT};

use std::net::Ipv4Addr;
use std::path::PathBuf;

use lb::config::{AdminState, BackendConfig, Forwarding, ServiceConfig, XdpConfig};
use lb::datapath::Datapath;
use lb::datapath::xdp::XdpDatapath;
use lb::state::{Command, State};
use lb_common::csum::checksum;
use lb_tests::packet::Tcp;
use lb_tests::packet::flags::{ACK, FIN, SYN};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];

struct Fixture {
    xdp: Option<XdpDatapath>,
    pins: PathBuf,
}

impl Fixture {
    fn new(hook: Hook, tag: &str) -> Fixture {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/lbt-{tag}-{}-{}",
            hook.name(),
            std::process::id()
        ));
        let config = XdpConfig {
            mode: common::mode(hook),
            pin_path: pins.clone(),
            ..XdpConfig::default()
        };
        let mut fx = Fixture { xdp: None, pins };
        let xdp = XdpDatapath::start(Some(&config), 0, RING).expect("load XDP program");
        let mut state = State::new(0, RING);
        let effect = state
            .apply(Command::AddService { service: service() })
            .expect("service applies");
        xdp.apply(&effect, &lb::runtime::Snapshot::new(state))
            .expect("datapath applies");
        fx.xdp = Some(xdp);
        fx
    }

    fn run(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self
            .xdp
            .as_ref()
            .unwrap()
            .test_run(frame, ifindex, 1)
            .expect("test run");
        (verdict, out)
    }

    fn counter(&self, name: &str) -> u64 {
        common::counter(self.xdp.as_ref().unwrap(), name)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.xdp.take());
        if let Ok(entries) = std::fs::read_dir(&self.pins) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pins);
    }
}

fn service() -> ServiceConfig {
    ServiceConfig {
        forwarding: Forwarding::Dsr,
        ..common::xdp_service(vec![BackendConfig {
            name: "b1".into(),
            address: format!("{BACKEND}:80").parse().unwrap(),
            weight: 1,
            backup: false,
            state: AdminState::Active,
            route: "b1".into(),
        }])
    }
}

/// Runs `f(client ifindex)` inside a fresh fixture namespace.
fn in_fixture<T: Send>(f: impl FnOnce(u32) -> T + Send) -> T {
    in_fixture_links(|links| f(links.client_if))
}

fn in_fixture_links<T: Send>(f: impl FnOnce(lb_tests::fixture::FixtureLinks) -> T + Send) -> T {
    lb_tests::fixture::in_fixture_netns(&common::spec(1, 1), f).expect("fixture namespace")
}

/// Checks that `out` is `input` wrapped in the outer header toward the backend.
#[track_caller]
fn assert_encapsulated(input: &[u8], out: &[u8]) {
    assert_eq!(out.len(), input.len() + 20, "20 bytes of outer header added");
    assert_eq!(&out[0..6], &BACKEND_MAC, "to the backend's MAC");
    assert_eq!(&out[12..14], &[0x08, 0x00], "IPv4");
    let outer = &out[14..34];
    assert_eq!(outer[0], 0x45, "version 4, IHL 5");
    assert_eq!(outer[1], input[15], "TOS copied");
    let inner_len = u16::from_be_bytes([input[16], input[17]]);
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]),
        inner_len + 20,
        "total length"
    );
    assert_eq!(&outer[4..6], &[0, 0], "identification");
    assert_eq!(outer[6] & 0x40, input[20] & 0x40, "DF copied");
    assert_eq!((outer[6] & 0x3f, outer[7]), (0, 0), "no fragment offset, no MF");
    assert_eq!(outer[8], 64, "TTL");
    assert_eq!(outer[9], 4, "protocol IPIP");
    assert_eq!(checksum(outer, 0), 0, "outer header checksum");
    assert_eq!(
        &outer[12..16],
        &LB_BACKEND_SIDE.octets(),
        "from the LB's address toward the backend"
    );
    assert_eq!(&outer[16..20], &BACKEND.octets(), "to the backend");
    assert!(out[34..] == input[14..], "the inner packet is byte-identical");
}

fn xdp_dsr_encapsulates_the_untouched_packet_toward_its_backend(hook: Hook) {
    if !common::ready("xdp_dsr_encapsulates_the_untouched_packet_toward_its_backend") {
        return;
    }
    in_fixture(|client_if| {
        // Built inside the namespace: the LB's address toward the backend comes from its routes.
        let fx = Fixture::new(hook, "dsrfx");
        let syn = Tcp::new((CLIENT, 40000), (VIP, 80), SYN)
            .macs(CLIENT_MAC, [0xaa; 6])
            .seq(1000)
            .tcp_options(&lb_tests::packet::syn_options(12345, 0))
            .build();
        let (verdict, out) = fx.run(&syn, client_if);
        assert_eq!(verdict, XDP_REDIRECT, "the SYN is forwarded");
        assert_encapsulated(&syn, &out);
        assert_eq!(fx.counter("new_flows"), 1);
        // Established packets with data, then the client's FIN: the same wrapping, no new flow.
        for (flags, payload) in [(ACK, &b"GET / HTTP/1.1\r\n\r\n"[..]), (ACK | FIN, &b""[..])] {
            let frame = Tcp::new((CLIENT, 40000), (VIP, 80), flags)
                .macs(CLIENT_MAC, [0xaa; 6])
                .seq(1001)
                .ack(7)
                .payload(payload)
                .build();
            let (verdict, out) = fx.run(&frame, client_if);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_encapsulated(&frame, &out);
        }
        assert_eq!(fx.counter("new_flows"), 1);
        assert_eq!(fx.counter("dsr_mid_flow"), 0);
        assert_eq!(fx.counter("rst_sent"), 0);
    });
}

fn xdp_dsr_forwards_mid_flow_packets_without_an_entry(hook: Hook) {
    if !common::ready("xdp_dsr_forwards_mid_flow_packets_without_an_entry") {
        return;
    }
    in_fixture(|client_if| {
        let fx = Fixture::new(hook, "dsrmid");
        // A connection another LB node opened: this node never saw its SYN.
        let frame = |seq: u32| {
            Tcp::new((CLIENT, 41000), (VIP, 80), ACK)
                .macs(CLIENT_MAC, [0xaa; 6])
                .seq(seq)
                .ack(1)
                .payload(&[0x5a; 100])
                .build()
        };
        let first = frame(5000);
        let (verdict, out) = fx.run(&first, client_if);
        assert_eq!(verdict, XDP_REDIRECT, "forwarded, not reset");
        assert_encapsulated(&first, &out);
        assert_eq!(fx.counter("dsr_mid_flow"), 1);
        assert_eq!(fx.counter("no_conntrack"), 0);
        assert_eq!(fx.counter("rst_sent"), 0);
        // The first one left an entry: the next packet is an established one.
        let next = frame(5100);
        let (verdict, out) = fx.run(&next, client_if);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_encapsulated(&next, &out);
        assert_eq!(fx.counter("dsr_mid_flow"), 1, "counted once per flow");
        assert_eq!(fx.counter("new_flows"), 0, "no SYN, no new flow");
    });
}

fn xdp_dsr_one_armed_sends_the_packet_back_out_its_interface(hook: Hook) {
    if !common::ready("xdp_dsr_one_armed_sends_the_packet_back_out_its_interface") {
        return;
    }
    in_fixture_links(|links| {
        let fx = Fixture::new(hook, "dsrone");
        // A client whose packets arrive on the backends' link (one NIC toward router and
        // backends, the usual DSR deployment): out the same interface, by XDP_TX.
        let syn = Tcp::new((CLIENT, 42000), (VIP, 80), SYN)
            .macs(CLIENT_MAC, [0xaa; 6])
            .seq(77)
            .build();
        let (verdict, out) = fx.run(&syn, links.backend_if);
        assert_eq!(verdict, common::tx(hook));
        assert_encapsulated(&syn, &out);
    });
}

fn xdp_dsr_counts_packets_too_big_once_encapsulated(hook: Hook) {
    if !common::ready("xdp_dsr_counts_packets_too_big_once_encapsulated") {
        return;
    }
    in_fixture(|client_if| {
        let fx = Fixture::new(hook, "dsrbig");
        let frame = |flags: u8, payload: usize| {
            Tcp::new((CLIENT, 43000), (VIP, 80), flags)
                .macs(CLIENT_MAC, [0xaa; 6])
                .seq(9)
                .payload(&vec![0x33; payload])
                .build()
        };
        // The SYN caches the next hop; a full-size segment (1500-byte IP packet, 1520 wrapped) is
        // still checked against the link's MTU of 1500, whatever the cache says.
        let (verdict, _) = fx.run(&frame(SYN, 0), client_if);
        assert_eq!(verdict, XDP_REDIRECT);
        let (verdict, _) = fx.run(&frame(ACK, 1460), client_if);
        assert_eq!(verdict, XDP_DROP, "1520 bytes do not fit a 1500-byte link");
        assert_eq!(fx.counter("too_big"), 1);
        // What advmss 1440 leaves (1480-byte packets, 1500 wrapped) goes, and so does the next.
        for _ in 0..2 {
            let fits = frame(ACK, 1440);
            let (verdict, out) = fx.run(&fits, client_if);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_encapsulated(&fits, &out);
        }
        assert_eq!(fx.counter("too_big"), 1);
    });
}

lb_tests::per_hook!(
    xdp_dsr_encapsulates_the_untouched_packet_toward_its_backend,
    xdp_dsr_forwards_mid_flow_packets_without_an_entry,
    xdp_dsr_one_armed_sends_the_packet_back_out_its_interface,
    xdp_dsr_counts_packets_too_big_once_encapsulated,
);
