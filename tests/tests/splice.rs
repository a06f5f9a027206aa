//! The proxy's relay modes (`splice = "off" | "pipe"`) end to end, each mode on a service of its
//! own in one daemon: many connections at once moving 8 MiB each way byte-exact, half-close in each
//! direction, a slow reader holding the sender back (the LB buffers a bounded amount, in user space
//! and in the kernel), and clients resetting mid-transfer leaving no socket behind.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Bed, ECHO_PORT, config_toml, service_toml};
use lb_tests::{connect_from, require_root};

/// Every relay mode, with the VIP port offset of its services.
const MODES: &[&str] = &["off", "pipe"];
/// Test servers in backend namespace b1 (see [`Servers`]).
const CLIENT_FIRST_PORT: u16 = 9000;
const SERVER_FIRST_PORT: u16 = 9001;
const SLOW_PORT: u16 = 9002;
/// VIP ports: echo, client-first, server-first and slow services of mode `i` are BASE + i.
const ECHO_BASE: u16 = 7000;
const CLIENT_FIRST_BASE: u16 = 7100;
const SERVER_FIRST_BASE: u16 = 7200;
const SLOW_BASE: u16 = 7300;

/// A deterministic byte stream (xorshift64), produced and checked in chunks.
struct Stream {
    x: u64,
    /// Bytes of the current word not yet handed out.
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            x: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                self.word = self.x.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Writes `len` bytes of stream `seed` to `w`, adding each chunk to `progress`.
fn send(w: &mut impl Write, seed: u64, len: usize, progress: Option<&AtomicU64>) -> std::io::Result<()> {
    let mut s = Stream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        s.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
        if let Some(p) = progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Reads `r` to EOF: (bytes read, whether they are exactly stream `seed` so far).
fn receive(r: &mut impl Read, seed: u64) -> std::io::Result<(usize, bool)> {
    let mut s = Stream::new(seed);
    let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let (mut total, mut same) = (0, true);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, same));
        }
        s.fill(&mut want[..n]);
        same &= buf[..n] == want[..n];
        total += n;
    }
}

const HALF: usize = 1 << 20;

/// The in-test backends of namespace b1: what each connection saw goes to `reports`.
struct Servers {
    reports: Mutex<Receiver<(u16, usize, bool)>>,
    /// Each message lets one slow-server connection start reading.
    release: Mutex<Sender<()>>,
}

impl Servers {
    /// - client-first (9000): reads to EOF, then sends `HALF` bytes of stream 2 and closes;
    /// - server-first (9001): sends `HALF` bytes of stream 3, half-closes, then reads to EOF;
    /// - slow (9002): reads nothing until released, then reads to EOF.
    ///
    /// Each reports (port, bytes read, bytes were stream 1).
    fn start(bed: &Bed) -> Servers {
        let (tx, reports) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for port in [CLIENT_FIRST_PORT, SERVER_FIRST_PORT, SLOW_PORT] {
            let listener = bed
                .topo
                .backend_ns(1)
                .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
                .expect("enter b1")
                .expect("bind test server");
            let (tx, release_rx) = (tx.clone(), release_rx.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let (tx, release_rx) = (tx.clone(), release_rx.clone());
                    thread::spawn(move || {
                        let seen = match port {
                            CLIENT_FIRST_PORT => {
                                let seen = receive(&mut conn, 1);
                                let _ = send(&mut conn, 2, HALF, None);
                                seen
                            }
                            SERVER_FIRST_PORT => {
                                let _ = send(&mut conn, 3, HALF, None);
                                let _ = conn.shutdown(Shutdown::Write);
                                receive(&mut conn, 1)
                            }
                            _ => {
                                let _ = release_rx.lock().unwrap().recv();
                                receive(&mut conn, 1)
                            }
                        };
                        let (n, same) = seen.unwrap_or((0, false));
                        let _ = tx.send((port, n, same));
                    });
                }
            });
        }
        Servers {
            reports: Mutex::new(reports),
            release: Mutex::new(release_tx),
        }
    }

    fn report(&self) -> (u16, usize, bool) {
        self.reports
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .expect("a test server's report")
    }
}

