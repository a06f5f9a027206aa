//! The control server under connection exhaustion, in-process on a temp socket: slots, root's
//! own slots through the real SO_PEERCRED path (other uids are perl clients run as `nobody`), and
//! idle connections timed out.

use crate::testlog::logged;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{Limits, MAX_CONNECTIONS, MAX_REQUEST, ROOT_SLOTS, Slots, answer, bind, run_limited};
use crate::config::{Config, ControlConfig, DatapathKind};
use crate::datapath::fake;

const CONFIG: &str = r#"
ring_size = 1009
[[service]]
name = "web"
listen = "10.0.0.100:80"
[service.health]
kind = "none"
[[service.backend]]
name = "b1"
address = "10.1.1.2:80"
"#;

/// The uid of `nobody`, the ordinary user the test's other clients run as.
const NOBODY: u32 = 65534;

#[test]
fn only_root_takes_roots_slots() {
    let slots = Slots::new(&Limits {
        connections: 2,
        root_slots: 1,
        ..Limits::default()
    });
    let ordinary = [slots.take(1000).unwrap(), slots.take(0).unwrap()];
    assert!(
        slots.take(1000).is_none(),
        "an ordinary uid took a slot beyond the limit"
    );
    let root = slots.take(0).expect("root has a slot of its own");
    assert!(slots.take(0).is_none(), "root's slots are bounded too");
    drop(ordinary);
    assert!(slots.take(1000).is_some(), "a freed slot is taken again");
    drop(root);
}

/// A control socket served in-process (mode 0666, `nobody` allowed) until dropped.
struct Server {
    dir: PathBuf,
    socket: PathBuf,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server(limits: Limits) -> Server {
    use std::os::unix::fs::PermissionsExt;
    let engine = fake::engine(Config::parse(CONFIG, "test").unwrap(), &[DatapathKind::Proxy]).unwrap();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lb-control-slots-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = ControlConfig {
        socket: dir.join("lb.sock"),
        mode: 0o666,
        allowed_uids: vec![NOBODY],
        ..ControlConfig::default()
    };
    let (listener, access) = bind(&control).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(run_limited(
        listener,
        access,
        Arc::new(engine),
        stop.clone(),
        limits,
    ));
    Server {
        dir,
        socket: control.socket,
        stop,
    }
}

/// perl, as `nobody`: `hold N` connects N times, says `held` and keeps them until stdin closes;
/// `ask` sends a status request and prints the answer line.
const CLIENT: &str = r#"
use IO::Socket::UNIX;
my ($path, $what, $n) = @ARGV;
$| = 1;
if ($what eq "hold") {
    my @held;
    for (1..$n) {
        push @held, IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or die "connect: $!";
    }
    print "held\n";
    <STDIN>;
} else {
    my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or die "connect: $!";
    print $c "{\"cmd\":\"status\"}\n";
    my $line = <$c>;
    print $line;
}
"#;

fn as_nobody(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("perl");
    c.arg("-e")
        .arg(CLIENT)
        .arg(socket)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY);
    c
}

/// Holds `n` idle connections as `nobody` until dropped.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn hold_as_nobody(socket: &Path, n: usize) -> Held {
    let mut child = as_nobody(socket, &["hold", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "held\n", "perl could not hold {n} connections");
    Held(child)
}

/// The daemon's answer to `status`, asked as `nobody`.
async fn ask_as_nobody(socket: &Path) -> serde_json::Value {
    let mut c = as_nobody(socket, &["ask"]);
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("answer {text:?}: {e}"))
}

/// The daemon's answer to `status`, asked in-process (as root).
async fn ask(socket: &Path) -> serde_json::Value {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), BufReader::new(read).read_line(&mut line))
        .await
        .expect("answered")
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

