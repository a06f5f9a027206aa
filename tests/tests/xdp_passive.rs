//! Kernel passive health end to end (issue #12, `datapath = "xdp"`): `lb run` in the lb namespace
//! with the XDP program on its veths, loops of new connections (`Connection: close`) from several
//! client addresses, and active checks slow on purpose (interval 2 s, fall 3: at least 4 s to
//! notice anything), so what moves the clients here is the kernel and passive health.
//!
//! - A backend process is killed (its port answers SYNs with RSTs): the kernel marks it refusing
//!   at the first RST and sends later SYNs elsewhere. Client errors are at most the connections
//!   in flight, and no connection that started more than 50 ms after the kill failed.
//! - A backend is killed under a `Connection: close` loop from ONE client address over a small
//!   `snat_ports` range (issue #12's failover bench case): every SNAT port toward it was used
//!   within the last second, and the backend closed first, so it holds them in TIME_WAIT; once
//!   nothing listens, TIME_WAIT answers a new SYN with a bare ACK of the old connection, not an
//!   RST. The kernel makes such an answer an RST to the client and, from the second in a row
//!   (no SYN-ACK between), marks the backend refusing. No client waits for a SYN retransmission
//!   (the client namespace's `TcpExtTCPSynRetrans` does not move), errors are at most the
//!   connections in flight, and no connection that started more than 50 ms after the kill failed.
//! - A backend is black-holed (an nft rule in its namespace drops the SYNs): SYNs left without a
//!   SYN-ACK for `connect_timeout` are connect failures; `error_limit` of them mark it down with
//!   reason "passive" within `connect_timeout` + one check interval; the checks bring it back.
//! - Both primaries are killed with a healthy backup: each primary's first refusal marks it, and
//!   every later new connection reaches the backup (the marks outlive the kernel's one-second
//!   window: lb keeps them until a check passes).
//!
//! Times are printed as `MEASURED …` lines (stderr). Needs root; skips with a `SKIP:` line
//! otherwise. The XDP tests of this binary run one at a time (`Pins`).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::client::HttpConn;
use lb_tests::daemon::backend_of;
use lb_tests::loops::{Sample, client_loops, fault_began, unix_ms_at};
use lb_tests::synflood::{FloodSpec, send_bad_checksum_syns};
use lb_tests::{Child, Topology, connect_from, require_root};

/// Client loops (one per client address).
const CLIENTS: usize = 8;
/// Active checks: slow enough that they cannot be what moved the clients.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// The clients' own connect timeout: a SYN lost in a black hole is given up after this, and the
/// loop tries again (a new SYN), as impatient clients and web tiers do.
const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// The compass goal of issue #12: the last connection reaching a killed backend starts at most
/// this long after the kill.
const KILL_BOUND: Duration = Duration::from_millis(50);

/// A SNAT range small enough that every port is used toward the victim within the 1.5 s before
/// the kill (the loops open a few thousand connections a second; the backend's TIME_WAIT lasts
/// 60 s), with room for them: a port closed less than 100 ms ago is not taken, and 512 ports ran
/// out now and then (`snat_exhausted`, a dropped SYN retransmitted a second later).
const SMALL_SNAT_RANGE: &str = "snat_ports = \"20000-22047\"\n";
/// Loops of the one-address test, all from client 0.
const ONE_ADDRESS_LOOPS: usize = 8;
/// Their connect timeout: longer than a SYN retransmission (1 s), so a SYN left unanswered shows
/// as a retransmission (and a slow request), not as an error.
const PATIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The daemon's passive-health log lines (what a failed timing assertion needs to be read).
fn passive_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("passive"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(line: &str) {
    eprintln!("{line}");
}

/// An XDP service `web` on VIP:80 over backends 1..=n (`backups` among them), affinity off (every
/// new connection asks the kernel's ring), slow TCP checks, passive health on (the default).
fn config(topo: &Topology, socket: &Path, pins: &Path, n: usize, backups: &[usize]) -> String {
    let mut interfaces = vec!["\"to-c\"".to_string()];
    interfaces.extend((1..=n).map(|i| format!("\"to-b{i}\"")));
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nring_size = 1009\nlog_level = \"info\"\n\n[control]\nsocket = \"{}\"\n\n[xdp]\nmode = \"driver\"\ninterfaces = [{}]\npin_path = \"{}\"\n\
         \n[[service]]\nname = \"web\"\nlisten = \"{}:80\"\ndatapath = \"xdp\"\naffinity_timeout = \"0s\"\nconnect_timeout = \"{}ms\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"{}s\"\ntimeout = \"1s\"\nrise = 2\nfall = 3\nerror_limit = 3\n",
        socket.display(),
        interfaces.join(", "),
        pins.display(),
        topo.vip(),
        CONNECT_TIMEOUT.as_millis(),
        CHECK_INTERVAL.as_secs()
    );
    for i in 1..=n {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{HTTP_PORT}\"\nbackup = {}\n",
            topo.backend_addr(i),
            backups.contains(&i)
        ));
    }
    c
}

