//! Self-test of the netns harness and `lb-testsrv` (no load balancer involved): clients reach
//! backends routed through the lb namespace, echo is byte-exact with half-close, every AJP mode
//! answers a CPing as documented, and everything is cleaned up on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::netns::netns_exists;
use lb_tests::{
    AJP_CPONG, AjpMode, HttpConn, Topology, ajp_cping, connect_from, http_get_from, require_root,
    start_ajp_backend, start_echo_backends, start_http_backends, unique_prefix,
};

fn assert_gone(names: &[String], pids: &[u32]) {
    for n in names {
        assert!(!netns_exists(n), "namespace {n} still exists after drop");
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "`ip netns list` still shows {n}"
        );
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still alive after drop"
        );
    }
}

#[test]
fn http_backends_reachable_from_each_client_address() {
    if !require_root("http_backends_reachable_from_each_client_address") {
        return;
    }
    let (names, pids);
    {
        let topo = Topology::new(&unique_prefix("hhttp"), 3, 3).expect("create topology");
        names = topo.namespace_names();
        assert_eq!(names.len(), 5);
        for n in &names {
            assert!(netns_exists(n), "namespace {n} missing");
        }
        let backends = start_http_backends(&topo, 8080).expect("start http backends");
        pids = backends.iter().map(lb_tests::Child::pid).collect::<Vec<_>>();
        let cns = topo.client_ns().name();
        let clients = topo.client_addrs();
        assert_eq!(clients.len(), 3);

        for &src in &clients {
            for i in 1..=3 {
                let addr = SocketAddr::new(topo.backend_addr(i).into(), 8080);
                let body = http_get_from(cns, src, addr, "/").unwrap_or_else(|e| {
                    panic!("GET {addr} from {src}: {e}");
                });
                assert_eq!(body, format!("b{i}\n"), "from {src} to backend {i}");
            }
        }

        // Keep-alive: several requests on one connection; the backend sees the real client
        // address (routed, no NAT) on that connection.
        let src = clients[1];
        let addr = SocketAddr::new(topo.backend_addr(2).into(), 8080);
        let mut conn = HttpConn::connect_from(cns, src, addr).expect("connect");
        assert_eq!(conn.stream().local_addr().unwrap().ip(), src);
        for _ in 0..3 {
            let r = conn.get("/x").expect("keep-alive GET");
            assert_eq!(r.status, 200);
            assert_eq!(r.body, "b2\n");
            assert_eq!(r.header("x-backend"), Some("b2"));
        }
        let ss = topo
            .backend_ns(2)
            .exec_ok(&["ss", "-Htn", "state", "established"])
            .expect("ss");
        let local = conn.stream().local_addr().unwrap().to_string();
        assert!(
            ss.lines().any(|l| l.contains(&local)),
            "backend does not see peer {local}:\n{ss}"
        );
        let r = conn.get_close("/").expect("GET with Connection: close");
        assert_eq!(r.header("connection"), Some("close"));
        let mut rest = Vec::new();
        let mut s = conn.stream();
        assert_eq!(s.read_to_end(&mut rest).expect("read after close"), 0);

        // The primary client address and the VIP are configured as documented.
        let out = topo
            .exec_in(cns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .expect("ip addr");
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains("10.0.0.2/24"), "{out}");
        assert!(out.contains("10.0.0.12/24"), "{out}");
        let lb_addrs = topo
            .lb_ns()
            .exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", topo.lb_client_if()])
            .expect("ip addr");
        assert!(lb_addrs.contains("10.0.0.100/32"), "{lb_addrs}");
        assert_eq!(topo.lb_ns().sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    }
    assert_gone(&names, &pids);
}

#[test]
fn echo_one_mib_with_half_close() {
    if !require_root("echo_one_mib_with_half_close") {
        return;
    }
    let (names, pids);
    {
        let topo = Topology::new(&unique_prefix("hecho"), 1, 1).expect("create topology");
        names = topo.namespace_names();
        let echo = start_echo_backends(&topo, 7).expect("start echo backend");
        pids = echo.iter().map(lb_tests::Child::pid).collect::<Vec<_>>();

        // Deterministic pseudo-random payload (xorshift).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();

        let addr = SocketAddr::new(topo.backend_addr(1).into(), 7);
        let src = topo.client_addrs()[0];
        let mut stream = connect_from(topo.client_ns().name(), src, addr, Duration::from_secs(5))
            .expect("connect to echo");
        let mut writer = stream.try_clone().expect("clone");
        let echoed = thread::scope(|s| {
            s.spawn(|| {
                writer.write_all(&data).expect("write 1 MiB");
                writer.shutdown(Shutdown::Write).expect("half-close");
            });
            let mut echoed = Vec::with_capacity(data.len());
            stream.read_to_end(&mut echoed).expect("read echo to EOF");
            echoed
        });
        assert_eq!(echoed.len(), data.len(), "echoed length");
        assert!(echoed == data, "echoed bytes differ");
    }
    assert_gone(&names, &pids);
}

#[test]
fn ajp_modes_answer_cping_as_documented() {
    if !require_root("ajp_modes_answer_cping_as_documented") {
        return;
    }
    let (names, pids);
    {
        let topo = Topology::new(&unique_prefix("hajp"), 1, 1).expect("create topology");
        names = topo.namespace_names();
        let mut servers = Vec::new();
        for (k, mode) in AjpMode::ALL.iter().enumerate() {
            let port = 8009 + k as u16;
            let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
            let child = start_ajp_backend(topo.backend_ns(1), listen, *mode).expect("start ajp backend");
            servers.push((*mode, port, child));
        }
        pids = servers.iter().map(|(_, _, c)| c.pid()).collect::<Vec<_>>();
        let cns = topo.client_ns().name();
        let src = topo.client_addrs()[0];
        let backend = topo.backend_addr(1);

        thread::scope(|s| {
            for (mode, port, _) in &servers {
                let (mode, addr) = (*mode, SocketAddr::new(backend.into(), *port));
                s.spawn(move || {
                    let mut st = connect_from(cns, src, addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("{mode:?}: connect: {e}"));
                    let t = Instant::now();
                    match mode {
                        AjpMode::Good => {
                            for _ in 0..3 {
                                let r = ajp_cping(&mut st, Duration::from_secs(2));
                                assert_eq!(r.unwrap(), AJP_CPONG, "good");
                            }
                        }
                        AjpMode::Silent => {
                            let e = ajp_cping(&mut st, Duration::from_secs(1)).unwrap_err();
                            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "silent: {e}");
                        }
                        AjpMode::Garbage => {
                            let r = ajp_cping(&mut st, Duration::from_secs(2)).unwrap();
                            assert_eq!(r, [0xde, 0xad, 0xbe, 0xef, 0x00], "garbage");
                        }
                        AjpMode::CpongClose => {
                            let r = ajp_cping(&mut st, Duration::from_secs(2)).unwrap();
                            assert_eq!(r, [0x41, 0x42, 0x00], "cpong-close");
                            let mut rest = Vec::new();
                            assert_eq!(st.read_to_end(&mut rest).unwrap(), 0, "then EOF");
                        }
                        AjpMode::Reset => {
                            let e = ajp_cping(&mut st, Duration::from_secs(2))
                                .expect_err("reset must not answer");
                            assert!(
                                matches!(
                                    e.kind(),
                                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                                ),
                                "reset: expected a connection reset, got {e}"
                            );
                        }
                        AjpMode::SlowCpong => {
                            let r = ajp_cping(&mut st, Duration::from_secs(6)).unwrap();
                            assert_eq!(r, AJP_CPONG, "slow-cpong");
                            let took = t.elapsed();
                            assert!(
                                took >= Duration::from_millis(2500),
                                "slow-cpong answered after {took:?}"
                            );
                        }
                    }
                });
            }
        });
        for (mode, _, child) in &mut servers {
            assert!(
                child.is_running(),
                "{mode:?} server died: {}",
                child.stderr_text()
            );
        }
    }
    assert_gone(&names, &pids);
}

#[test]
fn cleanup_after_panic_and_stale_namespaces() {
    if !require_root("cleanup_after_panic_and_stale_namespaces") {
        return;
    }
    let prefix = unique_prefix("hpanic");
    // A crashed run leaves a namespace behind (simulated by forgetting the handle)...
    std::mem::forget(lb_tests::Netns::new(&format!("{prefix}-lb")).expect("create netns"));
    assert!(netns_exists(&format!("{prefix}-lb")));

    // ...and the next run replaces it, then panics half-way through a test.
    let seen = std::sync::Mutex::new((Vec::new(), Vec::new()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new(&prefix, 2, 2).expect("create topology over a stale namespace");
        let backends = start_http_backends(&topo, 8080).expect("start http backends");
        *seen.lock().unwrap() = (
            topo.namespace_names(),
            backends.iter().map(lb_tests::Child::pid).collect(),
        );
        panic!("deliberate panic with live namespaces and processes");
    }));
    assert!(r.is_err());
    let (names, pids) = seen.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    assert_gone(&names, &pids);
}
