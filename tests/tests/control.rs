//! Runtime changes through the `lb` CLI (drain, disable, weight, add, remove) take effect at once
//! without breaking open connections; the control socket survives malformed and idle clients and
//! refuses uids it does not know; `lb check-config` names file and line.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Bed, CLI_TIMEOUT, Lb, busiest, close_echo, config_toml, echo_roundtrip, line_of, std_services};
use lb_tests::{HttpConn, Netns, lb_bin, require_root, run_with_timeout, unique_prefix, workspace_dir};
use serde_json::Value;

/// Backends `name` of `service` per status: (state, weight, ring_slots).
fn backend_info(lb: &Lb, service: &str, name: &str) -> (String, u64, u64) {
    let b = lb
        .backend(service, name)
        .unwrap_or_else(|| panic!("{service}/{name} missing from status"));
    (
        b["state"].as_str().unwrap().to_string(),
        b["weight"].as_u64().unwrap(),
        b["ring_slots"].as_u64().unwrap(),
    )
}

/// Common start of the runtime-change tests: 12 known clients, the busiest backend as target, a
/// keep-alive HTTP connection open on the target and an echo connection open on some backend.
struct Scene {
    known: BTreeMap<Ipv4Addr, String>,
    fresh: Vec<Ipv4Addr>,
    target: String,
    keepalive: HttpConn,
    echo: std::net::TcpStream,
    echo_backend: String,
}

fn scene(bed: &Bed) -> Scene {
    let clients = bed.topo.client_addrs();
    let (first, fresh) = clients.split_at(12);
    let known = bed.wave(first);
    let target = busiest(&known);
    let on_target = *known.iter().find(|(_, b)| **b == target).unwrap().0;
    let mut keepalive = HttpConn::connect_from(bed.topo.client_ns().name(), on_target, bed.web()).unwrap();
    assert_eq!(keepalive.get("/").unwrap().body.trim(), target);
    let echo = bed.open_echo(fresh[fresh.len() - 1]);
    let echo_backend = bed.lb.only_active_backend("echo");
    Scene {
        known,
        fresh: fresh[..fresh.len() - 1].to_vec(),
        target,
        keepalive,
        echo,
        echo_backend,
    }
}

/// The open connections still work: the keep-alive one still reaches `target`, the echo echoes.
fn open_connections_survive(s: &mut Scene, what: &str) {
    let r = s
        .keepalive
        .get("/again")
        .unwrap_or_else(|e| panic!("keep-alive connection after {what}: {e}"));
    assert_eq!(r.body.trim(), s.target, "keep-alive connection after {what}");
    echo_roundtrip(&mut s.echo, format!("still there after {what}").as_bytes());
}

