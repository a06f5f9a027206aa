//! `state_file` end to end: runtime changes (a drained backend, an added one, the transition
//! history) survive a restart of `lb run`; a corrupt file is set aside with a clear log line and
//! the daemon starts from the config; a move the file holds that cannot come up (an address the
//! host does not have) leaves the service as the config has it, at that start and every later one.

mod common;

use common::*;
use lb_tests::daemon::service_of;
use lb_tests::require_root;

fn state(bed: &Bed, backend: &str) -> Option<String> {
    bed.lb
        .backend("web", backend)
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
}

#[test]
fn runtime_changes_survive_a_restart_and_a_corrupt_file_is_set_aside() {
    if !require_root("runtime_changes_survive_a_restart_and_a_corrupt_file_is_set_aside") {
        return;
    }
    let mut bed = Bed::new("stf", 3, 1, |topo, sock| {
        let state_file = sock.with_file_name("state.json");
        let top = format!("state_file = \"{}\"\n", state_file.display());
        config_toml(sock, &top, "", &std_services(topo, 2, false))
    });
    let state_file = bed.lb.socket.with_file_name("state.json");
    assert!(bed.lb.log().contains("no state file yet"), "{}", bed.lb.log());
    assert!(state_file.exists(), "written at start");

    bed.lb.cli_ok(&["backend", "drain", "web", "b1"]);
    let b3 = format!("{}:{HTTP_PORT}", bed.topo.backend_addr(3));
    bed.lb.cli_ok(&["backend", "add", "web", &b3, "--name", "b3"]);
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2", "b3"]);

    bed.lb.stop().unwrap();
    bed.lb.run_again(bed.topo.lb_ns());
    assert_eq!(state(&bed, "b1").as_deref(), Some("drain"), "{}", bed.lb.log());
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2", "b3"]);
    let log = bed.lb.log();
    assert!(
        log.contains("restored from the state file")
            && log.contains("update backend b1")
            && log.contains("add backend b3"),
        "the log does not say what was restored:\n{log}"
    );
    // The drain's history came back too (the operator's, then the restore's).
    let stats = bed.lb.json(&["stats"]);
    let b1 = stats["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "b1")
        .unwrap()
        .clone();
    let reasons: Vec<&str> = b1["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["operator uid 0", "state file at start"], "{b1}");
    // Traffic still flows to the restored backend set.
    let answered = bed.get(bed.topo.client_addrs()[0]);
    assert!(["b2", "b3"].contains(&answered.as_str()), "{answered}");

    // A corrupt file: set aside, reported, and the daemon runs from the config alone.
    bed.lb.stop().unwrap();
    std::fs::write(
        &state_file,
        "{\"format\": \"lb-state\", \"version\": 1, \"services\": [",
    )
    .unwrap();
    bed.lb.run_again(bed.topo.lb_ns());
    let log = bed.lb.log();
    let line = log
        .lines()
        .find(|l| l.contains("state file not used"))
        .unwrap_or_else(|| panic!("no log line about the corrupt file:\n{log}"));
    assert!(
        line.contains("is not an lb state file") && line.contains("set aside as"),
        "{line}"
    );
    let aside: Vec<_> = std::fs::read_dir(bed.lb.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(state(&bed, "b1").as_deref(), Some("active"));
    assert_eq!(bed.lb.backend_names("web"), ["b1", "b2"]);
    bed.lb.assert_running();
}

#[test]
fn a_move_the_file_holds_that_cannot_come_up_leaves_the_service_as_the_config_has_it() {
    if !require_root("a_move_the_file_holds_that_cannot_come_up_leaves_the_service_as_the_config_has_it") {
        return;
    }
    let mut bed = Bed::new("stm", 2, 1, |topo, sock| {
        let state_file = sock.with_file_name("state.json");
        let top = format!("state_file = \"{}\"\n", state_file.display());
        config_toml(sock, &top, "", &std_services(topo, 2, false))
    });
    let state_file = bed.lb.socket.with_file_name("state.json");
    let web = bed.web().to_string();
    bed.lb.stop().unwrap();
    // The file moves web to an address no interface of the host has: it cannot be bound.
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(file["services"][0]["name"], "web");
    file["services"][0]["listen"] = "192.0.2.55:80".into();
    std::fs::write(&state_file, file.to_string()).unwrap();

    bed.lb.run_again(bed.topo.lb_ns());
    let log = bed.lb.log();
    assert_eq!(
        service_of(&bed.lb.status(), "web")["listen"],
        web.as_str(),
        "{log}"
    );
    for expected in [
        "state file: change not restored",
        "add service web on 192.0.2.55:80",
        "state file: service web kept as the config file has it",
    ] {
        assert!(log.contains(expected), "{expected:?} not in the log:\n{log}");
    }
    let answered = bed.get(bed.topo.client_addrs()[0]);
    assert!(["b1", "b2"].contains(&answered.as_str()), "{answered}");

    // The file written since holds web as the config has it: the next start has nothing to skip.
    bed.lb.stop().unwrap();
    bed.lb.run_again(bed.topo.lb_ns());
    let log = bed.lb.log();
    assert!(
        log.contains("restored from the state file: no runtime changes") && !log.contains("not restored"),
        "{log}"
    );
    assert_eq!(service_of(&bed.lb.status(), "web")["listen"], web.as_str());
    let answered = bed.get(bed.topo.client_addrs()[0]);
    assert!(["b1", "b2"].contains(&answered.as_str()), "{answered}");
    bed.lb.assert_running();
}
