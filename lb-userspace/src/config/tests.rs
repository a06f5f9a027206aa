//! Unit tests of the config parser: good files (defaults, every key), bad files (line, key path and
//! an allowed-values message for each kind of mistake), and every `examples/*.toml`.

use super::*;

/// Strips the first newline and the common indentation, so test files can be written indented.
/// Line 1 of the result is the first line after the opening quote.
fn doc(s: &str) -> String {
    let s = s.strip_prefix('\n').unwrap_or(s);
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn good(text: &str) -> Config {
    match Config::parse(&doc(text), "good.toml") {
        Ok(c) => c,
        Err(e) => panic!("expected the file to parse, got: {e}"),
    }
}

/// Parses `text` expecting an error at `line`, on `key`, whose message contains every `needles`.
#[track_caller]
fn bad(text: &str, line: usize, key: &str, needles: &[&str]) {
    match Config::parse(&doc(text), "bad.toml") {
        Ok(_) => panic!("expected an error at line {line} key {key}, but the file parsed"),
        Err(ConfigError::Invalid {
            path,
            line: l,
            key: k,
            message,
        }) => {
            let shown = format!("{path}:{l}: {k}: {message}");
            assert_eq!(path, "bad.toml", "{shown}");
            assert_eq!((l, k.as_str()), (line, key), "{shown}");
            for n in needles {
                assert!(message.contains(n), "message lacks {n:?}: {shown}");
            }
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

/// Service `a` on 10.0.0.1:80 (lines 1 to 3) followed by `rest` (from line 4 on).
macro_rules! svc {
    ($rest:literal) => {
        concat!("[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\n", $rest)
    };
}

/// One bad file: (text, line of the error, key path, fragments the message must contain).
type BadCase = (&'static str, usize, &'static str, &'static [&'static str]);

/// [`bad`] for every case of a table.
#[track_caller]
fn bad_table(cases: &[BadCase]) {
    for &(text, line, key, needles) in cases {
        bad(text, line, key, needles);
    }
}

// ---------------------------------------------------------------------------------------------
// Good files.

#[test]
fn empty_file_is_all_defaults() {
    let c = good("");
    assert_eq!(c.path, None);
    assert_eq!(c.log_level, "info");
    assert_eq!(c.seed, 0);
    assert_eq!(c.ring_size, 65537);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.control, ControlConfig::default());
    assert_eq!(c.control.socket, PathBuf::from("/run/lb/lb.sock"));
    assert_eq!(c.control.mode, 0o600);
    assert_eq!(c.control.group, None);
    assert!(c.control.allowed_uids.is_empty());
    assert_eq!(c.xdp, None);
    assert_eq!(c.metrics, None);
    assert!(c.services.is_empty());
}

#[test]
fn metrics_table() {
    let c = good(
        r#"
        [metrics]
        listen = "127.0.0.1:9100"

        [[service]]
        name = "web"
        listen = "127.0.0.1:80"
        "#,
    );
    assert_eq!(
        c.metrics,
        Some(MetricsConfig {
            listen: "127.0.0.1:9100".parse().unwrap()
        })
    );
    let c = good("metrics = { listen = \"[::1]:9100\" }\n");
    assert_eq!(c.metrics.unwrap().listen, "[::1]:9100".parse().unwrap());
}

#[test]
fn metrics_errors() {
    bad(
        "[metrics]\nlisten = \"127.0.0.1:9100\"\npath = \"/m\"\n",
        3,
        "metrics.path",
        &["unknown key `path`; allowed keys: listen"],
    );
    bad(
        "[metrics]\n",
        1,
        "metrics.listen",
        &[
            "missing required key `listen`",
            "[metrics] table needs listen",
            "127.0.0.1:9100",
        ],
    );
    bad(
        "[metrics]\nlisten = \"localhost:9100\"\n",
        2,
        "metrics.listen",
        &[
            "listen \"localhost:9100\" is not a valid address",
            "host names are not resolved",
        ],
    );
    bad(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        2,
        "metrics.listen",
        &["port 0"],
    );
    bad(
        "metrics = 9100\n",
        1,
        "metrics",
        &["wrong type", "expected a table"],
    );
    bad(
        r#"
        [metrics]
        listen = "0.0.0.0:8080"

        [[service]]
        name = "web"
        listen = "10.0.0.1:8080"
        "#,
        2,
        "metrics.listen",
        &[
            "overlaps service \"web\" (listen 10.0.0.1:8080, line 6)",
            "its own ip:port",
        ],
    );
}

#[test]
fn xdp_table_gets_defaults() {
    let c = good(
        r#"
        [xdp]
        interfaces = ["eth0"]
        "#,
    );
    assert_eq!(
        c.xdp,
        Some(XdpConfig {
            interfaces: vec!["eth0".into()],
            mode: XdpMode::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/lb"),
            snat_ports: (10000, 29999),
            idle_timeout: Duration::from_secs(15 * 60),
            closed_timeout: Duration::from_secs(1),
            syn_timeout: Duration::from_secs(5),
            syn_cookies: crate::config::SynCookies::Auto,
            redirect_peer: true,
            max_services: 16,
            max_backends: 1024,
            conntrack_entries: 262_144,
            affinity_entries: 262_144,
        })
    );
    let x = c.xdp.unwrap();
    assert_eq!(x.max_services, lb_common::maps::DEFAULT_MAX_SERVICES);
    assert_eq!(x.max_backends, lb_common::maps::DEFAULT_MAX_BACKENDS);
    assert_eq!(x.conntrack_entries, lb_common::maps::DEFAULT_CONNTRACK_ENTRIES);
    assert_eq!(x.affinity_entries, lb_common::maps::DEFAULT_AFFINITY_ENTRIES);
}

#[test]
fn minimal_service_gets_defaults() {
    let c = good(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [[service.backend]]
        address = "10.0.1.2:8080"

        [[service.backend]]
        address = "[2001:db8::2]:8080"
        "#,
    );
    let s = &c.services[0];
    assert_eq!(s.name, "web");
    assert_eq!(s.listen, "10.0.0.1:80".parse().unwrap());
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.datapath, DatapathKind::Proxy);
    assert_eq!(s.affinity_timeout, Duration::from_secs(30 * 60));
    assert_eq!(s.max_connections, 10_000);
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert!(!s.failback);
    assert_eq!(s.on_down, OnDown::Keep);
    assert_eq!(s.health, HealthConfig::default_for(Protocol::Tcp));
    assert_eq!(s.health.kind, HealthKind::Tcp);
    assert_eq!(s.health.interval, Duration::from_secs(2));
    assert_eq!(s.health.fast_interval, Duration::from_secs(2));
    assert_eq!(s.health.timeout, Duration::from_secs(1));
    assert_eq!((s.health.rise, s.health.fall, s.health.port), (2, 3, None));
    // Passive health is on by default where checks run.
    assert_eq!((s.health.observe, s.health.error_limit), (Observe::Layer4, 3));
    let b = &s.backends;
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].name, "10.0.1.2:8080", "name defaults to the address text");
    assert_eq!(b[0].address, "10.0.1.2:8080".parse().unwrap());
    assert_eq!(b[0].weight, 1);
    assert!(!b[0].backup);
    assert_eq!(b[0].state, AdminState::Active);
    assert_eq!(b[1].name, "[2001:db8::2]:8080");
}

#[test]
fn ajp_service_defaults_to_ajp_checks() {
    let c = good(
        r#"
        [[service]]
        name = "tomcat"
        listen = "10.0.0.1:8009"
        protocol = "ajp"

        [[service]]
        name = "tomcat2"
        listen = "10.0.0.2:8009"
        protocol = "ajp"
        [service.health]
        interval = "5s"
        "#,
    );
    assert_eq!(c.services[0].health.kind, HealthKind::Ajp);
    let h = &c.services[1].health;
    assert_eq!(
        h.kind,
        HealthKind::Ajp,
        "kind defaults from protocol inside the table too"
    );
    assert_eq!(h.interval, Duration::from_secs(5));
    assert_eq!(
        h.fast_interval,
        Duration::from_secs(5),
        "fast_interval defaults to interval"
    );
    assert_eq!(h.timeout, Duration::from_secs(1));
}