#[test]
fn drain_keeps_known_clients_and_refuses_new_ones() {
    if !require_root("drain_keeps_known_clients_and_refuses_new_ones") {
        return;
    }
    let bed = Bed::new("cdrain", 3, 36, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    let mut s = scene(&bed);
    let (fresh, later) = s.fresh.split_at(12);
    let (fresh, later) = (fresh.to_vec(), later.to_vec());

    bed.lb.cli_ok(&["backend", "drain", "web", &s.target]);
    bed.lb.cli_ok(&["backend", "drain", "echo", &s.echo_backend]);
    assert_eq!(backend_info(&bed.lb, "web", &s.target).0, "drain");
    assert_eq!(backend_info(&bed.lb, "echo", &s.echo_backend).0, "drain");

    // `which` still sends the drained backend's known clients to it, by affinity.
    for (c, b) in &s.known {
        let (w, reason) = bed.lb.which("web", *c);
        assert_eq!(
            (w.as_deref(), reason.as_str()),
            (Some(b.as_str()), "affinity"),
            "which {c}"
        );
    }
    // Known clients, the drained backend's included, keep their backend (several connections each).
    for _ in 0..3 {
        assert_eq!(bed.wave(&s.known.keys().copied().collect::<Vec<_>>()), s.known);
    }
    // New clients never reach it; `which` agrees.
    for (c, b) in bed.wave(&fresh) {
        assert_ne!(b, s.target, "new client {c} reached drained {}", s.target);
        assert_eq!(bed.lb.which("web", c).0.as_deref(), Some(b.as_str()));
    }
    open_connections_survive(&mut s, "drain");

    // Enable again: unseen clients are offered the backend again.
    bed.lb.cli_ok(&["backend", "enable", "web", &s.target]);
    assert_eq!(backend_info(&bed.lb, "web", &s.target).0, "active");
    let back = later
        .iter()
        .find(|c| bed.lb.which("web", **c).0.as_deref() == Some(s.target.as_str()))
        .copied()
        .unwrap_or_else(|| panic!("no unseen client maps to {} after enable", s.target));
    assert_eq!(bed.get(back), s.target);
    close_echo(s.echo);
}

#[test]
fn disable_sends_nobody_but_keeps_open_connections() {
    if !require_root("disable_sends_nobody_but_keeps_open_connections") {
        return;
    }
    let bed = Bed::new("cdisab", 3, 24, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    let mut s = scene(&bed);
    bed.lb.cli_ok(&["backend", "disable", "web", &s.target]);
    bed.lb.cli_ok(&["backend", "disable", "echo", &s.echo_backend]);
    assert_eq!(backend_info(&bed.lb, "web", &s.target).0, "maintenance");

    let known: Vec<_> = s.known.keys().copied().collect();
    let again = bed.wave(&known);
    for (c, b) in &again {
        assert_ne!(*b, s.target, "client {c} reached {} in maintenance", s.target);
        if s.known[c] != s.target {
            assert_eq!(*b, s.known[c], "client {c} of an untouched backend moved");
        }
        assert_ne!(bed.lb.which("web", *c).0.as_deref(), Some(s.target.as_str()));
    }
    for (c, b) in bed.wave(&s.fresh) {
        assert_ne!(b, s.target, "new client {c} reached {} in maintenance", s.target);
    }
    // A new echo connection avoids the disabled echo backend too.
    let src = s.fresh[0];
    let other = bed.open_echo(src);
    let st = bed.lb.backend("echo", &s.echo_backend).unwrap();
    assert_eq!(
        st["active_connections"], 1,
        "new echo connection landed on the disabled backend: {st}"
    );
    open_connections_survive(&mut s, "disable");
    close_echo(other);
    close_echo(s.echo);
}

#[test]
fn weight_zero_takes_no_new_clients() {
    if !require_root("weight_zero_takes_no_new_clients") {
        return;
    }
    let bed = Bed::new("cweight", 3, 36, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    let mut s = scene(&bed);
    let (fresh, later) = s.fresh.split_at(12);
    let (fresh, later) = (fresh.to_vec(), later.to_vec());

    bed.lb.cli_ok(&["backend", "weight", "web", &s.target, "0"]);
    let (state, weight, slots) = backend_info(&bed.lb, "web", &s.target);
    assert_eq!((state.as_str(), weight, slots), ("active", 0, 0));
    for (c, b) in bed.wave(&fresh) {
        assert_ne!(b, s.target, "new client {c} reached {} with weight 0", s.target);
    }
    // Weight 0 keeps the clients that have affinity.
    let known: Vec<_> = s.known.keys().copied().collect();
    assert_eq!(bed.wave(&known), s.known);
    open_connections_survive(&mut s, "weight 0");

    // A heavy weight takes the larger share of the ring and of new clients at once.
    bed.lb.cli_ok(&["backend", "weight", "web", &s.target, "8"]);
    let (_, weight, slots) = backend_info(&bed.lb, "web", &s.target);
    assert_eq!(weight, 8);
    let total: u64 = ["b1", "b2", "b3"]
        .iter()
        .map(|b| backend_info(&bed.lb, "web", b).2)
        .sum();
    assert!(
        slots * 10 >= total * 7,
        "weight 8 of 10 got {slots} of {total} ring slots"
    );
    let later = bed.wave(&later);
    let n = later.values().filter(|b| **b == s.target).count();
    assert!(
        n * 2 > later.len(),
        "weight 8 of 10 took only {n} of {} new clients",
        later.len()
    );

    // Bad weights are refused with an error and change nothing.
    let out = bed.lb.cli(&["backend", "weight", "web", &s.target, "300"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: "),
        "{out:?}"
    );
    assert_eq!(backend_info(&bed.lb, "web", &s.target).1, 8);
    close_echo(s.echo);
}

#[test]
fn add_and_remove_backend_at_runtime() {
    if !require_root("add_and_remove_backend_at_runtime") {
        return;
    }
    // Four backend namespaces; the config names only b1..b3.
    let bed = Bed::new("caddrm", 4, 44, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 3, true))
    });
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2", "b3"]);
    let mut s = scene(&bed);

    let b4 = format!("{}:8080", bed.topo.backend_addr(4));
    bed.lb.cli_ok(&["backend", "add", "web", &b4, "--name", "b4"]);
    let (state, weight, slots) = backend_info(&bed.lb, "web", "b4");
    assert_eq!((state.as_str(), weight), ("active", 1));
    assert!(slots > 0, "b4 has no ring slots");
    // A duplicate is refused.
    let out = bed.lb.cli(&["backend", "add", "web", &b4, "--name", "b4"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: "),
        "{out:?}"
    );

    // Known clients stay put; some new clients reach b4.
    let known: Vec<_> = s.known.keys().copied().collect();
    assert_eq!(bed.wave(&known), s.known, "adding b4 moved known clients");
    let (fresh, later) = s.fresh.split_at(20);
    let (fresh, later) = (fresh.to_vec(), later.to_vec());
    let predicted: BTreeMap<_, _> = fresh
        .iter()
        .map(|c| (*c, bed.lb.which("web", *c).0.unwrap()))
        .collect();
    let new = bed.wave(&fresh);
    assert_eq!(new, predicted, "new clients vs `lb which` after the add");
    assert!(
        new.values().any(|b| b == "b4"),
        "no new client reached the added b4: {new:?}"
    );

    // Remove the busiest original backend (and the echo connection's backend).
    bed.lb.cli_ok(&["backend", "remove", "web", &s.target]);
    bed.lb.cli_ok(&["backend", "remove", "echo", &s.echo_backend]);
    assert!(
        !bed.lb.backend_names("web").contains(&s.target),
        "still in status"
    );
    assert!(
        !bed.lb.backend_names("echo").contains(&s.echo_backend),
        "still in status"
    );
    let idx: usize = s.target[1..].parse().unwrap();
    let removed_addr = format!("{}:8080", bed.topo.backend_addr(idx));
    let text = bed.lb.cli_ok(&["status"]);
    assert!(
        !text.contains(&removed_addr),
        "removed backend {removed_addr} still in the status table:\n{text}"
    );

    let all: Vec<_> = known.iter().chain(&fresh).chain(&later).copied().collect();
    for (c, b) in bed.wave(&all) {
        assert_ne!(b, s.target, "client {c} reached removed {}", s.target);
        if let Some(k) = s.known.get(&c).or(new.get(&c))
            && *k != s.target
        {
            assert_eq!(b, *k, "client {c} of a remaining backend moved");
        }
    }
    open_connections_survive(&mut s, "remove");

    // Removing it again names what is missing.
    let out = bed.lb.cli(&["backend", "remove", "web", &s.target]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains(&s.target), "{err}");
    close_echo(s.echo);
}

#[test]
fn service_add_and_remove_at_runtime() {
    if !require_root("service_add_and_remove_at_runtime") {
        return;
    }
    let bed = Bed::new("csvc", 2, 3, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);
    let listen = format!("{}:7", bed.topo.vip());
    bed.lb.cli_ok(&[
        "service",
        "add",
        "echo2",
        "--listen",
        &listen,
        "--affinity-timeout",
        "10m",
    ]);
    let e1 = format!("{}:7", bed.topo.backend_addr(2));
    bed.lb.cli_ok(&["backend", "add", "echo2", &e1, "--name", "e1"]);
    let list = bed.lb.cli_ok(&["service", "list"]);
    assert!(list.contains("echo2") && list.contains(&listen), "{list}");
    let st = bed.lb.status();
    let svc = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo2")
        .unwrap();
    assert_eq!(svc["affinity_timeout_secs"], 600, "{svc}");

    let mut echo = bed.open_echo(bed.topo.client_addrs()[1]);
    assert_eq!(bed.lb.backend("echo2", "e1").unwrap()["active_connections"], 1);

    // A second service on a listen address in use, or with a bad duration, is refused.
    let taken = format!("{}:80", bed.topo.vip());
    for args in [
        vec!["service", "add", "web2", "--listen", taken.as_str()],
        vec![
            "service",
            "add",
            "web3",
            "--listen",
            "10.0.0.100:81",
            "--affinity-timeout",
            "soon",
        ],
    ] {
        let out = bed.lb.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("error: "),
            "{out:?}"
        );
    }
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2"]);
    assert!(!bed.lb.cli_ok(&["service", "list"]).contains("web3"));

    // Remove: no new connections, the open one goes on, the service is gone from status.
    bed.lb.cli_ok(&["service", "remove", "echo2"]);
    let t = Instant::now();
    loop {
        match lb_tests::connect_from(
            bed.topo.client_ns().name(),
            src,
            bed.echo(),
            Duration::from_secs(1),
        ) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect to a removed service: {e}"),
            Ok(_) => assert!(
                t.elapsed() < Duration::from_secs(1),
                "removed service still accepts"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    echo_roundtrip(&mut echo, b"service removed, connection kept");
    let st = bed.lb.status();
    assert!(
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "echo2"),
        "{st}"
    );
    assert_eq!(bed.get(src), home);
    close_echo(echo);
}

/// Read one response line from `r` and parse it.
fn read_response(r: &mut impl BufRead) -> Value {
    let mut line = String::new();
    let n = r.read_line(&mut line).expect("read response line");
    assert!(n > 0, "connection closed instead of answering");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("response is not JSON ({e}): {line:?}"))
}

fn assert_error(v: &Value, contains: &str, what: &str) {
    assert_eq!(v["ok"], false, "{what}: {v}");
    let e = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error text: {v}"));
    assert!(
        e.to_lowercase().contains(&contains.to_lowercase()),
        "{what}: error {e:?} should mention {contains:?}"
    );
}

#[test]
fn malformed_requests_get_json_errors() {
    if !require_root("malformed_requests_get_json_errors") {
        return;
    }
    let mut bed = Bed::new("cmalf", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let sock = &bed.lb.socket;
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);

    // Several bad requests on one connection: each gets its error line, the connection stays.
    let cases: &[(&[u8], &str)] = &[
        (b"not json\n", "bad request"),
        (b"{\"cmd\":\"explode\"}\n", "explode"),
        (
            b"{\"cmd\":\"set-weight\",\"service\":\"web\",\"backend\":\"b1\"}\n",
            "weight",
        ),
        (
            b"{\"cmd\":\"set-weight\",\"service\":\"web\",\"backend\":\"b1\",\"weight\":\"heavy\"}\n",
            "invalid type",
        ),
        (
            b"{\"cmd\":\"set-weight\",\"service\":7,\"backend\":\"b1\",\"weight\":1}\n",
            "invalid type",
        ),
        (b"{\"cmd\":\"status\",\"extra\":1}\n", "extra"),
        (b"{\"service\":\"web\"}\n", "cmd"),
        (b"[1,2,3]\n", "bad request"),
        (b"\n", "empty"),
        (b"   \r\n", "empty"),
        (b"\xff\xfe{\n", "bad request"),
        (
            b"{\"cmd\":\"set-state\",\"service\":\"web\",\"backend\":\"nope\",\"state\":\"drain\"}\n",
            "nope",
        ),
        (
            b"{\"cmd\":\"set-state\",\"service\":\"nosuch\",\"backend\":\"b1\",\"state\":\"drain\"}\n",
            "nosuch",
        ),
        (
            b"{\"cmd\":\"which\",\"service\":\"web\",\"client\":\"not-an-ip\"}\n",
            "not-an-ip",
        ),
        (
            b"{\"cmd\":\"add-backend\",\"service\":\"web\",\"address\":\"10.9.9.9\"}\n",
            "10.9.9.9",
        ),
    ];
    let stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for (req, want) in cases {
        (&stream).write_all(req).unwrap();
        let v = read_response(&mut reader);
        assert_error(&v, want, &String::from_utf8_lossy(req));
    }
    (&stream).write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let v = read_response(&mut reader);
    assert_eq!(v["ok"], true, "status after errors on the same connection: {v}");
    drop(reader);
    drop(stream);

    // A 100 KiB line without newline: an error, then the connection is closed.
    let stream = UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let big = vec![b'x'; 100 * 1024];
    let t = Instant::now();
    (&stream).write_all(&big).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let v = read_response(&mut reader);
    assert_error(&v, "longer than", "100 KiB line");
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "more after the error: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "after the error: {e}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    drop(reader);
    drop(stream);

    // A client that sends half a request and hangs up does not bother anyone.
    {
        let s = UnixStream::connect(sock).unwrap();
        (&s).write_all(b"{\"cmd\":\"sta").unwrap();
    }

    // The daemon is alive, unchanged, and forwarding.
    assert!(bed.lb.child.is_running(), "daemon died:\n{}", bed.lb.log());
    let st = bed.lb.status();
    for b in st["services"][0]["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "active", "{st}");
        assert_eq!(b["weight"], 1, "{st}");
    }
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2"]);
    assert_eq!(bed.get(src), home);

    // The CLI shows daemon errors as `error: …` with exit status 1.
    let out = bed.lb.cli(&["backend", "drain", "web", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("nope"), "{err}");
    let out = bed.lb.cli(&["--json", "backend", "drain", "web", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json error output is JSON");
    assert_error(&v, "nope", "--json drain of unknown backend");
}

#[test]
fn idle_control_connections_do_not_stall_the_daemon() {
    if !require_root("idle_control_connections_do_not_stall_the_daemon") {
        return;
    }
    let mut bed = Bed::new("cidle", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, false))
    });
    let src = bed.topo.client_addrs()[0];
    let home = bed.get(src);

    // 70 clients connect and say nothing: more than the 64 served at once plus root's 4 (the
    // test runs as root, so its connections may take root's own slots too).
    const SERVED: usize = 64 + 4;
    let idle: Vec<UnixStream> = (0..70)
        .map(|k| UnixStream::connect(&bed.lb.socket).unwrap_or_else(|e| panic!("idle connection {k}: {e}")))
        .collect();
    // Forwarding does not care.
    assert_eq!(bed.get(src), home);
    assert!(!bed.get(bed.topo.client_addrs()[1]).is_empty());

    // A new CLI call answers promptly: either served or told why not.
    let t = Instant::now();
    let out = bed.lb.cli(&["status"]);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "lb status took {took:?} with 70 idle connections"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("too many control connections"),
        "lb status with 70 idle connections: {out:?}"
    );
    // As many as are beyond the limit were told so, not left hanging. Which ones depends on when
    // the slots of the test's earlier control calls were given back, so all are polled.
    let beyond = idle.len() - SERVED;
    let mut told = vec![false; idle.len()];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for (s, t) in idle.iter().zip(told.iter_mut()) {
            let mut buf = [0u8; 256];
            s.set_nonblocking(true).unwrap();
            if let Ok(n) = (&*s).read(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).contains("too many control connections")
            {
                *t = true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // One or two more may be told when the slot of the test's last control call was not yet
    // given back as the 70 arrived.
    let told = told.iter().filter(|t| **t).count();
    assert!(
        (beyond..=beyond + 2).contains(&told),
        "of the {beyond} idle connections beyond the limit, {told} were told so"
    );
    assert_eq!(bed.get(src), home);

    drop(idle);
    // Once they are gone, the socket serves again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = bed.lb.cli(&["--json", "status"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status still refused after closing idle ones: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(bed.get(src), home);
    assert!(bed.lb.child.is_running(), "daemon died:\n{}", bed.lb.log());
}

/// `lb --socket S status` run as uid/gid 65534 (nobody).
fn status_as_nobody(socket: &Path) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lb_bin())
        .arg("--socket")
        .arg(socket)
        .arg("status");
    run_with_timeout(cmd, CLI_TIMEOUT).expect("run setpriv lb status")
}

