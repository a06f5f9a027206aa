//! Error texts on real paths of the `lb` binary name each cause once.

use std::process::Command;

fn lb(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "lb {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_missing_config_file_names_its_cause_once() {
    let path = std::env::temp_dir().join(format!("lb-error-text-{}/missing.toml", std::process::id()));
    let path = path.to_str().unwrap();
    let os = std::fs::read(path).unwrap_err().to_string();
    for args in [vec!["check-config", path], vec!["run", "-c", path]] {
        let stderr = lb(&args);
        assert!(
            stderr.contains(&format!("{path}: cannot read")),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.matches(&os).count(), 1, "{args:?}: {stderr}");
    }
}
