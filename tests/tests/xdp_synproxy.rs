//! End to end through the XDP SYN proxy (`[xdp] syn_cookies = "on"`): every new connection to the
//! VIP is answered from XDP with a cookie SYN-ACK, set up when the client's ACK proves its address,
//! and translated from then on. Real clients and servers in namespaces: HTTP requests, bulk data
//! byte-exact both ways on an echo connection, a clean close, and the counters and status that
//! show it.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use lb_tests::{connect_from, http_get_from, require_root};

fn xdp_syn_cookies_on_carry_real_connections_byte_exact(hook: Hook) {
    if !require_root("xdp_syn_cookies_on_carry_real_connections_byte_exact") {
        return;
    }
    let pins = Pins::new(pin_dir(&hook.tag("sp")));
    let bed = Bed::new(&hook.tag("xsp"), 2, 6, |topo, socket| {
        hook.config(xdp_config(topo, socket, &pins.0, 2, XDP_STD, ""))
            .replace("[xdp]\n", "[xdp]\nsyn_cookies = \"on\"\n")
    });
    prepare_peers(&bed.topo);
    wait_checked(&bed, "web");
    assert_eq!(xdp_counter(&bed, "syn_cookies"), 1, "lb status shows cookies on");
    let clients = bed.topo.client_addrs();
    let sent_before = xdp_counter(&bed, "cookies_sent");

    // New HTTP connections, each through a cookie handshake.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, &c) in clients.iter().cycle().take(24).enumerate() {
        loop {
            match http_get_from(bed.topo.client_ns().name(), c, bed.web(), "/") {
                Ok(body) => {
                    assert!(body.trim().starts_with('b'), "{c}: backend name, got {body:?}");
                    break;
                }
                // The first ones may race the neighbour resolution of a fresh topology.
                Err(e) if i < 2 && Instant::now() < deadline => {
                    eprintln!("retrying {c}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("GET {i} from {c} through SYN cookies: {e}\n{}", bed.lb.log()),
            }
        }
    }
    let sent = xdp_counter(&bed, "cookies_sent") - sent_before;
    let valid = xdp_counter(&bed, "cookie_valid");
    assert!(sent >= 24, "every connection got a cookie SYN-ACK ({sent})");
    assert!(
        valid >= 24,
        "every connection was set up by its cookie ACK ({valid})"
    );

    // Bulk both ways, byte-exact, on one cookie connection; then a clean close.
    let mut s = connect_from(
        bed.topo.client_ns().name(),
        clients[0],
        bed.echo(),
        Duration::from_secs(5),
    )
    .expect("echo connection through SYN cookies");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    echo_roundtrip(&mut s, b"first bytes after a cookie handshake");
    let data = random_bytes(4 << 20, 7);
    let mut writer = s.try_clone().unwrap();
    let sent_data = data.clone();
    let write = std::thread::spawn(move || {
        for chunk in sent_data.chunks(64 << 10) {
            writer.write_all(chunk).expect("write bulk");
        }
    });
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("read the echoed bulk");
    write.join().unwrap();
    assert!(back == data, "4 MiB echoed through the translated flow differ");
    close_echo(s);
    assert_eq!(xdp_counter(&bed, "syn_cookies"), 1);
    eprintln!(
        "cookies sent {sent}, valid {valid}, invalid {}, SYNs resent {}",
        xdp_counter(&bed, "cookie_invalid"),
        xdp_counter(&bed, "cookie_syn_resent")
    );
}

lb_tests::per_hook!(xdp_syn_cookies_on_carry_real_connections_byte_exact);
