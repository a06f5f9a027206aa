//! The state file: its format round trip, the commands it yields, the atomic write, and how a bad
//! file is refused.

use super::*;
use crate::engine::Origin;
use crate::state::tests::{backend, service};
use crate::state::{State, TransitionKind};
use crate::testlog::logged;

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
            "update 2 backends of web: b1 (10.1.1.2:80): weight 1, backup false, state Drain, route \"b1\"; \
             b2 (10.1.2.2:80): weight 7, backup false, state Active, route \"b2\"",
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
    assert_eq!(loaded.commands().len(), 2, "one update of b1 and b2, one add");
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
    // A bad backend inside is refused too, never half-read, and checked as a request would be.
    let mut bad_address = good.clone();
    bad_address["services"][0]["backend"][0]["address"] = "nowhere".into();
    corrupt(&bad_address.to_string());
    let mut bad_weight = good.clone();
    bad_weight["services"][0]["backend"][1]["weight"] = 999.into();
    let message = corrupt(&bad_weight.to_string());
    assert!(
        message.starts_with("services[0] (web): ") && message.contains("weight"),
        "{message}"
    );
    let mut twice = good;
    let web = twice["base"][0].clone();
    twice["base"].as_array_mut().unwrap().push(web);
    assert!(corrupt(&twice.to_string()).contains("base[1]: service web is listed twice"));
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

/// An engine over a fake proxy datapath started from `config` (written to `dir/lb.toml`).
fn engine(dir: &Path, config: &str) -> Engine {
    let path = dir.join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let config = Config::load(&path).unwrap();
    crate::datapath::fake::engine(
        config,
        &[
            crate::config::DatapathKind::Proxy,
            crate::config::DatapathKind::Ajp,
        ],
    )
    .unwrap()
}

fn config_text(state_file: &Path) -> String {
    format!(
        "ring_size = 1009\nstate_file = \"{}\"\n[[service]]\nname = \"web\"\nlisten = \"10.0.0.100:80\"\n\
         [service.health]\nkind = \"none\"\n[[service.backend]]\nname = \"b1\"\naddress = \"10.1.1.2:80\"\n\
         [[service.backend]]\nname = \"b2\"\naddress = \"10.1.2.2:80\"\n",
        state_file.display()
    )
}

fn backends(e: &Engine) -> Vec<(String, crate::config::AdminState, u32)> {
    let snap = e.balancer().snapshot();
    let svc = snap.state.service("web").unwrap();
    svc.backends
        .iter()
        .map(|b| (b.config.name.clone(), b.config.state, b.config.weight))
        .collect()
}

/// Runs `commands` on `e` as the operator (uid 0) would.
fn by_operator(e: &Engine, commands: impl IntoIterator<Item = Command>) {
    for c in commands {
        e.execute_by(c, &Origin::Operator { uid: Some(0) }).unwrap();
    }
}

fn drain_b1() -> Command {
    Command::SetState {
        service: "web".into(),
        backend: "b1".into(),
        state: crate::config::AdminState::Drain,
    }
}

