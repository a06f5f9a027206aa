//! The state file: its format round trip, the commands it yields, the atomic write, and how a bad
//! file is refused.

use super::*;
use crate::state::tests::{backend, service};
use crate::state::{State, TransitionKind};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-persist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn state_of(services: &[ServiceConfig]) -> State {
    let mut state = State::new(0, 101);
    for s in services {
        state.apply(Command::AddService { service: s.clone() }).unwrap();
    }
    state
}

fn base() -> Vec<ServiceConfig> {
    vec![service(
        "web",
        "10.0.0.100:80",
        vec![backend("b1", "10.1.1.2:80"), backend("b2", "10.1.2.2:80")],
    )]
}

fn drained() -> Transition {
    Transition {
        unix_ms: 1_700_000_000_000,
        kind: TransitionKind::State,
        from: "active".into(),
        to: "drain".into(),
        reason: "operator uid 0".into(),
    }
}

/// A state with b1 drained, b3 added, weight 7 on b2, and b1's transition recorded.
fn changed() -> Snapshot {
    let mut state = state_of(&base());
    for c in [
        Command::SetState {
            service: "web".into(),
            backend: "b1".into(),
            state: crate::config::AdminState::Drain,
        },
        Command::SetWeight {
            service: "web".into(),
            backend: "b2".into(),
            weight: 7,
        },
        Command::AddBackend {
            service: "web".into(),
            backend: backend("b3", "10.1.3.2:80"),
        },
    ] {
        state.apply(c).unwrap();
    }
    let snap = Snapshot::new(state);
    let svc = snap.state.service("web").unwrap();
    snap.runtime(svc, svc.backend("b1").unwrap())
        .transitions
        .lock()
        .unwrap()
        .record(drained());
    snap
}

#[test]
fn the_file_holds_the_runtime_changes_and_the_history() {
    let file = StateFile::of(&changed(), &base());
    let text = serde_json::to_string_pretty(&file).unwrap();
    let back = StateFile::parse(&text, Path::new("/x")).unwrap();
    assert_eq!(back, file);
    assert_eq!(back.format, FORMAT_NAME);
    assert_eq!(back.version, FORMAT_VERSION);
    let described: Vec<String> = back.commands().iter().map(crate::engine::describe).collect();
    assert_eq!(
        described,
        [
            "update backend b1 (10.1.1.2:80) of web: weight 1, backup false, state Drain",
            "update backend b2 (10.1.2.2:80) of web: weight 7, backup false, state Active",
            "add backend b3 (10.1.3.2:80) to web",
        ]
    );
    let b1 = &back.transitions["web"]["b1"];
    assert_eq!((b1.health, b1.state, b1.recent.clone()), (0, 1, vec![drained()]));
    // Backends without history are left out.
    assert_eq!(back.transitions["web"].len(), 1);
}

#[test]
fn no_change_means_no_commands_and_removed_services_come_back_removed() {
    let snap = Snapshot::new(state_of(&base()));
    assert!(StateFile::of(&snap, &base()).commands().is_empty());
    let empty = Snapshot::new(State::new(0, 101));
    let described: Vec<String> = StateFile::of(&empty, &base())
        .commands()
        .iter()
        .map(crate::engine::describe)
        .collect();
    assert_eq!(described, ["remove service web"]);
}

#[test]
fn a_restored_log_goes_on_with_what_the_start_recorded() {
    let saved = SavedLog {
        health: 4,
        state: 1,
        recent: vec![drained()],
    };
    let mut now = TransitionLog::default();
    let mut later = drained();
    later.unix_ms += 1;
    later.reason = "state file at start".into();
    now.record(later.clone());
    let log = saved.then(&now);
    assert_eq!((log.health, log.state), (4, 2));
    assert_eq!(log.recent().cloned().collect::<Vec<_>>(), vec![drained(), later]);
}

#[test]
fn the_write_is_atomic_and_replaces_the_file() {
    let dir = temp_dir("atomic");
    let path = dir.join("sub").join("state.json");
    write_atomic(&path, b"one").unwrap();
    write_atomic(&path, b"two").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.json"]);
    // A write that cannot happen leaves the old file as it was.
    let blocked = dir.join("sub").join("state.json").join("x");
    assert!(write_atomic(&blocked, b"three").is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn persist_saves_what_load_reads() {
    let dir = temp_dir("save");
    let path = dir.join("state.json");
    assert_eq!(StateFile::load(&path).unwrap(), None);
    let persist = Persist::new(path.clone(), base());
    persist.save(&changed()).unwrap();
    let loaded = StateFile::load(&path).unwrap().expect("written");
    assert_eq!(loaded.commands().len(), 3);
    persist.rebase(loaded.services.clone());
    persist.save(&changed()).unwrap();
    assert!(StateFile::load(&path).unwrap().unwrap().commands().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_files_are_refused_with_what_is_wrong() {
    let p = Path::new("/var/lib/lb/state.json");
    let good = serde_json::to_value(StateFile::of(&changed(), &base())).unwrap();
    let corrupt = |text: &str| match StateFile::parse(text, p) {
        Err(PersistError::Corrupt { message, .. }) => message,
        other => panic!("{text}: {other:?}"),
    };
    assert!(corrupt("{\"format\": \"lb-state\", \"vers").contains("EOF"));
    assert!(corrupt("[]").contains("\"format\": \"lb-state\""));
    assert!(corrupt("{\"format\": \"other\", \"version\": 1}").contains("format"));
    let mut no_version = good.clone();
    no_version.as_object_mut().unwrap().remove("version");
    assert!(corrupt(&no_version.to_string()).contains("version"));
    let mut truncated = good.clone();
    truncated.as_object_mut().unwrap().remove("services");
    assert!(corrupt(&truncated.to_string()).contains("services"));
    let mut future = good.clone();
    future["version"] = 2.into();
    let e = StateFile::parse(&future.to_string(), p).unwrap_err();
    assert!(matches!(e, PersistError::Version { found: 2, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "/var/lib/lb/state.json has format version 2, this lb reads version 1"
    );
    // A bad backend inside is refused too, never half-read.
    let mut bad_weight = good;
    bad_weight["services"][0]["backend"][0]["address"] = "nowhere".into();
    corrupt(&bad_weight.to_string());
}

#[test]
fn a_bad_file_is_set_aside_beside_the_original() {
    let dir = temp_dir("aside");
    let path = dir.join("state.json");
    std::fs::write(&path, "garbage").unwrap();
    assert!(StateFile::load(&path).is_err());
    let aside = set_aside(&path).unwrap();
    assert!(!path.exists());
    let name = aside.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("state.json.corrupt-"), "{name}");
    assert_eq!(std::fs::read_to_string(&aside).unwrap(), "garbage");
    std::fs::remove_dir_all(&dir).unwrap();
}
