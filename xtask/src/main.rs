//! `cargo xtask`: the developer entry point (build, test, run and demo `lb`).
//!
//! - `setup`: installs what is missing (nightly rust-src, Debian packages, bpf-linker); see [`setup`].
//! - `build [--release]`: builds the eBPF object (lb-ebpf, nightly, always release) and then `lb`,
//!   `lb-testsrv` and `lb-demo` with the object embedded (`LB_EBPF_OBJECT`).
//! - `run [--release] -- ARGS`: build, then exec `target/{debug,release}/lb ARGS`.
//! - `test [-- ARGS]`: setup, build, package, then `cargo test` for lb-common (no features) and the
//!   workspace, with `LB_EBPF_OBJECT`, `LB_REQUIRE_EBPF=1`, `LB_BIN`, `LB_TESTSRV`, `LB_DEB` and
//!   `LB_MICROBENCH` (a debug lb-microbench, built first) set. ARGS go to
//!   `cargo test` (`cargo xtask test -- ebpf -- --nocapture`).
//! - `demo [-- ARGS]`: setup, build, then run `lb-demo` as root.
//! - `package [--release]`: build, then the .deb with man page and completions; see [`package`].
//! - `bench [--quick] [--rows …] [--pin] [--out DIR]`: lb side by side with HAProxy, nginx stream,
//!   nftables DNAT and no load balancer, plus micro-benchmarks; see [`bench`].
//!
//! Every command is printed before it runs ([`cmd`]). The workspace root is the parent of this
//! crate's manifest directory.