#[test]
fn every_key_is_honoured() {
    let c = good(
        r#"
        log_level = "lb=debug,warn"
        seed = 4294967295
        ring_size = 211
        shutdown_timeout = "0s"

        [control]
        socket = "/tmp/lb-test.sock"
        mode = "0660"
        group = "lbadmin"
        allowed_uids = [1000, 0, 4294967295]

        [xdp]
        interfaces = ["eth0", "enp3s0f1", "bond0.100", "fifteen_chars_x"]
        mode = "skb"
        pin_path = "/sys/fs/bpf/lb-test/a"
        snat_ports = "1024-1087"
        idle_timeout = "1h"
        closed_timeout = "1h"
        max_services = 1024
        max_backends = 65536
        conntrack_entries = 16777216
        affinity_entries = 1024
        redirect_peer = false

        [[service]]
        name = "Tom_cat.1-a"
        listen = "192.0.2.10:8009"
        protocol = "ajp"
        datapath = "xdp"
        affinity_timeout = "0s"
        max_connections = 1000000
        connect_timeout = "250ms"
        failback = true
        on_down = "reset"

        [service.health]
        kind = "none"
        interval = "1h"
        fast_interval = "10m"
        timeout = "59m"
        rise = 100
        fall = 1
        port = 65535

        [[service.backend]]
        address = "192.0.2.21:8009"
        name = "t1"
        weight = 256
        backup = true
        state = "drain"

        [[service.backend]]
        address = "192.0.2.22:8009"
        weight = 0
        state = "maintenance"

        [[service]]
        name = "v6"
        listen = "[::]:443"
        "#,
    );
    assert_eq!(c.log_level, "lb=debug,warn");
    assert_eq!(c.seed, u32::MAX);
    assert_eq!(c.ring_size, 211);
    assert_eq!(c.shutdown_timeout, Duration::ZERO);
    assert_eq!(
        c.control,
        ControlConfig {
            socket: PathBuf::from("/tmp/lb-test.sock"),
            mode: 0o660,
            group: Some("lbadmin".into()),
            allowed_uids: vec![1000, 0, u32::MAX],
        }
    );
    assert_eq!(
        c.xdp,
        Some(XdpConfig {
            interfaces: vec![
                "eth0".into(),
                "enp3s0f1".into(),
                "bond0.100".into(),
                "fifteen_chars_x".into()
            ],
            mode: XdpMode::Skb,
            pin_path: PathBuf::from("/sys/fs/bpf/lb-test/a"),
            snat_ports: (1024, 1087),
            idle_timeout: Duration::from_secs(3600),
            closed_timeout: Duration::from_secs(3600),
            syn_timeout: Duration::from_secs(5),
            syn_cookies: crate::config::SynCookies::Auto,
            redirect_peer: false,
            max_services: 1024,
            max_backends: 65536,
            conntrack_entries: 16_777_216,
            affinity_entries: 1024,
        })
    );
    let s = &c.services[0];
    assert_eq!(s.name, "Tom_cat.1-a");
    assert_eq!(s.listen, "192.0.2.10:8009".parse().unwrap());
    assert_eq!(s.protocol, Protocol::Ajp);
    assert_eq!(s.datapath, DatapathKind::Xdp);
    assert_eq!(s.affinity_timeout, Duration::ZERO);
    assert_eq!(s.max_connections, 1_000_000);
    assert_eq!(s.connect_timeout, Duration::from_millis(250));
    assert!(s.failback);
    assert_eq!(s.on_down, OnDown::Reset);
    assert_eq!(
        s.health,
        HealthConfig {
            kind: HealthKind::None,
            interval: Duration::from_secs(3600),
            fast_interval: Duration::from_secs(600),
            timeout: Duration::from_secs(59 * 60),
            rise: 100,
            fall: 1,
            port: Some(65535),
            observe: crate::config::Observe::None,
            error_limit: crate::config::DEFAULT_ERROR_LIMIT,
        }
    );
    assert_eq!(
        s.backends,
        vec![
            BackendConfig {
                name: "t1".into(),
                address: "192.0.2.21:8009".parse().unwrap(),
                weight: 256,
                backup: true,
                state: AdminState::Drain,
                route: "t1".into(),
            },
            BackendConfig {
                name: "192.0.2.22:8009".into(),
                address: "192.0.2.22:8009".parse().unwrap(),
                weight: 0,
                backup: false,
                state: AdminState::Maintenance,
                route: "192.0.2.22:8009".into(),
            },
        ]
    );
    assert_eq!(c.services[1].listen, "[::]:443".parse().unwrap());
}

#[test]
fn inline_tables_work_too() {
    let c = good(
        r#"
        control = { mode = "600" }
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        health = { kind = "tcp", port = 9000 }
        backend = [ { address = "10.0.1.1:80" }, { address = "10.0.1.2:80", weight = 3 } ]
        "#,
    );
    assert_eq!(c.control.mode, 0o600);
    assert_eq!(c.xdp, None);
    assert_eq!(c.services[0].health.port, Some(9000));
    assert_eq!(c.services[0].backends[1].weight, 3);
}

#[test]
fn examples_all_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["lb.toml", "tcp.toml", "tomcat-ajp.toml"] {
        assert!(names.iter().any(|n| n == want), "examples/{want} is missing");
    }
    for f in &files {
        let c = Config::load(f).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.path.as_deref(), Some(f.as_path()));
    }

    let tcp = Config::load(&dir.join("tcp.toml")).unwrap();
    let s = &tcp.services[0];
    assert_eq!((s.protocol, s.datapath), (Protocol::Tcp, DatapathKind::Proxy));
    assert_eq!(s.backends.len(), 3);

    let ajp = Config::load(&dir.join("tomcat-ajp.toml")).unwrap();
    let s = &ajp.services[0];
    assert_eq!(s.listen.port(), 8009);
    assert_eq!((s.protocol, s.health.kind), (Protocol::Ajp, HealthKind::Ajp));
    assert!(!s.failback);
    let backups: Vec<bool> = s.backends.iter().map(|b| b.backup).collect();
    assert_eq!(backups, [false, false, true]);
    assert_eq!(s.datapath, DatapathKind::Ajp);
    let routes: Vec<&str> = s.backends.iter().map(|b| b.route.as_str()).collect();
    assert_eq!(routes, ["tomcat1", "tomcat2", "tomcat3"]);

    // The reference file documents every key: it sets each one at least once.
    let reference = std::fs::read_to_string(dir.join("lb.toml")).unwrap();
    for key in [
        "log_level",
        "seed",
        "ring_size",
        "shutdown_timeout",
        "state_file",
        "[control]",
        "socket",
        "mode",
        "group",
        "allowed_uids",
        "[xdp]",
        "interfaces",
        "pin_path",
        "snat_ports",
        "idle_timeout",
        "closed_timeout",
        "max_services",
        "max_backends",
        "conntrack_entries",
        "affinity_entries",
        "[metrics]",
        "[[service]]",
        "name",
        "listen",
        "protocol",
        "datapath",
        "affinity_timeout",
        "max_connections",
        "connect_timeout",
        "failback",
        "on_down",
        "[service.health]",
        "kind",
        "interval",
        "fast_interval",
        "timeout",
        "rise",
        "fall",
        "port",
        "observe",
        "error_limit",
        "[[service.backend]]",
        "address",
        "weight",
        "backup",
        "state",
        "route",
        "[service.ajp]",
        "secret",
        "backend_secret",
        "max_packet_size",
        "pool_size",
        "pool_idle_timeout",
        "ping_after_idle",
        "reply_timeout",
        "request_timeout",
        "idle_timeout",
        "retries",
        "retry_buffer",
        "session_cookies",
        "session_path_params",
        "allowed_attributes",
    ] {
        let set = reference
            .lines()
            .any(|l| l.starts_with(&format!("{key} =")) || l.trim() == key);
        assert!(set, "examples/lb.toml does not set {key}");
    }
    let lb = Config::load(&dir.join("lb.toml")).unwrap();
    assert_eq!(
        lb.metrics.as_ref().map(|m| m.listen),
        Some("127.0.0.1:9100".parse().unwrap())
    );
    let x = lb.xdp.expect("examples/lb.toml has an [xdp] table");
    assert_eq!(x.snat_ports, (10000, 29999));
    assert_eq!(x.mode, XdpMode::Auto);
}

#[test]
fn xdp_mode_tc_and_auto_on_veth_run_the_program_at_tc_ingress() {
    let c = good("[xdp]\ninterfaces = [\"eth0\"]\nmode = \"tc\"\n");
    let x = c.xdp.unwrap();
    assert_eq!(x.mode, XdpMode::Tc);
    for on_veth in [false, true] {
        assert_eq!(x.mode.hook(on_veth), crate::config::Hook::Tc);
    }
    for (text, mode, on_veth) in [
        ("auto", XdpMode::Auto, Hook::Tc),
        ("driver", XdpMode::Driver, Hook::Xdp),
        ("skb", XdpMode::Skb, Hook::Xdp),
    ] {
        let c = good(&format!("[xdp]\ninterfaces = [\"eth0\"]\nmode = \"{text}\"\n"));
        assert_eq!(c.xdp.unwrap().mode, mode);
        assert_eq!(mode.hook(false), Hook::Xdp, "{text}");
        assert_eq!(mode.hook(true), on_veth, "{text} on veth");
    }
}

#[test]
fn xdp_inline_table_and_pin_path_normalised() {
    let c = good(
        r#"
        xdp = { interfaces = ["lo"], pin_path = "/sys/fs/bpf//./lb/", snat_ports = " 40000 - 40063 " }
        "#,
    );
    let x = c.xdp.unwrap();
    assert_eq!(x.pin_path, PathBuf::from("/sys/fs/bpf/lb"));
    assert_eq!(x.pin_path.to_str(), Some("/sys/fs/bpf/lb"));
    assert_eq!(x.snat_ports, (40000, 40063));
}

