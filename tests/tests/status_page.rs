//! The status page (`/` on the `[metrics]` listener) loaded in a real headless browser (Debian's
//! `chromium`) inside the lb namespace: the rendered DOM shows every backend, a drained backend as
//! drained, and a backend that went down with the reason. Also writes the screenshot
//! `docs/status.png` shown in the README.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use lb_tests::{AjpMode, Netns, TempDir, Topology, require_root, start_ajp_backend, workspace_dir};

/// Where `[metrics]` listens inside the lb namespace.
const METRICS: &str = "127.0.0.1:9100";

/// AJP port of the `tomcat` service and of its backends (`lb-testsrv ajp`, CPing only).
const AJP_PORT: u16 = 8009;

/// `web` over b1..b3 with fast TCP checks (a stopped server is down within a second), and
/// `tomcat` (`datapath = "ajp"`) over b1..b2's AJP peers, for the AJP columns.
fn config(topo: &Topology, socket: &Path) -> String {
    let mut c = format!(
        "shutdown_timeout = \"1s\"\n[metrics]\nlisten = \"{METRICS}\"\n[control]\nsocket = \"{}\"\n\
         \n[[service]]\nname = \"web\"\nlisten = \"{}:{WEB_VIP_PORT}\"\ndatapath = \"proxy\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n",
        socket.display(),
        topo.vip()
    );
    for i in 1..=3 {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"{}:{HTTP_PORT}\"\n",
            topo.backend_addr(i)
        ));
    }
    c.push_str(&format!(
        "\n[[service]]\nname = \"tomcat\"\nlisten = \"{}:{AJP_PORT}\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n\
         [service.health]\nkind = \"ajp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
        topo.vip()
    ));
    for i in 1..=2 {
        c.push_str(&format!(
            "\n[[service.backend]]\nname = \"t{i}\"\naddress = \"{}:{AJP_PORT}\"\n",
            topo.backend_addr(i)
        ));
    }
    c
}

/// Runs headless chromium in `ns` on the status page with `mode` (`--dump-dom` or
/// `--screenshot=…`); its stdout.
fn chromium(ns: &Netns, mode: &[&str]) -> String {
    let profile = TempDir::new("chromium");
    let url = format!("http://{METRICS}/");
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let mut args = vec![
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        &profile_arg,
        // Let the page's script run its first refreshes before the DOM is taken.
        "--virtual-time-budget=5000",
    ];
    args.extend_from_slice(mode);
    args.push(&url);
    let out = ns
        .exec(&args)
        .expect("run chromium (is the `chromium` package installed?)");
    assert!(
        out.status.success(),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 DOM")
}

/// The element of `dom` that opens with `start` up to the next `</tr>`.
fn row<'a>(dom: &'a str, start: &str) -> &'a str {
    let at = dom
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in the DOM:\n{dom}"));
    let rest = &dom[at..];
    &rest[..rest.find("</tr>").expect("row end")]
}