fn bed(tag: &str, pins: &Path, n: usize, backups: &[usize]) -> Bed {
    bed_with(tag, pins, n, backups, "")
}

/// [`bed`] with `xdp` added to the `[xdp]` section.
fn bed_with(tag: &str, pins: &Path, n: usize, backups: &[usize], xdp: &str) -> Bed {
    let bed = Bed::new(tag, n, CLIENTS, |topo, socket| {
        config(topo, socket, pins, n, backups).replace("[xdp]\n", &format!("[xdp]\n{xdp}"))
    });
    prepare_peers(&bed.topo);
    wait_checked(&bed, "web");
    bed
}

/// One GET on a new connection from `src`, giving the connect [`CLIENT_CONNECT_TIMEOUT`].
fn get(topo: &Topology, src: Ipv4Addr) -> Result<String, String> {
    get_within(topo, src, CLIENT_CONNECT_TIMEOUT)
}

/// [`get`] with the connect timeout `connect`.
fn get_within(topo: &Topology, src: Ipv4Addr, connect: Duration) -> Result<String, String> {
    let vip = SocketAddr::new(topo.vip().into(), 80);
    let stream = connect_from(topo.client_ns().name(), src, vip, connect).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let resp = HttpConn::new(stream, &vip.to_string())
        .get_close("/")
        .map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("status {}", resp.status));
    }
    Ok(resp.body.trim().to_string())
}

/// The backend client 0 is sent to by the kernel ring: its number.
fn home_of_first_client(bed: &Bed) -> usize {
    let (b, _) = bed.lb.which("web", bed.topo.client_addrs()[0]);
    let name = b.expect("client 0 has a backend");
    name.trim_start_matches('b').parse().expect("backend name bN")
}