#[test]
fn xdp_services_fit_the_xdp_table() {
    // Listen ports outside snat_ports, proxy services in it; max_services and max_backends
    // reached exactly; proxy services and their backends do not count.
    let c = good(
        r#"
        ring_size = 16777213
        [xdp]
        interfaces = ["eth0"]
        snat_ports = "40000-40099"
        max_services = 2
        max_backends = 3

        [[service]]
        name = "a"
        listen = "10.0.0.1:39999"
        datapath = "xdp"
        [[service.backend]]
        address = "10.0.1.1:40000"

        [[service]]
        name = "p"
        listen = "10.0.0.1:40000"
        datapath = "proxy"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"

        [[service]]
        name = "b"
        listen = "10.0.0.1:40100"
        datapath = "xdp"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"
        "#,
    );
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.xdp.unwrap().max_services, 2);
    // The default max_services (16) fits any ring_size.
    good(
        "ring_size = 16777213
[xdp]
interfaces = [\"eth0\"]
",
    );
}

#[test]
fn load_reports_unreadable_files() {
    let err = Config::load(Path::new("/nonexistent/lb.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(
        err.to_string().starts_with("/nonexistent/lb.toml: cannot read: "),
        "{err}"
    );
}

#[test]
fn durations() {
    let ok = [
        ("500ms", Duration::from_millis(500)),
        ("0s", Duration::ZERO),
        ("2s", Duration::from_secs(2)),
        ("30m", Duration::from_secs(1800)),
        ("1h", Duration::from_secs(3600)),
        ("007s", Duration::from_secs(7)),
    ];
    for (text, d) in ok {
        assert_eq!(parse_duration(text), Some(d), "{text}");
    }
    for text in [
        "",
        "2",
        "s",
        "2 s",
        " 2s",
        "2s ",
        "1.5s",
        "-1s",
        "+1s",
        "2sec",
        "2S",
        "1d",
        "1h30m",
        "99999999999999999999s",
        "18446744073709551615h",
    ] {
        assert_eq!(parse_duration(text), None, "{text:?}");
    }
}

#[test]
fn names() {
    for n in ["a", "web", "app-1", "app_1.prod", "A".repeat(32).as_str()] {
        assert!(is_valid_name(n), "{n}");
    }
    for n in ["", "a b", "a:b", "ä", "a/b", "A".repeat(33).as_str()] {
        assert!(!is_valid_name(n), "{n}");
    }
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|&n| crate::maglev::is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(crate::maglev::is_prime(65537));
    assert!(crate::maglev::is_prime(MAX_RING_SIZE));
    assert!(crate::maglev::is_prime(4_294_967_291));
    assert!(!crate::maglev::is_prime(65536));
    assert!(!crate::maglev::is_prime(65535));
}

#[test]
fn display_names_file_line_and_key() {
    let text = doc(r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"
        weight = 300
        "#);
    let err = Config::parse(&text, "examples/bad.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "examples/bad.toml:8: service[0].backend[1].weight: weight 300 is out of range; allowed 0..=256"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad files.

#[test]
fn syntax_error() {
    bad(
        r#"
        seed = 1
        [[service]]
        name = "web
        "#,
        3,
        "(syntax)",
        &["TOML syntax error", "string"],
    );
    bad("seed = 1\nseed = 2\n", 2, "(syntax)", &["duplicate key `seed`"]);
}

#[test]
fn state_file_is_an_absolute_file_path() {
    assert_eq!(good("seed = 1\n").state_file, None);
    assert_eq!(
        good("state_file = \"/var/lib/lb/state.json\"\n").state_file,
        Some(std::path::PathBuf::from("/var/lib/lb/state.json"))
    );
    const MESSAGE: &str = "is not an absolute file path; use a path such as \"/var/lib/lb/state.json\"";
    bad_table(&[
        (
            "seed = 1\nstate_file = \"state.json\"\n",
            2,
            "state_file",
            &[MESSAGE],
        ),
        ("state_file = \"\"\n", 1, "state_file", &[MESSAGE]),
        ("state_file = \"/var/lib/lb/\"\n", 1, "state_file", &[MESSAGE]),
        ("state_file = 3\n", 1, "state_file", &["expected a string"]),
    ]);
}

#[test]
fn unknown_keys() {
    bad_table(&[
        (
            "seed = 1\nring = 101\n",
            2,
            "ring",
            &[
                "unknown key `ring`",
                "allowed keys: log_level, seed, ring_size, shutdown_timeout, control, xdp, metrics, state_file, announce, service",
            ],
        ),
        (
            "[control]\nsocket = \"/tmp/x\"\nowner = \"root\"\n",
            3,
            "control.owner",
            &["unknown key `owner`; allowed keys: socket, mode, group, allowed_uids"],
        ),
        (
            concat!(
                svc!("[[service]]\nname = \"api\"\nlisten = \"10.0.0.1:81\"\n"),
                "sticky = true\n"
            ),
            7,
            "service[1].sticky",
            &[
                "unknown key `sticky`; allowed keys: name, listen, protocol, datapath, forwarding, affinity_timeout",
            ],
        ),
        (
            svc!("\n[[service.backend]]\naddress = \"10.0.1.2:8080\"\nwieght = 3\n"),
            7,
            "service[0].backend[0].wieght",
            &["unknown key `wieght`; allowed keys: address, name, weight, backup, state"],
        ),
        (
            svc!("\n[service.health]\ninterval = \"2s\"\nretries = 3\n"),
            7,
            "service[0].health.retries",
            &[
                "unknown key `retries`; allowed keys: kind, interval, fast_interval, timeout, rise, fall, port, observe, error_limit",
            ],
        ),
        (
            "[xdp]\ninterfaces = [\"eth0\"]\nattach = \"native\"\n",
            3,
            "xdp.attach",
            &[
                "unknown key `attach`; allowed keys: interfaces, mode, pin_path, snat_ports, idle_timeout, closed_timeout, syn_timeout, syn_cookies, redirect_peer, max_services, max_backends, conntrack_entries, affinity_entries",
            ],
        ),
    ]);
}

#[test]
fn wrong_type() {
    bad_table(&[
        (
            svc!("max_connections = \"many\"\n"),
            4,
            "service[0].max_connections",
            &["wrong type", "expected an integer"],
        ),
        (
            svc!("failback = \"yes\"\n"),
            4,
            "service[0].failback",
            &["expected a boolean"],
        ),
        (
            svc!("[service.health]\ninterval = 2\n"),
            5,
            "service[0].health.interval",
            &["expected a duration string", "ms, s, m or h"],
        ),
        (
            "[control]\n\nallowed_uids = [1000, \"bob\"]\n",
            3,
            "control.allowed_uids[1]",
            &["expected an integer"],
        ),
        // A single [service] table instead of an array of tables.
        (
            "seed = 1\n[service]\nname = \"web\"\n",
            2,
            "service",
            &["expected an array of tables", "[[service]]"],
        ),
    ]);
}

#[test]
fn missing_listen() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [[service]]
        name = "api"
        protocol = "tcp"
        "#,
        5,
        "service[1].listen",
        &["missing required key `listen`", "ip:port"],
    );
}

#[test]
fn missing_backend_address() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        name = "app1"
        "#,
        4,
        "service[0].backend[0].address",
        &["missing required key `address`"],
    );
}

#[test]
fn bad_address() {
    bad_table(&[
        (
            "[[service]]\nname = \"web\"\nlisten = \"10.0.0.1\"\n",
            3,
            "service[0].listen",
            &[
                "\"10.0.0.1\" is not a valid address",
                "ip:port",
                "\"10.0.0.1:80\"",
            ],
        ),
        (
            svc!("[[service.backend]]\naddress = \"app1.example.com:8080\"\n"),
            5,
            "service[0].backend[0].address",
            &["not a valid address", "host names are not resolved"],
        ),
        (
            "[[service]]\nname = \"web\"\nlisten = \"10.0.0.1:0\"\n",
            3,
            "service[0].listen",
            &["port 0", "1..=65535"],
        ),
        (
            svc!("[[service.backend]]\naddress = \"0.0.0.0:8080\"\n"),
            5,
            "service[0].backend[0].address",
            &["unspecified", "backend's own ip:port"],
        ),
    ]);
}

#[test]
fn xdp_needs_ipv4() {
    bad(
        r#"
        [[service]]
        name = "web"
        datapath = "xdp"
        listen = "[2001:db8::1]:80"
        "#,
        4,
        "service[0].listen",
        &["specific IPv4", "datapath = \"proxy\""],
    );
    bad(
        r#"
        [[service]]
        name = "web"
        datapath = "xdp"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "[2001:db8::2]:80"
        "#,
        6,
        "service[0].backend[0].address",
        &["IPv4 backends only"],
    );
    // A loopback backend takes its share of clients and black-holes them under xdp, although its
    // health check (a local connect) passes; proxy services connect to it as to any address.
    for datapath in ["xdp", "proxy"] {
        let text = format!(
            "[[service]]\nname = \"web\"\ndatapath = \"{datapath}\"\nlisten = \"10.0.0.1:80\"\n[[service.backend]]\naddress = \"127.0.0.1:9106\"\n"
        );
        if datapath == "xdp" {
            bad(
                &text,
                6,
                "service[0].backend[0].address",
                &["loopback", "datapath = \"proxy\""],
            );
        } else {
            good(&text);
        }
    }
}

#[test]
fn bad_names() {
    bad(
        r#"
        [[service]]
        name = "my web"
        listen = "10.0.0.1:80"
        "#,
        2,
        "service[0].name",
        &[
            "\"my web\" is not allowed",
            "1 to 32 characters from A-Z a-z 0-9 _ . -",
        ],
    );
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:80"
        name = "app:1"
        "#,
        6,
        "service[0].backend[0].name",
        &["1 to 32 characters"],
    );
}

