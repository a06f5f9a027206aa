//! Observability end to end: after a known number of connections and bytes through each datapath
//! (proxy and XDP), `lb stats --json` and the Prometheus endpoint (`[metrics]`, scraped inside the
//! lb namespace on loopback) report them, and agree; the endpoint's text parses as Prometheus
//! exposition (`prometheus-parse`), with HELP and TYPE for every sample. Also: health and operator
//! transitions with their reasons, `lb top` under a pseudo-terminal (tmux), and `--log-format json`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::{Netns, Topology, connect_from, lb_bin, require_root, unique_prefix};
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::Value as Json;

/// Where `[metrics]` listens inside the lb namespace.
const METRICS: &str = "127.0.0.1:9100";
/// Largest TCP payload per segment on the 1500-byte veths.
const MSS: u64 = 1460;

// ---------------------------------------------------------------------------------------------
// Scraping and parsing.

/// An HTTP answer: status line, headers (lower-case names) and body.
struct HttpAnswer {
    status: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One raw HTTP/1.1 request to the metrics endpoint from inside `ns`.
fn http(ns: &Netns, request: &str) -> HttpAnswer {
    let request = request.to_string();
    let raw = ns
        .run(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("metrics endpoint {METRICS}: {e}"));
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `GET /metrics` in the default (Prometheus 0.0.4 text) format, checked and parsed.
fn get_metrics(ns: &Netns) -> (String, Scrape) {
    let a = http(ns, "GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n");
    assert_eq!(a.status, "HTTP/1.1 200 OK", "{}", a.body);
    assert_eq!(
        a.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        a.headers.get("content-length").map(String::as_str),
        Some(a.body.len().to_string().as_str())
    );
    let scrape = parse_strict(&a.body);
    (a.body, scrape)
}

/// Parses exposition text with `prometheus-parse` and checks what that lenient parser does not:
/// every sample line was understood, every sample has HELP and a TYPE of its own name, counters
/// end in `_total`, and no series appears twice.
fn parse_strict(text: &str) -> Scrape {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition parses");
    let sample_lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        scrape.samples.len(),
        sample_lines.len(),
        "some sample lines were not understood:\n{text}"
    );
    let mut series = std::collections::BTreeSet::new();
    for s in &scrape.samples {
        assert!(s.metric.starts_with("lb_"), "{}", s.metric);
        assert!(scrape.docs.contains_key(&s.metric), "no HELP for {}", s.metric);
        match s.value {
            Value::Counter(v) => {
                assert!(s.metric.ends_with("_total"), "counter {} lacks _total", s.metric);
                assert!(v >= 0.0 && v.fract() == 0.0, "{} = {v}", s.metric);
            }
            Value::Gauge(_) => assert!(!s.metric.ends_with("_total"), "gauge {}", s.metric),
            ref other => panic!("{} has no TYPE of its own name: {other:?}", s.metric),
        }
        let labels: BTreeMap<_, _> = s.labels.iter().collect();
        assert!(
            series.insert(format!("{}{labels:?}", s.metric)),
            "series {} {labels:?} appears twice",
            s.metric
        );
    }
    scrape
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("not a single number: {other:?}"),
    }
}

fn matches(s: &Sample, metric: &str, labels: &[(&str, &str)]) -> bool {
    s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
}

/// The value of the one series `metric{labels…}`; `None` when absent.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| matches(s, metric, labels))
        .collect();
    assert!(found.len() <= 1, "{metric} {labels:?} matches {found:?}");
    found.first().map(|s| number(&s.value))
}

fn must(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> u64 {
    value(scrape, metric, labels).unwrap_or_else(|| panic!("{metric} {labels:?} missing")) as u64
}

// ---------------------------------------------------------------------------------------------
// `lb stats --json` helpers.

fn stats(lb: &Lb) -> Json {
    lb.json(&["stats"])
}

fn service<'a>(stats: &'a Json, name: &str) -> &'a Json {
    stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("service {name} missing: {stats}"))
}

fn backends(stats: &Json, svc: &str) -> Vec<Json> {
    service(stats, svc)["backends"].as_array().unwrap().clone()
}