/// Refused SYNs the kernel counted for `backend` (`connect_failures` in `lb status`).
fn refused(bed: &Bed, backend: &str) -> u64 {
    let st = bed.lb.status();
    backend_of(&st, "web", backend).unwrap()["connect_failures"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connect_failures for {backend}: {st}"))
}

/// SIGKILLs `victims` and waits until each has exited (its sockets closed by the kernel): the
/// failover bounds count from then, not from the signal (an exit can take a while on a loaded
/// machine, and until it ends the listener still accepts).
fn kill(victims: &mut [&mut Child]) {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    for v in victims.iter_mut() {
        v.signal(nix::sys::signal::Signal::SIGKILL).expect("kill");
    }
    // Until each has exited, seen without reaping it (WNOWAIT): the moment `kill` returns, not
    // when its output pipes are drained too (what reaping by `wait_timeout` waits for).
    let deadline = Instant::now() + Duration::from_secs(5);
    for v in victims.iter() {
        let pid = nix::unistd::Pid::from_raw(v.pid() as i32);
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        while matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive)) {
            assert!(
                Instant::now() < deadline,
                "a backend still runs 5 s after SIGKILL"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Stops the client loops when dropped: also when `act` panics, which would otherwise leave the
/// scope waiting for loops that never end.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the client loops, calls `act` 500 ms in, keeps going for `after`; (samples, when `act`
/// began, when it returned).
fn under_load(bed: &Bed, after: Duration, act: impl FnOnce() + Send) -> (Vec<Sample>, Instant, Instant) {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let loops = s.spawn(|| client_loops(&bed.topo, CLIENTS, &stop, |src| get(&bed.topo, src)));
        let _stops = StopOnDrop(&stop);
        thread::sleep(Duration::from_millis(500));
        let at = Instant::now();
        act();
        let done = Instant::now();
        thread::sleep(after);
        stop.store(true, Ordering::Relaxed);
        (loops.join().expect("loops"), at, done)
    })
}

#[test]
fn xdp_a_killed_backend_costs_only_the_connections_in_flight() {
    if !require_root("xdp_a_killed_backend_costs_only_the_connections_in_flight") {
        return;
    }
    let pins = Pins::new(pin_dir("xpk"));
    let mut bed = bed("xpasK", &pins.0, 3, &[]);
    let home = home_of_first_client(&bed);
    let name = format!("b{home}");
    let mut victim = bed.servers.remove(home - 1);
    let avoided_before = xdp_counter(&bed, "refusing_avoided");

    let (samples, kill_at, dead_at) =
        under_load(&bed, Duration::from_millis(1500), || kill(&mut [&mut victim]));

    let before = samples.iter().filter(|s| s.start < kill_at).count();
    let after: Vec<_> = samples.iter().filter(|s| s.start >= dead_at).collect();
    let errors: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    let last_error = errors
        .iter()
        .map(|s| s.start.saturating_duration_since(dead_at))
        .max()
        .unwrap_or_default();
    let served_elsewhere = after
        .iter()
        .filter(|s| matches!(&s.result, Ok(b) if *b != name))
        .count();
    let from_killed = after
        .iter()
        .filter(|s| s.result.as_deref() == Ok(name.as_str()))
        .count();
    let refused_syns = refused(&bed, &name);
    let avoided = xdp_counter(&bed, "refusing_avoided") - avoided_before;
    report(&format!(
        "MEASURED xdp passive (killed {name}, exited {} ms after SIGKILL): {} client errors of {} requests \
         ({before} before the kill); the last failed connection started {} ms after the exit; \
         {refused_syns} SYNs refused by {name}, {avoided} SYNs steered away by the kernel",
        (dead_at - kill_at).as_millis(),
        errors.len(),
        samples.len(),
        last_error.as_millis()
    ));
    assert!(before >= CLIENTS * 5, "only {before} requests before the kill");
    assert!(
        served_elsewhere >= CLIENTS * 5,
        "only {served_elsewhere} answers after the kill"
    );
    assert_eq!(from_killed, 0, "answers from the killed backend after the kill");
    // At most the connections in flight fail: the one of each client loop at the kill, and the
    // SYNs already on their way when the first RST came back (the kernel counted them refused).
    assert!(
        errors.len() <= CLIENTS + refused_syns as usize,
        "{} requests failed: {:?}",
        errors.len(),
        errors.iter().map(|s| &s.result).collect::<Vec<_>>()
    );
    assert!(
        last_error <= KILL_BOUND,
        "a connection that started {last_error:?} after the kill still failed"
    );
    assert!(refused_syns >= 1, "the kernel counted no refused SYN");
    assert!(
        avoided >= 1,
        "the kernel steered no SYN away from {name} (the ring sends client 0 there)"
    );
    // The checks (fall 3 × 2 s) have not spoken yet: the kernel alone moved the clients.
    let down = bed.lb.health_transitions("web", &name);
    assert!(
        down.iter().all(|(_, _, r)| !r.starts_with("health check")),
        "{down:?}"
    );
}

/// `ONE_ADDRESS_LOOPS` loops of new connections from client 0 alone for 1.5 s, `act`, then 1.5 s
/// more: (samples, when `act` began, when it returned).
fn one_address_under_load(bed: &Bed, act: impl FnOnce() + Send) -> (Vec<Sample>, Instant, Instant) {
    let src = bed.topo.client_addrs()[0];
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let loops: Vec<_> = (0..ONE_ADDRESS_LOOPS)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let result = get_within(&bed.topo, src, PATIENT_CONNECT_TIMEOUT);
                        out.push(Sample {
                            start,
                            end: Instant::now(),
                            result,
                        });
                        thread::sleep(Duration::from_millis(1));
                    }
                    out
                })
            })
            .collect();
        let _stops = StopOnDrop(&stop);
        thread::sleep(Duration::from_millis(1500));
        let at = Instant::now();
        act();
        let done = Instant::now();
        thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let samples = loops.into_iter().flat_map(|l| l.join().expect("loop")).collect();
        (samples, at, done)
    })
}