#[test]
fn duplicate_service_name() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [[service]]
        name = "web"
        listen = "10.0.0.1:81"
        "#,
        6,
        "service[1].name",
        &["\"web\" is already used by service[0] (line 2)", "must be unique"],
    );
}

#[test]
fn duplicate_listen() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [[service]]
        name = "api"
        listen = "10.0.0.1:80"
        "#,
        7,
        "service[1].listen",
        &["is already used by service \"web\"", "line 3", "its own ip:port"],
    );
    // A wildcard listener overlaps a specific one on the same port.
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [[service]]
        name = "all"
        listen = "0.0.0.0:80"
        "#,
        7,
        "service[1].listen",
        &["overlaps service \"web\""],
    );
}

#[test]
fn a_backend_must_not_be_lbs_own_listen_address() {
    // Its own service's listen, and the IPv4-mapped spelling of an address already listed.
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "127.0.0.1:7000"
        [[service.backend]]
        address = "127.0.0.1:7000"
        "#,
        5,
        "service[0].backend[0].address",
        &["backend 127.0.0.1:7000 is lb's own listen address (service \"web\" listens on 127.0.0.1:7000)"],
    );
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:8080"
        [[service.backend]]
        address = "[::ffff:10.0.1.1]:8080"
        "#,
        7,
        "service[0].backend[1].address",
        &["10.0.1.1:8080 is already used by service[0].backend[0] (line 5)"],
    );
    // Another service's listen, before or after it in the file; 0.0.0.0 takes in 127.0.0.1.
    for (first, second, key, says) in [
        (
            "0.0.0.0:7000",
            "10.0.0.1:80",
            "service[1].backend[0].address",
            "backend 127.0.0.1:7000 is lb's own listen address (service \"one\" listens on 0.0.0.0:7000)",
        ),
        (
            "10.0.0.1:80",
            "0.0.0.0:7000",
            "service[1].listen",
            "0.0.0.0:7000 is the address of backend 127.0.0.1:7000 of service \"one\"",
        ),
    ] {
        let (a, b) = if first.starts_with("0.0.0.0") {
            ("10.0.1.1:8080", "127.0.0.1:7000")
        } else {
            ("127.0.0.1:7000", "10.0.1.1:8080")
        };
        let text = format!(
            "[[service]]\nname = \"one\"\nlisten = \"{first}\"\n[[service.backend]]\naddress = \"{a}\"\n\
             [[service]]\nname = \"two\"\nlisten = \"{second}\"\n[[service.backend]]\naddress = \"{b}\"\n"
        );
        let e = Config::parse(&text, "lb.toml").unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says), "{e}");
    }
}

#[test]
fn duplicate_backend_address() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:8080"
        [[service.backend]]
        address = "10.0.1.2:8080"
        [[service.backend]]
        address = "10.0.1.1:8080"
        "#,
        9,
        "service[0].backend[2].address",
        &[
            "10.0.1.1:8080 is already used by service[0].backend[0] (line 5)",
            "own ip:port",
        ],
    );
    // The same backend in two services is fine.
    good(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:8080"
        [[service]]
        name = "web2"
        listen = "10.0.0.1:81"
        [[service.backend]]
        address = "10.0.1.1:8080"
        "#,
    );
}

#[test]
fn duplicate_backend_name() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:8080"
        name = "app"
        [[service.backend]]
        address = "10.0.1.2:8080"
        name = "app"
        "#,
        9,
        "service[0].backend[1].name",
        &[
            "\"app\" is already used by service[0].backend[0] (line 6)",
            "unique",
        ],
    );
}

#[test]
fn weight_out_of_range() {
    bad_table(&[
        (
            svc!("[[service.backend]]\naddress = \"10.0.1.1:8080\"\nweight = 300\n"),
            6,
            "service[0].backend[0].weight",
            &["weight 300 is out of range; allowed 0..=256"],
        ),
        (
            svc!("[[service.backend]]\naddress = \"10.0.1.1:8080\"\nweight = -1\n"),
            6,
            "service[0].backend[0].weight",
            &["allowed 0..=256"],
        ),
    ]);
}

#[test]
fn other_ranges() {
    bad_table(&[
        ("seed = -1\n", 1, "seed", &["allowed 0..=4294967295"]),
        (
            svc!("max_connections = 0\n"),
            4,
            "service[0].max_connections",
            &["max_connections 0 is out of range; allowed 1..=1000000"],
        ),
        (
            svc!("[service.health]\nrise = 0\n"),
            5,
            "service[0].health.rise",
            &["allowed 1..=100"],
        ),
        (
            svc!("[service.health]\nfall = 101\n"),
            5,
            "service[0].health.fall",
            &["allowed 1..=100"],
        ),
        (
            svc!("[service.health]\nport = 70000\n"),
            5,
            "service[0].health.port",
            &["allowed 1..=65535"],
        ),
        (
            svc!("[service.health]\nerror_limit = 0\n"),
            5,
            "service[0].health.error_limit",
            &["allowed 1..=100"],
        ),
        (
            svc!("[service.health]\nobserve = \"layer7\"\n"),
            5,
            "service[0].health.observe",
            &["\"none\"", "\"layer4\""],
        ),
        (
            svc!("[service.health]\nkind = \"none\"\nobserve = \"layer4\"\n"),
            6,
            "service[0].health.observe",
            &["no check would bring them back", "observe = \"none\""],
        ),
        (
            "[control]\nallowed_uids = [-5]\n",
            2,
            "control.allowed_uids[0]",
            &["allowed 0..=4294967295"],
        ),
    ]);
}

#[test]
fn bad_enum_values() {
    bad_table(&[
        (
            svc!("protocol = \"http\"\n"),
            4,
            "service[0].protocol",
            &["protocol \"http\" is not allowed; use \"tcp\" or \"ajp\""],
        ),
        (
            svc!("datapath = \"kernel\"\n"),
            4,
            "service[0].datapath",
            &["use \"proxy\", \"xdp\" or \"ajp\""],
        ),
        (
            svc!("on_down = \"drop\"\n"),
            4,
            "service[0].on_down",
            &["use \"keep\" or \"reset\""],
        ),
        (
            svc!("[service.health]\nkind = \"http\"\n"),
            5,
            "service[0].health.kind",
            &["use \"none\", \"tcp\" or \"ajp\""],
        ),
        (
            svc!("[[service.backend]]\naddress = \"10.0.1.1:80\"\nstate = \"disabled\"\n"),
            6,
            "service[0].backend[0].state",
            &["state \"disabled\" is not allowed; use \"active\", \"drain\" or \"maintenance\""],
        ),
        (
            "log_level = \"lb=loud\"\n",
            1,
            "log_level",
            &["error, warn, info, debug, trace"],
        ),
        (
            "[xdp]\ninterfaces = [\"eth0\"]\nmode = \"native\"\n",
            3,
            "xdp.mode",
            &["mode \"native\" is not allowed; use \"auto\", \"driver\", \"skb\" or \"tc\""],
        ),
    ]);
}

#[test]
fn bad_duration() {
    bad_table(&[
        (
            svc!("affinity_timeout = \"30 min\"\n"),
            4,
            "service[0].affinity_timeout",
            &[
                "affinity_timeout \"30 min\" is not a valid duration",
                "an integer followed by ms, s, m or h",
                "\"500ms\"",
            ],
        ),
        (
            "shutdown_timeout = \"1.5s\"\n",
            1,
            "shutdown_timeout",
            &["ms, s, m or h"],
        ),
        (
            svc!("connect_timeout = \"0s\"\n"),
            4,
            "service[0].connect_timeout",
            &["must be greater than 0"],
        ),
        (
            "shutdown_timeout = \"1000h\"\n",
            1,
            "shutdown_timeout",
            &["too long", "720h"],
        ),
    ]);
}

#[test]
fn timeout_longer_than_interval() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"

        [service.health]
        interval = "2s"
        timeout = "3s"
        "#,
        7,
        "service[0].health.timeout",
        &[
            "timeout 3s is longer than interval 2s",
            "timeout must be <= interval",
        ],
    );
    // Only the interval written: the default timeout (1s) is too long for it.
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [service.health]
        interval = "500ms"
        "#,
        5,
        "service[0].health.interval",
        &["timeout 1s is longer than interval 500ms"],
    );
}

#[test]
fn ring_size_not_prime() {
    bad_table(&[
        (
            "seed = 7\nring_size = 65536\n",
            2,
            "ring_size",
            &["ring_size 65536 is not allowed", "use a prime", "such as 65537"],
        ),
        ("ring_size = 97\n", 1, "ring_size", &["prime in 101..=16777213"]),
    ]);
}

#[test]
fn ring_size_too_small_for_backends() {
    bad(
        r#"
        ring_size = 101

        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"
        "#,
        1,
        "ring_size",
        &[
            "too small for service \"web\" with 2 backends",
            "larger than 100 x 2 = 200",
            "such as 211",
        ],
    );
}

