//! Engine behaviour on [`FakeDatapath`]s: commands, transactions, health events, reload diffs,
//! drain/maintenance/backup rules, failback and transitions. No root, no sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Engine, EngineError, Origin};
use crate::config::{AdminState, Config, DatapathKind};
use crate::datapath::Datapath;
use crate::datapath::fake::{Call, FakeDatapath, Journal};
use crate::health::HealthEvent;
use crate::state::{Command, Effect, Health, TransitionKind, tests::backend};

const BASE: &str = r#"
ring_size = 1009
[[service]]
name = "web"
listen = "10.0.0.100:80"
[service.health]
kind = "none"
[[service.backend]]
name = "b1"
address = "10.1.1.2:80"
[[service.backend]]
name = "b2"
address = "10.1.2.2:80"
[[service.backend]]
name = "b3"
address = "10.1.3.2:80"
"#;

/// An engine over a fake proxy datapath, with the config written to a file (for reloads).
struct Bed {
    engine: Engine,
    journal: Arc<Mutex<Journal>>,
    path: PathBuf,
}

/// `text` in a config file of its own (tests run in parallel: a file shared by two could be read
/// half written, which parses as a config without services).
fn config_file(text: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("lb-engine-test-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

impl Bed {
    fn new(text: &str) -> Bed {
        Bed::with_kinds(text, &[DatapathKind::Proxy]).0
    }

    /// One fake per kind; the journal of the first.
    fn with_kinds(text: &str, kinds: &[DatapathKind]) -> (Bed, Vec<Arc<Mutex<Journal>>>) {
        let path = config_file(text);
        let config = Config::load(&path).unwrap();
        let (events, _) = mpsc::channel::<HealthEvent>(16);
        let mut journals = Vec::new();
        let engine = Engine::assemble(config, events, CancellationToken::new(), |_| {
            Ok(kinds
                .iter()
                .map(|k| {
                    let (fake, journal) = FakeDatapath::new(*k);
                    journals.push(journal);
                    Box::new(fake) as Box<dyn Datapath>
                })
                .collect())
        })
        .unwrap();
        let bed = Bed {
            engine,
            journal: journals[0].clone(),
            path,
        };
        (bed, journals)
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.journal.lock().unwrap().calls)
    }

    fn run(&self, command: Command) -> Result<Effect, EngineError> {
        self.engine
            .execute_by(command, &Origin::Operator { uid: Some(7) })
    }

    fn set_state(&self, backend: &str, state: AdminState) {
        self.run(Command::SetState {
            service: "web".into(),
            backend: backend.into(),
            state,
        })
        .unwrap();
    }

    fn health(&self, backend: &str, health: Health) {
        let address: SocketAddr = {
            let b = self.engine.balancer.snapshot();
            b.state
                .service("web")
                .unwrap()
                .backend(backend)
                .unwrap()
                .config
                .address
        };
        self.engine.health_event(HealthEvent {
            service: "web".into(),
            backend: address,
            health,
            reason: "connect refused".into(),
            source: crate::health::HealthSource::Check,
        });
    }

    /// Which backend a client would reach (through the engine's `which`).
    fn which(&self, client: &str) -> Option<String> {
        self.engine.which("web", client).unwrap().backend
    }

    /// Which backend a client reaches, recording affinity like a datapath does on connect.
    fn connect(&self, client: &str) -> String {
        let b = &self.engine.balancer;
        let ip = client.parse().unwrap();
        let now = std::time::Instant::now();
        let c = b.choose("web", ip, now, &[]).unwrap();
        b.confirm("web", ip, c.chosen(), now);
        c.backend_name
    }

    fn reload(&self, text: &str) -> crate::control::protocol::ReloadView {
        std::fs::write(&self.path, text).unwrap();
        self.engine.reload_by(Some(0)).unwrap()
    }

    fn backend(&self, name: &str) -> crate::state::Backend {
        let snap = self.engine.balancer.snapshot();
        snap.state.service("web").unwrap().backend(name).unwrap().clone()
    }

    /// Transition counts and recent transitions of a backend of `web`.
    fn transitions(&self, name: &str) -> crate::runtime::TransitionLog {
        let snap = self.engine.balancer.snapshot();
        let svc = snap.state.service("web").unwrap();
        let runtime = snap.runtime(svc, svc.backend(name).unwrap());
        runtime.transitions.lock().unwrap().clone()
    }

    fn forwarding(&self, service: &str) -> Option<Vec<String>> {
        self.journal.lock().unwrap().forwarding.get(service).cloned()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn clients(n: u32) -> impl Iterator<Item = String> {
    (0..n).map(|i| format!("192.0.2.{}", i + 1))
}

#[test]
fn start_adds_the_config_services_then_finishes() {
    let bed = Bed::new(BASE);
    let calls = bed.calls();
    assert_eq!(
        calls,
        vec![Call::Apply(Effect::ServiceAdded("web".into())), Call::FinishStart]
    );
    assert_eq!(bed.forwarding("web").unwrap(), ["b1", "b2", "b3"]);
}

#[test]
fn a_service_without_its_datapath_is_refused() {
    let (events, _) = mpsc::channel(1);
    let config = Config::parse(BASE, "test").unwrap();
    let err = Engine::assemble(config, events, CancellationToken::new(), |_| Ok(Vec::new()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not running"), "{err}");
}

#[test]
fn add_and_remove_service() {
    let bed = Bed::new(BASE);
    bed.calls();
    let mut svc = crate::state::tests::service("api", "10.0.0.101:81", vec![backend("a1", "10.1.9.2:80")]);
    svc.health.kind = crate::config::HealthKind::None;
    bed.run(Command::AddService { service: svc.clone() }).unwrap();
    assert_eq!(bed.forwarding("api").unwrap(), ["a1"]);
    assert!(matches!(
        bed.run(Command::AddService { service: svc }),
        Err(EngineError::State(crate::state::StateError::ServiceExists(_)))
    ));
    bed.run(Command::RemoveService {
        service: "api".into(),
    })
    .unwrap();
    assert_eq!(bed.forwarding("api"), None);
    assert!(bed.engine.status(Some("api")).is_err());
    let calls = bed.calls();
    assert!(matches!(
        &calls[..],
        [
            Call::Apply(Effect::ServiceAdded(_)),
            Call::Apply(Effect::ServiceRemoved { .. })
        ]
    ));
}

#[test]
fn update_service_changes_settings_and_keeps_affinity() {
    let bed = Bed::new(BASE);
    let on = bed.connect("192.0.2.1");
    let mut settings = bed
        .engine
        .balancer
        .snapshot()
        .state
        .service("web")
        .unwrap()
        .settings
        .clone();
    settings.affinity_timeout = std::time::Duration::from_secs(60);
    assert_eq!(
        bed.run(Command::UpdateService {
            service: settings.clone()
        })
        .unwrap(),
        Effect::ServiceChanged("web".into())
    );
    assert_eq!(
        bed.run(Command::UpdateService { service: settings }).unwrap(),
        Effect::Nothing
    );
    let status = bed.engine.status(None).unwrap();
    assert_eq!(status.services[0].affinity_timeout_secs, 60);
    assert_eq!(bed.which("192.0.2.1").unwrap(), on);
}

#[test]
fn add_remove_and_update_backend() {
    let bed = Bed::new(BASE);
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: backend("b4", "10.1.4.2:80"),
    })
    .unwrap();
    assert_eq!(bed.forwarding("web").unwrap(), ["b1", "b2", "b3", "b4"]);
    let mut b4 = backend("b4", "10.1.4.2:80");
    b4.weight = 3;
    b4.backup = true;
    bed.run(Command::UpdateBackends {
        service: "web".into(),
        backends: vec![b4],
    })
    .unwrap();
    assert!(bed.backend("b4").config.backup);
    assert_eq!(bed.backend("b4").config.weight, 3);
    bed.run(Command::RemoveBackend {
        service: "web".into(),
        backend: "10.1.4.2:80".into(),
    })
    .unwrap();
    assert_eq!(bed.forwarding("web").unwrap(), ["b1", "b2", "b3"]);
    assert!(matches!(
        bed.run(Command::RemoveBackend {
            service: "web".into(),
            backend: "b4".into()
        }),
        Err(EngineError::State(crate::state::StateError::NoBackend { .. }))
    ));
}

#[test]
fn set_weight_moves_ring_slots_and_refuses_out_of_range() {
    let bed = Bed::new(BASE);
    let slots = |name: &str| {
        let s = bed.engine.status(None).unwrap();
        s.services[0]
            .backends
            .iter()
            .find(|b| b.name == name)
            .unwrap()
            .ring_slots
    };
    let before = slots("b1");
    bed.run(Command::SetWeight {
        service: "web".into(),
        backend: "b1".into(),
        weight: 4,
    })
    .unwrap();
    assert!(slots("b1") > before * 3 / 2, "{} vs {before}", slots("b1"));
    assert!(
        bed.run(Command::SetWeight {
            service: "web".into(),
            backend: "b1".into(),
            weight: 300
        })
        .is_err()
    );
    assert_eq!(bed.backend("b1").config.weight, 4);
}

#[test]
fn drain_keeps_known_clients_and_refuses_new_ones() {
    let bed = Bed::new(BASE);
    let known: Vec<(String, String)> = clients(60)
        .map(|c| {
            let b = bed.connect(&c);
            (c, b)
        })
        .collect();
    bed.set_state("b1", AdminState::Drain);
    for (c, b) in &known {
        assert_eq!(&bed.connect(c), b, "client {c} keeps its backend through a drain");
    }
    for i in 0..60 {
        assert_ne!(bed.connect(&format!("198.51.100.{i}")), "b1");
    }
}

#[test]
fn maintenance_moves_everybody_and_backups_take_over_only_without_primaries() {
    let bed = Bed::new(BASE);
    let mut spare = backend("spare", "10.1.9.2:80");
    spare.backup = true;
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: spare,
    })
    .unwrap();
    for c in clients(40) {
        assert_ne!(
            bed.connect(&c),
            "spare",
            "a backup takes nobody while primaries are up"
        );
    }
    bed.set_state("b1", AdminState::Maintenance);
    for c in clients(40) {
        assert_ne!(bed.connect(&c), "b1");
    }
    bed.set_state("b2", AdminState::Maintenance);
    bed.health("b3", Health::Down);
    for c in clients(40) {
        assert_eq!(bed.connect(&c), "spare");
    }
    let status = bed.engine.status(None).unwrap();
    assert!(status.services[0].on_backups);
}

#[test]
fn health_down_and_up_record_transitions_with_their_reason() {
    let bed = Bed::new(BASE);
    bed.health("b2", Health::Down);
    assert_eq!(bed.backend("b2").health, Health::Down);
    bed.health("b2", Health::Up);
    let log = bed.transitions("b2");
    assert_eq!(log.health, 2);
    let recent: Vec<_> = log.recent().cloned().collect();
    assert_eq!((recent[0].from.as_str(), recent[0].to.as_str()), ("up", "down"));
    assert_eq!(recent[0].reason, "health check: connect refused");
    assert_eq!(recent[0].kind, TransitionKind::Health);
    assert_eq!((recent[1].from.as_str(), recent[1].to.as_str()), ("down", "up"));
    // A repeated report changes nothing and records nothing.
    bed.health("b2", Health::Up);
    assert_eq!(bed.transitions("b2").health, 2);
}

#[test]
fn operator_state_changes_name_who_made_them() {
    let bed = Bed::new(BASE);
    bed.set_state("b3", AdminState::Drain);
    let log = bed.transitions("b3");
    let t = log.recent().next().unwrap().clone();
    assert_eq!(
        (t.kind, t.from.as_str(), t.to.as_str()),
        (TransitionKind::State, "active", "drain")
    );
    assert_eq!(t.reason, "operator uid 7");
}

#[test]
fn on_down_reset_asks_the_datapath_to_reset_only_when_configured() {
    for (on_down, expect) in [("keep", false), ("reset", true)] {
        let text = BASE.replace(
            "[service.health]",
            &format!("on_down = \"{on_down}\"\n[service.health]"),
        );
        let bed = Bed::new(&text);
        bed.calls();
        bed.health("b1", Health::Down);
        let reset = bed.calls().contains(&Call::Reset {
            service: "web".into(),
            backend: "b1".into(),
        });
        assert_eq!(reset, expect, "on_down = {on_down}");
    }
}

#[test]
fn disable_with_reset_goes_to_maintenance_then_resets() {
    use crate::control::protocol::Request;
    let bed = Bed::new(BASE);
    bed.calls();
    let reset = |backend: &str| Request::DisableReset {
        service: "web".into(),
        backend: backend.into(),
    };
    let answer = bed.engine.handle_from(reset("b2"), Some(7)).unwrap();
    assert_eq!(answer["backend"], "b2");
    assert_eq!(answer["connections"], 0, "the fake datapath has none open");
    let calls = bed.calls();
    let want = Call::Reset {
        service: "web".into(),
        backend: "b2".into(),
    };
    let at = calls.iter().position(|c| *c == want).expect("reset asked");
    assert!(
        matches!(calls[..at].last(), Some(Call::Apply(Effect::ServiceChanged(_)))),
        "maintenance applied before the reset: {calls:?}"
    );
    assert_eq!(bed.backend("b2").config.state, AdminState::Maintenance);
    let t = bed.transitions("b2").recent().next().unwrap().clone();
    assert_eq!((t.from.as_str(), t.to.as_str()), ("active", "maintenance"));
    assert_eq!(t.reason, "operator uid 7");
    // Already in maintenance: what is left is reset again.
    bed.engine.handle_from(reset("b2"), Some(7)).unwrap();
    assert!(bed.calls().contains(&want));
    // A backend that does not exist: refused, nothing reset.
    let e = bed.engine.handle_from(reset("b9"), Some(7)).unwrap_err();
    assert!(e.to_string().contains("b9"), "{e}");
    assert!(!bed.calls().iter().any(|c| matches!(c, Call::Reset { .. })));
}

#[test]
fn failback_returns_failed_over_clients_only_when_enabled() {
    for failback in [false, true] {
        let text = BASE.replace(
            "[service.health]",
            &format!("failback = {failback}\n[service.health]"),
        );
        let bed = Bed::new(&text);
        let on_b1: Vec<String> = clients(90).filter(|c| bed.connect(c) == "b1").collect();
        assert!(!on_b1.is_empty());
        bed.health("b1", Health::Down);
        for c in &on_b1 {
            assert_ne!(bed.connect(c), "b1");
        }
        bed.health("b1", Health::Up);
        let back = on_b1.iter().filter(|c| bed.connect(c) == "b1").count();
        assert_eq!(
            back,
            if failback { on_b1.len() } else { 0 },
            "failback = {failback}"
        );
    }
}

#[test]
fn a_refused_change_leaves_no_trace() {
    let bed = Bed::new(BASE);
    bed.journal.lock().unwrap().refuse = Some("web".into());
    let err = bed.run(Command::AddBackend {
        service: "web".into(),
        backend: backend("b4", "10.1.4.2:80"),
    });
    assert!(matches!(err, Err(EngineError::Datapath(_))));
    bed.journal.lock().unwrap().refuse = None;
    {
        let b = bed.engine.balancer.snapshot();
        assert!(
            b.state.service("web").unwrap().backend("b4").is_none(),
            "refused backend stays out of the state"
        );
    }
    // The service is not poisoned: later changes and health events of other backends apply.
    bed.set_state("b2", AdminState::Drain);
    bed.health("b3", Health::Down);
    assert_eq!(bed.backend("b2").config.state, AdminState::Drain);
    assert_eq!(bed.backend("b3").health, Health::Down);
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: backend("b4", "10.1.4.2:80"),
    })
    .unwrap();
    assert_eq!(bed.forwarding("web").unwrap(), ["b1", "b2", "b3", "b4"]);
}