#[test]
fn xdp_a_killed_backend_holding_time_wait_leaves_no_client_waiting_for_a_syn_retransmission() {
    if !require_root(
        "xdp_a_killed_backend_holding_time_wait_leaves_no_client_waiting_for_a_syn_retransmission",
    ) {
        return;
    }
    // Which answer the first SYN after the kill meets is a race: a port whose last connection
    // was in flight at the kill holds no TIME_WAIT, and its RST marks the backend at once (the
    // case of the test above). Each round checks the same bounds; the TIME_WAIT case must turn up
    // within three (it does in most rounds).
    let mut stale = 0;
    for round in 1..=3 {
        stale = time_wait_round(round);
        if stale >= 1 {
            break;
        }
    }
    assert!(
        stale >= 1,
        "no SYN met TIME_WAIT at the killed backend in three rounds: the test did not test the design"
    );
}

/// One round of the test above on a fresh bed: its bounds asserted; the stale answers counted.
fn time_wait_round(round: usize) -> u64 {
    let pins = Pins::new(pin_dir(&format!("xpt{round}")));
    let mut bed = bed_with(&format!("xpasT{round}"), &pins.0, 3, &[], SMALL_SNAT_RANGE);
    let home = home_of_first_client(&bed);
    let name = format!("b{home}");
    let mut victim = bed.servers.remove(home - 1);
    let client_ns = bed.topo.client_ns();
    let (stale_before, collided_before) = (
        xdp_counter(&bed, "stale_answer"),
        xdp_counter(&bed, "stale_collision"),
    );
    let retrans_before = tcp_counters(client_ns)
        .get("TcpExtTCPSynRetrans")
        .copied()
        .unwrap_or(0);

    let (samples, kill_at, dead_at) = one_address_under_load(&bed, || kill(&mut [&mut victim]));

    let syn_retrans = tcp_counters(client_ns)
        .get("TcpExtTCPSynRetrans")
        .copied()
        .unwrap_or(0)
        - retrans_before;
    let stale = xdp_counter(&bed, "stale_answer") - stale_before;
    let collided = xdp_counter(&bed, "stale_collision") - collided_before;
    let refused_syns = refused(&bed, &name);
    let before = samples.iter().filter(|s| s.start < kill_at).count();
    let after: Vec<_> = samples.iter().filter(|s| s.start >= dead_at).collect();
    let errors: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    // The last connection that reached the killed backend: it failed (nothing answers there).
    let last_error = errors
        .iter()
        .map(|s| s.start.saturating_duration_since(dead_at))
        .max()
        .unwrap_or_default();
    let slowest = samples.iter().map(|s| s.end - s.start).max().unwrap_or_default();
    let served_elsewhere = after
        .iter()
        .filter(|s| matches!(&s.result, Ok(b) if *b != name))
        .count();
    // Requests that took a SYN retransmission (or more), by start relative to the kill (ms).
    let slow: Vec<(i128, &Result<String, String>)> = samples
        .iter()
        .filter(|s| s.end - s.start >= Duration::from_millis(900))
        .map(|s| {
            let ms = if s.start >= kill_at {
                (s.start - kill_at).as_millis() as i128
            } else {
                -((kill_at - s.start).as_millis() as i128)
            };
            (ms, &s.result)
        })
        .collect();
    let from_killed = after
        .iter()
        .filter(|s| s.result.as_deref() == Ok(name.as_str()))
        .count();
    report(&format!(
        "MEASURED xdp passive (round {round}: killed {name}, exited {} ms after SIGKILL, one client address, \
         its ports in TIME_WAIT): {} client errors of {} requests ({before} before the kill); the last \
         failed connection started {} ms after the exit; {stale} stale answers made RSTs, {collided} collisions, {refused_syns} SYNs \
         refused; client SYN retransmissions {syn_retrans}; slowest request {} ms; slow requests \
         (start after the kill in ms, result) {slow:?}",
        (dead_at - kill_at).as_millis(),
        errors.len(),
        samples.len(),
        last_error.as_millis(),
        slowest.as_millis()
    ));
    assert!(
        before >= ONE_ADDRESS_LOOPS * 5,
        "only {before} requests before the kill"
    );
    assert!(
        served_elsewhere >= ONE_ADDRESS_LOOPS * 5,
        "only {served_elsewhere} answers after the kill"
    );
    assert_eq!(from_killed, 0, "answers from the killed backend after the kill");
    // Nobody waited a second for a SYN retransmission: every SYN was answered at once, by
    // another backend or by the kernel's RST. The one exception is by design: a bare ACK on a
    // port the datapath holds (the minute after a start that made the maps, or a port reclaimed
    // from a half-open flow) is a collision passed to the client, which resets it and sends its
    // SYN again (README, kernel passive health); each such SYN is counted as a collision.
    assert!(
        syn_retrans <= collided,
        "clients retransmitted {syn_retrans} SYNs, {collided} of them after a collision (slowest request {slowest:?})"
    );
    // At most the connections in flight fail: the one of each loop at the kill, and the SYNs the
    // kernel answered with an RST before it marked the backend (stale answers and refusals).
    assert!(
        errors.len() <= ONE_ADDRESS_LOOPS + (stale + refused_syns) as usize,
        "{} requests failed: {:?}",
        errors.len(),
        errors.iter().map(|s| &s.result).collect::<Vec<_>>()
    );
    assert!(
        last_error <= KILL_BOUND,
        "a connection that started {last_error:?} after the kill still failed"
    );
    // The small SNAT range reuses ports without running out (a dropped SYN would be retransmitted).
    assert_eq!(xdp_counter(&bed, "snat_exhausted"), 0, "the SNAT range ran out");
    // The checks (fall 3 × 2 s) have not spoken yet: the kernel alone moved the clients.
    let down = bed.lb.health_transitions("web", &name);
    assert!(
        down.iter().all(|(_, _, r)| !r.starts_with("health check")),
        "{down:?}"
    );
    stale
}

