//! AJP 1.3 request routing behind a real web tier (issue #10): browsers → Apache httpd
//! (mod_proxy_ajp, then mod_jk) → `lb run` with `datapath = "ajp"` → three Tomcat 10 (`jvmRoute`
//! t1..t3) and a hot spare (t4, `backup = true`).
//!
//! ```text
//!  <p>-c  60+ browser addresses 10.0.0.10..   →  <p>-w  Apache 10.2.0.2:80
//!         (routed through <p>-lb)                       │ AJP, pooled
//!                                                       ▼
//!  <p>-lb  lb run, VIP 10.0.0.100:8009 (front secret s3, backend secret b3)
//!          ├─ <p>-b1 Tomcat t1 10.1.1.2:8009   ├─ <p>-b2 t2   ├─ <p>-b3 t3   └─ <p>-b4 t4 (backup)
//! ```
//!
//! The Tomcats and the topology are started once; the sub-cases run one after the other on them
//! (each reported as `ajp: PASS name` / `ajp: FAIL name: why` on stderr) and the test fails at the
//! end if any failed. The first sub-case needs no lb at all: Apache mod_proxy_balancer straight to
//! the three Tomcats with `stickysession`, the bench's anchor, which checks the test bed itself.
//!
//! The sub-cases, in order:
//! 1. the anchor (no lb): mod_proxy_balancer keeps each of 30 users on one Tomcat, spread evenly,
//!    and POST bodies of every size (around 8 KiB packets and the 64 KiB retry buffer) arrive;
//! 2. the raw AJP client (`lb_tests::ajp_client`) against a Tomcat directly: a page is served, a
//!    Ghostcat request refused, and both are in the Tomcat's access log (the detector used below);
//! 3. through lb (mod_proxy_ajp): each user stays on one Tomcat (cookie route), the users spread
//!    over all three (none more than half, each where `lb which` says); a session's cookie sent
//!    from another address keeps reaching its Tomcat; POST bodies of every size arrive;
//! 4. raw AJP to the VIP: Ghostcat `javax.servlet.include.*` attributes, a wrong secret and no
//!    secret get lb's 403 and reach no Tomcat (access logs), a Shutdown packet is refused, a
//!    CPing from the web tier gets a CPong, all counted in `lb stats`; the daemon keeps serving;
//! 5. idle pooled connections (web tier → lb, lb → Tomcats) outlive `pool_idle_timeout`;
//! 6. mod_jk instead of mod_proxy_ajp (`ping_mode=A`: CPing before requests): stick and spread;
//! 7. `lb backend drain`: sessions on the drained Tomcat stay, new users avoid it;
//! 8. the hot spare takes users only while all three primaries are down (AJP port blocked);
//! 9. SIGTERM to one Tomcat under a GET/POST loop: only requests in flight on it may fail, POSTs
//!    sent after it died are answered elsewhere, other users never move.
//!
//! `cargo xtask test -- -p lb-tests --test ajp` (about 40 s). Needs root (skipped otherwise). A
//! missing Tomcat or Apache is a failure, not a skip: setup installs them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::Lb;
use lb_tests::ajp_client::{self, Attr, ForwardRequest};
use lb_tests::apache::{self, Apache, ApacheConf, Front};
use lb_tests::tomcat::{self, CatalinaBase, Tomcat, TomcatOptions};
use lb_tests::webtier::{Browser, Page, WebTier};
use lb_tests::{AJP_CPONG, Topology, ajp_cping_from, connect_from, require_root, unique_prefix};

const AJP_PORT: u16 = 8009;
const WEB_PORT: u16 = 80;
/// The primaries' routes (= backend names = Tomcat jvmRoutes) and the hot spare's.
const PRIMARIES: [&str; 3] = ["t1", "t2", "t3"];
const SPARE: &str = "t4";
/// What the web tier must present to lb, and what lb presents to the Tomcats.
const FRONT_SECRET: &str = "s3";
const BACKEND_SECRET: &str = "b3";
/// Browser addresses: 30 users, then fresh ones for later sub-cases (drain, spare).
const USERS: usize = 30;
const CLIENTS: usize = 75;
const TOMCAT_START: Duration = Duration::from_secs(90);
/// The backend pools' idle timeout (`pool_idle_timeout`) of the lb config.
const IDLE: Duration = Duration::from_secs(2);

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The shared bed. Field order is drop order: web server, daemon, Tomcats, namespaces.
struct Bed {
    apache: Option<Apache>,
    lb: Option<Lb>,
    tomcats: Vec<(Tomcat, CatalinaBase)>,
    web: WebTier,
    topo: Topology,
}

