//! `lb-demo` (what `cargo xtask demo` runs) as a test: the whole walkthrough on the XDP datapath
//! (with `LB_REQUIRE_EBPF=1`, as `cargo xtask test` sets, it must not fall back to `proxy`), then
//! behind Apache with two Tomcats on the AJP datapath, and it exits 0.

use std::process::Command;

use lb_tests::{lb_bin, require_root, testsrv_bin, unique_prefix};

#[test]
fn demo_walkthrough_passes_on_the_xdp_datapath() {
    if !require_root("demo_walkthrough_passes_on_the_xdp_datapath") {
        return;
    }
    let require_xdp = std::env::var_os("LB_REQUIRE_EBPF").is_some_and(|v| v == "1");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb-demo"));
    cmd.env("LB_BIN", lb_bin())
        .env("LB_TESTSRV", testsrv_bin())
        .env("LB_DEMO_PREFIX", unique_prefix("demo"));
    if require_xdp {
        cmd.arg("--require-xdp");
    }
    let out = cmd.output().expect("run lb-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lb-demo failed:\n{stdout}\n{stderr}");
    let fell_back = stdout.contains("falling back to the proxy datapath");
    assert!(!(require_xdp && fell_back), "fell back to proxy:\n{stdout}");
    let mut steps = vec![
        "every client stayed on one backend",
        "no new client reached",
        "clients of",
        "namespaces deleted",
        // The deployment behind Apache (browsers → Apache → AJP → lb → Tomcats).
        "every browser stayed on its Tomcat",
        "still reach t1",
        "new browsers were placed on t2",
        "Tomcats stopped, namespaces deleted",
    ];
    if !fell_back {
        steps.extend([
            "the XDP program forwarded",
            "10 round trips while lb was down: all answered",
            "1 MiB echoed byte for byte on the same connection after the restart",
            "pinned objects under",
        ]);
    }
    for step in steps {
        assert!(stdout.contains(step), "demo output lacks {step:?}:\n{stdout}");
    }
    if require_xdp {
        assert!(
            stdout.contains("all expectations met on the xdp datapath, and behind Apache"),
            "{stdout}"
        );
    }
}