#[test]
fn bad_mode() {
    bad_table(&[
        (
            "[control]\nmode = \"rw-------\"\n",
            2,
            "control.mode",
            &["not an octal mode", "\"0600\""],
        ),
        (
            "[control]\nmode = \"1777\"\n",
            2,
            "control.mode",
            &["out of range", "\"0777\""],
        ),
        (
            "[control]\n# octal as a TOML integer\nmode = 0o600\n",
            3,
            "control.mode",
            &["quoted octal mode string"],
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// The [xdp] table.

#[test]
fn xdp_interfaces_required() {
    bad(
        "seed = 1\n[xdp]\nmode = \"skb\"\n",
        2,
        "xdp.interfaces",
        &[
            "missing required key `interfaces`",
            "interfaces = [\"eth0\", ...]",
        ],
    );
    bad(
        "[xdp]\ninterfaces = []\n",
        2,
        "xdp.interfaces",
        &["0 interfaces", "allowed 1..=16"],
    );
    let seventeen: Vec<String> = (0..17).map(|i| format!("\"eth{i}\"")).collect();
    bad(
        &format!("[xdp]\n\ninterfaces = [{}]\n", seventeen.join(", ")),
        3,
        "xdp.interfaces",
        &["17 interfaces", "allowed 1..=16"],
    );
    let sixteen = &seventeen[..16];
    good(&format!("[xdp]\ninterfaces = [{}]\n", sixteen.join(", ")));
    bad(
        "[xdp]\ninterfaces = \"eth0\"\n",
        2,
        "xdp.interfaces",
        &["wrong type", "expected an array"],
    );
    bad(
        "[xdp]\ninterfaces = [\"eth0\", 1]\n",
        2,
        "xdp.interfaces[1]",
        &["wrong type", "expected a string"],
    );
}

#[test]
fn xdp_bad_interface_names() {
    for (name, shown) in [
        ("", ""),
        ("eth0/1", "eth0/1"),
        ("eth 0", "eth 0"),
        ("eth0\\t", "eth0\\t"),
        ("eth0:1", "eth0:1"),
        (".", "."),
        ("..", ".."),
        ("sixteen_chars_xx", "sixteen_chars_xx"),
    ] {
        bad(
            &format!("[xdp]\ninterfaces = [\"eth0\",\n  \"{name}\"]\n"),
            3,
            "xdp.interfaces[1]",
            &[
                &format!("interface name \"{shown}\" is not allowed"),
                "1 to 15 bytes, no '/', ':', whitespace or control characters, not \".\" or \"..\"",
            ],
        );
    }
    // 15 bytes is the limit, and the kernel counts bytes.
    good("[xdp]\ninterfaces = [\"fifteen_chars_x\", \"äää\"]\n");
    bad(
        "[xdp]\ninterfaces = [\"ääääääää\"]\n",
        2,
        "xdp.interfaces[0]",
        &["1 to 15 bytes"],
    );
}

#[test]
fn xdp_duplicate_interface() {
    bad(
        r#"
        [xdp]
        interfaces = [
          "eth0",
          "eth1",
          "eth0",
        ]
        "#,
        5,
        "xdp.interfaces[2]",
        &["\"eth0\" is already listed as xdp.interfaces[0] (line 3)", "once"],
    );
}

#[test]
fn xdp_bad_pin_path() {
    for (path, why) in [
        ("lb", "is not an absolute path"),
        ("", "is not an absolute path"),
        ("/sys/fs/bpf", "is the bpffs mount itself"),
        ("/sys/fs/bpf/", "is the bpffs mount itself"),
        ("/sys/fs/bpf/./", "is the bpffs mount itself"),
        ("/sys/fs/bpf/../lb", "must not contain \"..\""),
        ("/sys/fs/bpf/lb/..", "must not contain \"..\""),
        ("/sys/fs/bpfx/lb", "is not below /sys/fs/bpf/"),
        ("/tmp/lb", "is not below /sys/fs/bpf/"),
    ] {
        bad(
            &format!("[xdp]\ninterfaces = [\"eth0\"]\npin_path = \"{path}\"\n"),
            3,
            "xdp.pin_path",
            &[
                &format!("pin_path \"{path}\" {why}"),
                "use an absolute path below /sys/fs/bpf/",
                "\"/sys/fs/bpf/lb\"",
            ],
        );
    }
}

#[test]
fn xdp_bad_snat_ports() {
    for (range, why) in [
        ("20000", "is not a port range"),
        ("20000-", "is not a port range"),
        ("20000:29999", "is not a port range"),
        ("-1-100", "is not a port range"),
        ("a-b", "is not a port range"),
        ("1000-2000", "starts at 1000, a privileged port"),
        ("60000-65536", "ends at 65536, above 65535"),
        ("60000-999999", "is not a port range"),
        ("30000-20000", "is reversed (30000 > 20000)"),
        ("20000-20062", "has only 63 ports"),
    ] {
        bad(
            &format!("[xdp]\ninterfaces = [\"eth0\"]\nsnat_ports = \"{range}\"\n"),
            3,
            "xdp.snat_ports",
            &[
                &format!("snat_ports \"{range}\" {why}"),
                "\"LO-HI\"",
                "1024 <= LO <= HI <= 65535, at least 64 ports",
            ],
        );
    }
    good("[xdp]\ninterfaces = [\"eth0\"]\nsnat_ports = \"65472-65535\"\n");
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nsnat_ports = 20000\n",
        3,
        "xdp.snat_ports",
        &["wrong type", "expected a port range string \"LO-HI\""],
    );
}

#[test]
fn xdp_bad_timeouts() {
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nidle_timeout = \"0s\"\n",
        3,
        "xdp.idle_timeout",
        &["idle_timeout must be greater than 0"],
    );
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nclosed_timeout = \"0ms\"\n",
        3,
        "xdp.closed_timeout",
        &["closed_timeout must be greater than 0"],
    );
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nclosed_timeout = \"15\"\n",
        3,
        "xdp.closed_timeout",
        &["not a valid duration", "ms, s, m or h"],
    );
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nidle_timeout = \"1000h\"\n",
        3,
        "xdp.idle_timeout",
        &["too long", "720h"],
    );
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nidle_timeout = \"1m\"\nclosed_timeout = \"2m\"\n",
        4,
        "xdp.closed_timeout",
        &[
            "closed_timeout 2m is longer than idle_timeout 1m",
            "closed_timeout must be <= idle_timeout",
        ],
    );
    // Only idle_timeout written: the default closed_timeout (1s) is too long for it.
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nidle_timeout = \"500ms\"\n",
        3,
        "xdp.idle_timeout",
        &["closed_timeout 1s is longer than idle_timeout 500ms"],
    );
}

#[test]
fn xdp_ranges() {
    for (key, value, allowed) in [
        ("max_services", "0", "allowed 1..=1024"),
        ("max_services", "1025", "allowed 1..=1024"),
        ("max_backends", "0", "allowed 1..=65536"),
        ("max_backends", "65537", "allowed 1..=65536"),
        ("conntrack_entries", "1023", "allowed 1024..=16777216"),
        ("conntrack_entries", "16777217", "allowed 1024..=16777216"),
        ("affinity_entries", "-1", "allowed 1024..=16777216"),
        ("affinity_entries", "4294967296", "allowed 1024..=16777216"),
    ] {
        bad(
            &format!("[xdp]\ninterfaces = [\"eth0\"]\n{key} = {value}\n"),
            3,
            &format!("xdp.{key}"),
            &[&format!("{key} {value} is out of range; {allowed}")],
        );
    }
    bad(
        "[xdp]\ninterfaces = [\"eth0\"]\nmax_services = \"16\"\n",
        3,
        "xdp.max_services",
        &["wrong type", "expected an integer"],
    );
}

#[test]
fn xdp_datapath_needs_xdp_table() {
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service]]
        name = "fast"
        listen = "10.0.0.1:81"
        datapath = "xdp"
        "#,
        7,
        "service[1].datapath",
        &["datapath \"xdp\" needs an [xdp] table with at least interfaces = [...]"],
    );
    // An [xdp] table without xdp services is fine (maps are set up, nothing uses them yet).
    good("[xdp]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\n");
}

#[test]
fn xdp_needs_ipv4_with_xdp_table() {
    bad(
        r#"
        [xdp]
        interfaces = ["eth0"]
        [[service]]
        name = "web"
        datapath = "xdp"
        listen = "0.0.0.0:80"
        "#,
        6,
        "service[0].listen",
        &["specific IPv4", "datapath = \"proxy\""],
    );
}

#[test]
fn xdp_ring_entries_limit() {
    bad(
        r#"
        ring_size = 16777213
        [xdp]
        interfaces = ["eth0"]
        max_services = 17
        "#,
        4,
        "xdp.max_services",
        &[
            "max_services 17 x ring_size 16777213 (line 1)",
            "ring_size x max_services must be <= 268435456",
            "max_services <= 16",
        ],
    );
    bad(
        "ring_size = 262147\n[xdp]\ninterfaces = [\"eth0\"]\nmax_services = 1024\n",
        4,
        "xdp.max_services",
        &["= 268438528 ring entries is too many", "max_services <= 1023"],
    );
    good("ring_size = 262139\n[xdp]\ninterfaces = [\"eth0\"]\nmax_services = 1024\n");
    good("[xdp]\ninterfaces = [\"eth0\"]\nmax_services = 1024\n");
    bad(
        "ring_size = 65537\n[xdp]\ninterfaces = [\"eth0\"]\nmax_services = 4097\n",
        4,
        "xdp.max_services",
        &["allowed 1..=1024"],
    );
}