/// `web`'s backend names and ring, to compare before and after a refused change.
fn web_state(bed: &Bed) -> (Vec<String>, Arc<Vec<u32>>) {
    let snap = bed.engine.balancer.snapshot();
    let svc = snap.state.service("web").unwrap();
    let names = svc.backends.iter().map(|b| b.config.name.clone()).collect();
    (names, svc.ring.clone())
}

fn add_backends(names: &[(&str, &str)]) -> Command {
    Command::AddBackends {
        service: "web".into(),
        backends: names.iter().map(|(n, a)| backend(n, a)).collect(),
    }
}

#[test]
fn a_batch_add_is_one_change_with_one_ring() {
    let bed = Bed::new(BASE);
    bed.calls();
    let ring_before = web_state(&bed).1;
    let effect = bed
        .run(add_backends(&[
            ("b4", "10.1.4.2:80"),
            ("b5", "10.1.5.2:80"),
            ("b6", "10.1.6.2:80"),
        ]))
        .unwrap();
    assert_eq!(effect, Effect::ServiceChanged("web".into()));
    // One datapath call for the three backends: the datapath saw them all at once.
    assert_eq!(bed.calls(), [Call::Apply(Effect::ServiceChanged("web".into()))]);
    assert_eq!(
        bed.forwarding("web").unwrap(),
        ["b1", "b2", "b3", "b4", "b5", "b6"]
    );
    let (_, ring) = web_state(&bed);
    let ids: std::collections::BTreeSet<u32> = ring.iter().copied().collect();
    assert_eq!(ids.len(), 6, "every new backend owns ring slots");
    // Maglev: the old backends keep most of their slots (about half of the ring moves to 3 of 6).
    let kept = ring
        .iter()
        .zip(ring_before.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert!(kept > ring.len() * 2 / 5, "{kept} of {} slots kept", ring.len());
}

#[test]
fn one_bad_backend_refuses_the_whole_batch() {
    let bed = Bed::new(BASE);
    let before = web_state(&bed);
    bed.calls();
    // The state's rule: an address in use (b1's), after two good ones.
    let err = bed
        .run(add_backends(&[
            ("b4", "10.1.4.2:80"),
            ("b5", "10.1.5.2:80"),
            ("b6", "10.1.1.2:80"),
        ]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::State(crate::state::StateError::BackendExists { .. })
        ),
        "{err}"
    );
    assert_eq!(web_state(&bed), before);
    assert!(
        bed.calls().is_empty(),
        "a batch the state refuses never reaches the datapath"
    );
    // The daemon's rule, through the control path: ring_size 1009 takes at most 10 backends.
    let eight: Vec<(String, String)> = (4..12)
        .map(|i| (format!("b{i}"), format!("10.1.{i}.2:80")))
        .collect();
    let eight: Vec<(&str, &str)> = eight.iter().map(|(n, a)| (n.as_str(), a.as_str())).collect();
    let err = bed
        .engine
        .handle(crate::control::protocol::Request::Change(add_backends(&eight)))
        .unwrap_err();
    assert!(err.to_string().contains("ring_size: 1009 is too small"), "{err}");
    assert_eq!(web_state(&bed), before);
    // The datapath's refusal: nothing kept, and the datapath is given the old state again.
    bed.journal.lock().unwrap().refuse = Some("web".into());
    assert!(matches!(
        bed.run(add_backends(&[("b4", "10.1.4.2:80"), ("b5", "10.1.5.2:80")])),
        Err(EngineError::Datapath(_))
    ));
    bed.journal.lock().unwrap().refuse = None;
    assert_eq!(web_state(&bed), before);
    // Nothing is poisoned: a health event of another backend applies, and so does the batch.
    bed.health("b2", Health::Down);
    assert_eq!(bed.backend("b2").health, Health::Down);
    assert!(!web_state(&bed).1.contains(&bed.backend("b2").id));
    bed.run(add_backends(&[("b4", "10.1.4.2:80"), ("b5", "10.1.5.2:80")]))
        .unwrap();
    assert_eq!(bed.forwarding("web").unwrap(), ["b1", "b2", "b3", "b4", "b5"]);
}

#[test]
fn an_xdp_batch_with_one_ipv6_address_is_refused_whole() {
    let text = format!(
        "{BASE}\n[xdp]\ninterfaces = [\"veth0\"]\n[[service]]\nname = \"x\"\nlisten = \"10.0.0.200:80\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.1.2:80\"\n"
    );
    let (bed, journals) = Bed::with_kinds(&text, &[DatapathKind::Proxy, DatapathKind::Xdp]);
    journals[1].lock().unwrap().calls.clear();
    for (bad, why) in [
        ("[2001:db8::1]:80", "IPv4 backends only"),
        ("127.0.0.1:9106", "loopback"),
    ] {
        let line = format!(
            r#"{{"cmd":"add-backends","service":"x","backends":[{{"address":"10.1.2.2:80"}},{{"address":"{bad}"}}]}}"#
        );
        let request = crate::control::protocol::Request::parse(&line).unwrap();
        let err = bed.engine.handle(request).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
        let snap = bed.engine.balancer.snapshot();
        assert_eq!(snap.state.service("x").unwrap().backends.len(), 1);
        assert!(journals[1].lock().unwrap().calls.is_empty());
    }
}

#[test]
fn a_refused_new_service_is_not_kept() {
    let bed = Bed::new(BASE);
    bed.journal.lock().unwrap().refuse = Some("api".into());
    let svc = crate::state::tests::service("api", "10.0.0.101:81", vec![backend("a1", "10.1.9.2:80")]);
    assert!(bed.run(Command::AddService { service: svc.clone() }).is_err());
    assert!(bed.engine.status(Some("api")).is_err());
    bed.journal.lock().unwrap().refuse = None;
    bed.run(Command::AddService { service: svc }).unwrap();
    assert!(bed.engine.status(Some("api")).is_ok());
}

#[test]
fn each_service_goes_to_the_datapath_of_its_kind() {
    let text = format!(
        "{BASE}\n[xdp]\ninterfaces = [\"veth0\"]\n[[service]]\nname = \"x\"\nlisten = \"10.0.0.200:80\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.1.2:80\"\n"
    );
    let (bed, journals) = Bed::with_kinds(&text, &[DatapathKind::Proxy, DatapathKind::Xdp]);
    assert_eq!(bed.forwarding("x"), None);
    assert_eq!(
        journals[1].lock().unwrap().forwarding.keys().collect::<Vec<_>>(),
        ["x"]
    );
    assert_eq!(bed.forwarding("web").unwrap().len(), 3);
}

#[test]
fn reload_applies_the_diff_and_keeps_runtime_changes() {
    let bed = Bed::new(BASE);
    let known: Vec<(String, String)> = clients(30)
        .map(|c| {
            let b = bed.connect(&c);
            (c, b)
        })
        .collect();
    // A runtime drain the file knows nothing about.
    bed.set_state("b1", AdminState::Drain);
    let text = BASE.replace(
        "[[service.backend]]\nname = \"b3\"\naddress = \"10.1.3.2:80\"",
        "[[service.backend]]\nname = \"b3\"\naddress = \"10.1.3.2:80\"\nweight = 2\n[[service.backend]]\nname = \"b4\"\naddress = \"10.1.4.2:80\"",
    );
    let view = bed.reload(&text);
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    assert_eq!(view.applied.len(), 2, "{:?}", view.applied);
    assert_eq!(bed.backend("b3").config.weight, 2);
    assert_eq!(
        bed.backend("b1").config.state,
        AdminState::Drain,
        "runtime drain survives"
    );
    for (c, b) in &known {
        assert_eq!(&bed.connect(c), b, "affinity survives a reload");
    }
    let log = bed.transitions("b3");
    assert_eq!(log.state, 0);
    // The same file again changes nothing.
    assert!(bed.reload(&text).applied.is_empty());
}

#[test]
fn reload_of_a_bad_file_changes_nothing() {
    let bed = Bed::new(BASE);
    bed.calls();
    std::fs::write(&bed.path, "[[service]]\nname = 3\n").unwrap();
    assert!(matches!(bed.engine.reload_by(None), Err(EngineError::Config(_))));
    assert!(bed.calls().is_empty());
    assert_eq!(bed.forwarding("web").unwrap().len(), 3);
}

#[test]
fn reload_removes_and_replaces_services_and_reports_restart_only_settings() {
    let bed = Bed::new(BASE);
    let moved = BASE.replace("10.0.0.100:80", "10.0.0.100:8080").replace(
        "ring_size = 1009",
        "ring_size = 1013\nstate_file = \"/tmp/lb-engine-test-never-written.json\"",
    );
    let view = bed.reload(&moved);
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    for setting in ["ring_size", "state_file"] {
        assert!(
            view.restart.iter().any(|p| p.starts_with(setting)),
            "{setting}: {:?}",
            view.restart
        );
    }
    assert!(!std::path::Path::new("/tmp/lb-engine-test-never-written.json").exists());
    let status = bed.engine.status(None).unwrap();
    assert_eq!(status.services[0].listen, "10.0.0.100:8080");
    let calls = bed.calls();
    assert!(calls.contains(&Call::Apply(Effect::ServiceAdded("web".into()))));
    let view = bed.reload("ring_size = 1009\n");
    assert_eq!(view.applied, ["remove service web"]);
    assert!(bed.engine.status(None).unwrap().services.is_empty());
}

#[test]
fn a_failed_reload_item_is_reported_and_retried_next_time() {
    let bed = Bed::new(BASE);
    let text = format!(
        "{BASE}\n[[service]]\nname = \"api\"\nlisten = \"10.0.0.101:81\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.9.2:80\"\n"
    );
    bed.journal.lock().unwrap().refuse = Some("api".into());
    let view = bed.reload(&text);
    assert_eq!(view.problems.len(), 1, "{:?}", view.problems);
    bed.journal.lock().unwrap().refuse = None;
    let view = bed.reload(&text);
    assert_eq!(view.applied, ["add service api on 10.0.0.101:81"]);
}

/// A move to an address the datapath cannot listen on is not begun: the service is never removed
/// (affinity, counters and health stay), and the next reload tries the move again.
#[test]
fn a_move_to_an_address_that_cannot_be_bound_leaves_the_service_untouched() {
    let bed = Bed::new(BASE);
    bed.set_state("b1", AdminState::Drain);
    let moved = BASE.replace("10.0.0.100:80", "10.0.0.100:8080");
    bed.journal.lock().unwrap().unbindable = Some("10.0.0.100:8080".parse().unwrap());
    bed.calls();
    let view = bed.reload(&moved);
    assert!(view.applied.is_empty(), "{:?}", view.applied);
    assert_eq!(view.problems.len(), 1, "{:?}", view.problems);
    assert!(
        view.problems[0].contains("kept as it was, on 10.0.0.100:80")
            && view.problems[0].contains("10.0.0.100:8080"),
        "{:?}",
        view.problems
    );
    assert_eq!(bed.calls(), [], "the datapath was asked nothing");
    assert_eq!(
        bed.engine.status(None).unwrap().services[0].listen,
        "10.0.0.100:80"
    );
    assert_eq!(bed.backend("b1").config.state, AdminState::Drain);
    bed.journal.lock().unwrap().unbindable = None;
    let view = bed.reload(&moved);
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    assert_eq!(
        view.applied,
        ["remove service web", "add service web on 10.0.0.100:8080"]
    );
}

/// An address in use lets a move begin only when a service this reload removes holds it: a
/// service kept where it was holds its address, so one moving onto it is kept too; one moving
/// onto the address of a service that leaves moves.
#[test]
fn a_move_onto_an_address_in_use_begins_only_if_its_holder_leaves() {
    let api = "[[service]]\nname = \"api\"\nlisten = \"10.0.0.101:81\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.9.2:80\"\n";
    let both = format!("{BASE}{api}");
    let bed = Bed::new(&both);
    bed.journal.lock().unwrap().in_use = vec!["10.0.0.101:81".parse().unwrap()];
    // web onto api's address, api to an address no interface has: both stay.
    bed.journal.lock().unwrap().unbindable = Some("10.0.0.102:81".parse().unwrap());
    let chain = format!(
        "{}{}",
        BASE.replace("10.0.0.100:80", "10.0.0.101:81"),
        api.replace("10.0.0.101:81", "10.0.0.102:81")
    );
    bed.calls();
    let view = bed.reload(&chain);
    assert!(view.applied.is_empty(), "{:?}", view.applied);
    assert_eq!(view.problems.len(), 2, "{:?}", view.problems);
    assert!(
        view.problems[1].contains("service web kept as it was, on 10.0.0.100:80"),
        "{:?}",
        view.problems
    );
    assert_eq!(bed.calls(), [], "the datapath was asked nothing");
    // web onto api's address while api leaves the file: web moves.
    let view = bed.reload(&BASE.replace("10.0.0.100:80", "10.0.0.101:81"));
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    assert_eq!(
        view.applied,
        [
            "remove service api",
            "remove service web",
            "add service web on 10.0.0.101:81"
        ]
    );
}

#[test]
fn a_service_whose_move_fails_in_a_reload_keeps_running_as_it_was_and_the_move_is_retried() {
    let bed = Bed::new(BASE);
    // A runtime change the file knows nothing about, and a backend added on the control socket.
    bed.set_state("b1", AdminState::Drain);
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: crate::state::tests::backend("b9", "10.1.9.2:80"),
    })
    .unwrap();
    let moved = BASE.replace("10.0.0.100:80", "10.0.0.100:8080");
    bed.journal.lock().unwrap().refuse_listen = Some("10.0.0.100:8080".parse().unwrap());
    let view = bed.reload(&moved);
    assert!(
        view.problems
            .iter()
            .any(|p| p.contains("put back as it was, on 10.0.0.100:80")),
        "{:?}",
        view.problems
    );
    let status = bed.engine.status(None).unwrap();
    assert_eq!(status.services.len(), 1);
    assert_eq!(status.services[0].listen, "10.0.0.100:80");
    assert_eq!(
        bed.forwarding("web").unwrap(),
        ["b1", "b2", "b3", "b9"],
        "the datapath forwards to the service as it ran"
    );
    assert_eq!(bed.backend("b1").config.state, AdminState::Drain);
    // Once the address can be bound, the next reload makes the move.
    bed.journal.lock().unwrap().refuse_listen = None;
    let view = bed.reload(&moved);
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    assert_eq!(
        view.applied,
        ["remove service web", "add service web on 10.0.0.100:8080"]
    );
    assert_eq!(
        bed.engine.status(None).unwrap().services[0].listen,
        "10.0.0.100:8080"
    );
}

