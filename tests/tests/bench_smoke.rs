//! Smoke test of `cargo xtask bench`: one quick round of the `none`, `lb-proxy`, `lb-xdp`,
//! `lb-xdp-native` and `lb-xdp-dsr` rows (the XDP rows only checked when the bench could run them), written to a temp directory so the committed
//! results stay as they are. Checks that every cell of those rows was produced and that source-IP
//! affinity holds (one client address → one backend; the client addresses together reach all three
//! backends). No timing assertions.
//!
//! `bench_cost_smoke`: `bench --cost --quick` (the kernel figures and the cost-growth
//! measurements in their smoke mode) produces every figure, with `$LB_MICROBENCH` (a debug
//! lb-microbench, which `cargo xtask test` builds).
//!
//! Runs the already-built `target/debug/xtask` with `--no-build` (a nested `cargo xtask` would wait
//! for the cargo lock that `cargo test` holds) and the debug `lb` (`$LB_BIN`, as `cargo xtask test`
//! sets). Needs root; prints SKIP otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::{Child, TempDir, lb_bin, require_root, workspace_dir};
use serde_json::Value;

/// `$LB_XTASK`, else `<target>/debug/xtask` (`$CARGO_TARGET_DIR` honoured).
fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_XTASK") {
        return PathBuf::from(p);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => workspace_dir().join(d),
        None => workspace_dir().join("target"),
    };
    target.join("debug").join("xtask")
}

fn row<'a>(results: &'a Value, name: &str) -> &'a Value {
    results["rows"]
        .as_array()
        .expect("rows array")
        .iter()
        .find(|r| r["row"] == name)
        .unwrap_or_else(|| panic!("row {name} missing from results.json"))
}

/// Every cell present, none empty, none failed.
fn assert_cells(r: &Value, name: &str, columns: usize) {
    let cells: Vec<&str> = r["cells"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no cells"))
        .iter()
        .map(|c| c.as_str().unwrap_or(""))
        .collect();
    assert_eq!(cells.len(), columns, "{name}: cells {cells:?}");
    for (i, c) in cells.iter().enumerate() {
        assert!(
            !c.trim().is_empty() && !c.contains("failed") && *c != "—",
            "{name}: cell {i} is {c:?} (all cells: {cells:?}; failures: {}; notes: {})",
            r["failures"],
            r["notes"]
        );
    }
}

fn assert_affinity(r: &Value, name: &str, spread_over: usize) {
    assert_eq!(
        r["max_backends_per_client"], 1,
        "{name}: a client address reached several backends: {}",
        r["reached"]
    );
    assert_eq!(r["clients"], 30, "{name}: clients probed: {}", r["reached"]);
    let spread = r["spread"].as_object().expect("spread object");
    assert_eq!(
        spread.len(),
        spread_over,
        "{name}: client addresses reached {spread:?}"
    );
}

#[test]
fn bench_quick_smoke() {
    if !require_root("bench_quick_smoke") {
        return;
    }
    let xtask = xtask_bin();
    if !xtask.is_file() {
        eprintln!(
            "SKIP: bench_quick_smoke: {} is not built (`cargo xtask …` builds it; or set LB_XTASK)",
            xtask.display()
        );
        return;
    }
    let lb = lb_bin();
    let out = TempDir::new("bench");

    let mut cmd = Command::new(&xtask);
    cmd.args([
        "bench",
        "--quick",
        "--no-build",
        "--no-micro",
        "--rows",
        "none,lb-proxy,lb-xdp,lb-xdp-native,lb-xdp-dsr",
        "--lb-bin",
    ])
    .arg(&lb)
    .arg("--out")
    .arg(out.path());
    let started = Instant::now();
    let mut child = Child::spawn(cmd).expect("spawn xtask bench");
    let pid = child.pid();
    let status = child
        .wait_timeout(Duration::from_secs(240))
        .unwrap()
        .unwrap_or_else(|| {
            let _ = child.stop();
            panic!(
                "xtask bench did not finish within 240 s:\n{}",
                child.stderr_text()
            )
        });
    // Let the output readers drain.
    std::thread::sleep(Duration::from_millis(200));
    let log = child.stderr_text();
    assert!(status.success(), "xtask bench failed ({status}):\n{log}");
    eprintln!(
        "bench_quick_smoke: xtask bench took {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // Outputs exist; the table is on stdout and in results.md.
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    let stdout = child.stdout_lines().join("\n");
    for text in [&md, &stdout] {
        assert!(text.contains("| row |"), "no table:\n{text}");
        for name in ["none", "lb-proxy", "lb-xdp", "lb-xdp-native"] {
            assert!(
                text.contains(&format!("| `{name}` |")),
                "row {name} missing:\n{text}"
            );
        }
    }
    let svg = std::fs::read_to_string(out.path().join("results.svg")).expect("results.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).expect("results.json"),
    )
    .expect("results.json is JSON");
    let columns = results["columns"].as_array().expect("columns").len();

    let none = row(&results, "none");
    assert_cells(none, "none", columns);
    // No load balancer: every client goes to backend 1.
    assert_affinity(none, "none", 1);

    let proxy = row(&results, "lb-proxy");
    assert_cells(proxy, "lb-proxy", columns);
    assert_affinity(proxy, "lb-proxy", 3);

    for name in ["lb-xdp", "lb-xdp-native", "lb-xdp-dsr"] {
        let xdp = row(&results, name);
        match xdp["unavailable"].as_str() {
            Some(why) => eprintln!("note: bench_quick_smoke: {name} unavailable in this build: {why}"),
            None => {
                assert_cells(xdp, name, columns);
                assert_affinity(xdp, name, 3);
            }
        }
    }

    // Nothing left behind: namespaces and temp files carry the bench's PID.
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let prefix = format!("lbb-{pid}-");
    assert!(!netns.contains(&prefix), "namespaces left behind:\n{netns}");
    let tmp = std::env::temp_dir().join(format!("lbb-{pid}.d"));
    assert!(!tmp.exists(), "{} left behind", tmp.display());
}

/// `$LB_MICROBENCH`, else `<target>/debug/lb-microbench`.
fn microbench_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_MICROBENCH") {
        return PathBuf::from(p);
    }
    xtask_bin().with_file_name("lb-microbench")
}

