//! Embeds the eBPF object (built by `cargo xtask build`) into `lb` when it exists.
//!
//! The object is taken from `$LB_EBPF_OBJECT`, else from the default output path of the lb-ebpf crate.
//! If found, it is copied to `$OUT_DIR/lb-ebpf.o` and `--cfg lb_ebpf_object` is set, so
//! `src/ebpf.rs` includes it. If not, `lb` still builds (plain `cargo build` / `cargo clippy` on a
//! machine without bpf-linker) and reports at run time that it has no datapath.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

const ENV_OBJECT: &str = "LB_EBPF_OBJECT";
const CFG: &str = "lb_ebpf_object";

fn main() {
    println!("cargo::rustc-check-cfg=cfg({CFG})");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed={ENV_OBJECT}");

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("lb-userspace lives inside the workspace");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("lb-ebpf.o");

    let (object, explicit) = match env::var_os(ENV_OBJECT) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (
            workspace.join("lb-ebpf/target/bpfel-unknown-none/release/lb-ebpf"),
            false,
        ),
    };

    if object.is_file() {
        println!("cargo::rerun-if-changed={}", object.display());
        fs::copy(&object, &out).unwrap_or_else(|e| {
            panic!(
                "copying the eBPF object {} to {}: {e}",
                object.display(),
                out.display()
            )
        });
        println!("cargo::rustc-cfg={CFG}");
        return;
    }

    assert!(
        !explicit,
        "{ENV_OBJECT}={} does not exist; run `cargo xtask build` or unset {ENV_OBJECT}",
        object.display()
    );
    // A missing rerun-if-changed path would make cargo rerun this script (and rebuild the crate) on
    // every build, so watch the nearest existing ancestor instead: it changes when the object appears.
    let _ = fs::remove_file(&out);
    let ebpf_crate = workspace.join("lb-ebpf");
    let watch = nearest_existing(&object, &ebpf_crate).unwrap_or(&ebpf_crate);
    println!("cargo::rerun-if-changed={}", watch.display());
}

/// The nearest existing directory above `path`, as long as it is inside `within`.
fn nearest_existing<'a>(path: &'a Path, within: &Path) -> Option<&'a Path> {
    path.ancestors()
        .skip(1)
        .take_while(|p| p.starts_with(within))
        .find(|p| p.is_dir())
}