#[test]
fn which_answers_from_the_balancer_for_user_space_datapaths() {
    let bed = Bed::new(BASE);
    let w = bed.engine.which("web", "192.0.2.9").unwrap();
    assert_eq!(w.reason, "ring");
    let on = bed.connect("192.0.2.9");
    let w = bed.engine.which("web", "192.0.2.9:4000").unwrap();
    assert_eq!((w.backend.unwrap(), w.reason.as_str()), (on, "affinity"));
    assert!(matches!(
        bed.engine.which("web", "nonsense"),
        Err(EngineError::BadAddress(_))
    ));
}

#[test]
fn which_refuses_a_client_of_the_other_address_family() {
    let text = format!(
        "{BASE}\n[xdp]\ninterfaces = [\"veth0\"]\n[[service]]\nname = \"xweb\"\nlisten = \"10.0.0.200:80\"\ndatapath = \"xdp\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.1.2:80\"\n[[service]]\nname = \"v6\"\nlisten = \"[::]:81\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.1.2:81\"\n"
    );
    let (bed, _) = Bed::with_kinds(&text, &[DatapathKind::Proxy, DatapathKind::Xdp]);
    for client in ["::1", "[::1]:4000", "2001:db8::9"] {
        let e = bed.engine.which("xweb", client).unwrap_err();
        assert!(matches!(e, EngineError::WrongFamily { .. }), "{client}: {e}");
        let text = e.to_string();
        assert!(
            text.contains("10.0.0.200:80") && text.contains("IPv4 client"),
            "{text}"
        );
    }
    // An IPv4 client, also written as IPv6, gets an answer.
    assert_eq!(bed.engine.which("xweb", "192.0.2.9").unwrap().reason, "ring");
    let mapped = bed.engine.which("xweb", "::ffff:192.0.2.9").unwrap();
    assert_eq!(
        mapped.backend,
        bed.engine.which("xweb", "192.0.2.9").unwrap().backend
    );
    // A dual-stack listener takes both families.
    assert!(bed.engine.which("v6", "192.0.2.9").is_ok());
    assert!(bed.engine.which("v6", "2001:db8::9").is_ok());
}