#[test]
fn control_socket_refuses_unknown_uids() {
    if !require_root("control_socket_refuses_unknown_uids") {
        return;
    }
    let ns = Netns::new(&format!("{}-lb", unique_prefix("cuid"))).unwrap();

    // Mode 0666: nobody can connect, but the daemon refuses the uid.
    {
        let lb = Lb::start(&ns, "cuid1", |s| config_toml(s, "", "mode = \"0666\"", &[]));
        let out = status_as_nobody(&lb.socket);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("uid 65534") && err.contains("not allowed"), "{err}");
        // The log is read by a background thread: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !lb.log().contains("65534") {
            assert!(Instant::now() < deadline, "refusal not logged:\n{}", lb.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Root still works.
        lb.status();
    }
    // allowed_uids = [65534]: it works.
    {
        let lb = Lb::start(&ns, "cuid2", |s| {
            config_toml(s, "", "mode = \"0666\"\nallowed_uids = [65534]", &[])
        });
        let out = status_as_nobody(&lb.socket);
        assert!(out.status.success(), "{out:?}");
    }
    // Default mode 0600: uid 65534 cannot even connect.
    {
        let lb = Lb::start(&ns, "cuid3", |s| config_toml(s, "", "", &[]));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&lb.socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode");
        let out = status_as_nobody(&lb.socket);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{err}");
        assert!(
            !lb.log().contains("65534"),
            "the daemon should never have seen uid 65534"
        );
    }
}