fn backend<'a>(stats: &'a Json, svc: &str, name: &str) -> &'a Json {
    service(stats, svc)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("backend {svc}/{name} missing: {stats}"))
}

fn sum(stats: &Json, svc: &str, key: &str) -> u64 {
    backends(stats, svc)
        .iter()
        .map(|b| b[key].as_u64().unwrap())
        .sum()
}

/// Waits until every backend of `svc` passed a health check.
fn wait_checked(lb: &Lb, svc: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while backends(&stats(lb), svc)
        .iter()
        .any(|b| b["check"]["consecutive_ok"] == 0)
    {
        assert!(Instant::now() < deadline, "checks never succeeded:\n{}", lb.log());
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until no backend of `svc` has an open connection; returns that snapshot.
fn settled(lb: &Lb, svc: &str) -> Json {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = stats(lb);
        if sum(&st, svc, "connections_active") == 0 {
            return st;
        }
        assert!(Instant::now() < deadline, "connections stay open: {st}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The per-backend counters that must be equal in `lb stats` and on the endpoint (nothing moves
/// between the two reads), by (JSON key, metric name).
const SAME: &[(&str, &str)] = &[
    ("connections_active", "lb_backend_connections_active"),
    ("connections_total", "lb_backend_connections_total"),
    ("bytes_in", "lb_backend_bytes_in_total"),
    ("bytes_out", "lb_backend_bytes_out_total"),
    ("packets_in", "lb_backend_packets_in_total"),
    ("packets_out", "lb_backend_packets_out_total"),
    ("connect_failures", "lb_backend_connect_failures_total"),
    ("ring_slots", "lb_backend_ring_slots"),
    ("weight", "lb_backend_weight"),
    ("health_transitions", "lb_backend_transitions_total"),
    ("state_transitions", "lb_backend_transitions_total"),
];

/// Every backend of every service: the endpoint says what `lb stats` said.
fn assert_agree(st: &Json, scrape: &Scrape) {
    for svc in st["services"].as_array().unwrap() {
        let s = svc["name"].as_str().unwrap();
        assert_eq!(
            Some(svc["affinity_entries"].as_u64().unwrap() as f64),
            value(scrape, "lb_service_affinity_entries", &[("service", s)]),
            "{s}: affinity entries"
        );
        assert_eq!(
            svc["failed_connections"].as_u64().map(|n| n as f64),
            value(scrape, "lb_service_failed_connections_total", &[("service", s)]),
            "{s}: failed connections"
        );
        for b in svc["backends"].as_array().unwrap() {
            let name = b["name"].as_str().unwrap();
            let l = [("service", s), ("backend", name)];
            for (key, metric) in SAME {
                let labels: Vec<(&str, &str)> = match *key {
                    "health_transitions" => vec![l[0], l[1], ("kind", "health")],
                    "state_transitions" => vec![l[0], l[1], ("kind", "state")],
                    _ => l.to_vec(),
                };
                assert_eq!(
                    b[*key].as_u64().map(|n| n as f64),
                    value(scrape, metric, &labels),
                    "{s}/{name}: {key} in lb stats vs {metric}"
                );
            }
            let up = if b["health"] == "up" { 1.0 } else { 0.0 };
            assert_eq!(value(scrape, "lb_backend_up", &l), Some(up), "{s}/{name} up");
            let state = b["state"].as_str().unwrap();
            assert_eq!(
                value(scrape, "lb_backend_state", &[l[0], l[1], ("state", state)]),
                Some(1.0),
                "{s}/{name} state {state}"
            );
            if let Some(check) = b["check"].as_object() {
                // Checks keep running between the two reads: the endpoint's count is not lower.
                let checks = check["checks"].as_u64().unwrap();
                let ok = must(scrape, "lb_backend_checks_total", &[l[0], l[1], ("result", "ok")]);
                let failed = must(
                    scrape,
                    "lb_backend_checks_total",
                    &[l[0], l[1], ("result", "failed")],
                );
                assert!(
                    ok + failed >= checks,
                    "{s}/{name}: {ok}+{failed} checks < {checks}"
                );
                assert!(failed >= check["failed_checks"].as_u64().unwrap());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// One echo connection from `src` to `to` carrying `len` bytes each way, closed by both sides.
fn echo_exchange(ns: &str, src: Ipv4Addr, to: SocketAddr, len: usize, seed: u64) {
    let data = random_bytes(len, seed);
    let mut s = connect_from(ns, src, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {src} -> {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(len);
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), len, "echo from {src} via {to}");
    assert!(back == random_bytes(len, seed), "echo bytes differ");
}

/// `n` echo exchanges from the client addresses in turn; (connections, payload bytes each way).
fn echo_traffic(topo: &Topology, to: SocketAddr, n: usize) -> (u64, u64) {
    let clients = topo.client_addrs();
    let mut total = 0u64;
    for i in 0..n {
        let len = 20_000 + 3_333 * i;
        echo_exchange(
            topo.client_ns().name(),
            clients[i % clients.len()],
            to,
            len,
            i as u64 + 1,
        );
        total += len as u64;
    }
    (n as u64, total)
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Proxy: `echo` (2 backends, TCP checks) and `dead` (one backend nobody listens on).
fn proxy_config(topo: &Topology, socket: &Path) -> String {
    let mut c = format!(
        "shutdown_timeout = \"1s\"\n[metrics]\nlisten = \"{METRICS}\"\n[control]\nsocket = \"{}\"\n",
        socket.display()
    );
    c.push_str(&format!(
        "\n[[service]]\nname = \"echo\"\nlisten = \"{}:{ECHO_VIP_PORT}\"\n[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n",
        topo.vip()
    ));
    for i in 1..=2 {
        c.push_str(&format!(
            "[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{ECHO_PORT}\"\n",
            topo.backend_addr(i)
        ));
    }
    c.push_str(&format!(
        "\n[[service]]\nname = \"dead\"\nlisten = \"{}:81\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\nname = \"nobody\"\naddress = \"{}:9\"\n",
        topo.vip(),
        topo.backend_addr(1)
    ));
    c
}

#[test]
fn proxy_counters_agree_in_stats_and_on_the_metrics_endpoint() {
    if !require_root("proxy_counters_agree_in_stats_and_on_the_metrics_endpoint") {
        return;
    }
    let mut bed = Bed::new("oproxy", 2, 6, proxy_config);
    wait_checked(&bed.lb, "echo");
    let (connections, payload) = echo_traffic(&bed.topo, bed.echo(), 9);

    // A client of `dead`: the proxy accepts, the connect to the backend is refused, the client is
    // closed: one connect failure on the backend, one failed client on the service.
    let dead = SocketAddr::new(bed.topo.vip().into(), 81);
    let mut c = connect_from(
        bed.topo.client_ns().name(),
        bed.topo.client_addrs()[0],
        dead,
        Duration::from_secs(5),
    )
    .unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());

    let st = settled(&bed.lb, "echo");
    // Exact: every connection, and every payload byte each way, once.
    assert_eq!(sum(&st, "echo", "connections_total"), connections, "{st}");
    assert_eq!(sum(&st, "echo", "bytes_in"), payload, "{st}");
    assert_eq!(sum(&st, "echo", "bytes_out"), payload, "{st}");
    for b in backends(&st, "echo") {
        assert_eq!(b["packets_in"], Json::Null, "the proxy counts no packets: {b}");
        assert_eq!(b["connect_failures"], 0);
        assert!(b["check"]["checks"].as_u64().unwrap() > 0, "{b}");
        assert!(b["check"]["last_latency_ms"].as_f64().is_some(), "{b}");
    }
    let nobody = backend(&st, "dead", "nobody");
    assert_eq!(nobody["connect_failures"], 1, "{nobody}");
    assert_eq!(nobody["connections_total"], 0);
    assert_eq!(service(&st, "dead")["failed_connections"], 1);
    assert_eq!(nobody["check"], Json::Null, "no checks configured");

    let (text, scrape) = get_metrics(bed.topo.lb_ns());
    assert_agree(&st, &scrape);
    assert_eq!(value(&scrape, "lb_up", &[]), Some(1.0));
    assert!(
        value(
            &scrape,
            "lb_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .is_some()
    );
    assert!(
        value(&scrape, "lb_backend_packets_in_total", &[("service", "echo")]).is_none(),
        "no packet counters for the proxy:\n{text}"
    );
    let latency = must_f64(&scrape, "lb_backend_check_latency_seconds", "echo", "b1");
    // In seconds, and a check's: not more than a loaded machine can take to wake the checker.
    assert!(latency > 0.0 && latency < 1.0, "check latency {latency}");
    assert_eq!(
        value(
            &scrape,
            "lb_service_info",
            &[("service", "echo"), ("datapath", "proxy"), ("protocol", "tcp")]
        ),
        Some(1.0)
    );

    // The same samples in OpenMetrics when asked for.
    let om = http(
        bed.topo.lb_ns(),
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n\r\n",
    );
    assert_eq!(
        om.headers.get("content-type").map(String::as_str),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));
    assert!(om.body.contains("# TYPE lb_backend_connections counter\n"));
    let om_scrape = Scrape::parse(om.body.lines().map(|l| Ok(l.to_string()))).unwrap();
    for b in ["b1", "b2"] {
        let l = [("service", "echo"), ("backend", b)];
        assert_eq!(
            value(&om_scrape, "lb_backend_bytes_in_total", &l),
            value(&scrape, "lb_backend_bytes_in_total", &l)
        );
    }
    // Anything but GET/HEAD /metrics (or the status page) is a 404.
    for req in [
        "GET /nothing HTTP/1.1\r\n\r\n",
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ] {
        assert_eq!(
            http(bed.topo.lb_ns(), req).status,
            "HTTP/1.1 404 Not Found",
            "{req:?}"
        );
    }

    // Transitions: an operator drain, then a health failure, each with who/why and a time.
    bed.lb.cli_ok(&["backend", "drain", "echo", "b2"]);
    drop(bed.servers.remove(2)); // echo server of b1 (http b1, http b2, echo b1, echo b2)
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = stats(&bed.lb);
        if backend(&st, "echo", "b1")["health"] == "down" {
            break st;
        }
        assert!(Instant::now() < deadline, "b1 never went down: {st}");
        thread::sleep(Duration::from_millis(50));
    };
    let b1 = backend(&st, "echo", "b1");
    let t = b1["transitions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (t["kind"].as_str(), t["from"].as_str(), t["to"].as_str()),
        (Some("health"), Some("up"), Some("down"))
    );
    assert!(t["reason"].as_str().unwrap().contains("connect failed"), "{t}");
    assert_eq!(b1["health_transitions"], 1);
    let b2 = backend(&st, "echo", "b2");
    let t = &b2["transitions"][0];
    assert_eq!(
        (
            t["kind"].as_str(),
            t["from"].as_str(),
            t["to"].as_str(),
            t["reason"].as_str()
        ),
        (
            Some("state"),
            Some("active"),
            Some("drain"),
            Some("operator uid 0")
        )
    );
    let now_ms = st["taken_unix_ms"].as_u64().unwrap();
    assert!(now_ms - t["unix_ms"].as_u64().unwrap() < 30_000, "{t}");
    let (_, scrape) = get_metrics(bed.topo.lb_ns());
    assert_agree(&st, &scrape);
    assert_eq!(
        value(
            &scrape,
            "lb_backend_up",
            &[("service", "echo"), ("backend", "b1")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &scrape,
            "lb_backend_state",
            &[("service", "echo"), ("backend", "b2"), ("state", "drain")]
        ),
        Some(1.0)
    );
    let last = must_f64(
        &scrape,
        "lb_backend_last_transition_timestamp_seconds",
        "echo",
        "b2",
    );
    assert!((last * 1000.0 - t["unix_ms"].as_f64().unwrap()).abs() < 1.0);

    // The table form.
    let table = bed.lb.cli_ok(&["stats"]);
    assert!(
        table.contains("service echo") && table.contains("recent transitions:"),
        "{table}"
    );
    assert!(
        table.contains("b2  state active → drain  (operator uid 0)"),
        "{table}"
    );
}

fn must_f64(scrape: &Scrape, metric: &str, svc: &str, be: &str) -> f64 {
    value(scrape, metric, &[("service", svc), ("backend", be)])
        .unwrap_or_else(|| panic!("{metric} {svc}/{be} missing"))
}

// ---------------------------------------------------------------------------------------------
// XDP.

#[test]
fn xdp_counters_agree_in_stats_and_on_the_metrics_endpoint() {
    if !require_root("xdp_counters_agree_in_stats_and_on_the_metrics_endpoint") {
        return;
    }
    let pins = Pins::new(PathBuf::from(format!(
        "/sys/fs/bpf/lbt-obs-{}",
        std::process::id()
    )));
    let bed = Bed::new("oxdp", 2, 6, |topo, socket| {
        xdp_config(
            topo,
            socket,
            &pins.0,
            2,
            XDP_STD,
            &format!("[metrics]\nlisten = \"{METRICS}\"\n"),
        )
    });
    prepare_peers(&bed.topo);
    // Checks resolve the backends' neighbours too.
    wait_checked(&bed.lb, "echo");
    let ns = bed.topo.lb_ns();
    let n = 8;
    let (connections, payload) = echo_traffic(&bed.topo, bed.echo(), n);
    let segments: u64 = (0..n as u64).map(|i| (20_000 + 3_333 * i).div_ceil(MSS)).sum();

    let st = settled(&bed.lb, "echo");
    // Kernel counters: one new flow per connection; at least every data segment and the handshake
    // and teardown packets each way; frames carry the payload plus at most 14+60+60 header bytes.
    assert_eq!(sum(&st, "echo", "connections_total"), connections, "{st}");
    let (pin, pout) = (sum(&st, "echo", "packets_in"), sum(&st, "echo", "packets_out"));
    let (bin, bout) = (sum(&st, "echo", "bytes_in"), sum(&st, "echo", "bytes_out"));
    // client → backend: SYN, ACK, data, FIN; backend → client: SYN-ACK, data, FIN.
    assert!(
        pin >= segments + 3 * connections,
        "packets in {pin} < {segments} segments + handshakes"
    );
    assert!(pout >= segments + 2 * connections, "packets out {pout}");
    assert!(
        bin >= payload && bin <= payload + pin * 134,
        "bytes in {bin} for payload {payload}, {pin} packets"
    );
    assert!(
        bout >= payload && bout <= payload + pout * 134,
        "bytes out {bout}, {pout} packets"
    );
    for b in backends(&st, "echo") {
        // XDP counts the SYNs a backend refused (RST): none here.
        assert_eq!(b["connect_failures"], 0, "no refused SYN: {b}");
    }
    assert!(st["xdp"]["new_flows"].as_u64().unwrap() >= connections);

    // A drop with a reason: no backend takes new clients of `web`, so its SYNs are dropped.
    for b in ["b1", "b2"] {
        bed.lb.cli_ok(&["backend", "disable", "web", b]);
    }
    let refused = connect_from(
        bed.topo.client_ns().name(),
        bed.topo.client_addrs()[1],
        bed.web(),
        Duration::from_millis(1500),
    );
    assert!(refused.is_err(), "a client reached a service without backends");

    let st = stats(&bed.lb);
    let (text, scrape) = get_metrics(ns);
    assert_agree(&st, &scrape);
    for b in ["b1", "b2"] {
        let t = backend(&st, "web", b)["transitions"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(
            (t["from"].as_str(), t["to"].as_str()),
            (Some("active"), Some("maintenance"))
        );
    }
    let xdp = &st["xdp"];
    let no_backend = xdp["no_backend"].as_u64().unwrap();
    assert!(no_backend >= 1, "{xdp}");
    // Global counters move with every health check, so the later scrape is not lower.
    let scraped = must(&scrape, "lb_xdp_packets_total", &[("reason", "no_backend")]);
    assert!(scraped >= no_backend, "{scraped} < {no_backend}\n{text}");
    assert!(must(&scrape, "lb_xdp_verdicts_total", &[("verdict", "dropped")]) >= no_backend);
    // Every packet counted on a backend got a verdict (forwarded, or passed to resolve a neighbour).
    let verdicts: u64 = ["forwarded", "passed"]
        .iter()
        .map(|v| must(&scrape, "lb_xdp_verdicts_total", &[("verdict", v)]))
        .sum();
    assert!(
        verdicts >= pin + pout,
        "{verdicts} verdicts < {} packets",
        pin + pout
    );
    assert!(must(&scrape, "lb_xdp_new_flows_total", &[]) >= connections);
    assert_eq!(
        value(
            &scrape,
            "lb_service_info",
            &[("service", "echo"), ("datapath", "xdp")]
        ),
        Some(1.0)
    );
    let table = bed.lb.cli_ok(&["stats"]);
    assert!(
        table.contains("xdp reasons:") && table.contains("no_backend"),
        "{table}"
    );
}

// ---------------------------------------------------------------------------------------------
// lb top.

/// A tmux server of our own (`tmux -L NAME`), killed on drop.
struct Tmux(String);

impl Tmux {
    fn new(tag: &str) -> Tmux {
        Tmux(unique_prefix(tag))
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn pane(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", session]).stdout).into_owned()
    }

    /// Waits until the pane of `session` satisfies `pred`; returns it.
    fn wait(&self, session: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pane = self.pane(session);
            if pred(&pane) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "tmux pane never showed {what}:\n{pane}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn lb_top_shows_backends_and_rates_and_quits_on_q_or_ctrl_c() {
    if !require_root("lb_top_shows_backends_and_rates_and_quits_on_q_or_ctrl_c") {
        return;
    }
    let bed = Bed::new("otop", 2, 2, |topo, sock| {
        config_toml(sock, "", "", &std_services(topo, 2, true))
    });
    // Without a terminal it refuses, pointing at `lb stats`.
    let out = bed.lb.cli(&["top"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a terminal"),
        "{out:?}"
    );

    let tmux = Tmux::new("otop");
    let top = format!(
        "{} --socket {} top --interval 300ms; echo top-exit=$?; sleep 60",
        lb_bin().display(),
        bed.lb.socket.display()
    );
    let ok = tmux.run(&["new-session", "-d", "-s", "top", "-x", "200", "-y", "50", &top]);
    assert!(
        ok.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let pane = tmux.wait("top", "the backend table", |p| {
        p.contains("SERVICE / BACKEND") && p.contains("  b1") && p.contains("  b2") && p.contains("echo ")
    });
    assert!(pane.contains("lb top") && pane.contains("q: quit"), "{pane}");

    // Traffic through echo shows up as a rate while it flows.
    let mut s = connect_from(
        bed.topo.client_ns().name(),
        bed.topo.client_addrs()[0],
        bed.echo(),
        Duration::from_secs(5),
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pump = {
        let mut w = s.try_clone().unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.write_all(&chunk).unwrap();
                thread::sleep(Duration::from_millis(20));
            }
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).map(|_| sink.len())
    });
    let pane = tmux.wait("top", "a non-zero byte rate", |p| {
        p.contains("KiB/s") || p.contains("MiB/s")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pump.join().unwrap();
    assert!(drain.join().unwrap().unwrap() > 0);
    assert!(
        pane.lines().any(|l| l.contains("  b1") || l.contains("  b2")),
        "{pane}"
    );

    // q leaves the alternate screen and exits 0.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let pane = tmux.wait("top", "top-exit=", |p| p.contains("top-exit="));
    assert!(pane.contains("top-exit=0"), "{pane}");
    assert!(
        !pane.contains("SERVICE / BACKEND"),
        "the terminal was not restored:\n{pane}"
    );

    // So does Ctrl-C (a key in raw mode, not a signal).
    let ok = tmux.run(&["new-session", "-d", "-s", "top2", "-x", "160", "-y", "40", &top]);
    assert!(ok.status.success());
    tmux.wait("top2", "the backend table", |p| p.contains("SERVICE / BACKEND"));
    tmux.run(&["send-keys", "-t", "top2", "C-c"]);
    let pane = tmux.wait("top2", "top-exit=", |p| p.contains("top-exit="));
    assert!(pane.contains("top-exit=0"), "{pane}");
}

// ---------------------------------------------------------------------------------------------
// Logs.

#[test]
fn json_logs_are_json_lines_with_transitions_and_operator_commands_but_no_connections() {
    if !require_root("json_logs_are_json_lines_with_transitions_and_operator_commands_but_no_connections") {
        return;
    }
    let topo = Topology::new(&unique_prefix("ojson"), 2, 2).expect("topology");
    let _servers = lb_tests::start_http_backends(&topo, HTTP_PORT).expect("http backends");
    // b1 is checked on a port nobody listens on: it goes DOWN.
    let mut services = std_services(&topo, 2, false);
    services[0] = services[0].replace(
        "kind = \"none\"",
        // A refused connect fails at once; b2's checks get a timeout no stall on a loaded machine
        // reaches (one failed check would take it down too, and log it).
        "kind = \"tcp\"\ninterval = \"1s\"\ntimeout = \"900ms\"\nfall = 1",
    );
    services[0] = services[0].replacen(
        &format!("address = \"{}:{HTTP_PORT}\"", topo.backend_addr(1)),
        &format!("address = \"{}:9\"", topo.backend_addr(1)),
        1,
    );
    let mut lb = Lb::spawn(
        topo.lb_ns(),
        Enter::NetOnly,
        "ojson",
        &["--log-format", "json"],
        |socket| config_toml(socket, "", "", &services),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lb.log().contains("backend DOWN") {
        assert!(Instant::now() < deadline, "b1 never went down:\n{}", lb.log());
        thread::sleep(Duration::from_millis(50));
    }
    let before = lb.child.stderr_lines().len();
    // Connections are not logged at the default level.
    let web = SocketAddr::new(topo.vip().into(), WEB_VIP_PORT);
    for i in 0..20 {
        let src = topo.client_addrs()[i % 2];
        let body = lb_tests::http_get_from(topo.client_ns().name(), src, web, "/").unwrap();
        assert_eq!(body.trim(), "b2");
    }
    thread::sleep(Duration::from_millis(300));
    let during: Vec<String> = lb.child.stderr_lines()[before..].to_vec();
    assert!(
        during.is_empty(),
        "20 connections were logged:\n{}",
        during.join("\n")
    );

    lb.cli_ok(&["backend", "drain", "web", "b2"]);
    lb.cli_ok(&["stats"]);
    lb.child.stop().unwrap();

    let lines: Vec<Json> = lb
        .child
        .stderr_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    let find = |message: &str| -> Vec<&Json> {
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    };
    let down = find("backend DOWN");
    assert_eq!(down.len(), 1, "one line per transition: {down:?}");
    let f = &down[0]["fields"];
    assert_eq!(
        (f["service"].as_str(), f["backend"].as_str()),
        (Some("web"), Some("b1"))
    );
    assert_eq!((f["from"].as_str(), f["to"].as_str()), (Some("up"), Some("down")));
    assert!(f["reason"].as_str().unwrap().contains("connect failed"), "{f}");
    assert_eq!(down[0]["level"], "WARN");

    let commands = find("operator command");
    assert_eq!(
        commands.len(),
        1,
        "read-only requests are not operator commands: {commands:?}"
    );
    let f = &commands[0]["fields"];
    assert_eq!(f["uid"], 0);
    assert!(f["request"].as_str().unwrap().contains("\"set-state\""), "{f}");
    let changed = find("backend state changed");
    assert_eq!(changed.len(), 1, "{changed:?}");
    let f = &changed[0]["fields"];
    assert_eq!(
        (
            f["backend"].as_str(),
            f["from"].as_str(),
            f["to"].as_str(),
            f["by"].as_str()
        ),
        (Some("b2"), Some("active"), Some("drain"), Some("operator uid 0"))
    );
}
