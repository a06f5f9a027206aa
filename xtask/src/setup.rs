//! `cargo xtask setup`: checks the build and test prerequisites and installs only what is missing.
//! Fast and silent-ish when everything is there.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{cmd::Cmd, is_root};

/// Debian packages needed to build (llvm-22-dev for bpf-linker) and to run the tests and demo.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "iperf3",
    "wrk",
    "bpftool",
    "tcpdump",
    "nftables",
    "tomcat10",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "tmux",
    // ethtool: the XDP tests enable GRO on veth peers so XDP_REDIRECT into a veth is accepted.
    "ethtool",
    // The web tier in front of `datapath = "ajp"`: Apache httpd with mod_proxy_ajp and mod_jk.
    "apache2",
    "libapache2-mod-jk",
    // BIRD 2: the BGP speakers of the two-node ECMP test (tests/tests/ecmp.rs).
    "bird2",
    // A real browser for the status page test (headless, `--dump-dom` and `--screenshot`).
    "chromium",
    // `cargo xtask package` and its test: systemd-analyze verifies the unit, man renders the page,
    // bash loads the completions.
    "systemd",
    "man-db",
    "bash-completion",
];

/// Packages whose Debian install starts a system service. The tests start their own instances in
/// network namespaces, so a freshly installed system service is stopped and disabled: it would
/// otherwise hold ports 8080/8009 (tomcat10) or 80 (nginx) on the host.
const SERVICES: &[(&str, &str)] = &[
    ("tomcat10", "tomcat10"),
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("apache2", "apache2"),
    ("bird2", "bird"),
];

/// bpf-linker must be built against the same LLVM major as nightly rustc (LLVM 22).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_INSTALL: &[&str] = &[
    "install",
    "bpf-linker",
    "--version",
    "~0.13",
    "--no-default-features",
    "--features",
    "llvm-22",
];

/// cargo-deb builds the .deb from `[package.metadata.deb]` in lb-userspace/Cargo.toml.
const CARGO_DEB_INSTALL: &[&str] = &["install", "cargo-deb", "--version", "^3", "--locked"];

pub fn setup() -> Result<()> {
    let root = is_root();
    let mut todo_as_root: Vec<String> = Vec::new();

    // 1. nightly with rust-src (for -Z build-std=core) and clippy (lints lb-ebpf); stable with
    //    rustfmt and clippy (the lint step of `cargo xtask test`).
    for (toolchain, components) in [
        ("nightly", &["rust-src", "clippy"][..]),
        ("stable", &["rustfmt", "clippy"][..]),
    ] {
        let installed = Cmd::new("rustup")
            .args(["component", "list", "--toolchain", toolchain, "--installed"])
            .probe();
        match installed {
            Some(list) => {
                for c in components {
                    if !list.lines().any(|l| l.starts_with(c)) {
                        Cmd::new("rustup")
                            .args(["component", "add", c, "--toolchain", toolchain])
                            .run()?;
                    }
                }
            }
            None => {
                let mut cmd =
                    Cmd::new("rustup").args(["toolchain", "install", toolchain, "--profile", "minimal"]);
                for c in components {
                    cmd = cmd.args(["--component", c]);
                }
                cmd.run()?;
            }
        }
    }

    // 2. Debian packages.
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        if root {
            Cmd::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["update", "-q"])
                .run()?;
            Cmd::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q"])
                .args(&missing)
                .run()?;
            for (pkg, service) in SERVICES {
                if missing.contains(pkg) {
                    stop_service(service);
                }
            }
        } else {
            todo_as_root.push(format!(
                "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
                missing.join(" ")
            ));
            for (pkg, service) in SERVICES {
                if missing.contains(pkg) {
                    todo_as_root.push(format!("sudo systemctl disable --now {service}"));
                }
            }
        }
    }

    // 3. bpf-linker (needs llvm-22-dev, installed above).
    if bpf_linker().is_none() {
        if missing.contains(&"llvm-22-dev") && !root {
            todo_as_root.push(format!(
                "LLVM_PREFIX={LLVM_PREFIX} cargo {}",
                BPF_LINKER_INSTALL.join(" ")
            ));
        } else {
            Cmd::new("cargo")
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .args(BPF_LINKER_INSTALL)
                .run()?;
        }
    }

    // 4. cargo-deb (`cargo xtask package`).
    if Cmd::new("cargo").args(["deb", "--version"]).probe().is_none() {
        Cmd::new("cargo").args(CARGO_DEB_INSTALL).run()?;
    }

    if !todo_as_root.is_empty() {
        bail!(
            "setup: missing prerequisites need root. Run:\n  {}\nthen `cargo xtask setup` again",
            todo_as_root.join("\n  ")
        );
    }
    eprintln!(
        "setup: nightly rust-src, {} packages, bpf-linker and cargo-deb present",
        PACKAGES.len()
    );
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .probe()
        .is_some_and(|s| s.trim() == "install ok installed")
}

/// Stops and disables a service a package install just started. Failures (no systemd, as in
/// containers) are ignored: then nothing was started either.
fn stop_service(service: &str) {
    eprintln!(
        "setup: {service} was just installed; stopping and disabling its system service so it does not \
         hold its ports on the host (the tests start their own instances)"
    );
    let mut cmd = Cmd::new("systemctl").args(["disable", "--now", service]);
    match cmd.status() {
        Ok(s) if s.success() => {}
        _ => eprintln!("setup: (systemctl could not fully stop/disable {service}, e.g. no systemd; ignored)"),
    }
}

/// Path of a working bpf-linker: in PATH, else in ~/.cargo/bin.
pub fn bpf_linker() -> Option<PathBuf> {
    let candidates = [
        Some(PathBuf::from("bpf-linker")),
        cargo_bin().map(|d| d.join("bpf-linker")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| Cmd::new(p).arg("--version").probe().is_some())
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
pub fn cargo_bin() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}