#[test]
fn check_config_good_and_bad() {
    // Needs no root: `lb check-config` only reads a file.
    let good = workspace_dir().join("examples/tcp.toml");
    let run = |file: &Path| {
        let mut cmd = Command::new(lb_bin());
        cmd.arg("check-config").arg(file);
        run_with_timeout(cmd, CLI_TIMEOUT).unwrap()
    };
    let out = run(&good);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok (1 services, 3 backends)"), "{text}");

    let dir = common::TempDir::new("ccheck");
    let base = std::fs::read_to_string(&good).unwrap();
    let cases = [
        // (description, text, needle on the bad line, key named in the message)
        (
            "weight out of range",
            base.replace("weight = 2", "weight = 300"),
            "weight = 300",
            "weight",
        ),
        (
            "unknown key",
            base.replace("protocol = \"tcp\"", "protocl = \"tcp\""),
            "protocl",
            "protocl",
        ),
        (
            "bad address",
            base.replace("10.0.1.2:8080", "10.0.1.2"),
            "\"10.0.1.2\"",
            "address",
        ),
        (
            "TOML syntax",
            base.replace("name = \"app2\"", "name = \"app2"),
            "\"app2",
            "",
        ),
    ];
    for (what, text, needle, key) in cases {
        assert_ne!(text, base, "{what}: the example changed; update this test");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let line = line_of(&text, needle);
        let out = run(&path);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let at = format!("{}:{line}", path.display());
        assert!(err.contains(&at), "{what}: error should name {at}: {err}");
        assert!(err.contains(key), "{what}: error should name {key}: {err}");
    }
    let missing = dir.path().join("missing.toml");
    let out = run(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&missing.display().to_string()),
        "{out:?}"
    );
}
