//! The Debian package built by `cargo xtask package` (`cargo xtask test` builds it and passes its
//! path as `$LB_DEB`): its contents, its conffile, and an install with `dpkg -i` into a scratch
//! root, where the binary runs, `man -l` renders the man page, the bash completion loads and
//! completes, and `systemd-analyze verify` accepts the unit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lb_tests::TempDir;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `$LB_DEB`, or None (with a SKIP line) when the test runs outside `cargo xtask test`.
fn deb() -> Option<PathBuf> {
    match std::env::var_os("LB_DEB").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "SKIP: the .deb tests need $LB_DEB (`cargo xtask test` builds it with `cargo xtask package`)"
            );
            None
        }
    }
}

const FILES: &[&str] = &[
    "./usr/bin/lb",
    "./usr/lib/systemd/system/lb.service",
    "./etc/lb/lb.toml",
    "./usr/share/man/man1/lb.1.gz",
    "./usr/share/man/man1/lb-run.1.gz",
    "./usr/share/man/man1/lb-backend-drain.1.gz",
    "./usr/share/bash-completion/completions/lb",
    "./usr/share/zsh/vendor-completions/_lb",
    "./usr/share/fish/vendor_completions.d/lb.fish",
    "./usr/share/doc/lb/examples/lb.toml",
    "./usr/share/doc/lb/examples/tcp.toml",
    "./usr/share/doc/lb/examples/tomcat-ajp.toml",
];

#[test]
fn deb_holds_binary_unit_conffile_man_page_completions_and_examples() {
    let Some(deb) = deb() else { return };
    let contents = text(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb)));
    for f in FILES {
        assert!(
            contents.lines().any(|l| l.ends_with(f)),
            "{f} missing from the .deb:\n{contents}"
        );
    }
    let conffiles = text(&run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/lb/lb.toml");
    let control = text(&run(Command::new("dpkg-deb").arg("--field").arg(&deb)));
    assert!(control.contains("Package: lb\n"), "{control}");
}

#[test]
fn deb_installs_into_a_scratch_root_and_everything_in_it_works() {
    let Some(deb) = deb() else { return };
    let dir = TempDir::new("deb");
    let root = dir.path().join("root");
    let admin = root.join("var/lib/dpkg");
    for d in ["updates", "info"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    // The scratch root has no libc6 package registered: --force-depends. The package has no
    // maintainer scripts, so nothing runs chrooted.
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-not-root", "--force-depends", "--log=/dev/null", "-i"])
        .arg(&deb));
    let listed = text(&run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-L", "lb"])));
    assert!(listed.contains("/usr/bin/lb"), "{listed}");

    // The binary runs.
    let lb = root.join("usr/bin/lb");
    let version = text(&run(Command::new(&lb).arg("--version")));
    assert_eq!(version.trim(), format!("lb {}", env!("CARGO_PKG_VERSION")));
    // The conffile is a valid config whose socket the client commands find.
    let check = text(&run(Command::new(&lb)
        .arg("check-config")
        .arg(root.join("etc/lb/lb.toml"))));
    assert!(check.contains(": ok"), "{check}");

    // man renders the page.
    let man = run(Command::new("man")
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/lb.1.gz")));
    let page = text(&man);
    assert!(
        page.contains("NAME") && page.contains("lb - Layer-4 TCP/AJP load balancer"),
        "{page}"
    );
    for sub in ["completions", "cleanup", "backend", "status"] {
        assert!(page.contains(sub), "man page does not mention {sub}:\n{page}");
    }

    // The pages the main page points to exist and render too.
    let drain = text(&run(Command::new("man")
        .env("MANPAGER", "cat")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/lb-backend-drain.1.gz"))));
    assert!(
        drain.contains("lb-backend-drain") && drain.contains("--config"),
        "{drain}"
    );

    // bash loads the completion and completes subcommands and options.
    let script = root.join("usr/share/bash-completion/completions/lb");
    let complete = |words: &str, cword: usize| -> String {
        let out = run(Command::new("bash").arg("-c").arg(format!(
            "set -e; source '{}'; complete -p lb; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _lb lb \"${{COMP_WORDS[$COMP_CWORD]}}\" \
             \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            script.display()
        )));
        text(&out)
    };
    let out = complete("lb back", 1);
    assert!(out.contains("-F _lb lb"), "{out}");
    assert!(
        out.lines().last().unwrap().split(' ').any(|w| w == "backend"),
        "{out}"
    );
    let out = complete("lb backend dr", 2);
    assert!(
        out.lines().last().unwrap().split(' ').any(|w| w == "drain"),
        "{out}"
    );

    // systemd accepts the unit (its ExecStart pointed at the installed binary, since the host's
    // /usr/bin/lb may not exist).
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/lb.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(
        units.join("lb.service"),
        unit.replace("/usr/bin/lb", lb.to_str().unwrap()),
    )
    .unwrap();
    if Path::new("/usr/bin/systemd-analyze").exists() {
        run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join("lb.service")));
    } else {
        panic!("systemd-analyze missing: run `cargo xtask setup` (installs systemd)");
    }
}