/// The daemon with, for each mode, an echo service (VIP:ECHO_BASE+i → bI:7 over two backends)
/// and the three test-server services (→ b1 only).
fn bed(tag: &str) -> Bed {
    Bed::new(tag, 2, 4, |topo, sock| {
        let mut services = Vec::new();
        for (i, mode) in MODES.iter().enumerate() {
            let i = i as u16;
            let extra = format!("splice = \"{mode}\"");
            services.push(service_toml(
                topo,
                &format!("echo-{mode}"),
                ECHO_BASE + i,
                ECHO_PORT,
                &extra,
                &[(1, 1), (2, 1)],
            ));
            for (name, base, port) in [
                ("cfirst", CLIENT_FIRST_BASE, CLIENT_FIRST_PORT),
                ("sfirst", SERVER_FIRST_BASE, SERVER_FIRST_PORT),
                ("slow", SLOW_BASE, SLOW_PORT),
            ] {
                services.push(service_toml(
                    topo,
                    &format!("{name}-{mode}"),
                    base + i,
                    port,
                    &extra,
                    &[(1, 1)],
                ));
            }
        }
        config_toml(sock, "", "", &services)
    })
}

fn vip(bed: &Bed, port: u16) -> SocketAddr {
    SocketAddr::new(bed.topo.vip().into(), port)
}