#[test]
fn xdp_too_many_services() {
    bad(
        r#"
        [xdp]
        interfaces = ["eth0"]
        max_services = 1

        [[service]]
        name = "a"
        listen = "10.0.0.1:80"
        datapath = "xdp"
        [[service]]
        name = "p"
        listen = "10.0.0.1:81"
        [[service]]
        name = "b"
        listen = "10.0.0.1:82"
        datapath = "xdp"
        "#,
        3,
        "xdp.max_services",
        &[
            "max_services 1 is too small",
            "service \"b\" is xdp service number 2",
            "allowed 1..=1024",
            "datapath = \"proxy\"",
        ],
    );
    // With the default (16), the error points at the 17th xdp service.
    let mut text = String::from("[xdp]\ninterfaces = [\"eth0\"]\n");
    for i in 0..17 {
        text += &format!(
            "[[service]]\nname = \"s{i}\"\nlisten = \"10.0.0.1:{}\"\ndatapath = \"xdp\"\n",
            80 + i
        );
    }
    bad(
        &text,
        2 + 16 * 4 + 4,
        "xdp.max_services",
        &[
            "max_services 16 (the default) is too small",
            "service \"s16\" is xdp service number 17",
        ],
    );
}

#[test]
fn xdp_too_many_backends() {
    bad(
        r#"
        [xdp]
        interfaces = ["eth0"]
        max_backends = 2

        [[service]]
        name = "a"
        listen = "10.0.0.1:80"
        datapath = "xdp"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service]]
        name = "p"
        listen = "10.0.0.1:81"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"
        [[service]]
        name = "b"
        datapath = "xdp"
        listen = "10.0.0.1:82"
        [[service.backend]]
        address = "10.0.1.1:80"
        [[service.backend]]
        address = "10.0.1.2:80"
        "#,
        3,
        "xdp.max_backends",
        &[
            "max_backends 2 is too small",
            "the xdp services up to \"b\" have 3 backends in total",
            "allowed 1..=65536",
        ],
    );
    // Not written: the error points at the datapath of the service that overflows.
    let mut text = String::from(
        "ring_size = 16777213\n[xdp]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"big\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\n",
    );
    for i in 0..1025 {
        text += &format!(
            "[[service.backend]]\naddress = \"10.0.{}.{}:80\"\n",
            1 + i / 200,
            1 + i % 200
        );
    }
    bad(
        &text,
        7,
        "xdp.max_backends",
        &[
            "max_backends 1024 (the default) is too small",
            "1025 backends in total",
        ],
    );
}

#[test]
fn xdp_listen_inside_snat_ports() {
    bad(
        r#"
        [xdp]
        interfaces = ["eth0"]
        [[service]]
        name = "web"
        listen = "10.0.0.1:10000"
        datapath = "xdp"
        "#,
        5,
        "service[0].listen",
        &[
            "port 10000 is inside xdp.snat_ports 10000-29999 (the default)",
            "reserved for the source ports the xdp datapath uses toward backends",
            "outside 10000-29999",
        ],
    );
    bad(
        r#"
        [xdp]
        interfaces = ["eth0"]
        snat_ports = "40000-40063"
        [[service]]
        name = "web"
        datapath = "xdp"
        listen = "10.0.0.1:40063"
        "#,
        7,
        "service[0].listen",
        &[
            "port 40063 is inside xdp.snat_ports 40000-40063 (line 3)",
            "reserved",
        ],
    );
    // The proxy datapath may listen there.
    good(
        r#"
        [xdp]
        interfaces = ["eth0"]
        [[service]]
        name = "web"
        listen = "10.0.0.1:29999"
        "#,
    );
}

// ---------------------------------------------------------------------------------------------
// The AJP datapath: `datapath = "ajp"`, backend `route`, `[service.ajp]`.

#[test]
fn ajp_datapath_defaults() {
    let c = good(
        r#"
        [[service]]
        name = "tomcat"
        listen = "10.0.0.10:8009"
        protocol = "ajp"
        datapath = "ajp"

        [[service.backend]]
        name = "t1"
        address = "10.0.1.11:8009"

        [[service.backend]]
        address = "10.0.1.12:8009"
        route = "jvm2"
        "#,
    );
    let s = &c.services[0];
    assert_eq!(s.datapath, DatapathKind::Ajp);
    assert_eq!(s.ajp, None, "no table: every default");
    assert_eq!(s.backends[0].route, "t1", "route defaults to the name");
    assert_eq!(s.backends[1].route, "jvm2");
    let d = AjpConfig::default();
    assert_eq!(d.max_packet_size, 8192);
    assert_eq!(d.pool_size, 64);
    assert_eq!(d.pool_idle_timeout, Duration::from_secs(60));
    assert_eq!(d.ping_after_idle, Duration::from_secs(10));
    assert_eq!(d.reply_timeout, Duration::from_secs(60));
    assert_eq!(d.request_timeout, Duration::from_secs(60));
    assert_eq!(d.idle_timeout, Duration::from_secs(600));
    assert_eq!((d.retries, d.retry_buffer), (1, 65536));
    assert_eq!(d.session_cookies, vec!["JSESSIONID"]);
    assert_eq!(d.session_path_params, vec!["jsessionid"]);
    assert_eq!((d.secret.clone(), d.backend_secret.clone()), (None, None));
}

#[test]
fn ajp_table_every_key() {
    let c = good(
        r#"
        [[service]]
        name = "tomcat"
        listen = "10.0.0.10:8009"
        protocol = "ajp"
        datapath = "ajp"

        [service.ajp]
        secret = "from-apache"
        backend_secret = "to-tomcat"
        max_packet_size = 65536
        pool_size = 8
        pool_idle_timeout = "5m"
        ping_after_idle = "0s"
        reply_timeout = "0s"
        request_timeout = "250ms"
        idle_timeout = "2h"
        retries = 3
        retry_buffer = 0
        session_cookies = ["SESSION", "JSESSIONID"]
        session_path_params = []
        allowed_attributes = ["AJP_REMOTE_PORT", "SSL_*"]
        "#,
    );
    let a = c.services[0].ajp.clone().expect("table given");
    assert_eq!(a.secret, Some(Secret("from-apache".into())));
    assert_eq!(a.backend_secret, Some(Secret("to-tomcat".into())));
    assert_eq!((a.max_packet_size, a.pool_size), (65536, 8));
    assert_eq!(a.pool_idle_timeout, Duration::from_secs(300));
    assert_eq!(a.ping_after_idle, Duration::ZERO);
    assert_eq!(a.reply_timeout, Duration::ZERO, "0s: no reply timeout");
    assert_eq!(a.request_timeout, Duration::from_millis(250));
    assert_eq!(a.idle_timeout, Duration::from_secs(7200));
    assert_eq!((a.retries, a.retry_buffer), (3, 0));
    assert_eq!(a.session_cookies, vec!["SESSION", "JSESSIONID"]);
    assert!(a.session_path_params.is_empty());
    assert!(a.attribute_allowed(b"AJP_REMOTE_PORT"));
    assert!(a.attribute_allowed(b"SSL_CLIENT_CERT"));
    assert!(!a.attribute_allowed(b"AJP_LOCAL_ADDR"));
    // Secrets never show in Debug or serialized output.
    let shown = format!("{a:?} {}", serde_json::to_string(&a).unwrap());
    assert!(
        !shown.contains("from-apache") && !shown.contains("to-tomcat"),
        "{shown}"
    );
}

#[test]
fn ajp_attribute_allow_list() {
    let d = AjpConfig::default();
    for ok in [
        "AJP_REMOTE_PORT",
        "AJP_LOCAL_ADDR",
        "AJP_SSL_PROTOCOL",
        "JK_LB_ACTIVATION",
        "SSL_CIPHER",
    ] {
        assert!(d.attribute_allowed(ok.as_bytes()), "{ok}");
    }
    for refused in [
        "javax.servlet.include.request_uri",
        "jakarta.servlet.include.path_info",
        "org.apache.catalina.jsp_file",
        "ajp_remote_port",
        "",
    ] {
        assert!(!d.attribute_allowed(refused.as_bytes()), "{refused}");
    }
    // Include attributes are refused even by a catch-all pattern.
    let all = AjpConfig {
        allowed_attributes: vec!["*".into()],
        ..AjpConfig::default()
    };
    assert!(all.attribute_allowed(b"org.apache.catalina.jsp_file"));
    assert!(!all.attribute_allowed(b"javax.servlet.include.servlet_path"));
    assert!(!all.attribute_allowed(b"JAVAX.SERVLET.INCLUDE.x"));
}

const AJP_HEAD: &str =
    "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:8009\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n";