#[tokio::test]
async fn shutdown_reaches_every_datapath() {
    let (bed, journals) = Bed::with_kinds(BASE, &[DatapathKind::Proxy, DatapathKind::Xdp]);
    bed.engine.shutdown().await;
    for j in journals {
        assert!(j.lock().unwrap().calls.contains(&Call::Shutdown));
    }
}

/// The mini-redis habit: the control server runs in-process on a temp socket, over an engine with
/// a fake datapath; a change and a query go through it, a bad line gets an error and the server
/// keeps answering.
#[tokio::test]
async fn control_server_in_process_on_a_temp_socket() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let engine =
        crate::datapath::fake::engine(Config::parse(BASE, "test").unwrap(), &[DatapathKind::Proxy]).unwrap();
    let dir = std::env::temp_dir().join(format!("lb-engine-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let control = crate::config::ControlConfig {
        socket: dir.join("lb.sock"),
        ..Default::default()
    };
    let (listener, access) = crate::control::server::bind(&control).unwrap();
    let engine = std::sync::Arc::new(engine);
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::control::server::run(
        listener,
        access,
        engine.clone(),
        stop.clone(),
    ));
    let stream = tokio::net::UnixStream::connect(&control.socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut ask = async |line: &str| -> serde_json::Value {
        write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap()
    };
    let drained = ask(r#"{"cmd":"set-state","service":"web","backend":"b2","state":"drain"}"#).await;
    assert_eq!(drained["ok"], true, "{drained}");
    let bad = ask(r#"{"cmd":"set-weight","service":"web","backend":"b2","weight":300}"#).await;
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("weight"), "{bad}");
    let status = ask(r#"{"cmd":"status"}"#).await;
    let b2 = &status["result"]["services"][0]["backends"][1];
    assert_eq!(
        (b2["name"].as_str(), b2["state"].as_str(), b2["weight"].as_u64()),
        (Some("b2"), Some("drain"), Some(1))
    );
    stop.cancel();
    server.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An affinity request as the control socket decodes it.
fn affinity_request(bed: &Bed, line: &str) -> Result<serde_json::Value, EngineError> {
    let request = crate::control::protocol::Request::parse(line).unwrap();
    bed.engine.handle_from(request, Some(7))
}

#[test]
fn affinity_list_flush_and_set_change_where_clients_go() {
    let bed = Bed::new(BASE);
    let placed: Vec<(String, String)> = clients(60).map(|c| (c.clone(), bed.connect(&c))).collect();
    let on = |b: &str| placed.iter().filter(|(_, x)| x == b).count() as u64;
    // Counts per backend in status, summing to the service's.
    let status = bed.engine.status(None).unwrap();
    let svc = &status.services[0];
    assert_eq!(svc.affinity_entries, 60);
    for b in &svc.backends {
        assert_eq!(b.affinity_clients, on(&b.name), "{}", b.name);
    }
    // List: all, one backend's, limited.
    let all = bed.engine.affinity_list("web", None, None).unwrap();
    assert_eq!((all.total, all.entries.len()), (60, 60));
    let b1 = bed.engine.affinity_list("web", Some("b1"), Some(3)).unwrap();
    assert_eq!(b1.total, on("b1"));
    assert_eq!(b1.entries.len(), 3.min(on("b1") as usize));
    assert!(
        b1.entries
            .iter()
            .all(|e| e.backend == "b1" && e.address == "10.1.1.2:80")
    );
    // Set: a client of b1 is pinned to b2; `which` and the next connection follow.
    let (client, _) = placed.iter().find(|(_, b)| b == "b1").unwrap().clone();
    let answer = affinity_request(
        &bed,
        &format!(r#"{{"cmd":"affinity-set","service":"web","client":"{client}","backend":"b2"}}"#),
    )
    .unwrap();
    assert_eq!(answer["entries"], 1);
    let w = bed.engine.which("web", &client).unwrap();
    assert_eq!(
        (w.backend.as_deref(), w.reason.as_str()),
        (Some("b2"), "affinity")
    );
    assert_eq!(bed.connect(&client), "b2");
    // Flush one backend: its clients follow the ring again, the others keep their entries.
    let before_b3 = bed.engine.affinity_list("web", Some("b3"), None).unwrap().total;
    let answer =
        affinity_request(&bed, r#"{"cmd":"affinity-flush","service":"web","backend":"b2"}"#).unwrap();
    assert_eq!(answer["entries"], on("b2") + 1);
    assert_eq!(
        bed.engine.affinity_list("web", Some("b2"), None).unwrap().total,
        0
    );
    assert_eq!(
        bed.engine.affinity_list("web", Some("b3"), None).unwrap().total,
        before_b3
    );
    let w = bed.engine.which("web", &client).unwrap();
    assert_eq!((w.backend.as_deref(), w.reason.as_str()), (Some("b1"), "ring"));
    // Flush all.
    affinity_request(&bed, r#"{"cmd":"affinity-flush","service":"web"}"#).unwrap();
    assert_eq!(bed.engine.status(None).unwrap().services[0].affinity_entries, 0);
}

#[test]
fn affinity_changes_are_refused_with_a_reason_and_leave_no_trace() {
    let text = BASE.to_string()
        + "[[service]]\nname = \"nosticky\"\nlisten = \"10.0.0.101:80\"\naffinity_timeout = \"0s\"\n\
           [service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.9.2:80\"\n";
    let bed = Bed::new(&text);
    let placed: Vec<(String, String)> = clients(30).map(|c| (c.clone(), bed.connect(&c))).collect();
    let on_b1 = placed.iter().find(|(_, b)| b == "b1").unwrap().0.clone();
    bed.set_state("b3", AdminState::Maintenance);
    let cases = [
        (
            r#"{"cmd":"affinity-set","service":"nope","client":"192.0.2.1","backend":"b1"}"#,
            "no service named `nope`",
        ),
        (
            r#"{"cmd":"affinity-set","service":"web","client":"192.0.2.1","backend":"b9"}"#,
            "has no backend `b9`",
        ),
        (
            r#"{"cmd":"affinity-set","service":"web","client":"192.0.2.1","backend":"b3"}"#,
            "takes no clients now (state maintenance)",
        ),
        (
            r#"{"cmd":"affinity-set","service":"nosticky","client":"192.0.2.1","backend":"10.1.9.2:80"}"#,
            "keeps no affinity",
        ),
        (
            r#"{"cmd":"affinity-flush","service":"web","backend":"b9"}"#,
            "has no backend `b9`",
        ),
    ];
    for (line, want) in cases {
        let e = affinity_request(&bed, line).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
    assert_eq!(
        bed.engine.which("web", &on_b1).unwrap().backend.as_deref(),
        Some("b1"),
        "refused changes moved nobody"
    );
    assert_eq!(bed.engine.affinity_list("web", None, None).unwrap().total, 30);
}

#[test]
fn drained_mark_appears_once_no_client_sticks() {
    let bed = Bed::new(BASE);
    let on_b1: Vec<String> = clients(60).filter(|c| bed.connect(c) == "b1").collect();
    assert!(!on_b1.is_empty());
    bed.set_state("b1", AdminState::Drain);
    let b1 = |bed: &Bed| {
        bed.engine.status(None).unwrap().services[0]
            .backends
            .iter()
            .find(|b| b.name == "b1")
            .unwrap()
            .clone()
    };
    assert_eq!(b1(&bed).affinity_clients, on_b1.len() as u64);
    assert!(!b1(&bed).drained, "clients still stick to b1");
    bed.engine
        .affinity_change(
            crate::control::protocol::AffinityChange::AffinityFlush {
                service: "web".into(),
                backend: Some("b1".into()),
            },
            &Origin::Operator { uid: Some(0) },
        )
        .unwrap();
    assert!(b1(&bed).drained);
    // Only a draining backend is ever "drained".
    bed.set_state("b1", AdminState::Active);
    bed.engine.affinity_list("web", None, None).unwrap();
    assert!(!b1(&bed).drained);
}

#[test]
fn failback_moves_clients_off_the_backups_when_primaries_recover() {
    for failback in [false, true] {
        let text = BASE.replace(
            "[service.health]",
            &format!("failback = {failback}\n[service.health]"),
        ) + "[[service.backend]]\nname = \"spare\"\naddress = \"10.1.4.2:80\"\nbackup = true\n";
        let bed = Bed::new(&text);
        for b in ["b1", "b2", "b3"] {
            bed.health(b, Health::Down);
        }
        // New clients while every primary is down land on the spare and stick there.
        let on_spare: Vec<String> = clients(40).collect();
        for c in &on_spare {
            assert_eq!(bed.connect(c), "spare");
        }
        bed.health("b2", Health::Up);
        let back = on_spare.iter().filter(|c| bed.connect(c) == "b2").count();
        assert_eq!(
            back,
            if failback { on_spare.len() } else { 0 },
            "failback = {failback}"
        );
    }
}

/// Passive health: an engine over a fake datapath, with active TCP checks on loopback (their
/// first probe an hour away: the tests drive the check status themselves) and the health
/// pipeline's receiving end.
mod passive {
    use super::*;
    use crate::health::HealthSource;

    const CHECKED: &str = r#"
ring_size = 1009
[[service]]
name = "web"
listen = "127.0.0.1:80"
[service.health]
kind = "tcp"
interval = "1h"
rise = 2
HEALTH_EXTRA
[[service.backend]]
name = "b1"
address = "127.0.0.1:1"
[[service.backend]]
name = "b2"
address = "127.0.0.1:2"
"#;

    struct PassiveBed {
        bed: Bed,
        events: mpsc::Receiver<HealthEvent>,
    }

    impl PassiveBed {
        fn new(extra: &str) -> PassiveBed {
            let text = CHECKED.replace("HEALTH_EXTRA", extra);
            let path = config_file(&text);
            let config = Config::load(&path).unwrap();
            let (tx, events) = mpsc::channel::<HealthEvent>(16);
            let mut journal = None;
            let engine = Engine::assemble(config, tx, CancellationToken::new(), |_| {
                let (fake, j) = FakeDatapath::new(DatapathKind::Proxy);
                journal = Some(j);
                Ok(vec![Box::new(fake) as Box<dyn Datapath>])
            })
            .unwrap();
            PassiveBed {
                bed: Bed {
                    engine,
                    journal: journal.unwrap(),
                    path,
                },
                events,
            }
        }

        fn runtime(&self, name: &str) -> Arc<crate::runtime::BackendRuntime> {
            let snap = self.bed.engine.balancer.snapshot();
            let svc = snap.state.service("web").unwrap();
            snap.runtime(svc, svc.backend(name).unwrap())
        }

        /// A datapath's failed connect to `name`; whether it marked the backend down.
        fn fail(&self, name: &str) -> bool {
            let snap = self.bed.engine.balancer.snapshot();
            let svc = snap.state.service("web").unwrap();
            let be = svc.backend(name).unwrap();
            self.bed.engine.passive().failed(
                svc,
                be,
                &snap.runtime(svc, be),
                "Connection refused (os error 111)",
            )
        }

        fn connected(&self, name: &str) {
            self.bed.engine.passive().connected(&self.runtime(name));
        }

        /// Feeds every event the pipeline holds into the engine, as the daemon loop does.
        fn deliver(&mut self) -> Vec<HealthEvent> {
            let mut seen = Vec::new();
            while let Ok(e) = self.events.try_recv() {
                seen.push(e.clone());
                self.bed.engine.health_event(e);
            }
            seen
        }

        /// One active probe result recorded as the checker does; a transition goes to the engine.
        fn probe(&self, ok: bool) -> Option<Health> {
            let rt = self.runtime("b1");
            let result: Result<std::time::Duration, &str> = if ok {
                Ok(std::time::Duration::from_millis(1))
            } else {
                Err("refused")
            };
            let changed = rt.check.lock().unwrap().record(&result, 2, 3);
            if let Some(health) = changed {
                self.bed.engine.health_event(HealthEvent {
                    service: "web".into(),
                    backend: self.bed.backend("b1").config.address,
                    health,
                    reason: "ok".into(),
                    source: HealthSource::Check,
                });
            }
            changed
        }
    }

    #[tokio::test]
    async fn error_limit_failures_in_a_row_mark_the_backend_down_with_reason_passive() {
        let mut p = PassiveBed::new("error_limit = 3");
        assert!(!p.fail("b1"));
        assert!(!p.fail("b1"));
        assert!(p.deliver().is_empty(), "below the limit nothing is sent");
        assert_eq!(p.bed.backend("b1").health, Health::Up);
        assert!(p.fail("b1"), "the third failure in a row marks it down");
        let sent = p.deliver();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].source, HealthSource::Passive);
        assert_eq!(sent[0].health, Health::Down);
        assert_eq!(p.bed.backend("b1").health, Health::Down);
        assert_eq!(p.bed.backend("b2").health, Health::Up);
        let log = p.bed.transitions("b1");
        let last = log.recent().last().unwrap();
        assert_eq!(last.kind, TransitionKind::Health);
        assert!(
            last.reason.starts_with("passive: 3 connect failures in a row"),
            "{}",
            last.reason
        );
        assert!(last.reason.contains("Connection refused"), "{}", last.reason);
        // `lb status` shows it in the check column.
        let status = p.bed.engine.status(None).unwrap();
        let b1 = &status.services[0].backends[0];
        let check = b1.check.as_ref().unwrap();
        assert_eq!(check.health, Health::Down);
        assert!(
            check.last_result.starts_with("passive: "),
            "{}",
            check.last_result
        );
        // Connections already failing when it went down send nothing more.
        for _ in 0..10 {
            assert!(!p.fail("b1"));
        }
        assert!(p.deliver().is_empty());
        assert_eq!(p.bed.transitions("b1").health, 1);
    }

    #[tokio::test]
    async fn a_success_resets_the_count() {
        let mut p = PassiveBed::new("error_limit = 3");
        for _ in 0..5 {
            assert!(!p.fail("b1"));
            assert!(!p.fail("b1"));
            p.connected("b1");
        }
        assert_eq!(p.runtime("b1").passive.get(), 0);
        assert!(p.deliver().is_empty());
        assert_eq!(p.bed.backend("b1").health, Health::Up);
        // Counts are per backend: b2's failures do not add to b1's.
        assert!(!p.fail("b1"));
        assert!(!p.fail("b2"));
        assert!(!p.fail("b1"));
        assert!(p.deliver().is_empty());
        assert!(p.fail("b1"));
        assert_eq!(p.deliver().len(), 1);
    }

    #[tokio::test]
    async fn active_checks_bring_it_back_after_rise_successes_and_it_can_fall_again() {
        let mut p = PassiveBed::new("error_limit = 1");
        assert!(p.fail("b1"));
        p.deliver();
        assert_eq!(p.bed.backend("b1").health, Health::Down);
        // rise = 2: one good probe is not enough.
        assert_eq!(p.probe(true), None);
        assert_eq!(p.bed.backend("b1").health, Health::Down);
        assert_eq!(p.probe(true), Some(Health::Up));
        assert_eq!(p.bed.backend("b1").health, Health::Up);
        let log = p.bed.transitions("b1");
        let reasons: Vec<_> = log.recent().map(|t| t.reason.clone()).collect();
        assert!(reasons[0].starts_with("passive: "), "{reasons:?}");
        assert_eq!(reasons[1], "health check: ok");
        // Back up, passive health watches again.
        assert!(p.fail("b1"));
        p.deliver();
        assert_eq!(p.bed.backend("b1").health, Health::Down);
    }

    #[tokio::test]
    async fn off_for_kind_none_and_with_observe_none() {
        for (text, what) in [
            (BASE.to_string(), "kind = \"none\""),
            (
                CHECKED.replace("HEALTH_EXTRA", "observe = \"none\""),
                "observe = \"none\"",
            ),
        ] {
            let path =
                std::env::temp_dir().join(format!("lb-engine-passive-off-{}.toml", std::process::id()));
            std::fs::write(&path, &text).unwrap();
            let config = Config::load(&path).unwrap();
            let (tx, mut events) = mpsc::channel::<HealthEvent>(16);
            let engine = Engine::assemble(config, tx, CancellationToken::new(), |_| {
                Ok(vec![
                    Box::new(FakeDatapath::new(DatapathKind::Proxy).0) as Box<dyn Datapath>
                ])
            })
            .unwrap();
            let snap = engine.balancer.snapshot();
            let svc = snap.state.service("web").unwrap();
            let be = svc.backend("b1").unwrap();
            for _ in 0..20 {
                assert!(
                    !engine
                        .passive()
                        .failed(svc, be, &snap.runtime(svc, be), "refused"),
                    "{what}"
                );
            }
            assert!(events.try_recv().is_err(), "{what}: nothing sent");
            assert_eq!(
                engine
                    .balancer
                    .snapshot()
                    .state
                    .service("web")
                    .unwrap()
                    .backend("b1")
                    .unwrap()
                    .health,
                Health::Up,
                "{what}"
            );
        }
    }
}

#[test]
fn check_tells_a_serving_service_from_an_empty_one_and_an_unknown_one() {
    let bed = Bed::new(BASE);
    let e = &bed.engine;
    let ok = e.check("web");
    assert_eq!(ok.status, "ok", "{ok:?}");
    assert!(
        ok.detail.starts_with("3 of 3 backends take new clients"),
        "{ok:?}"
    );
    assert_eq!(ok.announced, None, "no [announce] table");
    for b in ["b1", "b2"] {
        e.execute(Command::SetHealth {
            service: "web".into(),
            backend: b.into(),
            health: Health::Down,
        })
        .unwrap();
    }
    e.execute(Command::SetState {
        service: "web".into(),
        backend: "b3".into(),
        state: AdminState::Drain,
    })
    .unwrap();
    let none = e.check("web");
    assert_eq!(none.status, "no-backend", "{none:?}");
    assert_eq!(
        none.detail,
        "no backend takes new clients (b1 down, b2 down, b3 drain)"
    );
    let unknown = e.check("nope");
    assert_eq!(
        (unknown.status.as_str(), unknown.detail.as_str()),
        ("unknown-service", "no service `nope`")
    );
}

#[test]
fn a_dsr_backend_on_another_port_is_refused_from_the_control_socket() {
    let text = format!(
        "{BASE}\n[xdp]\ninterfaces = [\"veth0\"]\n[[service]]\nname = \"d\"\nlisten = \"10.0.0.201:80\"\ndatapath = \"xdp\"\nforwarding = \"dsr\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.1.2:80\"\n"
    );
    let (bed, journals) = Bed::with_kinds(&text, &[DatapathKind::Proxy, DatapathKind::Xdp]);
    journals[1].lock().unwrap().calls.clear();
    let line = r#"{"cmd":"add-backend","service":"d","address":"10.1.2.2:8080"}"#;
    let err = bed
        .engine
        .handle(crate::control::protocol::Request::parse(line).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("must listen on port 80"), "{err}");
    assert!(
        journals[1].lock().unwrap().calls.is_empty(),
        "nothing reached the datapath"
    );
    // The VIP's port is accepted.
    let line = r#"{"cmd":"add-backend","service":"d","address":"10.1.2.2:80"}"#;
    bed.engine
        .handle(crate::control::protocol::Request::parse(line).unwrap())
        .unwrap();
    let snap = bed.engine.balancer.snapshot();
    assert_eq!(snap.state.service("d").unwrap().backends.len(), 2);
}

/// Two AJP backends trade routes in one reload (each update alone meets the other's route: the
/// backends' changes are checked together). A change a reload could not make (a route a backend
/// added at runtime has) is not recorded as made: it fails on every reload, not only the first,
/// and the state keeps the routes it had; once the file is changed back nothing is left to do.
#[test]
fn routes_swap_in_one_reload_and_a_change_that_failed_is_tried_again_by_the_next() {
    let ajp = |r1: &str, r2: &str| {
        format!(
            "ring_size = 1009\n[[service]]\nname = \"web\"\nlisten = \"10.0.0.100:8009\"\nprotocol = \"ajp\"\n\
             datapath = \"ajp\"\n[service.health]\nkind = \"none\"\n\
             [[service.backend]]\nname = \"t1\"\naddress = \"10.1.1.2:8009\"\nroute = \"{r1}\"\n\
             [[service.backend]]\nname = \"t2\"\naddress = \"10.1.2.2:8009\"\nroute = \"{r2}\"\n"
        )
    };
    let (bed, _) = Bed::with_kinds(&ajp("r1", "r2"), &[DatapathKind::Ajp]);
    let routes = || ["t1", "t2"].map(|b| bed.backend(b).config.route.clone());
    let view = bed.reload(&ajp("r2", "r1"));
    assert!(view.problems.is_empty(), "{view:?}");
    assert_eq!(view.applied.len(), 1, "{view:?}");
    assert_eq!(routes(), ["r2", "r1"]);
    // Applied once: the next reload of the same file has nothing to do.
    let view = bed.reload(&ajp("r2", "r1"));
    assert!(view.problems.is_empty() && view.applied.is_empty(), "{view:?}");
    // t3, added at runtime, has route r9; the file gives it to t2 (and t1 a new one): refused as
    // a whole, every time.
    let mut t3 = crate::state::tests::backend("t3", "10.1.3.2:8009");
    t3.route = "r9".into();
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: t3,
    })
    .unwrap();
    for round in 0..2 {
        let view = bed.reload(&ajp("r5", "r9"));
        assert_eq!(view.problems.len(), 1, "round {round}: {view:?}");
        assert!(view.problems[0].contains("t3"), "round {round}: {view:?}");
        assert!(view.applied.is_empty(), "round {round}: {view:?}");
        assert_eq!(routes(), ["r2", "r1"], "round {round}");
    }
    let view = bed.reload(&ajp("r2", "r1"));
    assert!(view.problems.is_empty() && view.applied.is_empty(), "{view:?}");
}

/// A reload is checked against what runs, as a control-socket change is: a service the file adds
/// on an address that a service added at runtime already covers (a wildcard listen on the same
/// port) is refused and reported, not started beside it.
#[test]
fn a_reload_is_checked_against_services_added_at_runtime() {
    let bed = Bed::new(BASE);
    let p = "[[service]]\nname = \"p\"\nlisten = \"0.0.0.0:8081\"\n[service.health]\nkind = \"none\"\n[[service.backend]]\naddress = \"10.1.9.2:80\"\n";
    let service = Config::parse(&format!("{BASE}{p}"), "test")
        .unwrap()
        .services
        .into_iter()
        .find(|s| s.name == "p")
        .unwrap();
    bed.run(Command::AddService { service }).unwrap();
    let x = p
        .replace("\"p\"", "\"x\"")
        .replace("0.0.0.0:8081", "10.0.0.1:8081");
    let view = bed.reload(&format!("{BASE}{x}"));
    assert_eq!(view.problems.len(), 1, "{view:?}");
    assert!(view.problems[0].contains("overlaps service \"p\""), "{view:?}");
    let names: Vec<String> = bed
        .engine
        .status(None)
        .unwrap()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.contains(&"x".to_string()), "{names:?}");
}

/// A backend removed at runtime and then from the file: the reload that meets it gone reports it
/// at most once; the next finds nothing left to do (it is not put back as if still running).
#[test]
fn a_removal_the_runtime_made_first_is_not_retried_by_every_reload() {
    let bed = Bed::new(BASE);
    bed.run(Command::RemoveBackend {
        service: "web".into(),
        backend: "10.1.2.2:80".into(),
    })
    .unwrap();
    let without = BASE.replace(
        "[[service.backend]]\nname = \"b2\"\naddress = \"10.1.2.2:80\"\n",
        "",
    );
    assert_ne!(without, BASE);
    bed.reload(&without);
    let view = bed.reload(&without);
    assert!(view.problems.is_empty() && view.applied.is_empty(), "{view:?}");
}

/// A reload's backend updates are not held back by a backend the runtime removed (or replaced by
/// another of its address): that one is reported once and not renamed into; the others apply.
#[test]
fn an_update_of_a_backend_the_runtime_removed_does_not_hold_back_the_others() {
    let bed = Bed::new(BASE);
    bed.run(Command::RemoveBackend {
        service: "web".into(),
        backend: "b2".into(),
    })
    .unwrap();
    // b3's address now holds b9, added at runtime.
    bed.run(Command::RemoveBackend {
        service: "web".into(),
        backend: "b3".into(),
    })
    .unwrap();
    bed.run(Command::AddBackend {
        service: "web".into(),
        backend: crate::state::tests::backend("b9", "10.1.3.2:80"),
    })
    .unwrap();
    let weights = BASE
        .replace("name = \"b1\"\n", "name = \"b1\"\nweight = 4\n")
        .replace(
            "address = \"10.1.2.2:80\"\n",
            "address = \"10.1.2.2:80\"\nweight = 5\n",
        );
    let weights = weights.replace(
        "address = \"10.1.3.2:80\"\n",
        "address = \"10.1.3.2:80\"\nweight = 6\n",
    );
    let view = bed.reload(&weights);
    assert_eq!(view.applied.len(), 1, "{view:?}");
    assert_eq!(view.problems.len(), 2, "{view:?}");
    assert!(
        view.problems.iter().any(|p| p.contains("b2")) && view.problems.iter().any(|p| p.contains("b3")),
        "{view:?}"
    );
    assert_eq!(bed.backend("b1").config.weight, 4);
    let b9 = bed.backend("b9");
    assert_eq!(
        (b9.config.name.as_str(), b9.config.weight),
        ("b9", 1),
        "b9 is not b3"
    );
    // Reported once: the next reload of the same file has nothing left to do.
    let view = bed.reload(&weights);
    assert!(view.problems.is_empty() && view.applied.is_empty(), "{view:?}");
}