fn connect(bed: &Bed, src: Ipv4Addr, port: u16) -> TcpStream {
    let s = connect_from(
        bed.topo.client_ns().name(),
        src,
        vip(bed, port),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("connect VIP:{port} from {src}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn lb_pid(bed: &Bed) -> u32 {
    bed.lb.child.pid()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn many_connections_8mib_each_way_byte_exact() {
    if !require_root("many_connections_8mib_each_way_byte_exact") {
        return;
    }
    let bed = bed("spmany");
    let clients = bed.topo.client_addrs();
    const CONNECTIONS: u64 = 12;
    const LEN: usize = 8 << 20;
    for (i, mode) in MODES.iter().enumerate() {
        let port = ECHO_BASE + i as u16;
        thread::scope(|s| {
            for c in 0..CONNECTIONS {
                let stream = connect(&bed, clients[c as usize % clients.len()], port);
                s.spawn(move || {
                    let seed = 100 + c;
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = stream;
                    let sent = thread::spawn(move || {
                        send(&mut writer, seed, LEN, None).expect("write 8 MiB");
                        writer.shutdown(Shutdown::Write).expect("half-close");
                    });
                    let (n, same) = receive(&mut reader, seed).expect("read the echo to EOF");
                    sent.join().unwrap();
                    assert_eq!(n, LEN, "{mode}: connection {c} echoed length");
                    assert!(same, "{mode}: connection {c} echoed different bytes");
                });
            }
        });
        // Both backends' byte counters add up to what went through.
        let st = bed.lb.status();
        let svc = lb_tests::daemon::service_of(&st, &format!("echo-{mode}"));
        let sum = |key: &str| -> u64 {
            svc["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[key].as_u64().unwrap())
                .sum()
        };
        assert_eq!(sum("bytes_in"), CONNECTIONS * LEN as u64, "{mode}: {svc}");
        assert_eq!(sum("bytes_out"), CONNECTIONS * LEN as u64, "{mode}: {svc}");
    }
}

#[test]
fn half_close_in_each_direction() {
    if !require_root("half_close_in_each_direction") {
        return;
    }
    let bed = bed("sphalf");
    let servers = Servers::start(&bed);
    let src = bed.topo.client_addrs()[0];
    for (i, mode) in MODES.iter().enumerate() {
        let i = i as u16;
        // The client half-closes first; the backend answers only after seeing that EOF.
        let mut s = connect(&bed, src, CLIENT_FIRST_BASE + i);
        send(&mut s, 1, HALF, None).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (n, same) = receive(&mut s, 2).expect("the answer after the client's half-close");
        assert_eq!(
            (n, same),
            (HALF, true),
            "{mode}: answer after the client's half-close"
        );
        assert_eq!(
            servers.report(),
            (CLIENT_FIRST_PORT, HALF, true),
            "{mode}: what the backend read"
        );

        // The backend half-closes first; the client still sends afterwards.
        let mut s = connect(&bed, src, SERVER_FIRST_BASE + i);
        let (n, same) = receive(&mut s, 3).expect("the backend's bytes up to its half-close");
        assert_eq!(
            (n, same),
            (HALF, true),
            "{mode}: bytes before the backend's half-close"
        );
        send(&mut s, 1, HALF, None).expect("sending after the backend's half-close");
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            servers.report(),
            (SERVER_FIRST_PORT, HALF, true),
            "{mode}: what the backend read after its own half-close"
        );
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{mode}: nothing after EOF");
    }
}

#[test]
fn slow_reader_holds_the_sender_back() {
    if !require_root("slow_reader_holds_the_sender_back") {
        return;
    }
    let bed = bed("spslow");
    let servers = Servers::start(&bed);
    let src = bed.topo.client_addrs()[0];
    let pid = lb_pid(&bed);
    // What the socket buffers on the way may hold (client send, LB receive and send, backend
    // receive: tcp_wmem/tcp_rmem maxima of 4 and 6 MiB) plus a pipe, with room to spare. Anything
    // beyond is a queue without backpressure.
    const BOUND: u64 = 40 << 20;
    const TOTAL: usize = 96 << 20;
    for (i, mode) in MODES.iter().enumerate() {
        let rss_before = rss_kib(pid);
        let s = connect(&bed, src, SLOW_BASE + i as u16);
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (mut s, written) = (s.try_clone().unwrap(), written.clone());
            thread::spawn(move || {
                send(&mut s, 1, TOTAL, Some(&written)).expect("write");
                s.shutdown(Shutdown::Write).unwrap();
            })
        };
        // Wait until the sender stalls (no progress for a second) or passes the bound.
        let (mut last, mut since) = (0, Instant::now());
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = written.load(Ordering::Relaxed);
            if now > BOUND || since.elapsed() > Duration::from_secs(1) {
                break;
            }
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let ahead = written.load(Ordering::Relaxed);
        let grown = rss_kib(pid).saturating_sub(rss_before);
        assert!(
            ahead <= BOUND,
            "{mode}: the sender got {} MiB ahead of a reader that reads nothing",
            ahead >> 20
        );
        assert!(
            grown < 16 * 1024,
            "{mode}: lb RSS grew by {grown} KiB while the reader stalled"
        );
        // Now the reader reads: everything arrives, in order.
        servers.release.lock().unwrap().send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(
            servers.report(),
            (SLOW_PORT, TOTAL, true),
            "{mode}: what the slow reader read"
        );
        eprintln!(
            "{mode}: sender stalled {} KiB ahead; lb RSS grew {grown} KiB",
            ahead >> 10
        );
        drop(s);
    }
}

#[test]
fn client_reset_mid_transfer_leaks_nothing() {
    if !require_root("client_reset_mid_transfer_leaks_nothing") {
        return;
    }
    let bed = bed("spreset");
    let pid = lb_pid(&bed);
    let clients = bed.topo.client_addrs();
    // The control connection that found the daemon ready may still be closing.
    thread::sleep(Duration::from_millis(300));
    let start = open_fds(pid);
    for (i, mode) in MODES.iter().enumerate() {
        let port = ECHO_BASE + i as u16;
        let streams: Vec<TcpStream> = (0..8)
            .map(|c| connect(&bed, clients[c % clients.len()], port))
            .collect();
        for (c, s) in streams.iter().enumerate() {
            let mut w = s;
            send(&mut w, c as u64, 512 * 1024, None).expect("write before the reset");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_fds(pid) < start + 16 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let during = open_fds(pid);
        assert!(
            during >= start + 16,
            "{mode}: {during} fds open with 8 connections, {start} before"
        );
        for s in streams {
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .unwrap();
            drop(s); // an RST, with unread echo data in flight
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while open_fds(pid) > start && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let end = open_fds(pid);
        assert!(
            end <= start,
            "{mode}: lb has {end} fds open after the resets, {start} before"
        );
        let st = bed.lb.status();
        let svc = lb_tests::daemon::service_of(&st, &format!("echo-{mode}"));
        let active: u64 = svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["active_connections"].as_u64().unwrap())
            .sum();
        assert_eq!(active, 0, "{mode}: {svc}");
    }
}