#[test]
fn an_engine_restarted_with_a_state_file_keeps_its_runtime_changes() {
    use crate::config::AdminState::{Active, Drain};
    let dir = temp_dir("engine");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    assert!(state_file.exists(), "written at start");
    by_operator(
        &first,
        [
            drain_b1(),
            Command::AddBackend {
                service: "web".into(),
                backend: backend("b3", "10.1.3.2:80"),
            },
        ],
    );
    first
        .execute_by(
            Command::SetHealth {
                service: "web".into(),
                backend: "b2".into(),
                health: crate::state::Health::Down,
            },
            &Origin::Health {
                reason: "connect refused".into(),
            },
        )
        .unwrap();
    let expected = vec![
        ("b1".into(), Drain, 1),
        ("b2".into(), Active, 1),
        ("b3".into(), Active, 1),
    ];
    assert_eq!(backends(&first), expected);
    drop(first);

    let second = engine(&dir, &config_text(&state_file));
    assert_eq!(backends(&second), expected);
    let stats = second.stats();
    let b = |name: &str| {
        stats.services[0]
            .backends
            .iter()
            .find(|b| b.name == name)
            .unwrap()
            .clone()
    };
    // The history came back: b2's fall with its reason, b1's drain by the operator, then by the file.
    let b2 = b("b2");
    assert_eq!(b2.health_transitions, 1);
    assert_eq!(b2.transitions[0].reason, "health check: connect refused");
    let reasons: Vec<_> = b("b1").transitions.iter().map(|t| t.reason.clone()).collect();
    assert_eq!(reasons, ["operator uid 0", "state file at start"]);
    // A reload of the unchanged config keeps the restored changes.
    second.reload().unwrap();
    assert_eq!(backends(&second), expected);
    drop(second);

    // A corrupt file is set aside and the engine starts from the config.
    std::fs::write(
        &state_file,
        "{\"format\": \"lb-state\", \"version\": 1, \"base\": [",
    )
    .unwrap();
    let third = engine(&dir, &config_text(&state_file));
    assert_eq!(
        backends(&third),
        vec![("b1".into(), Active, 1), ("b2".into(), Active, 1)]
    );
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // And a fresh file was written for the state it started with.
    assert!(
        StateFile::load(&state_file)
            .unwrap()
            .unwrap()
            .commands()
            .is_empty()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An AJP service with both secrets, as an `add-service` request makes it.
fn ajp_service() -> ServiceConfig {
    ServiceConfig::from_fields(serde_json::json!({
        "name": "sx",
        "listen": "10.0.0.100:8009",
        "protocol": "ajp",
        "datapath": "ajp",
        "health": {"kind": "none"},
        "ajp": {"secret": "TOPSECRET123", "backend_secret": "BACKSECRET456"},
        "backend": [{"address": "10.1.1.2:8009"}],
    }))
    .unwrap()
}

fn has_secrets(text: &str) -> bool {
    text.contains("TOPSECRET123") || text.contains("BACKSECRET456")
}

#[test]
fn the_file_keeps_the_ajp_secrets_operators_never_see() {
    let dir = temp_dir("secrets");
    let path = dir.join("state.json");
    let mut services = base();
    services.push(ajp_service());
    Persist::new(path.clone(), base())
        .save(&Snapshot::new(state_of(&services)))
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(has_secrets(&std::fs::read_to_string(&path).unwrap()));
    // Read back: the same secrets, and the change that restores the service carries them.
    let loaded = StateFile::load(&path).unwrap().unwrap();
    let sx = loaded.services.iter().find(|s| s.name == "sx").unwrap();
    assert_eq!(sx, &ajp_service());
    let ajp = sx.ajp.as_ref().unwrap();
    assert_eq!(
        (
            ajp.secret.as_ref().unwrap().0.as_str(),
            ajp.backend_secret.as_ref().unwrap().0.as_str()
        ),
        ("TOPSECRET123", "BACKSECRET456")
    );
    assert_eq!(
        loaded.commands(),
        [Command::AddService {
            service: ajp_service()
        }]
    );
    // What operators see (JSON output, a request's JSON form, Debug) still says "(hidden)".
    let shown = serde_json::to_string(sx).unwrap();
    assert!(!has_secrets(&shown), "{shown}");
    assert!(shown.contains(r#""secret":"(hidden)""#) && shown.contains(r#""backend_secret":"(hidden)""#));
    let request = crate::control::protocol::Request::Change(Command::AddService { service: sx.clone() });
    assert!(!has_secrets(&request.to_value().unwrap().to_string()));
    assert!(!has_secrets(&format!("{loaded:?}")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_ajp_service_added_at_runtime_keeps_its_secrets_across_a_restart() {
    let dir = temp_dir("secrets-engine");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    let operator = Origin::Operator { uid: Some(0) };
    first
        .execute_by(
            Command::AddService {
                service: ajp_service(),
            },
            &operator,
        )
        .unwrap();
    drop(first);
    let second = engine(&dir, &config_text(&state_file));
    let snap = second.balancer().snapshot();
    let sx = &snap.state.service("sx").unwrap().settings;
    assert_eq!(sx.ajp, ajp_service().ajp);
    let status = serde_json::to_string(&second.status(None).unwrap()).unwrap();
    assert!(status.contains("\"sx\"") && !has_secrets(&status), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_secret_an_older_lb_saved_as_hidden_is_not_restored() {
    use crate::config::AdminState::{Active, Drain};
    let dir = temp_dir("secrets-old");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    let operator = Origin::Operator { uid: Some(0) };
    for command in [
        Command::AddService {
            service: ajp_service(),
        },
        Command::SetState {
            service: "web".into(),
            backend: "b1".into(),
            state: Drain,
        },
    ] {
        first.execute_by(command, &operator).unwrap();
    }
    drop(first);
    // The file as an older lb wrote it: every secret replaced by "(hidden)".
    let text = std::fs::read_to_string(&state_file).unwrap();
    std::fs::write(
        &state_file,
        text.replace("TOPSECRET123", "(hidden)")
            .replace("BACKSECRET456", "(hidden)"),
    )
    .unwrap();

    let (second, log) = logged(|| engine(&dir, &config_text(&state_file)));
    // The service is not restored with "(hidden)" as its secret, and the log says why and what to do.
    assert!(second.balancer().snapshot().state.service("sx").is_err());
    assert!(
        log.contains("state file: change not restored")
            && log.contains(
                "service sx: its AJP secret was saved as \"(hidden)\" by an older lb, which did not keep \
                 secrets in the state file; add the service again with its secrets"
            ),
        "{log}"
    );
    // The rest of the file is restored, and the file is kept (not set aside), now without sx.
    assert_eq!(
        backends(&second),
        vec![("b1".into(), Drain, 1), ("b2".into(), Active, 1)]
    );
    assert!(
        std::fs::read_dir(&dir)
            .unwrap()
            .all(|e| { !e.unwrap().file_name().to_string_lossy().contains("corrupt") })
    );
    drop(second);
    let file = StateFile::load(&state_file).unwrap().unwrap();
    assert!(file.services.iter().all(|s| s.name != "sx"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// [`engine`], with the fake datapath refusing to add a service on `refuse_listen` (as a datapath
/// that cannot bind it); the datapath's journal too.
fn engine_refusing(
    dir: &Path,
    config: &str,
    refuse_listen: &str,
) -> (
    Engine,
    std::sync::Arc<std::sync::Mutex<crate::datapath::fake::Journal>>,
) {
    use crate::datapath::Datapath;
    use crate::datapath::fake::FakeDatapath;
    let path = dir.join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let config = Config::load(&path).unwrap();
    let (fake, journal) = FakeDatapath::new(crate::config::DatapathKind::Proxy);
    journal.lock().unwrap().refuse_listen = Some(refuse_listen.parse().unwrap());
    let (events, _) = tokio::sync::mpsc::channel(16);
    let engine = Engine::assemble(config, events, tokio_util::sync::CancellationToken::new(), |_| {
        Ok(vec![Box::new(fake) as Box<dyn Datapath>])
    })
    .unwrap();
    (engine, journal)
}

fn listen_of(e: &Engine, service: &str) -> Option<String> {
    let snap = e.balancer().snapshot();
    snap.state
        .service(service)
        .ok()
        .map(|s| s.settings.listen.to_string())
}

#[test]
fn a_move_in_the_file_that_cannot_come_up_leaves_the_service_as_the_config_has_it() {
    use crate::config::AdminState::{Active, Drain};
    let dir = temp_dir("move");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    let operator = Origin::Operator { uid: Some(0) };
    // Moved on the control socket (removed, then added on another address), and a change of
    // another kind that does fit.
    let mut moved = first.balancer().snapshot().state.service("web").unwrap().config();
    moved.listen = "192.0.2.55:80".parse().unwrap();
    moved.backends[1].state = Drain;
    for command in [
        Command::RemoveService {
            service: "web".into(),
        },
        Command::AddService { service: moved },
        Command::AddService {
            service: service("api", "10.0.0.101:80", vec![backend("a1", "10.1.4.2:80")]),
        },
    ] {
        first.execute_by(command, &operator).unwrap();
    }
    drop(first);

    // The address cannot be bound at the next start: the move is skipped and logged like any
    // change that no longer fits, and web runs as the config file has it.
    let ((second, journal), log) =
        logged(|| engine_refusing(&dir, &config_text(&state_file), "192.0.2.55:80"));
    assert_eq!(
        listen_of(&second, "web").as_deref(),
        Some("10.0.0.100:80"),
        "{log}"
    );
    assert_eq!(
        backends(&second),
        vec![("b1".into(), Active, 1), ("b2".into(), Active, 1)]
    );
    assert_eq!(
        journal.lock().unwrap().forwarding.get("web").cloned(),
        Some(vec!["b1".to_string(), "b2".to_string()]),
        "the datapath forwards web again"
    );
    assert_eq!(listen_of(&second, "api").as_deref(), Some("10.0.0.101:80"));
    for expected in [
        "state file: change not restored",
        "add service web on 192.0.2.55:80",
        "state file: service web kept as the config file has it, on 10.0.0.100:80",
        "changes=1 not_restored=1",
        "restored from the state file: add service api on 10.0.0.101:80",
    ] {
        assert!(log.contains(expected), "{expected:?} not in:\n{log}");
    }
    drop(second);

    // The file written since holds web as the config has it: later starts keep it too.
    let file = StateFile::load(&state_file).unwrap().unwrap();
    let described: Vec<String> = file.commands().iter().map(crate::engine::describe).collect();
    assert_eq!(described, ["add service api on 10.0.0.101:80"]);
    let third = engine(&dir, &config_text(&state_file));
    assert_eq!(listen_of(&third, "web").as_deref(), Some("10.0.0.100:80"));
    assert_eq!(listen_of(&third, "api").as_deref(), Some("10.0.0.101:80"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// [`StateFile::load`] of `path` on a thread; panics if it blocks, after unblocking it with
/// `unblock`.
fn load_unblocked(path: &Path, unblock: impl FnOnce()) -> Result<Option<StateFile>, PersistError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || tx.send(StateFile::load(&p)).unwrap());
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(loaded) => loaded,
        Err(_) => {
            unblock();
            panic!("loading {} blocked: {:?}", path.display(), rx.recv());
        }
    }
}

#[test]
fn only_a_regular_file_is_read_and_anything_else_is_set_aside_without_blocking() {
    let dir = temp_dir("fifo");
    let path = dir.join("state.json");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // No writer: reading it would wait forever.
    let loaded = load_unblocked(&path, || {
        let _writer = std::fs::OpenOptions::new().write(true).open(&path);
    });
    let e = loaded.unwrap_err();
    assert!(
        matches!(e, PersistError::NotRegular { what: "a FIFO", .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("state.json is a FIFO, not a regular file"),
        "{e}"
    );
    // Set aside (renamed, still a FIFO) and the engine starts from the config, writing a fresh file.
    let (started, log) = logged(|| engine(&dir, &config_text(&path)));
    assert!(
        log.contains("state file not used") && log.contains("is a FIFO") && log.contains("set aside as"),
        "{log}"
    );
    assert_eq!(backends(&started).len(), 2);
    drop(started);
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    use std::os::unix::fs::FileTypeExt;
    assert!(aside[0].file_type().unwrap().is_fifo());
    assert!(std::fs::metadata(&path).unwrap().is_file());
    assert!(StateFile::load(&path).unwrap().unwrap().commands().is_empty());

    // A symlink to a device (never read whole) and a directory are refused the same way.
    let zero = dir.join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let e = load_unblocked(&zero, || {}).unwrap_err();
    assert!(
        matches!(
            e,
            PersistError::NotRegular {
                what: "a character device",
                ..
            }
        ),
        "{e:?}"
    );
    let e = StateFile::load(&dir).unwrap_err();
    assert!(
        matches!(
            e,
            PersistError::NotRegular {
                what: "a directory",
                ..
            }
        ),
        "{e:?}"
    );
    // A symlink to a regular file is read.
    let link = dir.join("link.json");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(StateFile::load(&link).unwrap().is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_larger_than_a_state_file_may_be_is_not_read() {
    let dir = temp_dir("huge");
    let path = dir.join("state.json");
    // Sparse: 65 MiB that take no disk.
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MAX_FILE_SIZE + (1 << 20)).unwrap();
    drop(f);
    let e = StateFile::load(&path).unwrap_err();
    assert!(
        matches!(e, PersistError::TooLarge { size, .. } if size == MAX_FILE_SIZE + (1 << 20)),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{} is 68157440 bytes, more than the 67108864 bytes a state file may have",
            path.display()
        )
    );
    // Set aside like any bad file; the engine starts from the config.
    let (started, log) = logged(|| engine(&dir, &config_text(&path)));
    assert!(
        log.contains("more than the 67108864 bytes") && log.contains("set aside as"),
        "{log}"
    );
    assert_eq!(backends(&started).len(), 2);
    drop(started);
    assert!(StateFile::load(&path).unwrap().unwrap().commands().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the runtime changed comes back; what the config file changed while lb was stopped is
/// not undone by it: b1 was drained at runtime, and its weight then raised in the file.
#[test]
fn a_restore_keeps_what_the_config_file_changed_while_lb_was_stopped() {
    use crate::config::AdminState::{Active, Drain};
    let dir = temp_dir("edited");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    by_operator(&first, [drain_b1()]);
    first.flush_state_file();
    drop(first);
    let edited = config_text(&state_file).replace(
        "name = \"b1\"\naddress = \"10.1.1.2:80\"\n",
        "name = \"b1\"\naddress = \"10.1.1.2:80\"\nweight = 3\n",
    );
    assert_ne!(edited, config_text(&state_file));
    let second = engine(&dir, &edited);
    assert_eq!(
        backends(&second),
        vec![("b1".into(), Drain, 3), ("b2".into(), Active, 1)]
    );
    drop(second);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A backend the config file dropped while lb was stopped does not hold back the runtime changes
/// of the others: b1's drain and b2's weight were saved as one change; b2 is gone, b1 is drained.
#[test]
fn a_restore_without_a_backend_the_file_dropped_restores_the_others() {
    use crate::config::AdminState::Drain;
    let dir = temp_dir("dropped");
    let state_file = dir.join("state.json");
    let first = engine(&dir, &config_text(&state_file));
    by_operator(
        &first,
        [
            drain_b1(),
            Command::SetWeight {
                service: "web".into(),
                backend: "b2".into(),
                weight: 7,
            },
        ],
    );
    first.flush_state_file();
    drop(first);
    let without_b2 = config_text(&state_file).replace(
        "[[service.backend]]\nname = \"b2\"\naddress = \"10.1.2.2:80\"\n",
        "",
    );
    assert_ne!(without_b2, config_text(&state_file));
    let (second, log) = logged(|| engine(&dir, &without_b2));
    assert_eq!(backends(&second), vec![("b1".into(), Drain, 1)], "{log}");
    assert!(log.contains("backend change not restored"), "{log}");
    drop(second);
    std::fs::remove_dir_all(&dir).unwrap();
}