#[test]
fn bad_ajp_settings() {
    bad(
        "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"ajp\"\n",
        4,
        "service[0].datapath",
        &["needs protocol = \"ajp\""],
    );
    bad(
        "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\nprotocol = \"ajp\"\n[service.ajp]\nretries = 2\n",
        5,
        "service[0].ajp",
        &["applies only to datapath = \"ajp\""],
    );
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "max_packet_size = 512",
            "service[0].ajp.max_packet_size",
            &["out of range; allowed 1024..=65536"],
        ),
        (
            "max_packet_size = 65537",
            "service[0].ajp.max_packet_size",
            &["allowed 1024..=65536"],
        ),
        (
            "pool_size = 0",
            "service[0].ajp.pool_size",
            &["allowed 1..=65536"],
        ),
        ("retries = -1", "service[0].ajp.retries", &["allowed 0..=16"]),
        (
            "retry_buffer = 99999999",
            "service[0].ajp.retry_buffer",
            &["allowed 0..=16777216"],
        ),
        (
            "pool_idle_timeout = \"0s\"",
            "service[0].ajp.pool_idle_timeout",
            &["greater than 0"],
        ),
        (
            "ping_after_idle = \"soon\"",
            "service[0].ajp.ping_after_idle",
            &["not a valid duration"],
        ),
        (
            "reply_timeout = \"-1s\"",
            "service[0].ajp.reply_timeout",
            &["not a valid duration"],
        ),
        (
            "request_timeout = 30",
            "service[0].ajp.request_timeout",
            &["expected a duration string"],
        ),
        (
            "idle_timeout = \"1000h\"",
            "service[0].ajp.idle_timeout",
            &["too long"],
        ),
        (
            "secret = \"\"",
            "service[0].ajp.secret",
            &["1 to 1024 characters"],
        ),
        (
            "backend_secret = \"a\\nb\"",
            "service[0].ajp.backend_secret",
            &["without control characters"],
        ),
        (
            "session_cookies = [\"JSESSION ID\"]",
            "service[0].ajp.session_cookies[0]",
            &["is not allowed", "JSESSIONID"],
        ),
        (
            "session_cookies = [\"A\", \"A\"]",
            "service[0].ajp.session_cookies[1]",
            &["listed twice"],
        ),
        (
            "session_path_params = [\"\"]",
            "service[0].ajp.session_path_params[0]",
            &["is not allowed"],
        ),
        (
            "allowed_attributes = [\"A*B\"]",
            "service[0].ajp.allowed_attributes[0]",
            &["prefix ending in *"],
        ),
        (
            "allowed_attributes = \"SSL_*\"",
            "service[0].ajp.allowed_attributes",
            &["expected an array"],
        ),
        (
            "sticky = true",
            "service[0].ajp.sticky",
            &["unknown key `sticky`", "backend_secret"],
        ),
    ];
    for (line, key, needles) in cases {
        bad(&format!("{AJP_HEAD}[service.ajp]\n{line}\n"), 7, key, needles);
    }
    // A bad secret is not repeated in the message.
    let text = format!("{AJP_HEAD}[service.ajp]\nsecret = \"{}\"\n", "x".repeat(1025));
    let e = Config::parse(&text, "bad.toml").unwrap_err().to_string();
    assert!(!e.contains("xxxx"), "{e}");
    bad(
        &format!("{AJP_HEAD}[[service.backend]]\naddress = \"10.0.1.1:8009\"\nroute = \"a b\"\n"),
        8,
        "service[0].backend[0].route",
        &["route \"a b\" is not allowed", "jvmRoute"],
    );
    bad(
        &format!(
            "{AJP_HEAD}[[service.backend]]\nname = \"t1\"\naddress = \"10.0.1.1:8009\"\n[[service.backend]]\naddress = \"10.0.1.2:8009\"\nroute = \"t1\"\n"
        ),
        11,
        "service[0].backend[1].route",
        &["route \"t1\" is already the route of service[0].backend[0] (line 7)"],
    );
}

