//! Smoke test of the AJP chain of `cargo xtask bench` (wrk → Apache → load balancer → three
//! Tomcats): one quick round of `ajp-lb` and `ajp-balancer`, written to a temp directory. Checks
//! that both rows produced req/s and p99 without errors, and that both spread the requests over
//! all three Tomcats (the session cookies wrk rotates cover all three routes). No timing
//! assertions.
//!
//! Runs the already-built `target/debug/xtask` with `--no-build` and the debug `lb` (`$LB_BIN`, as
//! `cargo xtask test` sets). Needs root; prints SKIP otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb_tests::{lb_bin, require_root, run_with_timeout, unique_prefix, workspace_dir};
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

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bench_ajp_chain_smoke() {
    if !require_root("bench_ajp_chain_smoke") {
        return;
    }
    let xtask = xtask_bin();
    assert!(
        xtask.is_file(),
        "{} missing; build it with `cargo build -p xtask`",
        xtask.display()
    );
    let out = TempDir(std::env::temp_dir().join(unique_prefix("bajp")));
    let mut cmd = Command::new(&xtask);
    cmd.args([
        "bench",
        "--ajp-rows",
        "ajp-lb,ajp-balancer",
        "--quick",
        "--no-build",
        "--lb-bin",
    ])
    .arg(lb_bin())
    .arg("--out")
    .arg(&out.0)
    .current_dir(workspace_dir());
    let run = run_with_timeout(cmd, Duration::from_secs(300)).expect("xtask bench --ajp-rows");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "xtask bench failed ({}):\n{stderr}",
        run.status
    );
    let text = std::fs::read_to_string(out.0.join("ajp.json")).expect("ajp.json");
    let v: Value = serde_json::from_str(&text).expect("ajp.json is JSON");
    for name in ["ajp-lb", "ajp-balancer"] {
        let r = v["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["row"] == name))
            .unwrap_or_else(|| panic!("row {name} missing: {text}"));
        assert!(r["unavailable"].is_null(), "{name} unavailable: {r}");
        assert_eq!(r["failures"], Value::Array(vec![]), "{name}: {r}");
        assert_eq!(r["wrk_errors"], Value::Array(vec![]), "{name}: {r}");
        let rps = r["requests_per_sec"][0].as_f64().unwrap_or(0.0);
        let p99 = r["p99_ms"][0].as_f64().unwrap_or(0.0);
        assert!(rps > 0.0 && p99 > 0.0, "{name}: {r}");
        let per: Vec<u64> = r["requests_per_tomcat"][0]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no requests per Tomcat: {r}"))
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        let total: u64 = per.iter().sum();
        assert_eq!(per.len(), 3, "{name}: {per:?}");
        // The cookies cover t1..t3 evenly: each Tomcat gets a fair share (a quarter at least).
        for (k, n) in per.iter().enumerate() {
            assert!(
                *n * 4 >= total,
                "{name}: t{} served {n} of {total} requests: {per:?}",
                k + 1
            );
        }
    }
}