mod bench;
mod cmd;
mod package;
mod setup;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::cmd::Cmd;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, run and demo lb")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check prerequisites and install only what is missing (idempotent).
    Setup,
    /// Build the eBPF object (nightly, release) and lb with it embedded.
    Build {
        /// Build lb in release mode (the eBPF object is always release).
        #[arg(long)]
        release: bool,
    },
    /// Build, then run target/{debug,release}/lb with ARGS.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for lb (put them after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check formatting and lints of the whole tree (workspace, xtask, lb-ebpf).
    Lint,
    /// Setup, lint, build, then run all tests with the eBPF object required.
    Test {
        /// Arguments for `cargo test` (a filter, `-- --nocapture`, …).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup, build, then run the lb-demo walkthrough (root).
    Demo {
        /// Arguments for lb-demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build the Debian package (target/debian/lb_*.deb): lb, systemd unit, /etc/lb/lb.toml,
    /// man page, completions, examples.
    Package {
        /// Package a release build (default: debug, quick to build).
        #[arg(long)]
        release: bool,
    },
    /// Benchmarks: lb vs HAProxy, nginx stream, nft DNAT and no LB (root; network namespaces).
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    // Print the error chain ourselves: an anyhow backtrace (RUST_BACKTRACE=1) only hides it.
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => setup::setup(),
        Command::Build { release } => Workspace::locate()?.build(release).map(drop),
        Command::Run { release, args } => {
            let built = Workspace::locate()?.build(release)?;
            Err(Cmd::new(built.lb).args(args).exec())
        }
        Command::Lint => Workspace::locate()?.lint(),
        Command::Test { args } => Workspace::locate()?.test(&args),
        Command::Demo { args } => {
            if !is_root() {
                bail!(
                    "cargo xtask demo needs root (it creates network namespaces and attaches XDP); \
                     run it as root, e.g. `sudo -E cargo xtask demo`"
                );
            }
            Workspace::locate()?.demo(&args)
        }
        Command::Package { release } => {
            setup::setup()?;
            Workspace::locate()?.package(release).map(drop)
        }
        Command::Bench(args) => bench::run(args),
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Paths of one build's outputs, all absolute.
struct Built {
    object: PathBuf,
    lb: PathBuf,
    testsrv: PathBuf,
    demo: PathBuf,
}

struct Workspace {
    root: PathBuf,
    target: PathBuf,
    /// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
    cargo: OsString,
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask lives inside the workspace")?
            .to_owned();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target = target_dir(&root, &cargo);
        Ok(Self { root, target, cargo })
    }

    fn cargo(&self) -> Cmd {
        Cmd::new(&self.cargo).current_dir(&self.root)
    }

    /// The eBPF object: `rustup run nightly cargo build --release` inside lb-ebpf (its
    /// .cargo/config.toml sets the BPF target and build-std), with everything the outer cargo and
    /// rustup put into our environment removed so the nested build picks nightly and its own flags.
    /// `cargo ARGS` with nightly in lb-ebpf (its own workspace, BPF target and build-std from its
    /// `.cargo/config.toml`), without the variables our own cargo set.
    fn ebpf_cargo(&self, args: &[&str]) -> Cmd {
        let dir = self.root.join("lb-ebpf");
        let mut cmd = Cmd::new("rustup")
            .args(["run", "nightly", "cargo"])
            .args(args)
            .arg("--target-dir")
            .arg(dir.join("target"))
            .current_dir(&dir);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if is_inherited_build_var(&k) {
                cmd = cmd.env_remove(&key);
            }
        }
        cmd
    }

    /// Formatting and lints of the whole tree: the workspace (xtask included) and lb-ebpf on its
    /// own target. Any finding fails.
    fn lint(&self) -> Result<()> {
        let steps: [(&str, Cmd); 4] = [
            (
                "cargo fmt --check (workspace)",
                self.cargo().args(["fmt", "--all", "--check"]),
            ),
            (
                "cargo fmt --check (lb-ebpf)",
                self.cargo()
                    .args(["fmt", "--check", "--manifest-path"])
                    .arg(self.root.join("lb-ebpf/Cargo.toml")),
            ),
            (
                "cargo clippy (workspace)",
                self.cargo()
                    .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
            ),
            (
                "cargo clippy (lb-ebpf, bpfel-unknown-none)",
                self.ebpf_cargo(&["clippy", "--release"])
                    .args(["--", "-D", "warnings"]),
            ),
        ];
        for (name, mut cmd) in steps {
            match cmd.status() {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    bail!("{name} found problems ({s}); fix them (cargo fmt, cargo clippy) and run again")
                }
                Err(e) => bail!("{name} could not run: {e:#}"),
            }
        }
        eprintln!("xtask: fmt and clippy clean (workspace, xtask, lb-ebpf)");
        Ok(())
    }

    fn build_ebpf(&self) -> Result<PathBuf> {
        let dir = self.root.join("lb-ebpf");
        let target_dir = dir.join("target");
        let mut cmd = self.ebpf_cargo(&["build", "--release"]);
        // bpf-linker is often only in ~/.cargo/bin.
        if let Some(linker) = setup::bpf_linker() {
            if let Some(bin) = linker.parent().filter(|p| !p.as_os_str().is_empty()) {
                let mut path = vec![bin.to_owned()];
                path.extend(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                ));
                cmd = cmd.env("PATH", std::env::join_paths(path)?);
            }
        } else {
            bail!("bpf-linker not found in PATH or ~/.cargo/bin; run `cargo xtask setup`");
        }
        cmd.run().context("building the eBPF object (lb-ebpf)")?;
        let object = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
        if !object.is_file() {
            bail!("the eBPF build succeeded but {} is missing", object.display());
        }
        Ok(object)
    }

    fn build(&self, release: bool) -> Result<Built> {
        let t = Instant::now();
        let object = self.build_ebpf()?;
        eprintln!(
            "xtask: eBPF object built in {:.1}s: {}",
            t.elapsed().as_secs_f64(),
            object.display()
        );

        let t = Instant::now();
        let mut cmd = self.cargo().env("LB_EBPF_OBJECT", &object).args([
            "build",
            "-p",
            "lb-userspace",
            "-p",
            "lb-tests",
        ]);
        if release {
            cmd = cmd.arg("--release");
        }
        cmd.run()?;
        let bin = self.target.join(if release { "release" } else { "debug" });
        eprintln!(
            "xtask: lb built in {:.1}s: {}",
            t.elapsed().as_secs_f64(),
            bin.display()
        );
        Ok(Built {
            object,
            lb: bin.join("lb"),
            testsrv: bin.join("lb-testsrv"),
            demo: bin.join("lb-demo"),
        })
    }

    fn test(&self, args: &[OsString]) -> Result<()> {
        let start = Instant::now();
        setup::setup()?;
        self.lint()?;
        let built = self.build(false)?;
        // The .deb of the debug build, checked by lb-tests' package.rs.
        let deb = self.package(false)?;
        // lb-microbench (debug), for the bench smoke test's kernel figures.
        self.cargo()
            .env("LB_EBPF_OBJECT", &built.object)
            .args([
                "build",
                "-p",
                "xtask",
                "--features",
                "micro",
                "--bin",
                "lb-microbench",
            ])
            .run()
            .context("building lb-microbench")?;
        let microbench = self.target.join("debug/lb-microbench");
        let suites: [(&str, Cmd); 2] = [
            (
                "lb-common (no features)",
                self.cargo().args(["test", "-p", "lb-common"]).args(args),
            ),
            (
                "workspace",
                self.cargo()
                    .env("LB_EBPF_OBJECT", &built.object)
                    .env("LB_REQUIRE_EBPF", "1")
                    .env("LB_BIN", &built.lb)
                    .env("LB_TESTSRV", &built.testsrv)
                    .env("LB_DEB", &deb)
                    .env("LB_MICROBENCH", &microbench)
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .args(args),
            ),
        ];
        let mut failed = Vec::new();
        for (name, mut cmd) in suites {
            match cmd.status() {
                Ok(s) if s.success() => {}
                Ok(s) => failed.push(format!("{name} ({s})")),
                Err(e) => failed.push(format!("{name} ({e:#})")),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if failed.is_empty() {
            eprintln!("xtask test: OK: lb-common and workspace tests passed, eBPF required ({secs:.0}s)");
            Ok(())
        } else {
            eprintln!("xtask test: FAILED: {} ({secs:.0}s)", failed.join(", "));
            bail!("tests failed: {}", failed.join(", "))
        }
    }

    fn demo(&self, args: &[OsString]) -> Result<()> {
        setup::setup()?;
        let built = self.build(false)?;
        Cmd::new(&built.demo)
            .env("LB_BIN", &built.lb)
            .env("LB_TESTSRV", &built.testsrv)
            .args(args)
            .current_dir(&self.root)
            .run()
    }
}

/// Variables that cargo and rustup set for the process they run (us) and that would leak into the
/// nested nightly build: toolchain selection, compiler and wrappers, flags, target dir, and the
/// per-package `CARGO_*` variables. Kept: `CARGO_HOME`, network, registry and terminal settings.
fn is_inherited_build_var(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO",
    ];
    const KEEP_PREFIX: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    EXACT.contains(&key) || (key.starts_with("CARGO_") && !KEEP_PREFIX.iter().any(|p| key.starts_with(p)))
}

/// The workspace target directory: from `cargo metadata` (honours `CARGO_TARGET_DIR` and cargo
/// config), else `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir(root: &Path, cargo: &OsString) -> PathBuf {
    let from_metadata = Cmd::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .probe()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
        .and_then(|meta| meta["target_directory"].as_str().map(PathBuf::from));
    from_metadata.unwrap_or_else(|| match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    })
}