#[test]
fn check_intervals_and_socket_paths_have_limits() {
    bad_table(&[
        (
            svc!("[service.health]\ninterval = \"1ms\"\ntimeout = \"1ms\"\n"),
            5,
            "service[0].health.interval",
            &["interval \"1ms\" is too short", "\"100ms\""],
        ),
        (
            svc!("[service.health]\nfast_interval = \"99ms\"\n"),
            5,
            "service[0].health.fast_interval",
            &["too short"],
        ),
    ]);
    let c = good(svc!(
        "[service.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n"
    ));
    assert_eq!(c.services[0].health.interval, Duration::from_millis(100));

    let longest = format!("/run/{}", "s".repeat(107 - "/run/".len()));
    let c = good(&format!("[control]\nsocket = \"{longest}\"\n"));
    assert_eq!(c.control.socket, PathBuf::from(&longest));
    let text = format!("[control]\nsocket = \"{longest}s\"\n");
    let e = Config::parse(&text, "bad.toml").unwrap_err().to_string();
    assert!(e.contains("bad.toml:2") && e.contains("at most 107 bytes"), "{e}");
    // The limit is real: a path one byte longer cannot be bound.
    let dir = std::env::temp_dir().join(format!("lb-sockpath-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.to_str().unwrap().len() + 1;
    let fits = dir.join("f".repeat(107 - base));
    let over = dir.join("o".repeat(108 - base));
    assert!(std::os::unix::net::UnixListener::bind(&fits).is_ok());
    assert!(std::os::unix::net::UnixListener::bind(&over).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn passive_health_is_on_where_checks_run_and_off_for_kind_none_unless_asked() {
    let load = |text: &str| {
        let c = good(text);
        (c.services[0].health.observe, c.services[0].health.error_limit)
    };
    assert_eq!(load(svc!("")), (Observe::Layer4, 3));
    assert_eq!(
        load(svc!("[service.health]\nkind = \"ajp\"\n")),
        (Observe::Layer4, 3)
    );
    assert_eq!(
        load(svc!("[service.health]\nkind = \"none\"\n")),
        (Observe::None, 3)
    );
    assert_eq!(
        load(svc!("[service.health]\nobserve = \"none\"\nerror_limit = 7\n")),
        (Observe::None, 7)
    );
    assert_eq!(
        load(svc!("[service.health]\nerror_limit = 1\n")),
        (Observe::Layer4, 1)
    );
}

#[test]
fn announce_names_a_table_and_a_protocol_of_lbs_own() {
    assert_eq!(good("seed = 1\n").announce, None);
    assert_eq!(
        good("[announce]\n").announce,
        Some(crate::config::AnnounceConfig {
            table: 100,
            protocol: 201
        })
    );
    assert_eq!(
        good("[announce]\ntable = 4242\nprotocol = 77\n").announce,
        Some(crate::config::AnnounceConfig {
            table: 4242,
            protocol: 77
        })
    );
    bad_table(&[
        (
            "[announce]\ntable = 254\n",
            2,
            "announce.table",
            &["one of the kernel's own", "such as 100"],
        ),
        (
            "[announce]\ntable = 0\n",
            2,
            "announce.table",
            &["out of range; allowed 1..=4294967295"],
        ),
        (
            "[announce]\nprotocol = 12\n",
            2,
            "announce.protocol",
            &["reserved", "BIRD's"],
        ),
        (
            "[announce]\nprotocol = 256\n",
            2,
            "announce.protocol",
            &["out of range; allowed 1..=255"],
        ),
        (
            "[announce]\nprotocol = 3\n",
            2,
            "announce.protocol",
            &["reserved"],
        ),
        ("[announce]\ntabel = 3\n", 2, "announce.tabel", &["unknown key"]),
    ]);
}

// ---------------------------------------------------------------------------------------------
// forwarding = "nat" | "dsr".

const XDP_TABLE: &str = "[xdp]\ninterfaces = [\"eth0\"]\n";

#[test]
fn forwarding_defaults_to_nat_and_dsr_is_kept() {
    let c = good(&format!(
        "{XDP_TABLE}{}",
        r#"
        [[service]]
        name = "nat"
        listen = "10.0.0.1:80"
        datapath = "xdp"
        [[service.backend]]
        address = "10.0.1.1:8080"
        [[service]]
        name = "dsr"
        listen = "10.0.0.2:80"
        datapath = "xdp"
        forwarding = "dsr"
        [[service.backend]]
        address = "10.0.1.1:80"
        "#
    ));
    assert_eq!(c.services[0].forwarding, Forwarding::Nat);
    assert_eq!(c.services[1].forwarding, Forwarding::Dsr);
    // A proxy service says nat explicitly: allowed.
    let c = good(svc!("forwarding = \"nat\"\n"));
    assert_eq!(c.services[0].forwarding, Forwarding::Nat);
}

#[test]
fn dsr_needs_xdp_and_backends_on_the_vip_port() {
    bad_table(&[
        (
            svc!("forwarding = \"dsr\"\n"),
            4,
            "service[0].forwarding",
            &["needs datapath = \"xdp\"", "proxy datapath"],
        ),
        (
            "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:8009\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\nforwarding = \"dsr\"\n",
            6,
            "service[0].forwarding",
            &["needs datapath = \"xdp\"", "ajp datapath"],
        ),
        (
            svc!("forwarding = \"direct\"\n"),
            4,
            "service[0].forwarding",
            &["\"nat\" or \"dsr\""],
        ),
    ]);
    bad(
        &format!(
            "{XDP_TABLE}{}",
            "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\nforwarding = \"dsr\"\n[[service.backend]]\naddress = \"10.0.1.1:8080\"\n"
        ),
        9,
        "service[0].backend[0].address",
        &["must listen on port 80", "use 10.0.1.1:80"],
    );
}

#[test]
fn dsr_in_a_request() {
    let fields = serde_json::json!({
        "name": "a", "listen": "10.0.0.1:80", "datapath": "xdp", "forwarding": "dsr",
        "backend": [{"address": "10.0.1.1:80"}]
    });
    assert_eq!(
        ServiceConfig::from_fields(fields).unwrap().forwarding,
        Forwarding::Dsr
    );
    let err = ServiceConfig::from_fields(serde_json::json!({
        "name": "a", "listen": "10.0.0.1:80", "forwarding": "dsr"
    }))
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("forwarding: ") && err.contains("needs datapath = \"xdp\""),
        "{err}"
    );
    let err = ServiceConfig::from_fields(serde_json::json!({
        "name": "a", "listen": "10.0.0.1:80", "datapath": "xdp", "forwarding": "dsr",
        "backend": [{"address": "10.0.1.1:81"}]
    }))
    .unwrap_err()
    .to_string();
    assert!(err.contains("must listen on port 80"), "{err}");
}

#[test]
fn splice_modes_of_proxy_services() {
    let c = good(svc!(""));
    assert_eq!(c.services[0].splice, SpliceMode::default());
    for (text, want) in [("off", SpliceMode::Off), ("pipe", SpliceMode::Pipe)] {
        let c = good(&format!("{}splice = \"{text}\"\n", svc!("")));
        assert_eq!(c.services[0].splice, want, "splice = {text:?}");
    }
    bad_table(&[
        (
            svc!("splice = \"zero-copy\"\n"),
            4,
            "service[0].splice",
            &["\"off\"", "\"pipe\""],
        ),
        (
            "[xdp]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\nsplice = \"pipe\"\n",
            7,
            "service[0].splice",
            &["only to datapath = \"proxy\"", "xdp datapath"],
        ),
        (
            svc!("protocol = \"ajp\"\ndatapath = \"ajp\"\nsplice = \"off\"\n"),
            6,
            "service[0].splice",
            &["only to datapath = \"proxy\"", "ajp datapath"],
        ),
    ]);
    // The control socket's add-service goes through the same check.
    let e = ServiceConfig::from_fields(serde_json::json!({
        "name": "a", "listen": "10.0.0.1:80", "datapath": "xdp", "splice": "pipe"
    }))
    .unwrap_err();
    assert!(e.to_string().contains("splice"), "{e}");
}

#[test]
fn idle_timeout_of_proxy_services() {
    let c = good(svc!(""));
    assert_eq!(c.services[0].idle_timeout, Duration::from_secs(15 * 60));
    for (text, want) in [("90s", Duration::from_secs(90)), ("0s", Duration::ZERO)] {
        let c = good(&format!("{}idle_timeout = \"{text}\"\n", svc!("")));
        assert_eq!(c.services[0].idle_timeout, want, "idle_timeout = {text:?}");
    }
    bad_table(&[
        (
            svc!("idle_timeout = \"soon\"\n"),
            4,
            "service[0].idle_timeout",
            &["not a valid duration"],
        ),
        (
            "[xdp]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\nidle_timeout = \"1m\"\n",
            7,
            "service[0].idle_timeout",
            &["only to datapath = \"proxy\"", "[xdp] idle_timeout"],
        ),
        (
            svc!("protocol = \"ajp\"\ndatapath = \"ajp\"\nidle_timeout = \"1m\"\n"),
            6,
            "service[0].idle_timeout",
            &["only to datapath = \"proxy\"", "[service.ajp] idle_timeout"],
        ),
    ]);
    // Serialized (state file, control requests) it parses again; the default is not written out,
    // so an xdp or ajp service's serialized form stays valid.
    for text in [svc!(""), &format!("{}idle_timeout = \"0s\"\n", svc!(""))] {
        let svc = &good(text).services[0];
        let json = serde_json::to_value(svc).unwrap();
        assert_eq!(
            json.get("idle_timeout").is_some(),
            !svc.idle_timeout.eq(&Duration::from_secs(900))
        );
        let back = ServiceConfig::from_fields(json.clone()).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(back.idle_timeout, svc.idle_timeout, "{json}");
    }
}

#[test]
fn splice_round_trips_through_serialization() {
    // An xdp service serialized (state file, control requests) parses again: the default is not
    // written out; a proxy service's mode is.
    let c = good(
        "[xdp]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"x\"\nlisten = \"10.0.0.1:80\"\ndatapath = \"xdp\"\n[[service]]\nname = \"p\"\nlisten = \"10.0.0.1:81\"\nsplice = \"pipe\"\n",
    );
    for svc in &c.services {
        let json = serde_json::to_value(svc).unwrap();
        let back = ServiceConfig::from_fields(json.clone()).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(back.splice, svc.splice, "{json}");
    }
    assert_eq!(c.services[1].splice, SpliceMode::Pipe);
}

/// A service of `n` backends, `b0`… on distinct addresses (`ring_size` large enough for them): the
/// backend table of backend `i` starts on line `5 + 3 * i`.
fn many_backends(n: usize) -> String {
    use std::fmt::Write as _;
    let mut text =
        format!("ring_size = {MAX_RING_SIZE}\n[[service]]\nname = \"web\"\nlisten = \"10.0.0.1:80\"\n");
    for i in 0..n {
        writeln!(
            text,
            "[[service.backend]]\naddress = \"{}\"\nname = \"b{i}\"",
            many_address(i)
        )
        .unwrap();
    }
    text
}

fn many_address(i: usize) -> String {
    format!("10.{}.{}.{}:8080", 1 + i / 62_500, (i / 250) % 250, 1 + i % 250)
}

#[test]
fn a_service_of_twenty_thousand_backends_is_checked_whole() {
    const N: usize = 20_000;
    let text = many_backends(N);
    let c = Config::parse(&text, "many.toml").unwrap();
    let backends = &c.services[0].backends;
    assert_eq!(backends.len(), N);
    assert_eq!(
        (backends[N - 1].name.as_str(), backends[N - 1].address.to_string()),
        ("b19999", many_address(N - 1))
    );
    // A request (or a state file) with the same backends passes the same checks.
    let fields = serde_json::to_value(&c.services[0]).unwrap();
    assert_eq!(&ServiceConfig::from_fields(fields).unwrap(), &c.services[0]);
    // A clash near the end is found, and named with the earlier backend's line.
    let last = 5 + 3 * (N - 1);
    let address = text.replace(
        &format!("address = \"{}\"\nname = \"b{}\"", many_address(N - 1), N - 1),
        &format!("address = \"{}\"\nname = \"b{}\"", many_address(12_345), N - 1),
    );
    let e = Config::parse(&address, "many.toml").unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "many.toml:{}: service[0].backend[19999].address: backend address {} is already used by service[0].backend[12345] (line {}); each backend of a service needs its own ip:port",
            last + 1,
            many_address(12_345),
            5 + 3 * 12_345 + 1
        )
    );
    let name = text.replace(&format!("name = \"b{}\"\n", N - 1), "name = \"b777\"\n");
    let e = Config::parse(&name, "many.toml").unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "many.toml:{}: service[0].backend[19999].name: backend name \"b777\" is already used by service[0].backend[777] (line {}); backend names must be unique within a service",
            last + 2,
            5 + 3 * 777 + 2
        )
    );
}

#[test]
fn a_backend_that_clashes_with_several_earlier_ones_is_told_about_the_first() {
    // backend[2] has backend[1]'s address and backend[0]'s name: backend[0] is named.
    bad(
        r#"
        [[service]]
        name = "web"
        listen = "10.0.0.1:80"
        [[service.backend]]
        address = "10.0.1.1:8080"
        name = "a"
        [[service.backend]]
        address = "10.0.1.2:8080"
        name = "b"
        [[service.backend]]
        address = "10.0.1.2:8080"
        name = "a"
        "#,
        12,
        "service[0].backend[2].name",
        &["backend name \"a\" is already used by service[0].backend[0] (line 6)"],
    );
    // backend[2] has backend[0]'s address and backend[1]'s route: backend[0] is named.
    let head =
        "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:8009\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n";
    let two = |third: &str| {
        format!(
            "{head}[[service.backend]]\nname = \"t1\"\naddress = \"10.0.1.1:8009\"\n\
             [[service.backend]]\nname = \"t2\"\naddress = \"10.0.1.2:8009\"\n\
             [[service.backend]]\nname = \"t3\"\n{third}"
        )
    };
    let e = Config::parse(&two("address = \"10.0.1.1:8009\"\nroute = \"t2\"\n"), "x.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("service[0].backend[2].address: backend address 10.0.1.1:8009 is already used by service[0].backend[0] (line 8)"),
        "{e}"
    );
    // With one backend both its route and its address: the route is told.
    let e = Config::parse(&two("address = \"10.0.1.2:8009\"\nroute = \"t2\"\n"), "x.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("service[0].backend[2].route: route \"t2\" is already the route of service[0].backend[1] (line 10)"),
        "{e}"
    );
    // Routes of services that are not AJP are not compared.
    let tcp = "[[service]]\nname = \"a\"\nlisten = \"10.0.0.1:80\"\n[[service.backend]]\nname = \"x\"\naddress = \"10.0.1.1:80\"\nroute = \"r\"\n[[service.backend]]\nname = \"y\"\naddress = \"10.0.1.2:80\"\nroute = \"r\"\n";
    Config::parse(tcp, "x.toml").unwrap();
}