/// `text` as HTML element text writes it.
fn html_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[test]
fn the_status_page_renders_in_a_browser() {
    if !require_root("the_status_page_renders_in_a_browser") {
        return;
    }
    let mut bed = Bed::new("spg", 3, 4, config);
    let ajp_peers: Vec<_> = (1..=2)
        .map(|i| {
            let listen = std::net::SocketAddr::new(bed.topo.backend_addr(i).into(), AJP_PORT);
            start_ajp_backend(bed.topo.backend_ns(i), listen, AjpMode::Good).expect("AJP peer")
        })
        .collect();
    // Some traffic first, so the connection counters are not all zero.
    let clients = bed.topo.client_addrs();
    for c in &clients {
        bed.get(*c);
    }
    bed.lb.cli_ok(&["backend", "drain", "web", "b2"]);
    drop(bed.servers.remove(2)); // the http server of b3 (http b1..b3, then echo b1..b3)
    let deadline = Instant::now() + Duration::from_secs(10);
    let b3 = loop {
        let b3 = bed.lb.backend("web", "b3").expect("b3 in status");
        if b3["health"] == "down" {
            break b3;
        }
        assert!(Instant::now() < deadline, "b3 not down: {b3}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stats = bed.lb.json(&["stats"]);
    let web = stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    let b3_stats = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "b3")
        .unwrap();
    let fall = b3_stats["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["to"] == "down")
        .unwrap_or_else(|| panic!("no down transition: {b3_stats}"));
    let reason = fall["reason"].as_str().unwrap();
    assert!(reason.starts_with("health check: "), "{reason}");

    let dom = chromium(bed.topo.lb_ns(), &["--dump-dom"]);
    assert!(dom.contains("<h1>lb status</h1>"), "{dom}");
    for b in ["b1", "b2", "b3"] {
        let r = row(&dom, &format!("data-backend=\"{b}\">"));
        assert!(r.contains(&format!("<td class=\"name\">{b}<br>")), "{r}");
    }
    let b2 = row(
        &dom,
        "<tr class=\"backend state-drain health-up\" data-backend=\"b2\">",
    );
    assert!(b2.contains("<td class=\"state\">drain"), "{b2}");
    // "(drained)" once nothing is left on it, as `lb status` says.
    let drained = bed.lb.backend("web", "b2").unwrap()["drained"] == true;
    assert_eq!(b2.contains("(drained)"), drained, "{b2}");
    let b3_row = row(
        &dom,
        "<tr class=\"backend state-active health-down\" data-backend=\"b3\">",
    );
    assert!(b3_row.contains("<b>down</b>"), "{b3_row}");
    let last = b3["check"]["last_result"].as_str().unwrap();
    assert_ne!(last, "ok");
    // The health cell shows a failed last check (its text may have changed since `b3` was read,
    // but it is never "ok" while the server is gone).
    assert!(
        b3_row.contains("last check: ") && !b3_row.contains("last check: ok"),
        "{b3_row}"
    );
    let transition = row(&dom, "<tr class=\"transition down\" data-backend=\"b3\">");
    assert!(
        transition.contains(&format!("<td class=\"reason\">{}</td>", html_text(reason))),
        "{transition}\nexpected reason {reason:?}"
    );
    let drain = row(&dom, "<tr class=\"transition\" data-backend=\"b2\">");
    assert!(drain.contains("active → drain"), "{drain}");
    // The script ran: the page was refreshed from /status.json and / at least once.
    assert!(
        dom.contains("<span id=\"refreshed\">refreshed "),
        "script did not refresh:\n{dom}"
    );

    // The AJP service has the AJP columns and its service counters.
    let tomcat = &dom[dom.find("id=\"service-tomcat\"").expect("tomcat section")..];
    let tomcat = &tomcat[..tomcat.find("</section>").unwrap()];
    assert!(
        tomcat.contains("<th>AJP requests</th><th>AJP statuses</th>"),
        "{tomcat}"
    );
    assert!(tomcat.contains("<dt>AJP 503 sent (no backend)</dt>"), "{tomcat}");
    assert!(!dom[..dom.find("id=\"service-tomcat\"").unwrap()].contains("<th>AJP requests</th>"));

    // The README's picture is refreshed only when asked (LB_UPDATE_SCREENSHOT=1): a test run
    // leaves the checkout as it found it.
    let shot_dir = TempDir::new("statusshot");
    let shot = if std::env::var_os("LB_UPDATE_SCREENSHOT").is_some() {
        workspace_dir().join("docs").join("status.png")
    } else {
        shot_dir.path().join("status.png")
    };
    let _ = std::fs::remove_file(&shot);
    let shot_arg = format!("--screenshot={}", shot.display());
    chromium(
        bed.topo.lb_ns(),
        &[&shot_arg, "--window-size=1280,900", "--hide-scrollbars"],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "not a PNG screenshot"
    );
    bed.lb.assert_running();
    drop(ajp_peers);
}
