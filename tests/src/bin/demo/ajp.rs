//! The demo's second part: the deployment lb's users run. Browsers → Apache httpd (mod_proxy_ajp,
//! a few pooled AJP connections for everyone) → `lb run` with `datapath = "ajp"` → two Tomcat 10
//! (`jvmRoute` t1 and t2). lb decides per request: a session's route first, else the browser's
//! address that Apache puts in the AJP request; a connection-level balancer would see only Apache
//! and put everyone on one Tomcat. Then a drain: sessions on the drained Tomcat stay, new
//! browsers go to the other one.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::apache::{self, Apache, ApacheConf, Front};
use lb_tests::daemon::backend_of;
use lb_tests::netns::netns_exists;
use lb_tests::tomcat::{self, CatalinaBase, Tomcat, TomcatOptions};
use lb_tests::webtier::{Browser, WebTier};
use lb_tests::{Daemon, Topology};

use super::{lb_cli, spawn_shown, step, wait_ready};

const ROUTES: [&str; 2] = ["t1", "t2"];
const AJP_PORT: u16 = 8009;
const WEB_PORT: u16 = 80;
const FIRST: usize = 12;
const LATER: usize = 6;
const PAGES: usize = 3;
const TOMCAT_START: Duration = Duration::from_secs(90);

/// Runs the part in namespaces `<prefix>-*`; everything it started is gone when it returns.
pub fn run(prefix: &str) -> Result<()> {
    step("the real deployment: browsers → Apache httpd → AJP → lb → two Tomcat 10");
    if let Err(e) = tomcat::check_installed().and_then(|()| apache::check_installed()) {
        bail!("{e} (`cargo xtask setup` installs Tomcat 10 and Apache httpd)");
    }
    // Locals drop in reverse order: Apache, lb, the Tomcats, the web namespace, the topology.
    let topo = Topology::new(prefix, ROUTES.len(), FIRST + LATER).context("creating the namespaces")?;
    let web = WebTier::attach(&topo).context("creating the web tier's namespace")?;
    let started = Instant::now();
    let mut tomcats = Vec::new();
    for (k, route) in ROUTES.iter().enumerate() {
        let i = k + 1;
        let base = CatalinaBase::with_options(
            &format!("demo{i}"),
            topo.backend_addr(i),
            AJP_PORT,
            &TomcatOptions::app(route),
        )
        .context("CATALINA_BASE")?;
        let tomcat = Tomcat::start(topo.backend_ns(i), &base).context("starting Tomcat")?;
        tomcats.push((tomcat, base));
    }
    for (tomcat, base) in &mut tomcats {
        tomcat
            .wait_cping(topo.lb_ns().name(), TOMCAT_START)
            .with_context(|| format!("Tomcat never answered a CPing:\n{}", base.log_tail(20)))?;
    }
    println!(
        "  Tomcats t1 ({}) and t2 ({}) answer CPing on :{AJP_PORT} after {:.1}s",
        topo.backend_addr(1),
        topo.backend_addr(2),
        started.elapsed().as_secs_f64()
    );

    let vip = SocketAddr::new(topo.vip().into(), AJP_PORT);
    let mut daemon = spawn_shown(
        &topo,
        "demoajp",
        |socket| config(&topo, socket, vip),
        "t1 and t2: name = route = the Tomcat's jvmRoute",
    );
    wait_ready(&mut daemon)?;
    let result = scenario(&topo, &web, &daemon, vip);
    if result.is_err() {
        eprintln!("\n--- lb daemon log (last 40 lines) ---\n{}", daemon.log_tail(40));
    }
    result?;
    let status = daemon.stop().context("stopping lb")?;
    println!("  lb stopped ({status})");
    let mut names = topo.namespace_names();
    names.push(web.ns().name().to_string());
    drop((daemon, tomcats, web, topo));
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    println!("  Tomcats stopped, namespaces deleted");
    Ok(())
}

fn config(topo: &Topology, socket: &Path, vip: SocketAddr) -> String {
    let mut c = format!(
        "shutdown_timeout = \"1s\"\nring_size = 1009\n\n[control]\nsocket = \"{}\"\n\n\
         [[service]]\nname = \"app\"\nlisten = \"{vip}\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n\
         affinity_timeout = \"10m\"\n\n[service.health]\nkind = \"ajp\"\ninterval = \"1s\"\n",
        socket.display()
    );
    for (k, route) in ROUTES.iter().enumerate() {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"{route}\"\naddress = \"{}:{AJP_PORT}\"\n",
            topo.backend_addr(k + 1)
        ));
    }
    c
}