/// The entry whose name starts with `prefix`: its value, or a failure naming why it is missing.
fn figure(entries: &[Value], prefix: &str) -> f64 {
    let e = entries
        .iter()
        .find(|e| e["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no figure {prefix:?} in {entries:#?}"));
    e["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("figure {prefix:?} unavailable: {}", e["unavailable"]))
}

#[test]
fn bench_cost_smoke() {
    if !require_root("bench_cost_smoke") {
        return;
    }
    let (xtask, micro) = (xtask_bin(), microbench_bin());
    for bin in [&xtask, &micro] {
        if !bin.is_file() {
            eprintln!(
                "SKIP: bench_cost_smoke: {} is not built (`cargo xtask test` builds both; or set LB_XTASK / LB_MICROBENCH)",
                bin.display()
            );
            return;
        }
    }
    let out = TempDir::new("bench-cost");
    let mut cmd = Command::new(&xtask);
    cmd.args(["bench", "--cost", "--quick", "--no-build", "--lb-bin"])
        .arg(lb_bin())
        .arg("--microbench")
        .arg(&micro)
        .arg("--out")
        .arg(out.path());
    let started = Instant::now();
    let mut child = Child::spawn(cmd).expect("spawn xtask bench --cost");
    let status = child
        .wait_timeout(Duration::from_secs(180))
        .unwrap()
        .unwrap_or_else(|| {
            let _ = child.stop();
            panic!(
                "xtask bench --cost did not finish within 180 s:\n{}",
                child.stderr_text()
            )
        });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        status.success(),
        "xtask bench --cost failed ({status}):\n{}",
        child.stderr_text()
    );
    eprintln!(
        "bench_cost_smoke: xtask bench --cost --quick took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("cost.json")).expect("cost.json"))
            .expect("cost.json is JSON");
    let entries = json["entries"].as_array().expect("entries").clone();
    for prefix in [
        "XDP precise: established flow, client → backend",
        "XDP precise: established flow, backend → client",
        "XDP precise: new SYN",
        "XDP precise: established client → backend with 10 live flows",
        "XDP precise: established client → backend with 10k live flows",
        "XDP precise: established client → backend with 100k live flows",
        "XDP live frames, one CPU: lb",
        "XDP live frames, one CPU: trivial XDP_TX, through",
        "XDP live frames, one CPU: trivial XDP_TX, plain",
        "XDP live frames: lb as a share",
        "lb proxy RSS per idle connection",
        "Maglev rebuild, one of 100 backends leaves",
    ] {
        let v = figure(&entries, prefix);
        assert!(v.is_finite() && v > 0.0, "{prefix}: {v}");
    }
    // Maglev's promise: about 1 % of clients move when one of 100 backends leaves, and hardly any
    // of them were on a backend that stayed.
    let moved = figure(&entries, "Clients moved when one of 100 backends leaves");
    assert!((0.9..3.0).contains(&moved), "clients moved: {moved} %");
    // Memory grows with the backends.
    let small = figure(&entries, "lb daemon RSS, 16 proxy services × 10 backends");
    let big = figure(&entries, "lb daemon RSS, 16 proxy services × 1000 backends");
    assert!(
        big > small,
        "daemon RSS: 16 × 1000 backends {big} MiB, 16 × 10 {small} MiB"
    );
    if bench_has_haproxy() {
        let v = figure(&entries, "HAProxy RSS per idle connection");
        assert!(v.is_finite() && v > 0.0, "HAProxy RSS per idle connection: {v}");
    }
    let md = std::fs::read_to_string(out.path().join("cost.md")).expect("cost.md");
    assert!(md.contains("| benchmark | result | how |"), "no table:\n{md}");
    let svg = std::fs::read_to_string(out.path().join("cost.svg")).expect("cost.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("Mpps"),
        "not the cost chart:\n{svg}"
    );
}

fn bench_has_haproxy() -> bool {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"]
        .iter()
        .any(|p| Path::new(p).is_file())
}