#[test]
fn xdp_a_black_holed_backend_is_marked_down_within_connect_timeout_and_one_check_interval() {
    if !require_root("xdp_a_black_holed_backend_is_marked_down_within_connect_timeout_and_one_check_interval")
    {
        return;
    }
    let pins = Pins::new(pin_dir("xpb"));
    let bed = bed("xpasB", &pins.0, 3, &[]);
    let home = home_of_first_client(&bed);
    let name = format!("b{home}");
    let ns = bed.topo.backend_ns(home);
    let rules = format!(
        "table ip lbxpassive {{\n chain input {{\n  type filter hook input priority 0;\n  tcp dport {HTTP_PORT} tcp flags & (syn|ack) == syn drop\n }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("{}-nft", lb_tests::unique_prefix("xpasB")));
    std::fs::write(&path, rules).unwrap();

    let (samples, exec_at, applied_at) = under_load(
        &bed,
        CONNECT_TIMEOUT + CHECK_INTERVAL + Duration::from_millis(500),
        || {
            let out = ns.exec(&["nft", "-f", path.to_str().unwrap()]).expect("nft");
            assert!(
                out.status.success(),
                "nft: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );
    let _ = std::fs::remove_file(&path);
    let errors: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    // The black hole began no later than the first connect it swallowed.
    let drop_at = fault_began(&samples, exec_at, applied_at, |s| s.result.is_err());
    let drop_ms = unix_ms_at(drop_at);

    let down = bed.lb.health_transitions("web", &name);
    let Some((at_ms, to, reason)) = down.first().cloned() else {
        let _ = ns.exec(&["nft", "delete", "table", "ip", "lbxpassive"]);
        panic!("{name} never went down\n{}", bed.lb.log_tail(40));
    };
    let moved = Duration::from_millis(at_ms.saturating_sub(drop_ms));
    let last_error = errors
        .iter()
        .map(|s| s.start.saturating_duration_since(drop_at))
        .max()
        .unwrap_or_default();
    report(&format!(
        "MEASURED xdp passive (black-holed {name}): marked down {} ms after the drop rule took effect \
         ({reason}; `nft` took {} ms); bound connect_timeout {} ms + interval {} ms; {} client errors \
         (connects given up after {} ms) of {} requests, the last starting {} ms after the drop",
        moved.as_millis(),
        (applied_at - exec_at).as_millis(),
        CONNECT_TIMEOUT.as_millis(),
        CHECK_INTERVAL.as_millis(),
        errors.len(),
        CLIENT_CONNECT_TIMEOUT.as_millis(),
        samples.len(),
        last_error.as_millis()
    ));
    assert_eq!(to, "down");
    assert!(reason.starts_with("passive: "), "{name} went down by {reason:?}");
    assert!(reason.contains("timed out"), "{reason}");
    assert!(
        moved <= CONNECT_TIMEOUT + CHECK_INTERVAL,
        "marked down only after {moved:?}\n{}",
        passive_lines(&bed.lb.log())
    );
    // The last connection that reached it (a lost SYN, given up by the client) started within
    // the bound; everything later went elsewhere.
    assert!(
        last_error <= CONNECT_TIMEOUT + CHECK_INTERVAL,
        "a connection starting {last_error:?} after the drop was lost"
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.start >= drop_at + moved + Duration::from_millis(100))
            .all(|s| s.result.is_ok()),
        "connections failed after {name} was marked down"
    );

    // Lift the rule: the checks bring it back after `rise` successes.
    let lifted = Instant::now();
    let _ = ns.exec(&["nft", "delete", "table", "ip", "lbxpassive"]);
    let (st, up_at) = bed
        .lb
        .wait_status(CHECK_INTERVAL * 5, "back up through the checks", |st| {
            backend_of(st, "web", &name).is_some_and(|b| b["health"] == "up")
        });
    let back = bed.lb.health_transitions("web", &name);
    let (_, to, reason) = back.last().unwrap();
    assert_eq!(to, "up");
    assert!(reason.starts_with("health check"), "{reason}");
    assert!(backend_of(&st, "web", &name).unwrap()["check"]["consecutive_ok"].as_u64() >= Some(2));
    report(&format!(
        "MEASURED xdp passive (black-holed {name}): back up {} ms after the rule went (rise 2, interval {} s)",
        (up_at - lifted).as_millis(),
        CHECK_INTERVAL.as_secs()
    ));
    // And takes clients again.
    let (b, _) = bed.lb.which("web", bed.topo.client_addrs()[0]);
    assert_eq!(b.as_deref(), Some(name.as_str()));
    assert_eq!(
        get(&bed.topo, bed.topo.client_addrs()[0]).as_deref(),
        Ok(name.as_str())
    );
}

#[test]
fn xdp_both_primaries_killed_send_every_later_connection_to_the_backup() {
    if !require_root("xdp_both_primaries_killed_send_every_later_connection_to_the_backup") {
        return;
    }
    let pins = Pins::new(pin_dir("xpu"));
    let mut bed = bed("xpasU", &pins.0, 3, &[3]);
    // Servers: http b1, b2, b3, then echo; take the two primaries' http servers.
    let mut b2 = bed.servers.remove(1);
    let mut b1 = bed.servers.remove(0);
    let stale_before = xdp_counter(&bed, "stale_answer");
    let (samples, kill_at, dead_at) = under_load(&bed, Duration::from_millis(1500), || {
        kill(&mut [&mut b1, &mut b2]);
    });
    // SYNs that met TIME_WAIT at a primary before it was marked: each got an RST at once.
    let stale = xdp_counter(&bed, "stale_answer") - stale_before;

    let before: Vec<_> = samples.iter().filter(|s| s.start < kill_at).collect();
    let after: Vec<_> = samples.iter().filter(|s| s.start >= dead_at).collect();
    let errors: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    let late_errors = errors.iter().filter(|s| s.start > dead_at + KILL_BOUND).count();
    let on_backup = after.iter().filter(|s| s.result.as_deref() == Ok("b3")).count();
    let last_error = errors
        .iter()
        .map(|s| s.start.saturating_duration_since(dead_at))
        .max()
        .unwrap_or_default();
    report(&format!(
        "MEASURED xdp passive (b1 and b2 killed, exited {} ms after SIGKILL, b3 backup): {} client errors \
         of {} requests (the last starting {} ms after the exits); {on_backup} of {} later requests answered by the backup; \
         {} SYNs steered away by the kernel; {stale} stale answers made RSTs",
        (dead_at - kill_at).as_millis(),
        errors.len(),
        samples.len(),
        last_error.as_millis(),
        after.len(),
        xdp_counter(&bed, "refusing_avoided")
    ));
    assert!(
        before
            .iter()
            .filter(|s| s.end < kill_at)
            .all(|s| matches!(s.result.as_deref(), Ok("b1" | "b2"))),
        "before the kill only the primaries answer"
    );
    // One failed attempt per primary (its first RST marks it), the SYNs that met TIME_WAIT there
    // before (each answered by an RST at once: the second in a row marks it), plus the
    // connections in flight.
    assert!(
        errors.len() <= CLIENTS + 2 + stale as usize,
        "{} requests failed: {:?}",
        errors.len(),
        errors.iter().map(|s| &s.result).collect::<Vec<_>>()
    );
    assert_eq!(late_errors, 0, "new connections failed after the first refusals");
    assert!(
        on_backup >= CLIENTS * 5,
        "only {on_backup} answers from the backup"
    );
    assert!(
        after
            .iter()
            .filter(|s| s.start > dead_at + KILL_BOUND)
            .all(|s| s.result.as_deref() == Ok("b3")),
        "a later connection reached a primary"
    );
    // The marks outlived the kernel's one-second window (lb keeps them until a check passes).
    assert!(
        after
            .iter()
            .filter(|s| s.start > dead_at + Duration::from_millis(1200))
            .count()
            >= CLIENTS,
        "too few requests after the first second to tell"
    );

    // The primaries listen again: once a check passes (and, if passive health marked them down,
    // `rise` checks), lb clears the marks and new connections reach the primaries again.
    let restarted = Instant::now();
    for i in 1..=2 {
        let name = format!("b{i}");
        let args = [
            "http",
            "--listen",
            &format!("0.0.0.0:{HTTP_PORT}"),
            "--name",
            &name,
        ];
        bed.servers
            .push(lb_tests::servers::start_testsrv(bed.topo.backend_ns(i), &args).expect("restart"));
    }
    let client = bed.topo.client_addrs()[0];
    let deadline = Instant::now() + CHECK_INTERVAL * 5;
    loop {
        let (which, _) = bed.lb.which("web", client);
        if matches!(which.as_deref(), Some("b1" | "b2"))
            && matches!(get(&bed.topo, client).as_deref(), Ok("b1" | "b2"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the primaries never took new connections again (which: {which:?})\n{}",
            bed.lb.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    report(&format!(
        "MEASURED xdp passive (b1 and b2 restarted): new connections reach a primary again {} ms later",
        restarted.elapsed().as_millis()
    ));
}

/// SYNs the backend's kernel drops (a bad TCP checksum, from spoofed sources), forwarded by XDP,
/// go unanswered past `connect_timeout` like SYNs to a black-holed backend. A client's junk must not
/// take a healthy backend down: a probe confirms first, it answers, and nobody is marked down.
#[test]
fn xdp_syns_a_backend_drops_as_invalid_do_not_mark_it_down() {
    if !require_root("xdp_syns_a_backend_drops_as_invalid_do_not_mark_it_down") {
        return;
    }
    let pins = Pins::new(pin_dir("xpc"));
    let bed = bed("xpasC", &pins.0, 2, &[]);
    let (client, lb) = (bed.topo.client_ns(), bed.topo.lb_ns());
    let spec = FloodSpec {
        netns: client.name().to_string(),
        interface: bed.topo.peer_if().to_string(),
        src_mac: mac(client, bed.topo.peer_if()),
        dst_mac: mac(lb, bed.topo.lb_client_if()),
        base: Ipv4Addr::new(10, 99, 0, 0),
        count: 1 << 16,
        target: std::net::SocketAddrV4::new(bed.topo.vip(), 80),
    };
    send_bad_checksum_syns(&spec, 40, Duration::from_millis(20)).expect("send the SYNs");
    // Past connect_timeout every one of them is a timed-out connect; the confirming probes take
    // at most the check's timeout (1 s).
    thread::sleep(CONNECT_TIMEOUT + Duration::from_millis(1500));
    for b in ["b1", "b2"] {
        let moves = bed.lb.health_transitions("web", b);
        assert!(
            moves.is_empty(),
            "{b} moved by invalid SYNs: {moves:?}\n{}",
            bed.lb.log_tail(30)
        );
    }
    assert!(
        bed.lb.log().contains("answers a check: not marked down"),
        "no confirming probe ran\n{}",
        bed.lb.log_tail(30)
    );
    let body = get(&bed.topo, bed.topo.client_addrs()[0]).expect("GET after the invalid SYNs");
    assert!(body.starts_with('b'), "{body}");
}