impl Bed {
    fn web_url(&self) -> SocketAddr {
        SocketAddr::new(self.web.addr().into(), WEB_PORT)
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip().into(), AJP_PORT)
    }

    fn tomcat_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.topo.backend_addr(i).into(), AJP_PORT)
    }

    fn browser(&self, k: usize) -> Browser {
        Browser::new(
            self.topo.client_ns().name(),
            self.topo.client_addrs()[k],
            self.web_url(),
        )
    }

    fn lb(&self) -> &Lb {
        self.lb.as_ref().expect("lb runs")
    }

    /// (Re)start Apache with `front`.
    fn apache(&mut self, front: Front) {
        if let Some(mut a) = self.apache.take() {
            a.stop().expect("stop Apache");
        }
        let conf = ApacheConf::new(self.web_url(), front);
        self.apache = Some(Apache::start(self.web.ns(), "ajp", &conf).expect("start Apache"));
    }

    fn proxy_ajp(&mut self) {
        let target = self.vip();
        self.apache(Front::ProxyAjp {
            target,
            secret: Some(FRONT_SECRET.into()),
            ping: false,
        });
    }

    /// Logs for a failure message: Apache's error log and lb's log tail.
    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(a) = &self.apache {
            s.push_str("--- apache error.log ---\n");
            s.push_str(&tail(&a.error_log(), 20));
        }
        if let Some(lb) = &self.lb {
            s.push_str("\n--- lb log ---\n");
            s.push_str(&tail(&lb.log(), 30));
        }
        s
    }

    /// The service's AJP counters (`lb --json stats`, `services[app].ajp`).
    fn ajp_stats(&self) -> serde_json::Value {
        let st = self.lb().json(&["stats"]);
        let svc = st["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "app"))
            .unwrap_or_else(|| panic!("service app missing from lb stats: {st}"));
        assert!(svc["ajp"].is_object(), "no ajp counters in lb stats: {svc}");
        svc["ajp"].clone()
    }

    /// A service-level AJP counter.
    fn ajp_counter(&self, key: &str) -> u64 {
        let a = self.ajp_stats();
        a[key]
            .as_u64()
            .unwrap_or_else(|| panic!("ajp counter {key} missing: {a}"))
    }

    /// A backend-level AJP counter of backend `name` (`None`: every backend summed).
    fn backend_counter(&self, name: Option<&str>, key: &str) -> u64 {
        let a = self.ajp_stats();
        let backends = a["backends"]
            .as_object()
            .unwrap_or_else(|| panic!("no ajp backends: {a}"));
        let mut found = false;
        let mut sum = 0;
        for b in backends.values() {
            if name.is_none_or(|n| b["name"] == n) {
                found = true;
                sum += b[key]
                    .as_u64()
                    .unwrap_or_else(|| panic!("ajp backend counter {key} missing: {b}"));
            }
        }
        assert!(found, "backend {name:?} missing from the ajp counters: {a}");
        sum
    }

    /// Health of backend `name` in lb's status.
    fn health(&self, name: &str) -> String {
        self.lb()
            .backend("app", name)
            .map(|b| b["health"].as_str().unwrap_or("?").to_string())
            .unwrap_or_default()
    }

    fn wait_health(&self, names: &[&str], want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now: Vec<String> = names.iter().map(|n| self.health(n)).collect();
            if now.iter().all(|h| h == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backends {names:?} not all {want} within {timeout:?}: {now:?}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Block (`reject with tcp-reset`) or unblock the AJP port of Tomcat `i` in its namespace.
    fn block_tomcat(&self, i: usize, block: bool) {
        let ns = self.topo.backend_ns(i);
        if block {
            let rules = "table ip lbtest {\n chain input {\n  type filter hook input priority 0;\n  \
                         tcp dport 8009 reject with tcp reset\n }\n}\n";
            let path = std::env::temp_dir().join(format!("{}-nft-b{i}", unique_prefix("ajp")));
            std::fs::write(&path, rules).unwrap();
            let out = ns.exec(&["nft", "-f", path.to_str().unwrap()]).expect("nft");
            let _ = std::fs::remove_file(&path);
            assert!(
                out.status.success(),
                "nft: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let _ = ns.exec(&["nft", "delete", "table", "ip", "lbtest"]);
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// lb's config: service `app` on VIP:8009, `datapath = "ajp"`, t1..t3 and the spare t4.
fn lb_config(topo: &Topology, socket: &std::path::Path) -> String {
    let mut c = format!(
        "log_level = \"lb=debug,info\"\nshutdown_timeout = \"1s\"\nring_size = 1009\n\n\
         [control]\nsocket = \"{}\"\n\n\
         [[service]]\nname = \"app\"\nlisten = \"{}:{AJP_PORT}\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n\n\
         [service.health]\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 2\nfall = 2\n\n\
         [service.ajp]\nsecret = \"{FRONT_SECRET}\"\nbackend_secret = \"{BACKEND_SECRET}\"\n\
         pool_size = 64\npool_idle_timeout = \"{idle}s\"\nping_after_idle = \"1s\"\nretries = 1\n\
         retry_buffer = 65536\nsession_cookies = [\"JSESSIONID\"]\n",
        socket.display(),
        topo.vip(),
        idle = IDLE.as_secs(),
    );
    for (k, name) in PRIMARIES.iter().chain([&SPARE]).enumerate() {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"{name}\"\naddress = \"{}:{AJP_PORT}\"\nbackup = {}\n",
            topo.backend_addr(k + 1),
            *name == SPARE
        ));
    }
    c
}

/// `n` requests per browser (GET, POST with a body, alternating); each browser's pages in order.
/// Every answer must be a 200 from the test webapp that echoes the browser's address and body.
fn visit(bed: &Bed, browsers: &mut [Browser], n: usize) -> Vec<Vec<Page>> {
    let body = vec![b'x'; 1500];
    let results: Vec<Result<Vec<Page>, String>> = thread::scope(|s| {
        let handles: Vec<_> = browsers
            .iter_mut()
            .map(|b| {
                let body = &body;
                s.spawn(move || {
                    let mut pages = Vec::new();
                    for k in 0..n {
                        let r = if k % 2 == 0 {
                            b.get("/index.jsp")
                        } else {
                            b.post("/index.jsp", body)
                        };
                        let p = r.map_err(|e| format!("{}: request {k}: {e}", b.addr()))?;
                        check_page(&p, b.addr(), if k % 2 == 0 { 0 } else { body.len() })
                            .map_err(|e| format!("{}: request {k}: {e}", b.addr()))?;
                        pages.push(p);
                    }
                    Ok(pages)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}\n{}", bed.logs())))
        .collect()
}

fn check_page(p: &Page, from: Ipv4Addr, body_len: usize) -> Result<(), String> {
    if p.status != 200 {
        return Err(format!("status {} body {:?}", p.status, p.body));
    }
    if p.field("remote") != Some(&from.to_string()) {
        return Err(format!(
            "Tomcat saw remote {:?}, not the browser {from}",
            p.field("remote")
        ));
    }
    if p.field("body") != Some(&body_len.to_string()) {
        return Err(format!("Tomcat read body {:?}, sent {body_len}", p.field("body")));
    }
    Ok(())
}

/// Every browser's pages came from one Tomcat, its session cookie names that Tomcat, and the
/// session was created once. Returns the Tomcat of each browser.
fn assert_sticky(browsers: &[Browser], pages: &[Vec<Page>]) -> BTreeMap<Ipv4Addr, String> {
    let mut at = BTreeMap::new();
    for (b, ps) in browsers.iter().zip(pages) {
        let routes: BTreeSet<&str> = ps.iter().map(Page::route).collect();
        assert_eq!(routes.len(), 1, "{} moved between Tomcats: {routes:?}", b.addr());
        let route = ps[0].route().to_string();
        assert_eq!(
            b.cookie_route(),
            Some(route.as_str()),
            "{}: cookie {:?}",
            b.addr(),
            b.session
        );
        let sessions: BTreeSet<&str> = ps.iter().filter_map(|p| p.field("session")).collect();
        assert_eq!(sessions.len(), 1, "{}: sessions {sessions:?}", b.addr());
        assert_eq!(ps[0].field("new"), Some("true"));
        assert!(ps[1..].iter().all(|p| p.field("new") == Some("false")));
        at.insert(b.addr(), route);
    }
    at
}

/// Users per Tomcat; every primary has some, none more than half, the spare none.
fn assert_spread(at: &BTreeMap<Ipv4Addr, String>) -> BTreeMap<String, usize> {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for r in at.values() {
        *per.entry(r.clone()).or_default() += 1;
    }
    for t in PRIMARIES {
        assert!(per.get(t).copied().unwrap_or(0) > 0, "no user on {t}: {per:?}");
    }
    assert!(
        !per.contains_key(SPARE),
        "users on the spare while primaries are up: {per:?}"
    );
    let max = per.values().max().copied().unwrap_or(0);
    assert!(
        max * 2 <= at.len(),
        "one Tomcat has more than half the users: {per:?}"
    );
    per
}

/// Runs the named sub-cases, catching panics; the failures by name.
struct Cases {
    failed: Vec<String>,
}

impl Cases {
    fn run(&mut self, name: &str, f: impl FnOnce()) -> bool {
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => {
                report(&format!("ajp: PASS {name} ({:.1}s)", t.elapsed().as_secs_f64()));
                true
            }
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(std::string::ToString::to_string))
                    .unwrap_or_default();
                report(&format!("ajp: FAIL {name}: {why}"));
                self.failed.push(name.to_string());
                false
            }
        }
    }

    fn skip(&mut self, name: &str, why: &str) {
        report(&format!("ajp: FAIL {name}: not run ({why})"));
        self.failed.push(name.to_string());
    }
}

fn start_bed() -> Bed {
    if let Err(e) = tomcat::check_installed() {
        panic!("{e}");
    }
    if let Err(e) = apache::check_installed() {
        panic!("{e}");
    }
    let topo = Topology::new(&unique_prefix("ajp"), 4, CLIENTS).expect("topology");
    let web = WebTier::attach(&topo).expect("web namespace");
    let mut bed = Bed {
        apache: None,
        lb: None,
        tomcats: Vec::new(),
        web,
        topo,
    };
    let t = Instant::now();
    for (k, route) in PRIMARIES.iter().chain([&SPARE]).enumerate() {
        let i = k + 1;
        let opts = TomcatOptions::app(route)
            .with_secret(Some(BACKEND_SECRET))
            .with_access_log(true);
        let base = CatalinaBase::with_options(&format!("ajp{i}"), bed.topo.backend_addr(i), AJP_PORT, &opts)
            .expect("CATALINA_BASE");
        let tc = Tomcat::start(bed.topo.backend_ns(i), &base).expect("start Tomcat");
        bed.tomcats.push((tc, base));
    }
    let lb_ns = bed.topo.lb_ns().name().to_string();
    for (tc, base) in &mut bed.tomcats {
        tc.wait_cping(&lb_ns, TOMCAT_START)
            .unwrap_or_else(|e| panic!("{e}\n--- catalina log ---\n{}", base.log_tail(30)));
    }
    report(&format!(
        "ajp: four Tomcats answer CPing after {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    bed
}

#[test]
fn ajp_behind_apache_end_to_end() {
    if !require_root("ajp_behind_apache_end_to_end") {
        return;
    }
    let mut bed = start_bed();
    let mut cases = Cases { failed: Vec::new() };
    let users: Vec<usize> = (0..USERS).collect();

    // The anchor: Apache mod_proxy_balancer straight to the three Tomcats, sticky by JSESSIONID.
    cases.run(
        "anchor: mod_proxy_balancer sticky to three Tomcats (no lb)",
        || {
            let members = (1..=3)
                .map(|i| (PRIMARIES[i - 1].to_string(), bed.tomcat_addr(i)))
                .collect();
            bed.apache(Front::Balancer {
                members,
                secret: Some(BACKEND_SECRET.into()),
            });
            let mut browsers: Vec<Browser> = users.iter().map(|&k| bed.browser(k)).collect();
            let pages = visit(&bed, &mut browsers, 4);
            let at = assert_sticky(&browsers, &pages);
            let per = assert_spread(&at);
            report(&format!("ajp:   anchor users per Tomcat {per:?}"));
            post_sizes(&bed, &mut browsers[1]);
        },
    );

    // The raw AJP client and the access-log detector, checked against Tomcat t1 itself: a good
    // request is served and logged, and a refused one (Ghostcat attribute) is logged too, so "not
    // in any access log" below means "never reached a Tomcat".
    cases.run("raw AJP client and access logs against a Tomcat directly", || {
        let ns = bed.topo.lb_ns().name().to_string();
        let t1 = bed.tomcat_addr(1);
        let send = |req: &ForwardRequest| {
            ajp_client::exchange_from(&ns, Ipv4Addr::UNSPECIFIED, t1, req, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("raw AJP to {t1}: {e}"))
        };
        let ok = send(
            &ForwardRequest::post("/index.jsp?probe=direct-ok", "10.0.0.66", &[7u8; 20_000])
                .attr(Attr::Secret(BACKEND_SECRET.into())),
        );
        assert_eq!(ok.status, 200, "{}", ok.text());
        for line in [
            "route=t1",
            "remote=10.0.0.66",
            "method=POST",
            "body=20000",
            "new=true",
        ] {
            assert!(
                ok.text().contains(&format!("{line}\n")),
                "{line} missing: {}",
                ok.text()
            );
        }
        assert!(
            ok.header("Set-Cookie").is_some_and(|c| c.contains(".t1")),
            "{ok:?}"
        );
        let ghost = send(
            &ForwardRequest::get("/index.jsp?probe=direct-ghost", "10.0.0.66")
                .attr(Attr::Secret(BACKEND_SECRET.into()))
                .attr(Attr::ReqAttribute(
                    "javax.servlet.include.request_uri".into(),
                    "/".into(),
                )),
        );
        assert_eq!(ghost.status, 403, "Tomcat itself answered {}", ghost.status);
        // Tomcat writes the access log line just after the response: wait for it.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut log = bed.tomcats[0].1.access_log();
        while !log.contains("probe=direct-ghost ") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            log = bed.tomcats[0].1.access_log();
        }
        assert!(log.contains("probe=direct-ok HTTP/1.1 200"), "{log}");
        assert!(log.contains("probe=direct-ghost HTTP/1.1 403"), "{log}");
    });

    let lb_up = cases.run("lb run with datapath = \"ajp\" starts", || {
        bed.lb = Some(Lb::start(bed.topo.lb_ns(), "ajp", |socket| {
            lb_config(&bed.topo, socket)
        }));
        bed.wait_health(&["t1", "t2", "t3", "t4"], "up", Duration::from_secs(10));
        bed.proxy_ajp();
    });
    if !lb_up {
        for name in [
            "users stick and spread (mod_proxy_ajp)",
            "session follows its cookie to another address",
            "POST bodies of every size arrive whole",
            "Ghostcat attribute, wrong secret and Shutdown refused; CPing answered",
            "idle pooled connections outlive the idle timeouts",
            "users stick and spread (mod_jk, CPing before each request)",
            "drain: sessions stay, new users avoid the drained Tomcat",
            "hot spare only while no primary is up",
            "Tomcat killed under load: only in-flight requests lost, POSTs retried",
        ] {
            cases.skip(name, "lb did not start");
        }
        panic!("ajp sub-cases failed: {:?}", cases.failed);
    }

    // Users through mod_proxy_ajp → lb: sticky by cookie, spread by address.
    let mut browsers: Vec<Browser> = users.iter().map(|&k| bed.browser(k)).collect();
    let mut at = BTreeMap::new();
    cases.run("users stick and spread (mod_proxy_ajp)", || {
        let pages = visit(&bed, &mut browsers, 4);
        at = assert_sticky(&browsers, &pages);
        let per = assert_spread(&at);
        report(&format!("ajp:   users per Tomcat {per:?}"));
        // A user without a cookie lands where `lb which` says its address goes.
        for (addr, route) in &at {
            let (which, why) = bed.lb().which("app", *addr);
            assert_eq!(
                which.as_deref(),
                Some(route.as_str()),
                "lb which app {addr}: {why}"
            );
        }
    });

    cases.run("session follows its cookie to another address", || {
        // A user on X, and an address whose own user is on Y ≠ X: the cookie wins.
        let (x_user, x) = at.iter().next().map(|(a, r)| (*a, r.clone())).expect("users");
        let (y_addr, y) = at
            .iter()
            .find(|(_, r)| **r != x)
            .map(|(a, r)| (*a, r.clone()))
            .expect("a user on another Tomcat");
        let b = browsers.iter().find(|b| b.addr() == x_user).unwrap();
        let mut moved = b.moved_to(y_addr);
        let hits = bed.backend_counter(Some(&x), "route_hits");
        for _ in 0..3 {
            let p = moved
                .get("/index.jsp")
                .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
            check_page(&p, y_addr, 0).unwrap();
            assert_eq!(
                p.route(),
                x,
                "cookie of {x} sent from {y_addr} (a {y} address): {}",
                p.body
            );
            assert_eq!(p.field("session"), b.session.as_deref());
            assert_eq!(p.field("new"), Some("false"));
        }
        assert_eq!(
            bed.backend_counter(Some(&x), "route_hits") - hits,
            3,
            "route hits of {x}"
        );
        // And without the cookie, that address still lands on its own Tomcat.
        let mut fresh = bed.browser(bed.topo.client_addrs().iter().position(|a| *a == y_addr).unwrap());
        let p = fresh.get("/index.jsp").unwrap();
        assert_eq!(p.route(), y, "{y_addr} without a cookie");
    });

    cases.run("POST bodies of every size arrive whole", || {
        post_sizes(&bed, &mut browsers[1].clone());
    });

    cases.run(
        "Ghostcat attribute, wrong secret and Shutdown refused; CPing answered",
        || {
            let ns = bed.web.ns().name().to_string();
            let vip = bed.vip();
            let web = bed.web.addr();
            let conn = || {
                connect_from(&ns, web, vip, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect to {vip}: {e}"))
            };
            let good = |probe: &str| {
                ForwardRequest::get(&format!("/index.jsp?probe={probe}"), "10.0.0.77")
                    .attr(Attr::Secret(FRONT_SECRET.into()))
            };
            // Which Tomcats logged `probe` (each Tomcat logs every request it gets, refused ones too).
            let reached = |probe: &str| -> Vec<String> {
                bed.tomcats
                    .iter()
                    .zip(PRIMARIES.iter().chain([&SPARE]))
                    .filter(|((_, base), _)| base.access_log().contains(&format!("probe={probe} ")))
                    .map(|(_, t)| t.to_string())
                    .collect()
            };
            // Baseline: the raw client gets a page through lb, twice on one connection, and the Tomcat
            // that answered logged it.
            let mut s = conn();
            for k in 0..2 {
                let r = ajp_client::exchange(&mut s, &good(&format!("baseline{k}")))
                    .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
                assert_eq!(r.status, 200, "{}", r.text());
                let route = PRIMARIES
                    .iter()
                    .find(|t| r.text().contains(&format!("route={t}\n")))
                    .unwrap_or_else(|| panic!("no primary's route in {}", r.text()));
                assert!(r.text().contains("remote=10.0.0.77\n"), "{}", r.text());
                // Tomcat writes the access log line just after the response: wait for it.
                let probe = format!("baseline{k}");
                let deadline = Instant::now() + Duration::from_secs(3);
                while reached(&probe).is_empty() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
                assert_eq!(reached(&probe), vec![route.to_string()]);
            }
            let refused = |req: ForwardRequest, probe: &str, what: &str| {
                let mut s = conn();
                match ajp_client::exchange(&mut s, &req) {
                    Ok(r) => assert_eq!(r.status, 403, "{what}: answered {} {}", r.status, r.text()),
                    Err(e) => panic!("{what}: expected a 403, got {e}"),
                }
                thread::sleep(Duration::from_millis(500));
                assert!(
                    reached(probe).is_empty(),
                    "{what} was forwarded to {:?}",
                    reached(probe)
                );
            };
            let (secret0, attr0, shut0, cping0) = (
                bed.ajp_counter("refused_secret"),
                bed.ajp_counter("refused_attribute"),
                bed.ajp_counter("refused_shutdown"),
                bed.ajp_counter("cpings_answered"),
            );
            refused(
                good("ghostcat")
                    .attr(Attr::ReqAttribute(
                        "javax.servlet.include.request_uri".into(),
                        "/".into(),
                    ))
                    .attr(Attr::ReqAttribute(
                        "javax.servlet.include.path_info".into(),
                        "WEB-INF/web.xml".into(),
                    ))
                    .attr(Attr::ReqAttribute(
                        "javax.servlet.include.servlet_path".into(),
                        "/".into(),
                    )),
                "ghostcat",
                "Ghostcat include attributes",
            );
            refused(
                ForwardRequest::get("/index.jsp?probe=wrongsecret", "10.0.0.77")
                    .attr(Attr::Secret("wrong".into())),
                "wrongsecret",
                "wrong secret",
            );
            refused(
                ForwardRequest::get("/index.jsp?probe=nosecret", "10.0.0.77"),
                "nosecret",
                "no secret",
            );
            // Shutdown: never forwarded; whatever lb answers, it is not a Tomcat's answer, and every
            // Tomcat still runs.
            let mut s = conn();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let answer = ajp_client::send_and_read(&mut s, &ajp_client::shutdown_packet());
            if let Ok(Some(p)) = &answer {
                assert_ne!(
                    p.first(),
                    Some(&ajp_client::END_RESPONSE),
                    "Shutdown answered {p:02x?}"
                );
            }
            thread::sleep(Duration::from_millis(500));
            for (tc, _) in &mut bed.tomcats {
                assert!(tc.is_running(), "a Tomcat stopped after the Shutdown packet");
            }
            // CPing from the web tier: lb's CPong.
            let reply = ajp_cping_from(&ns, web, vip, Duration::from_secs(3)).expect("CPing");
            assert_eq!(reply, AJP_CPONG);
            // Every refusal and the CPing counted, once each.
            thread::sleep(Duration::from_millis(200));
            assert_eq!(
                bed.ajp_counter("refused_attribute") - attr0,
                1,
                "refused_attribute"
            );
            assert_eq!(
                bed.ajp_counter("refused_secret") - secret0,
                2,
                "refused_secret (wrong, none)"
            );
            assert_eq!(bed.ajp_counter("refused_shutdown") - shut0, 1, "refused_shutdown");
            assert_eq!(bed.ajp_counter("cpings_answered") - cping0, 1, "cpings_answered");
            // The daemon keeps serving: raw and through Apache.
            let mut s = conn();
            let r = ajp_client::exchange(&mut s, &good("after"))
                .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
            assert_eq!(r.status, 200);
            let mut b = bed.browser(0);
            let p = b.get("/index.jsp").unwrap();
            assert_eq!(p.status, 200);
        },
    );

    cases.run("idle pooled connections outlive the idle timeouts", || {
        // Warm the pools, go idle past idle_timeout and pool_idle_timeout, then every user again:
        // no request may hang (each is bounded by a 5 s timeout, lb's retry included).
        let mut bs: Vec<Browser> = browsers.clone();
        visit(&bed, &mut bs, 1);
        thread::sleep(IDLE * 2 + Duration::from_millis(500));
        for b in &mut bs {
            b.timeout = Duration::from_secs(5);
        }
        let t = Instant::now();
        let pages = visit(&bed, &mut bs, 2);
        for (b, ps) in bs.iter().zip(&pages) {
            assert!(
                ps.iter().all(|p| Some(p.route()) == b.cookie_route()),
                "{}",
                b.addr()
            );
        }
        report(&format!(
            "ajp:   {} requests after {:?} idle in {:.2}s",
            bs.len() * 2,
            IDLE * 2,
            t.elapsed().as_secs_f64()
        ));
    });

    cases.run(
        "users stick and spread (mod_jk, CPing before each request)",
        || {
            let target = bed.vip();
            bed.apache(Front::ModJk {
                target,
                secret: Some(FRONT_SECRET.into()),
                ping: true,
            });
            let cpings = bed.ajp_counter("cpings_answered");
            let mut bs: Vec<Browser> = users.iter().map(|&k| bed.browser(k)).collect();
            let pages = visit(&bed, &mut bs, 4);
            let at = assert_sticky(&bs, &pages);
            let per = assert_spread(&at);
            // ping_mode=A: mod_jk CPings its connections to lb (and would fail the requests
            // without a CPong).
            let cpings = bed.ajp_counter("cpings_answered") - cpings;
            assert!(cpings > 0, "mod_jk sent no CPing lb answered");
            report(&format!(
                "ajp:   mod_jk users per Tomcat {per:?}; {cpings} CPings from mod_jk answered"
            ));
            bed.proxy_ajp();
        },
    );

    cases.run(
        "a Tomcat whose route is taken is refused on the control socket",
        || {
            let names = |lb: &Lb| -> Vec<String> {
                let st = lb.status();
                let app = st["services"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["name"] == "app")
                    .cloned();
                app.expect("app in status")["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            };
            let before = names(bed.lb());
            // The route of a primary, and of the spare.
            for route in ["t1", SPARE] {
                let args = [
                    "backend",
                    "add",
                    "app",
                    "10.9.9.9:8009",
                    "--name",
                    "t9",
                    "--route",
                    route,
                ];
                let out = bed.lb().cli(&args);
                if out.status.success() {
                    bed.lb().cli_ok(&["backend", "remove", "app", "10.9.9.9:8009"]);
                }
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "lb {args:?} was accepted");
                assert!(
                    err.contains("is already the route of backend"),
                    "lb {args:?}: {err}"
                );
                assert_eq!(names(bed.lb()), before, "a refused add leaves no trace");
            }
        },
    );

    let mut next_fresh = USERS;
    cases.run("drain: sessions stay, new users avoid the drained Tomcat", || {
        let x = "t1";
        // Some of the new users' addresses map to x on the ring: they are the ones drain moves.
        let addrs = bed.topo.client_addrs();
        let would: Vec<Ipv4Addr> = addrs[next_fresh..next_fresh + 15]
            .iter()
            .copied()
            .filter(|a| bed.lb().which("app", *a).0.as_deref() == Some(x))
            .collect();
        assert!(
            !would.is_empty(),
            "no new user's address maps to {x}; pick other addresses"
        );
        bed.lb().cli_ok(&["backend", "drain", "app", x]);
        let mut on_x: Vec<Browser> = browsers
            .iter()
            .filter(|b| b.cookie_route() == Some(x))
            .cloned()
            .collect();
        assert!(!on_x.is_empty());
        let hits = bed.backend_counter(Some(x), "route_hits");
        let pages = visit(&bed, &mut on_x, 2);
        for (b, ps) in on_x.iter().zip(&pages) {
            for p in ps {
                assert_eq!(p.route(), x, "{} left drained {x}", b.addr());
                assert_eq!(p.field("new"), Some("false"));
            }
        }
        assert_eq!(
            bed.backend_counter(Some(x), "route_hits") - hits,
            2 * on_x.len() as u64,
            "route hits of drained {x}"
        );
        let mut fresh: Vec<Browser> = (next_fresh..next_fresh + 15).map(|k| bed.browser(k)).collect();
        next_fresh += 15;
        let pages = visit(&bed, &mut fresh, 2);
        let at = assert_sticky(&fresh, &pages);
        assert!(
            at.values().all(|r| r != x),
            "new users on drained {x} (their ring choice: {would:?}): {at:?}"
        );
        bed.lb().cli_ok(&["backend", "enable", "app", x]);
    });

    cases.run("hot spare only while no primary is up", || {
        let before = fresh_routes(&bed, &mut next_fresh, 8);
        assert!(
            !before.contains(SPARE),
            "spare answered while primaries are up: {before:?}"
        );
        for i in 1..=3 {
            bed.block_tomcat(i, true);
        }
        let blocked = catch_unwind(AssertUnwindSafe(|| {
            bed.wait_health(&PRIMARIES, "down", Duration::from_secs(10));
            // New users and a user whose session lives on a dead primary: all on the spare.
            let during = fresh_routes(&bed, &mut next_fresh, 8);
            assert_eq!(
                during,
                BTreeSet::from([SPARE.to_string()]),
                "while no primary is up"
            );
            let mut old = browsers[0].clone();
            let p = old
                .get("/index.jsp")
                .unwrap_or_else(|e| panic!("{e}\n{}", bed.logs()));
            assert_eq!((p.status, p.route()), (200, SPARE), "{}", p.body);
        }));
        for i in 1..=3 {
            bed.block_tomcat(i, false);
        }
        if let Err(e) = blocked {
            std::panic::resume_unwind(e);
        }
        bed.wait_health(&PRIMARIES, "up", Duration::from_secs(10));
        let after = fresh_routes(&bed, &mut next_fresh, 8);
        assert!(
            !after.contains(SPARE),
            "spare answered after primaries came back: {after:?}"
        );
    });

    cases.run(
        "Tomcat killed under load: only in-flight requests lost, POSTs retried",
        || {
            kill_under_load(&mut bed, &browsers);
        },
    );

    drop(bed);
    assert!(
        cases.failed.is_empty(),
        "ajp sub-cases failed: {:?}",
        cases.failed
    );
}

/// POSTs around the AJP packet size (8 KiB) and the retry buffer (64 KiB), and beyond, with a
/// length and chunked: each body arrives whole at the browser's own Tomcat.
fn post_sizes(bed: &Bed, b: &mut Browser) {
    let home = b.cookie_route().map(String::from);
    for (k, len) in [0usize, 100, 8186, 8187, 65535, 65536, 65537, 200_000]
        .into_iter()
        .enumerate()
    {
        let body: Vec<u8> = (0..len).map(|i| (i * 7 + k) as u8).collect();
        let p = b
            .post("/index.jsp", &body)
            .unwrap_or_else(|e| panic!("POST {len} bytes: {e}\n{}", bed.logs()));
        check_page(&p, b.addr(), len).unwrap_or_else(|e| panic!("POST {len} bytes: {e}\n{}", bed.logs()));
        assert_eq!(Some(p.route()), home.as_deref(), "POST {len} bytes");
    }
    // Without a length (`Transfer-Encoding: chunked`): httpd sends nothing of the body until
    // Tomcat asks for it, then one packet per Get Body Chunk.
    for (k, len) in [1usize, 8187, 65537, 200_000].into_iter().enumerate() {
        let body: Vec<u8> = (0..len).map(|i| (i * 5 + k) as u8).collect();
        let p = b
            .post_chunked("/index.jsp", &body)
            .unwrap_or_else(|e| panic!("chunked POST {len} bytes: {e}\n{}", bed.logs()));
        check_page(&p, b.addr(), len)
            .unwrap_or_else(|e| panic!("chunked POST {len} bytes: {e}\n{}", bed.logs()));
        assert_eq!(Some(p.route()), home.as_deref(), "chunked POST {len} bytes");
    }
}

/// Routes that `n` fresh browsers (addresses never used before) land on.
fn fresh_routes(bed: &Bed, next: &mut usize, n: usize) -> BTreeSet<String> {
    assert!(*next + n <= CLIENTS, "out of fresh client addresses");
    let mut bs: Vec<Browser> = (*next..*next + n).map(|k| bed.browser(k)).collect();
    *next += n;
    let pages = visit(bed, &mut bs, 1);
    pages.iter().map(|ps| ps[0].route().to_string()).collect()
}

/// One request of a load loop.
struct Outcome {
    started: Instant,
    post: bool,
    /// The Tomcat that answered, or the error.
    result: Result<String, String>,
}

fn kill_under_load(bed: &mut Bed, browsers: &[Browser]) {
    // Three users per Tomcat loop GET and POST (a 3000-byte body), each request held 100 ms.
    let mut loopers: Vec<Browser> = Vec::new();
    for t in PRIMARIES {
        loopers.extend(
            browsers
                .iter()
                .filter(|b| b.cookie_route() == Some(t))
                .take(3)
                .cloned(),
        );
    }
    let x = "t2";
    let xi = 2;
    let failovers0 = bed.backend_counter(None, "route_failovers");
    let retries0 = bed.backend_counter(None, "retries");
    let stop = Arc::new(AtomicBool::new(false));
    let body = vec![b'p'; 3000];
    let (outcomes, killed, exited) = thread::scope(|s| {
        let handles: Vec<_> = loopers
            .iter()
            .cloned()
            .map(|mut b| {
                let stop = stop.clone();
                let body = &body;
                s.spawn(move || {
                    let home = b.cookie_route().unwrap().to_string();
                    let mut out = Vec::new();
                    let mut k = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let post = k % 2 == 1;
                        k += 1;
                        let started = Instant::now();
                        let r = if post {
                            b.post("/index.jsp?sleep=100", body)
                        } else {
                            b.get("/index.jsp?sleep=100")
                        };
                        let result = match r {
                            Ok(p) => match check_page(&p, b.addr(), if post { body.len() } else { 0 }) {
                                Ok(()) => Ok(p.route().to_string()),
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e.to_string()),
                        };
                        out.push(Outcome {
                            started,
                            post,
                            result,
                        });
                    }
                    (home, b.addr(), out)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        let (tc, _) = &mut bed.tomcats[xi - 1];
        tc.terminate().expect("SIGTERM Tomcat");
        let killed = Instant::now();
        let gone = tc.wait_exit(Duration::from_secs(30));
        let exited = Instant::now();
        if matches!(gone, Ok(Some(_))) {
            thread::sleep(Duration::from_millis(2500));
        }
        // Stop the loops before any assertion: the scope waits for them.
        stop.store(true, Ordering::SeqCst);
        let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let gone = gone.expect("wait for Tomcat");
        assert!(gone.is_some(), "Tomcat {x} still runs 30 s after SIGTERM");
        (outcomes, killed, exited)
    });
    report(&format!(
        "ajp:   {x} exited {:.2}s after SIGTERM",
        (exited - killed).as_secs_f64()
    ));
    let mut lost = 0;
    let mut retried_posts = 0;
    for (home, addr, out) in &outcomes {
        for o in out {
            match &o.result {
                Ok(route) if home != x => assert_eq!(route, home, "{addr} (on {home}) moved"),
                Ok(route) if o.started >= exited => {
                    assert_ne!(route, x, "{addr}: answered by the dead {x}");
                    if o.post {
                        retried_posts += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(home, x, "{addr} on {home} lost a request: {e}\n{}", bed.logs());
                    assert!(
                        o.started < exited,
                        "{addr}: a {} started after {x} had exited failed: {e}\n{}",
                        if o.post { "POST" } else { "GET" },
                        bed.logs()
                    );
                    lost += 1;
                }
            }
        }
        if home == x {
            // After the kill the user settles on one other Tomcat.
            let last: BTreeSet<&str> = out
                .iter()
                .rev()
                .take(4)
                .filter_map(|o| o.result.as_deref().ok())
                .collect();
            assert_eq!(last.len(), 1, "{addr} after {x} died: {last:?}");
        }
    }
    let on_x = outcomes.iter().filter(|(h, _, _)| h == x).count();
    assert!(
        lost <= on_x,
        "{lost} requests lost, more than the {on_x} that can be in flight on {x}"
    );
    assert!(
        retried_posts > 0,
        "no POST of a {x} user was sent after {x} exited"
    );
    // The t2 users' requests with t2's route went elsewhere: by a retry (t2 failed before
    // answering) or a route failover (t2 known down), and lb counted it.
    let failovers = bed.backend_counter(None, "route_failovers") - failovers0;
    let retries = bed.backend_counter(None, "retries") - retries0;
    assert!(
        failovers + retries > 0,
        "no route failover or retry counted after {x} died"
    );
    report(&format!(
        "ajp:   {lost} request(s) lost (≤ {on_x} in flight on {x}); {retried_posts} POSTs of {x} users \
         answered elsewhere after it exited; \
         lb counted {retries} retries, {failovers} route failovers"
    ));
}