fn can_run_as_nobody() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run clients as another uid");
        return false;
    }
    if Command::new("perl").arg("-e1").status().is_err() {
        eprintln!("skipped: needs perl for the clients run as another uid");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_socket_keeps_roots_slots_and_times_idle_connections_out() {
    if !can_run_as_nobody() {
        return;
    }
    let limits = Limits {
        first_request: Duration::from_secs(3),
        idle: Duration::from_secs(3),
        ..Limits::default()
    };
    let srv = server(limits);
    assert_eq!(ask_as_nobody(&srv.socket).await["ok"], true, "nobody is allowed");

    // Their first-request timers start as the server accepts them, from here on.
    let holding = Instant::now();
    let held = hold_as_nobody(&srv.socket, MAX_CONNECTIONS);
    let full = Instant::now();
    let refused = ask_as_nobody(&srv.socket).await;
    assert_eq!(refused["ok"], false, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("too many control connections"), "{error}");
    // Root gets in (the peer credentials say uid 0), up to its own slots.
    let answer = ask(&srv.socket).await;
    assert_eq!(answer["ok"], true, "root was locked out: {answer}");
    let mut roots = Vec::new();
    for _ in 0..ROOT_SLOTS {
        roots.push(tokio::net::UnixStream::connect(&srv.socket).await.unwrap());
    }
    // Once the server has taken those in (under load that can take a moment), root is refused too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while ask(&srv.socket).await["ok"] != false {
        assert!(Instant::now() < deadline, "root's slots are bounded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        full.elapsed() < limits.first_request,
        "the test was too slow to see a full socket"
    );

    // The idle connections are closed after the first-request timeout: ordinary users get in.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask_as_nobody(&srv.socket).await;
        if answer["ok"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle connections were never closed: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        holding.elapsed() >= limits.first_request,
        "{:?}",
        holding.elapsed()
    );
    drop(held);
}

#[test]
fn operator_commands_are_logged_without_their_secrets() {
    let engine = fake::engine(
        Config::parse(CONFIG, "test").unwrap(),
        &[DatapathKind::Proxy, DatapathKind::Ajp],
    )
    .unwrap();
    let add = r#"{"cmd":"add-service","name":"sx","listen":"127.0.0.41:18010","protocol":"ajp","datapath":"ajp","health":{"kind":"none"},"ajp":{"secret":"TOPSECRET123","backend_secret":"BACKSECRET456"},"backend":[{"address":"127.0.0.32:19001"}]}"#;
    // The second one is refused (sx exists): logged all the same, and without the secrets.
    let (answers, log) = logged(|| {
        [
            answer(add.as_bytes(), 0, &engine),
            answer(add.as_bytes(), 0, &engine),
        ]
    });
    assert!(answers[0].ok && !answers[1].ok, "{answers:?}");
    assert_eq!(log.matches("operator command uid=0").count(), 2, "{log}");
    assert!(log.contains("operator command failed"), "{log}");
    assert!(
        !log.contains("TOPSECRET123") && !log.contains("BACKSECRET456"),
        "{log}"
    );
    assert!(
        log.contains(r#""ajp":{"backend_secret":"(hidden)","secret":"(hidden)"}"#),
        "{log}"
    );
    // The rest of the request is shown as it came.
    assert!(log.contains(r#""listen":"127.0.0.41:18010""#), "{log}");

    // The masked form hides a secret at any depth, and shows nothing of text that is not JSON.
    let masked = super::masked(r#"{"cmd":"x","list":[{"ajp":{"secret":{"a":"S1"}}}],"backend_secret":"S2"}"#);
    assert_eq!(
        masked,
        r#"{"backend_secret":"(hidden)","cmd":"x","list":[{"ajp":{"secret":"(hidden)"}}]}"#
    );
    assert_eq!(
        super::masked(r#"{"ajp":{"secret":"TOPSECRET123""#),
        "(31 bytes, not JSON)"
    );
}

/// A request of MAX_REQUEST bytes (the README's "at most 64 KiB") is answered; one byte more is
/// refused as too long.
#[tokio::test]
async fn a_request_of_the_most_bytes_allowed_is_answered_and_one_more_is_refused() {
    let srv = server(Limits::default());
    for (len, ok) in [(MAX_REQUEST, true), (MAX_REQUEST + 1, false)] {
        let stream = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut request = b"{\"cmd\":\"status\"}".to_vec();
        request.resize(len, b' ');
        request.push(b'\n');
        write.write_all(&request).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), BufReader::new(read).read_line(&mut line))
            .await
            .expect("answered")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["ok"], ok, "{len} bytes: {v}");
        if !ok {
            assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
        }
    }
}