fn scenario(topo: &Topology, web: &WebTier, daemon: &Daemon, vip: SocketAddr) -> Result<()> {
    daemon.wait_status(Duration::from_secs(10), "both Tomcats up", |st| {
        ROUTES
            .iter()
            .all(|r| backend_of(st, "app", r).is_some_and(|b| b["health"] == "up"))
    });
    let front = Front::ProxyAjp {
        target: vip,
        secret: None,
        ping: false,
    };
    let web_url = SocketAddr::new(web.addr().into(), WEB_PORT);
    let mut apache =
        Apache::start(web.ns(), "demo", &ApacheConf::new(web_url, front)).context("starting Apache")?;
    println!("  Apache httpd on {web_url}: ProxyPass / ajp://{vip}/ (mod_proxy_ajp, pooled connections)");
    let result = browse(topo, daemon, web_url);
    if result.is_err() {
        eprintln!("\n--- Apache error log ---\n{}", apache.error_log());
    }
    let _ = apache.stop();
    result
}

fn browse(topo: &Topology, daemon: &Daemon, web_url: SocketAddr) -> Result<()> {
    let cfg = daemon.config.clone();
    let ns = topo.client_ns().name();
    let clients = topo.client_addrs();
    let (first, later) = clients.split_at(FIRST);
    let mut browsers: Vec<Browser> = first.iter().map(|&c| Browser::new(ns, c, web_url)).collect();

    step(&format!(
        "{FIRST} browsers, {PAGES} pages each, through Apache's shared AJP connections"
    ));
    let home = visit(&mut browsers, PAGES)?;
    spread(&home, FIRST)?;
    println!("  every browser stayed on its Tomcat; the session cookie names it (….t1 / ….t2)");
    println!("  Tomcat saw each browser's own address (lb passes Apache's remote_addr through)");

    step("`lb which`: where a browser's requests without a session route go (its address decides)");
    let b = first[0];
    let out = lb_cli(&cfg, &["which", "app", &b.to_string()])?;
    ensure!(
        out.contains(&format!("→ {}", home[&b])),
        "lb which says {out:?}, but {b} is on {}",
        home[&b]
    );

    step("`lb backend drain app t1`: t1's sessions stay, new browsers go to t2");
    lb_cli(&cfg, &["backend", "drain", "app", "t1"])?;
    let again = visit(&mut browsers, 2)?;
    ensure!(
        again == home,
        "a browser moved after the drain: {again:?} vs {home:?}"
    );
    let on_t1 = home.values().filter(|r| *r == "t1").count();
    println!("  the {on_t1} browser(s) with a session on t1 still reach t1");
    let mut newcomers: Vec<Browser> = later.iter().map(|&c| Browser::new(ns, c, web_url)).collect();
    let placed = visit(&mut newcomers, PAGES)?;
    ensure!(
        placed.values().all(|r| r == "t2"),
        "a new browser reached the drained t1: {placed:?}"
    );
    println!("  all {LATER} new browsers were placed on t2");
    let status = lb_cli(&cfg, &["status"])?;
    ensure!(
        status.contains("ajp: refused secret"),
        "lb status shows no AJP counters"
    );
    Ok(())
}

/// `n` pages per browser (GET); each browser must stay on one Tomcat, whose route its session
/// cookie carries, and Tomcat must see the browser's address. Returns each browser's Tomcat.
fn visit(browsers: &mut [Browser], n: usize) -> Result<BTreeMap<Ipv4Addr, String>> {
    println!(
        "  {:<12} → Tomcat per page    session cookie             sticky",
        "browser"
    );
    let mut home = BTreeMap::new();
    for b in browsers {
        let mut routes = Vec::with_capacity(n);
        for _ in 0..n {
            let page = b
                .get("/index.jsp")
                .with_context(|| format!("GET from {}", b.addr()))?;
            ensure!(
                page.status == 200,
                "{}: status {} {:?}",
                b.addr(),
                page.status,
                page.body
            );
            ensure!(
                page.field("remote") == Some(&b.addr().to_string()),
                "Tomcat saw {:?}, not the browser {}",
                page.field("remote"),
                b.addr()
            );
            routes.push(page.route().to_string());
        }
        let sticky = routes.iter().all(|r| *r == routes[0]) && b.cookie_route() == Some(routes[0].as_str());
        println!(
            "  {:<12} → {:<18} {:<26} {}",
            b.addr().to_string(),
            routes.join(" "),
            b.session.as_deref().map_or("-".to_string(), |s| format!(
                "…{}",
                &s[s.len().saturating_sub(12)..]
            )),
            if sticky { "yes" } else { "NO" }
        );
        ensure!(sticky, "{} moved between Tomcats: {routes:?}", b.addr());
        home.insert(b.addr(), routes.swap_remove(0));
    }
    Ok(home)
}

/// Both Tomcats got browsers, as their addresses lead.
fn spread(home: &BTreeMap<Ipv4Addr, String>, browsers: usize) -> Result<()> {
    println!("  distribution:");
    for route in ROUTES {
        let n = home.values().filter(|r| *r == route).count();
        println!("    {route}: {n:>2} browser(s) {}", "#".repeat(n));
        ensure!(
            n > 0 && n < browsers,
            "{n} of {browsers} browsers on {route}: not spread"
        );
    }
    Ok(())
}
