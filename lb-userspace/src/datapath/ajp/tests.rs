//! In-process tests of the AJP datapath on 127.0.0.1: fake AJP backends (tokio tasks speaking
//! AJP as Tomcat does) and a fake web tier sending Forward Requests as mod_jk does.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::ajp::codec::{
    Attribute, ContainerMessage, Direction, ForwardRequest, Frame, FrameDecoder, HeaderName, SendHeaders,
    ServerMessage, attr, req_header,
};
use crate::config::{AjpConfig, Protocol};
use crate::state::{Command, tests::backend, tests::service};

// ---------------------------------------------------------------------------------------------
// Fake backend.

/// What a fake backend does with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Reads the whole body, answers 200 with its name and the body, End Response reuse.
    Answer,
    /// As `Answer`, but End Response says: do not reuse.
    AnswerNoReuse,
    /// Reads the whole body, then closes without a word.
    CloseBeforeAnswer,
    /// Reads the whole body, then says nothing (a hung application) until lb closes the
    /// connection.
    Stall,
    /// Sends the response headers, then says nothing more.
    StallAfterHeaders,
    /// Reads the whole body, then sends a Send Body Chunk that declares more data than it holds.
    BadChunk,
    /// As `Answer`, after working on the request for [`SLOW`].
    Slow,
    /// Answers 200 with [`LARGE`] bytes (whatever the request), End Response reuse.
    Large,
    /// Takes the Forward Request, then asks for body packets without end and reads none of them
    /// (its receive buffer is small): until lb closes the connection.
    AskWithoutReading,
}

/// The size of a `Mode::Large` answer: more than the sockets between lb and a web tier that
/// reads nothing can buffer.
const LARGE: usize = 32 << 20;

/// How long a `Mode::Slow` backend works on a request.
const SLOW: Duration = Duration::from_millis(600);

#[derive(Clone, Debug)]
struct Seen {
    remote_addr: String,
    secret: Option<String>,
    body: Vec<u8>,
    connection: usize,
}

struct FakeBackend {
    name: String,
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Connections lb closed while a request stalled on them.
    stalls_closed: Arc<AtomicUsize>,
}

impl FakeBackend {
    async fn start(name: &str, mode: Mode) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        if mode == Mode::AskWithoutReading {
            // Inherited by accepted sockets: a few KiB fill it.
            nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
        }
        let b = FakeBackend {
            name: name.to_string(),
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(Mutex::new(mode)),
            seen: Arc::default(),
            connections: Arc::default(),
            stalls_closed: Arc::default(),
        };
        let (name, mode, seen, connections, closed) = (
            b.name.clone(),
            b.mode.clone(),
            b.seen.clone(),
            b.connections.clone(),
            b.stalls_closed.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let n = connections.fetch_add(1, SeqCst);
                let _ = s.set_nodelay(true);
                let (name, mode, seen, closed) = (name.clone(), mode.clone(), seen.clone(), closed.clone());
                tokio::spawn(async move {
                    let _ = backend_conn(s, n, &name, &mode, &seen, &closed).await;
                });
            }
        });
        b
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut, d: Direction) -> Option<Frame> {
    let decoder = FrameDecoder::new(d, 65536);
    loop {
        if let Some(f) = decoder.decode(buf).unwrap() {
            return Some(f);
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn send(s: &mut TcpStream, m: ContainerMessage) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    m.encode(&mut out, 65536).unwrap();
    s.write_all(&out).await
}

async fn backend_conn(
    mut s: TcpStream,
    connection: usize,
    name: &str,
    mode: &Mutex<Mode>,
    seen: &Mutex<Vec<Seen>>,
    stalls_closed: &AtomicUsize,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    while let Some(f) = read_frame(&mut s, &mut buf, Direction::ToContainer).await {
        let req = match ServerMessage::decode(f.payload(), false).unwrap() {
            ServerMessage::CPing => {
                s.write_all(&crate::ajp::CPONG).await?;
                continue;
            }
            ServerMessage::ForwardRequest(r) => r,
            other => panic!("backend got {other:?}"),
        };
        if *mode.lock().unwrap() == Mode::AskWithoutReading {
            while send(&mut s, ContainerMessage::GetBodyChunk(8186)).await.is_ok() {}
            stalls_closed.fetch_add(1, SeqCst);
            return Ok(());
        }
        // Read the body as Tomcat does: the first packet comes unasked, then ask for the rest.
        let mut body = Vec::new();
        let mut left = req.content_length().unwrap_or(0) as usize;
        let mut first = true;
        while left > 0 {
            if !first {
                send(&mut s, ContainerMessage::GetBodyChunk(8186)).await?;
            }
            first = false;
            let Some(f) = read_frame(&mut s, &mut buf, Direction::ToContainer).await else {
                return Ok(());
            };
            let data = crate::ajp::codec::decode_body(f.payload()).unwrap();
            assert!(!data.is_empty(), "body ended early");
            left -= data.len();
            body.extend_from_slice(&data);
        }
        let text = |s: &Option<Bytes>| s.as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
        seen.lock().unwrap().push(Seen {
            remote_addr: text(&req.remote_addr).unwrap_or_default(),
            secret: req.attribute(attr::SECRET).and_then(text),
            body: body.clone(),
            connection,
        });
        let mode = *mode.lock().unwrap();
        if mode == Mode::CloseBeforeAnswer {
            return Ok(());
        }

        if mode == Mode::BadChunk {
            // 65,535 bytes announced, one there.
            s.write_all(&[b'A', b'B', 0, 4, 3, 0xff, 0xff, b'x']).await?;
            std::future::pending::<()>().await;
        }
        if mode == Mode::Slow {
            tokio::time::sleep(SLOW).await;
        }
        if mode == Mode::Stall {
            let mut rest = [0u8; 256];
            while s.read(&mut rest).await.is_ok_and(|n| n > 0) {}
            stalls_closed.fetch_add(1, SeqCst);
            return Ok(());
        }
        send(
            &mut s,
            ContainerMessage::SendHeaders(Box::new(SendHeaders {
                status: 200,
                message: Some(Bytes::from_static(b"OK")),
                headers: vec![],
            })),
        )
        .await?;
        if mode == Mode::StallAfterHeaders {
            std::future::pending::<()>().await;
        }
        let mut answer = name.as_bytes().to_vec();
        answer.push(b':');
        answer.extend_from_slice(&body);
        if mode == Mode::Large {
            answer.resize(LARGE, b'x');
        }
        for part in answer.chunks(8000) {
            send(
                &mut s,
                ContainerMessage::SendBodyChunk(Bytes::copy_from_slice(part)),
            )
            .await?;
        }
        send(
            &mut s,
            ContainerMessage::EndResponse {
                reuse: matches!(mode, Mode::Answer | Mode::Slow | Mode::Large),
            },
        )
        .await?;
        if mode == Mode::AnswerNoReuse {
            return Ok(());
        }
    }
    Ok(())
}

/// An address nothing listens on.
fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Fake web tier.

#[derive(Default, Clone)]
struct Req {
    remote_addr: String,
    uri: String,
    cookie: Option<String>,
    body: Vec<u8>,
    secret: Option<String>,
    attributes: Vec<(String, String)>,
    /// AJP method code; GET without a body, POST with one, unless set.
    method: Option<u8>,
}

impl Req {
    fn from(ip: &str) -> Req {
        Req {
            remote_addr: ip.into(),
            uri: "/app/".into(),
            ..Req::default()
        }
    }
    fn cookie(mut self, c: &str) -> Req {
        self.cookie = Some(c.into());
        self
    }
    fn body(mut self, b: &[u8]) -> Req {
        self.body = b.to_vec();
        self
    }
    /// As a PUT (AJP method 5): idempotent, with a body.
    fn put(mut self) -> Req {
        self.method = Some(5);
        self
    }
    fn secret(mut self, s: &str) -> Req {
        self.secret = Some(s.into());
        self
    }
    fn attribute(mut self, n: &str, v: &str) -> Req {
        self.attributes.push((n.into(), v.into()));
        self
    }

    fn encode(&self) -> BytesMut {
        let b = |s: &str| Some(Bytes::copy_from_slice(s.as_bytes()));
        let mut headers = vec![(HeaderName::Coded(req_header::HOST), b("www.example.com"))];
        if let Some(c) = &self.cookie {
            headers.push((HeaderName::Coded(req_header::COOKIE), b(c)));
        }
        if !self.body.is_empty() {
            headers.push((
                HeaderName::Coded(req_header::CONTENT_LENGTH),
                b(&self.body.len().to_string()),
            ));
        }
        let mut attributes: Vec<Attribute> = self
            .attributes
            .iter()
            .map(|(n, v)| Attribute::Request {
                name: b(n),
                value: b(v),
            })
            .collect();
        if let Some(s) = &self.secret {
            attributes.push(Attribute::Coded {
                code: attr::SECRET,
                value: b(s),
            });
        }
        let r = ForwardRequest {
            method: self.method.unwrap_or(if self.body.is_empty() { 2 } else { 4 }),
            protocol: b("HTTP/1.1"),
            req_uri: b(&self.uri),
            remote_addr: b(&self.remote_addr),
            remote_host: None,
            server_name: b("www.example.com"),
            server_port: 80,
            is_ssl: false,
            headers,
            attributes,
        };
        let mut out = BytesMut::new();
        r.encode(&mut out, 8192).unwrap();
        out
    }
}

/// A web-tier connection to lb.
struct Web {
    s: TcpStream,
    buf: BytesMut,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    /// The fake backend that answered.
    fn backend(&self) -> &str {
        self.body.split(':').next().unwrap_or("")
    }
}

impl Web {
    async fn connect(addr: SocketAddr) -> Web {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Web {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Sends a request as mod_jk does and reads the answer; None if lb closed the connection.
    async fn request(&mut self, r: &Req) -> Option<Answer> {
        let mut out = r.encode();
        let chunk = 8186;
        let mut sent = 0;
        if !r.body.is_empty() {
            let n = r.body.len().min(chunk);
            crate::ajp::codec::encode_body(&r.body[..n], &mut out, 8192).unwrap();
            sent = n;
        }
        self.s.write_all(&out).await.ok()?;
        self.answer(r, sent).await
    }

    /// Reads the answer to `r`, whose first `sent` body bytes went with it, feeding the rest of
    /// its body on demand; None if lb closed the connection.
    async fn answer(&mut self, r: &Req, mut sent: usize) -> Option<Answer> {
        let chunk = 8186;
        let mut status = 0;
        let mut body = Vec::new();
        loop {
            let f = read_frame(&mut self.s, &mut self.buf, Direction::ToServer).await?;
            match ContainerMessage::decode(f.payload()).unwrap() {
                ContainerMessage::GetBodyChunk(n) => {
                    let n = usize::from(n).min(r.body.len() - sent).min(chunk);
                    let mut out = BytesMut::new();
                    crate::ajp::codec::encode_body(&r.body[sent..sent + n], &mut out, 8192).unwrap();
                    sent += n;
                    self.s.write_all(&out).await.ok()?;
                }
                ContainerMessage::SendHeaders(h) => status = h.status,
                ContainerMessage::SendBodyChunk(d) => body.extend_from_slice(&d),
                ContainerMessage::EndResponse { reuse } => {
                    // Except after a 403 for a missing or wrong secret, which closes.
                    assert!(reuse || status == 403, "lb keeps web-tier connections");
                    return Some(Answer {
                        status,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                }
                ContainerMessage::CPong => panic!("unexpected CPong"),
            }
        }
    }

    /// Sends a CPing; true if a CPong comes back within `wait`.
    async fn cping(&mut self, wait: Duration) -> bool {
        self.s.write_all(&crate::ajp::CPING).await.unwrap();
        let mut reply = [0u8; 5];
        matches!(
            tokio::time::timeout(wait, self.s.read_exact(&mut reply)).await,
            Ok(Ok(_)) if reply == crate::ajp::CPONG
        )
    }

    /// Whether lb closed the connection (within a second).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

// ---------------------------------------------------------------------------------------------
// lb under test.

struct Lb {
    dp: AjpDatapath,
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Lb {
    /// Service "ajp" with the backends (name, address, backup).
    fn start(backends: &[(&str, SocketAddr, bool)], ajp: AjpConfig) -> Lb {
        let mut svc = service(
            "ajp",
            "127.0.0.1:0",
            backends
                .iter()
                .map(|(n, a, backup)| {
                    let mut b = backend(n, &a.to_string());
                    b.backup = *backup;
                    b
                })
                .collect(),
        );
        svc.protocol = Protocol::Ajp;
        svc.datapath = DatapathKind::Ajp;
        svc.ajp = Some(ajp);
        let balancer = Arc::new(Balancer::new(State::new(0, 101)));
        // Passive health reports go nowhere here (the receiver is dropped).
        let passive = crate::health::passive::Passive::new(tokio::sync::mpsc::channel(1).0);
        let dp = AjpDatapath::new(balancer.clone(), passive);
        let lb = Lb {
            addr: "127.0.0.1:0".parse().unwrap(),
            dp,
            balancer,
        };
        lb.run(Command::AddService { service: svc });
        let addr = lb.dp.local_addr("ajp").unwrap();
        Lb { addr, ..lb }
    }

    fn run(&self, c: Command) {
        let pending = self.balancer.stage(c).unwrap();
        self.dp.apply(pending.effect(), pending.snapshot()).unwrap();
        self.balancer.commit(pending);
    }

    fn set_state(&self, backend: &str, state: AdminState) {
        self.run(Command::SetState {
            service: "ajp".into(),
            backend: backend.into(),
            state,
        });
    }

    fn set_connect_timeout(&self, timeout: Duration) {
        let mut settings = self
            .balancer
            .snapshot()
            .state
            .service("ajp")
            .unwrap()
            .settings
            .clone();
        settings.connect_timeout = timeout;
        self.run(Command::UpdateService { service: settings });
    }

    fn set_health(&self, backend: &str, health: Health) {
        self.run(Command::SetHealth {
            service: "ajp".into(),
            backend: backend.into(),
            health,
        });
    }

    /// The backend the balancer picks for `ip` by address alone.
    fn by_address(&self, ip: &str) -> String {
        let ip: IpAddr = ip.parse().unwrap();
        self.balancer
            .choose("ajp", ip, Instant::now(), &[])
            .unwrap()
            .backend_name
    }

    fn counters(&self) -> AjpServiceCounters {
        self.dp.counters("ajp").unwrap()
    }

    fn backend_counters(&self, name: &str) -> AjpBackendCounters {
        self.counters()
            .backends
            .into_values()
            .find(|b| b.name == name)
            .unwrap()
    }
}

async fn three(mode: Mode) -> (Vec<FakeBackend>, Lb) {
    let mut fakes = Vec::new();
    for n in ["t1", "t2", "t3"] {
        fakes.push(FakeBackend::start(n, mode).await);
    }
    let list: Vec<_> = fakes.iter().map(|f| (f.name.as_str(), f.addr, false)).collect();
    let lb = Lb::start(&list, AjpConfig::default());
    (fakes, lb)
}

fn ip(i: u32) -> String {
    format!("198.51.100.{i}")
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn session_route_is_sticky_whatever_the_address() {
    let (fakes, lb) = three(Mode::Answer).await;
    let mut web = Web::connect(lb.addr).await;
    for i in 0..30 {
        let a = web
            .request(&Req::from(&ip(i)).cookie("lang=en; JSESSIONID=ABCDEF.t2"))
            .await
            .unwrap();
        assert_eq!((a.status, a.backend()), (200, "t2"), "request {i}");
    }
    // The path parameter works too, and wins over the cookie.
    let mut r = Req::from(&ip(1)).cookie("JSESSIONID=X.t2");
    r.uri = "/app/page.jsp;jsessionid=Y.t3".into();
    assert_eq!(web.request(&r).await.unwrap().backend(), "t3");
    assert_eq!(fakes[1].requests(), 30);
    let c = lb.backend_counters("t2");
    assert_eq!(
        (c.requests, c.route_hits, c.address_hits, c.responses_2xx),
        (30, 30, 0, 30)
    );
    assert_eq!(lb.backend_counters("t3").route_hits, 1);
    // Each request saw the browser's address, not the web tier's.
    assert!(
        fakes[1]
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.remote_addr.starts_with("198.51.100."))
    );
}

#[tokio::test]
async fn without_route_the_browser_address_decides() {
    let (fakes, lb) = three(Mode::Answer).await;
    let mut web = Web::connect(lb.addr).await;
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let want = lb.by_address(&ip(i));
        for round in 0..3 {
            // An unknown route is no route.
            let r = if round == 2 {
                Req::from(&ip(i)).cookie("JSESSIONID=Z.nosuchnode")
            } else {
                Req::from(&ip(i))
            };
            let a = web.request(&r).await.unwrap();
            assert_eq!(a.backend(), want, "address {i} round {round}");
        }
        used.insert(want);
    }
    // Every request came over one web-tier connection from 127.0.0.1, yet users spread.
    assert_eq!(used.len(), 3, "{used:?}");
    let hits: u64 = ["t1", "t2", "t3"]
        .iter()
        .map(|n| lb.backend_counters(n).address_hits)
        .sum();
    assert_eq!(hits, 90);
    assert_eq!(fakes.iter().map(FakeBackend::requests).sum::<usize>(), 90);
    // The choice was recorded as affinity: a weight change does not move the address.
    let first = lb.by_address(&ip(0));
    for n in ["t1", "t2", "t3"].iter().filter(|n| **n != first) {
        lb.run(Command::SetWeight {
            service: "ajp".into(),
            backend: (*n).into(),
            weight: 100,
        });
    }
    assert_eq!(web.request(&Req::from(&ip(0))).await.unwrap().backend(), first);
}

#[tokio::test]
async fn route_failover_drain_and_maintenance() {
    let (_fakes, lb) = three(Mode::Answer).await;
    let mut web = Web::connect(lb.addr).await;
    let session = "JSESSIONID=S.t2";
    // Drain: the session stays, new users avoid t2.
    lb.set_state("t2", AdminState::Drain);
    let a = web.request(&Req::from(&ip(7)).cookie(session)).await.unwrap();
    assert_eq!(a.backend(), "t2");
    for i in 100..130 {
        assert_ne!(web.request(&Req::from(&ip(i))).await.unwrap().backend(), "t2");
    }
    // Maintenance (and down): the session's requests go where the address leads, counted.
    for (state, health) in [
        (AdminState::Maintenance, Health::Up),
        (AdminState::Active, Health::Down),
    ] {
        lb.set_state("t2", state);
        lb.set_health("t2", health);
        let before = lb.counters();
        let want = lb.by_address(&ip(8));
        assert_ne!(want, "t2");
        let a = web.request(&Req::from(&ip(8)).cookie(session)).await.unwrap();
        assert_eq!(a.backend(), want);
        let after = lb.backend_counters(&want);
        let old = before.backends.values().find(|b| b.name == want).unwrap();
        assert_eq!(after.route_failovers, old.route_failovers + 1);
        lb.set_health("t2", Health::Up);
    }
    // Back to active: the session returns to t2 at once.
    lb.set_state("t2", AdminState::Active);
    assert_eq!(
        web.request(&Req::from(&ip(8)).cookie(session))
            .await
            .unwrap()
            .backend(),
        "t2"
    );
}

#[tokio::test]
async fn an_idempotent_request_with_a_body_is_retried_on_the_next_backend() {
    let (fakes, lb) = three(Mode::Answer).await;
    // A browser whose address leads to t1, which takes the whole body and then dies.
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    fakes[0].set_mode(Mode::CloseBeforeAnswer);
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&Req::from(&user).body(&body).put()).await.unwrap();
    assert_eq!(a.status, 200);
    assert_ne!(a.backend(), "t1");
    let other = fakes.iter().find(|f| f.name == a.backend()).unwrap();
    assert_eq!(
        other.seen.lock().unwrap()[0].body,
        body,
        "the same body, replayed"
    );
    assert_eq!(fakes[0].seen.lock().unwrap()[0].body, body);
    assert_eq!(lb.backend_counters("t1").retries, 1);
    // The web tier's connection carries on.
    fakes[0].set_mode(Mode::Answer);
    assert_eq!(web.request(&Req::from(&user)).await.unwrap().status, 200);
}

/// A POST that reached its backend may have run there: when the backend fails before answering,
/// the web tier gets a 502 and no other backend runs it again (mod_jk and nginx do the same).
#[tokio::test]
async fn a_post_that_reached_a_failing_backend_gets_502_and_runs_nowhere_else() {
    let (fakes, lb) = three(Mode::Answer).await;
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    let mut web = Web::connect(lb.addr).await;
    // A first request leaves a pooled connection to t1: the POST goes out on it, so the retry on
    // a new connection to the same backend (for a stale pooled one) must not run it again there.
    assert_eq!(web.request(&Req::from(&user)).await.unwrap().backend(), "t1");
    fakes[0].set_mode(Mode::CloseBeforeAnswer);
    for round in 1..=2 {
        let a = web.request(&Req::from(&user).body(b"order=1")).await.unwrap();
        assert_eq!(a.status, 502, "round {round}");
        assert_eq!(fakes[0].requests(), 1 + round, "round {round}: run twice on t1");
        assert_eq!(
            fakes[1].requests() + fakes[2].requests(),
            0,
            "round {round}: run again elsewhere"
        );
    }
    fakes[0].set_mode(Mode::Answer);
    assert_eq!(web.request(&Req::from(&user)).await.unwrap().status, 200);
}

#[tokio::test]
async fn a_malformed_body_chunk_from_a_backend_is_not_relayed_and_the_request_moves_on() {
    let (fakes, lb) = three(Mode::Answer).await;
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    fakes[0].set_mode(Mode::BadChunk);
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&Req::from(&user)).await.unwrap();
    assert_eq!(a.status, 200);
    assert_ne!(a.backend(), "t1", "t1's chunk was not passed on");
    assert_eq!(fakes[0].requests(), 1);
    assert_eq!(lb.backend_counters("t1").retries, 1);
    fakes[0].set_mode(Mode::Answer);
    assert_eq!(web.request(&Req::from(&user)).await.unwrap().status, 200);
}

#[tokio::test]
async fn a_request_in_the_moment_a_backend_is_removed_moves_on_instead_of_a_503() {
    let (_fakes, lb) = three(Mode::Answer).await;
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t2").unwrap();
    // The datapath has dropped t2's pool; the published state still lists t2 (the engine
    // publishes right after).
    let pending = lb
        .balancer
        .stage(Command::RemoveBackend {
            service: "ajp".into(),
            backend: "t2".into(),
        })
        .unwrap();
    lb.dp.apply(pending.effect(), pending.snapshot()).unwrap();
    let mut web = Web::connect(lb.addr).await;
    for req in [Req::from(&user).cookie("JSESSIONID=x.t2"), Req::from(&user)] {
        let a = web.request(&req).await.unwrap();
        assert_eq!(a.status, 200);
        assert_ne!(a.backend(), "t2");
    }
    lb.balancer.commit(pending);
}

#[tokio::test]
async fn body_larger_than_the_retry_buffer_gets_503_not_a_retry() {
    let mut fakes = Vec::new();
    for n in ["t1", "t2"] {
        fakes.push(FakeBackend::start(n, Mode::CloseBeforeAnswer).await);
    }
    let list: Vec<_> = fakes.iter().map(|f| (f.name.as_str(), f.addr, false)).collect();
    let lb = Lb::start(
        &list,
        AjpConfig {
            retry_buffer: 10_000,
            ..AjpConfig::default()
        },
    );
    let mut web = Web::connect(lb.addr).await;
    let body = vec![b'x'; 30_000];
    let a = web.request(&Req::from(&ip(1)).body(&body).put()).await.unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(
        fakes.iter().map(FakeBackend::requests).sum::<usize>(),
        1,
        "not retried"
    );
    assert_eq!(lb.counters().unavailable_503, 1);
}

#[tokio::test]
async fn no_backend_gives_a_clean_503() {
    let lb = Lb::start(
        &[("a", dead_address(), false), ("b", dead_address(), false)],
        AjpConfig::default(),
    );
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&Req::from(&ip(1)).body(b"payload")).await.unwrap();
    assert_eq!(a.status, 503);
    // Still usable afterwards, and again 503 once every backend is in maintenance.
    lb.set_state("a", AdminState::Maintenance);
    lb.set_state("b", AdminState::Maintenance);
    assert_eq!(web.request(&Req::from(&ip(2))).await.unwrap().status, 503);
    assert_eq!(lb.counters().unavailable_503, 2);
}

#[tokio::test]
async fn backup_is_the_last_resort_while_primaries_fail() {
    let spare = FakeBackend::start("spare", Mode::Answer).await;
    let lb = Lb::start(
        &[
            ("p1", dead_address(), false),
            ("p2", dead_address(), false),
            ("p3", dead_address(), false),
            ("spare", spare.addr, true),
        ],
        AjpConfig::default(),
    );
    let mut web = Web::connect(lb.addr).await;
    // Primaries still look healthy (not yet detected down): every request still succeeds.
    for i in 0..5 {
        let a = web.request(&Req::from(&ip(i)).body(b"form=1")).await.unwrap();
        assert_eq!((a.status, a.backend()), (200, "spare"));
    }
}

#[tokio::test]
async fn secret_attributes_and_shutdown_are_refused() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let lb = Lb::start(
        &[("t1", fake.addr, false)],
        AjpConfig {
            secret: Some(crate::config::Secret("front".into())),
            backend_secret: Some(crate::config::Secret("back".into())),
            ..AjpConfig::default()
        },
    );
    let ok = Req::from(&ip(1)).secret("front");
    // Without the right secret: 403, and the connection is closed (one guess per connection),
    // at once even when the request announced a body that never comes.
    // (`encode` gives the Forward Request alone: its body packet is not sent.)
    let never_sent = Req::from(&ip(1)).secret("frontx").body(b"abc").encode();
    for (what, req) in [
        ("no secret", Req::from(&ip(1)).encode()),
        ("wrong secret", Req::from(&ip(1)).secret("wrong").encode()),
        ("a body announced, never sent", never_sent),
    ] {
        let mut web = Web::connect(lb.addr).await;
        web.s.write_all(&req).await.unwrap();
        let mut answer = Vec::new();
        let read = async {
            while let Some(f) = read_frame(&mut web.s, &mut web.buf, Direction::ToServer).await {
                answer.push(ContainerMessage::decode(f.payload()).unwrap());
                if matches!(answer.last(), Some(ContainerMessage::EndResponse { .. })) {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .unwrap_or_else(|_| panic!("{what}: answered at once"));
        assert!(
            matches!(answer.first(), Some(ContainerMessage::SendHeaders(h)) if h.status == 403),
            "{what}: {answer:?}"
        );
        assert!(
            matches!(
                answer.last(),
                Some(ContainerMessage::EndResponse { reuse: false })
            ),
            "{what}: the answer says the connection ends: {answer:?}"
        );
        assert!(closed_by_lb(&mut web.s).await, "{what}: closed after the 403");
    }
    assert_eq!(lb.counters().refused_secret, 3);
    let mut web = Web::connect(lb.addr).await;
    // Ghostcat: include attributes are refused; ordinary mod_jk attributes pass.
    let ghost = ok
        .clone()
        .attribute("javax.servlet.include.request_uri", "/WEB-INF/web.xml");
    assert_eq!(web.request(&ghost).await.unwrap().status, 403);
    let other = ok.clone().attribute("org.apache.catalina.jsp_file", "/x");
    assert_eq!(web.request(&other).await.unwrap().status, 403);
    assert_eq!(lb.counters().refused_attribute, 2);
    let fine = ok.clone().attribute("AJP_REMOTE_PORT", "50000");
    assert_eq!(web.request(&fine).await.unwrap().status, 200);
    assert_eq!(fake.requests(), 1, "refused requests never reach the backend");
    // The backend gets the backend secret, not the front one.
    assert_eq!(fake.seen.lock().unwrap()[0].secret.as_deref(), Some("back"));
    // Shutdown: refused, counted, connection closed; lb keeps serving.
    let mut out = BytesMut::new();
    ServerMessage::Shutdown.encode(&mut out, 8192).unwrap();
    web.s.write_all(&out).await.unwrap();
    assert!(web.closed().await);
    assert_eq!(lb.counters().refused_shutdown, 1);
    assert_eq!(fake.connections.load(SeqCst), 1, "nothing forwarded");
    let mut again = Web::connect(lb.addr).await;
    assert_eq!(again.request(&ok).await.unwrap().status, 200);
}

#[tokio::test]
async fn front_cping_is_answered_while_a_backend_takes_requests() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let lb = Lb::start(&[("t1", fake.addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    assert!(web.cping(Duration::from_secs(2)).await);
    assert_eq!(fake.connections.load(SeqCst), 0, "lb answers itself");
    lb.set_state("t1", AdminState::Maintenance);
    assert!(!web.cping(Duration::from_millis(300)).await);
    assert_eq!(lb.counters().cpings_answered, 1);
}

#[tokio::test]
async fn pooled_connections_are_reused_only_after_the_reuse_flag() {
    let fake = FakeBackend::start("t1", Mode::AnswerNoReuse).await;
    let lb = Lb::start(&[("t1", fake.addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    for _ in 0..3 {
        assert_eq!(web.request(&Req::from(&ip(1))).await.unwrap().status, 200);
    }
    assert_eq!(
        fake.connections.load(SeqCst),
        3,
        "reuse = false: one connection each"
    );
    fake.set_mode(Mode::Answer);
    for _ in 0..5 {
        assert_eq!(web.request(&Req::from(&ip(1))).await.unwrap().status, 200);
    }
    // The first of these opened a connection that the other four reused.
    assert_eq!(fake.connections.load(SeqCst), 4);
    let conns: Vec<usize> = fake.seen.lock().unwrap().iter().map(|s| s.connection).collect();
    assert_eq!(&conns[3..], &[3, 3, 3, 3, 3]);
    let c = lb.backend_counters("t1");
    assert_eq!((c.pool_idle, c.pool_busy, c.in_flight), (1, 0, 0));
    // The connection counters every datapath reports count backend connections here.
    {
        let snap = lb.balancer.snapshot();
        let svc = snap.state.service("ajp").unwrap();
        let runtime = snap.runtime(svc, svc.backend("t1").unwrap());
        let st = &runtime.stats;
        assert_eq!(st.total_connections.load(SeqCst), 4);
        assert_eq!(st.active_connections.load(SeqCst), 1);
        assert!(st.bytes_in.load(SeqCst) > 0 && st.bytes_out.load(SeqCst) > 0);
    }
    // Maintenance closes the idle connection.
    lb.set_state("t1", AdminState::Maintenance);
    assert_eq!(lb.backend_counters("t1").pool_idle, 0);
}

#[tokio::test]
async fn idle_connection_closed_by_the_backend_is_replaced_transparently() {
    // A backend that answers once per connection with reuse = true, then closes it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    let Some(f) = read_frame(&mut s, &mut buf, Direction::ToContainer).await else {
                        return;
                    };
                    if f.kind() != Some(crate::ajp::codec::kind::CPING) {
                        break;
                    }
                    let _ = s.write_all(&crate::ajp::CPONG).await;
                }
                let _ = send(
                    &mut s,
                    ContainerMessage::SendHeaders(Box::new(SendHeaders {
                        status: 204,
                        message: None,
                        headers: vec![],
                    })),
                )
                .await;
                let _ = send(&mut s, ContainerMessage::EndResponse { reuse: true }).await;
                // Closes: the pooled connection is dead by the next request.
            });
        }
    });
    let lb = Lb::start(&[("t1", addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    for _ in 0..3 {
        assert_eq!(web.request(&Req::from(&ip(1))).await.unwrap().status, 204);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(SeqCst), 3);
    assert_eq!(lb.counters().unavailable_503, 0);
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_connections() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let lb = Lb::start(&[("t1", fake.addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    assert_eq!(web.request(&Req::from(&ip(1))).await.unwrap().status, 200);
    assert_eq!(lb.backend_counters("t1").pool_idle, 1);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), lb.dp.shutdown())
        .await
        .expect("shutdown finished at once with only idle connections");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(web.closed().await, "idle web-tier connection closed");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let lb = Lb::start(&[("t1", fake.addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    // Larger than retry_buffer: streamed packet by packet, echoed back in many chunks.
    let body: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    for _ in 0..2 {
        let a = web.request(&Req::from(&ip(3)).body(&body)).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.body.as_bytes(), [b"t1:".as_slice(), &body].concat());
    }
    assert_eq!(fake.seen.lock().unwrap()[1].body, body);
    assert_eq!(fake.connections.load(SeqCst), 1);
}

#[tokio::test]
async fn engine_runs_ajp_services_and_reports_their_counters() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let port = dead_address().port();
    let text = format!(
        "[[service]]\nname = \"tomcat\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"ajp\"\ndatapath = \"ajp\"\n\
         [service.health]\nkind = \"none\"\n[service.ajp]\nsecret = \"s3cret-value\"\n\
         [[service.backend]]\nname = \"t1\"\naddress = \"{}\"\n",
        fake.addr
    );
    let config = crate::config::Config::parse(&text, "test.toml").unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let engine =
        crate::engine::Engine::start(config, tx, tokio_util::sync::CancellationToken::new()).unwrap();
    let mut web = Web::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let a = web
        .request(&Req::from(&ip(1)).secret("s3cret-value"))
        .await
        .unwrap();
    assert_eq!((a.status, a.backend()), (200, "t1"));
    assert_eq!(web.request(&Req::from(&ip(1))).await.unwrap().status, 403);
    // A connection that sent no secret is closed after its 403: the web tier connects anew.
    let mut web = Web::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let stats = engine.stats();
    let svc = stats.services.iter().find(|s| s.name == "tomcat").unwrap();
    let ajp = svc.ajp.as_ref().expect("ajp counters in stats");
    assert_eq!(ajp.refused_secret, 1);
    let t1 = ajp.backends.values().next().unwrap();
    assert_eq!((t1.name.as_str(), t1.requests, t1.responses_2xx), ("t1", 1, 1));
    // `lb which` answers by the browser's address for ajp services too.
    let which = engine.which("tomcat", &ip(1)).unwrap();
    assert_eq!(which.backend.as_deref(), Some("t1"));
    assert_eq!(
        which.reason, "affinity",
        "the request recorded the address's affinity"
    );
    // The secret shows nowhere in the operator's views.
    let shown = format!(
        "{}{}",
        serde_json::to_string(&engine.stats()).unwrap(),
        serde_json::to_string(&engine.status(None).unwrap()).unwrap()
    );
    assert!(!shown.contains("s3cret-value"));
    let text =
        crate::observe::metrics::render(&engine.stats(), crate::observe::metrics::Format::Text).unwrap();
    assert!(!text.contains("s3cret-value"));
    assert!(
        text.contains("lb_ajp_backend_requests_total{service=\"tomcat\",backend=\"t1\"} 1"),
        "{text}"
    );
    // A browser on IPv6 through the web tier: `lb which` answers for it too (the listener's
    // family is the web tier's, not the browser's).
    let which = engine.which("tomcat", "2001:db8::7").unwrap();
    assert_eq!(which.backend.as_deref(), Some("t1"));
    // t1 drains; its only user goes on by its session route, which refreshes no address entry:
    // t1 is not drained while that session is in use (within affinity_timeout).
    let run = |line: &str| {
        engine
            .handle(crate::control::protocol::Request::parse(line).unwrap())
            .unwrap()
    };
    run(r#"{"cmd":"set-state","service":"tomcat","backend":"t1","state":"drain"}"#);
    // No connection left open to t1 after the request (none pooled).
    fake.set_mode(Mode::AnswerNoReuse);
    let session = Req::from(&ip(1)).secret("s3cret-value").cookie("JSESSIONID=x.t1");
    assert_eq!(web.request(&session).await.unwrap().backend(), "t1");
    run(r#"{"cmd":"affinity-flush","service":"tomcat"}"#);
    let t1_view = || {
        let st = engine.status(None).unwrap();
        let svc = st.services.into_iter().find(|s| s.name == "tomcat").unwrap();
        svc.backends.into_iter().find(|b| b.name == "t1").unwrap()
    };
    assert!(eventually(|| t1_view().active_connections == 0).await);
    let v = t1_view();
    assert_eq!(v.affinity_clients, 0);
    assert!(!v.drained, "a session was routed to t1 just now: {v:?}");
    tokio::time::timeout(Duration::from_secs(2), engine.shutdown())
        .await
        .expect("idle connections do not hold up shutdown");
}

/// A backend whose every pooled connection is busy is busy, not failing: a request bound to it by
/// its session waits there for a free connection (beyond connect_timeout) and keeps its session;
/// one bound by the browser's address alone moves on, as before.
#[tokio::test]
async fn a_session_waits_for_its_busy_backend_instead_of_moving() {
    let t1 = FakeBackend::start("t1", Mode::Slow).await;
    let t2 = FakeBackend::start("t2", Mode::Answer).await;
    let lb = Lb::start(
        &[("t1", t1.addr, false), ("t2", t2.addr, false)],
        AjpConfig {
            pool_size: 1,
            ..AjpConfig::default()
        },
    );
    lb.set_connect_timeout(Duration::from_millis(150));
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    let other = (0..200).map(ip).find(|i| lb.by_address(i) == "t2").unwrap();
    let session = |from: &str| Req::from(from).cookie("JSESSIONID=abc.t1");
    // The first request holds t1's only connection for SLOW.
    let mut first = Web::connect(lb.addr).await;
    let busy = tokio::spawn({
        let r = session(&user);
        async move { first.request(&r).await }
    });
    assert!(eventually(|| t1.requests() == 1).await);
    // A browser with a session on t1 (from another address) waits for that connection.
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&session(&other)).await.unwrap();
    assert_eq!((a.status, a.backend()), (200, "t1"), "the session stays on t1");
    let a = busy.await.unwrap().unwrap();
    assert_eq!((a.status, a.backend()), (200, "t1"));
    assert_eq!(t2.requests(), 0);
    let c = lb.backend_counters("t1");
    assert_eq!((c.route_failovers, c.retries), (0, 0));
    // Without a session, a request on a busy t1 moves on once connect_timeout has passed.
    let mut first = Web::connect(lb.addr).await;
    let busy = tokio::spawn({
        let r = Req::from(&user);
        async move { first.request(&r).await }
    });
    assert!(eventually(|| t1.requests() == 3).await);
    let a = web.request(&Req::from(&user)).await.unwrap();
    assert_eq!((a.status, a.backend()), (200, "t2"), "moved by address");
    assert_eq!(busy.await.unwrap().unwrap().backend(), "t1");
    // A session waiting on t1 stops waiting once t1 is marked down: it fails over at once
    // instead of holding on until t1's connection is free (or reply_timeout).
    let mut first = Web::connect(lb.addr).await;
    let busy = tokio::spawn({
        let r = session(&user);
        async move { first.request(&r).await }
    });
    assert!(eventually(|| t1.requests() == 4).await);
    let waiting = tokio::spawn(async move { web.request(&session(&other)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    lb.set_health("t1", Health::Down);
    let a = waiting.await.unwrap().unwrap();
    assert_eq!(
        (a.status, a.backend()),
        (200, "t2"),
        "failed over when t1 went down"
    );
    assert_eq!(lb.backend_counters("t2").route_failovers, 1);
    assert_eq!(busy.await.unwrap().unwrap().backend(), "t1");
}

#[tokio::test]
async fn backend_that_accepts_but_never_answers_is_skipped() {
    // Accepts connections (the kernel does) but never reads: the CPing goes unanswered.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let good = FakeBackend::start("good", Mode::Answer).await;
    let lb = Lb::start(
        &[("hung", silent_addr, false), ("good", good.addr, false)],
        AjpConfig::default(),
    );
    lb.set_connect_timeout(Duration::from_millis(300));
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "hung").unwrap();
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&Req::from(&user).body(b"x=1")).await.unwrap();
    assert_eq!((a.status, a.backend()), (200, "good"));
    assert_eq!(lb.backend_counters("hung").retries, 1);
}

#[tokio::test]
async fn on_down_reset_aborts_requests_on_a_backend_marked_down() {
    let stalls = FakeBackend::start("t1", Mode::Stall).await;
    let good = FakeBackend::start("t2", Mode::Answer).await;
    let lb = Lb::start(
        &[("t1", stalls.addr, false), ("t2", good.addr, false)],
        AjpConfig::default(),
    );
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    // Marks t1 down with on_down = "reset" the way the engine does, once the request is under way.
    let reset_t1 = |lb: &Lb| {
        lb.set_health("t1", Health::Down);
        let snap = lb.balancer.snapshot();
        let svc = snap.state.service("ajp").unwrap();
        snap.runtime(svc, svc.backend("t1").unwrap()).reset_connections();
    };
    // Nothing answered yet: a GET moves on to t2.
    let mut web = Web::connect(lb.addr).await;
    let first = Req::from(&user);
    let pending = tokio::spawn(async move { web.request(&first).await });
    while stalls.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reset_t1(&lb);
    let a = pending.await.unwrap().unwrap();
    assert_eq!((a.status, a.backend()), (200, "t2"));
    // A POST that reached t1 may have run there: 502, not run again on t2.
    lb.set_health("t1", Health::Up);
    let mut web = Web::connect(lb.addr).await;
    let post = Req::from(&user).cookie("JSESSIONID=x.t1").body(b"order=1");
    let pending = tokio::spawn(async move { web.request(&post).await });
    while stalls.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reset_t1(&lb);
    assert_eq!(pending.await.unwrap().unwrap().status, 502);
    assert_eq!(good.requests(), 1, "the POST ran again on t2");
    // Part of the answer sent already: the web tier's connection is closed instead.
    lb.set_health("t1", Health::Up);
    stalls.set_mode(Mode::StallAfterHeaders);
    let session = Req::from(&user).cookie("JSESSIONID=x.t1");
    let mut web = Web::connect(lb.addr).await;
    let pending = tokio::spawn(async move { web.request(&session).await });
    while stalls.requests() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    reset_t1(&lb);
    assert!(pending.await.unwrap().is_none(), "connection closed mid-response");
    assert_eq!(good.requests(), 1);
}

#[tokio::test]
async fn refused_pool_connects_mark_the_backend_down_through_passive_health() {
    let good = FakeBackend::start("t1", Mode::Answer).await;
    let dead = dead_address();
    let mut svc = service(
        "ajp",
        "127.0.0.1:0",
        vec![
            backend("t1", &good.addr.to_string()),
            backend("t2", &dead.to_string()),
        ],
    );
    svc.protocol = Protocol::Ajp;
    svc.datapath = DatapathKind::Ajp;
    svc.ajp = Some(AjpConfig::default());
    svc.health.kind = crate::config::HealthKind::Ajp;
    svc.health.observe = crate::config::Observe::Layer4;
    svc.health.error_limit = 3;
    let balancer = Arc::new(Balancer::new(State::new(0, 101)));
    let (tx, mut events) = tokio::sync::mpsc::channel(16);
    let dp = AjpDatapath::new(balancer.clone(), crate::health::passive::Passive::new(tx));
    let lb = Lb {
        addr: "127.0.0.1:0".parse().unwrap(),
        dp,
        balancer,
    };
    lb.run(Command::AddService { service: svc });
    let lb = Lb {
        addr: lb.dp.local_addr("ajp").unwrap(),
        ..lb
    };
    let on_dead = (0..40).filter(|i| lb.by_address(&ip(*i)) == "t2").count();
    assert!(on_dead >= 3, "only {on_dead} of 40 clients map to t2");
    let mut web = Web::connect(lb.addr).await;
    for i in 0..40 {
        // A refused connect is retried on t1: every request is answered.
        let a = web.request(&Req::from(&ip(i))).await.unwrap();
        assert_eq!((a.status, a.backend()), (200, "t1"));
    }
    let event = events.try_recv().expect("a passive transition for t2");
    assert_eq!(event.source, crate::health::HealthSource::Passive);
    assert_eq!((event.backend, event.health), (dead, Health::Down));
    assert!(
        event.reason.starts_with("3 connect failures in a row"),
        "{}",
        event.reason
    );
    // One transition, however many failures followed.
    assert!(events.try_recv().is_err());
}

// ---------------------------------------------------------------------------------------------
// Timeouts: reply_timeout, a web tier that gives up, request_timeout and idle_timeout.

/// Polls `cond` every 10 ms for up to 5 s; whether it became true.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Whether the peer closed `s` within 5 s (bytes before the end are skipped).
async fn closed_by_lb(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    let wait = async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait).await.is_ok()
}

/// t1 stalls, t2 answers; one pool slot per backend, so a slot not given back shows.
async fn stalled_pair(ajp: AjpConfig) -> (FakeBackend, FakeBackend, Lb) {
    let t1 = FakeBackend::start("t1", Mode::Stall).await;
    let t2 = FakeBackend::start("t2", Mode::Answer).await;
    let lb = Lb::start(
        &[("t1", t1.addr, false), ("t2", t2.addr, false)],
        AjpConfig { pool_size: 1, ..ajp },
    );
    (t1, t2, lb)
}

#[tokio::test]
async fn backend_silent_past_reply_timeout_gets_503_and_frees_its_slot() {
    let (t1, t2, lb) = stalled_pair(AjpConfig {
        reply_timeout: Duration::from_millis(200),
        ..AjpConfig::default()
    })
    .await;
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    let mut web = Web::connect(lb.addr).await;
    let a = tokio::time::timeout(
        Duration::from_secs(5),
        web.request(&Req::from(&user).body(b"k=v")),
    )
    .await
    .expect("answered within reply_timeout and a margin")
    .expect("web-tier connection kept");
    assert_eq!(a.status, 503);
    // The request reached t1: it is not replayed on t2 even with its body held.
    assert_eq!((t1.requests(), t2.requests()), (1, 0));
    assert!(
        eventually(|| t1.stalls_closed.load(SeqCst) == 1).await,
        "lb closed the silent connection"
    );
    let c = lb.backend_counters("t1");
    assert_eq!((c.reply_timeouts, c.retries, c.in_flight), (1, 0, 0));
    assert_eq!((c.pool_idle, c.pool_busy), (0, 0), "the connection is not pooled");
    assert_eq!(lb.counters().unavailable_503, 1);
    // t1's only slot is free again: a session routed to it gets there, on a new connection.
    slot_is_free_again(&t1, &mut web, &user).await;
    // And another backend serves on the same web-tier connection.
    let other = (0..200).map(ip).find(|i| lb.by_address(i) == "t2").unwrap();
    let a = web.request(&Req::from(&other)).await.unwrap();
    assert_eq!((a.status, a.backend()), (200, "t2"));
}

/// A backend that keeps asking for an upload's body packets and reads none of them (a hung
/// application) cannot hold the request past `reply_timeout`: lb's writes to a backend are bounded
/// as its reads are.
#[tokio::test]
async fn a_backend_that_stops_reading_gets_no_longer_than_reply_timeout() {
    let t1 = FakeBackend::start("t1", Mode::AskWithoutReading).await;
    let lb = Lb::start(
        &[("t1", t1.addr, false)],
        AjpConfig {
            reply_timeout: Duration::from_millis(300),
            ..AjpConfig::default()
        },
    );
    let mut web = Web::connect(lb.addr).await;
    let upload = Req::from(&ip(1)).body(&[b'u'; 16 << 20]);
    let a = tokio::time::timeout(Duration::from_secs(5), web.request(&upload))
        .await
        .expect("answered within reply_timeout and a margin, not held by the backend");
    // The web tier is told (a 503), unless lb closed its connection with the body unfinished.
    assert!(a.as_ref().is_none_or(|a| a.status == 503), "{a:?}");
    assert!(
        eventually(|| t1.stalls_closed.load(SeqCst) == 1).await,
        "lb closed the backend's connection"
    );
    let c = lb.backend_counters("t1");
    assert_eq!((c.reply_timeouts, c.in_flight, c.pool_busy), (1, 0, 0));
}

/// Shutting down (or removing the service) while a request is still arriving lets it finish: only
/// a connection between requests is closed at once.
#[tokio::test]
async fn a_stop_while_a_request_arrives_lets_it_finish() {
    let fake = FakeBackend::start("t1", Mode::Answer).await;
    let lb = Lb::start(&[("t1", fake.addr, false)], AjpConfig::default());
    let mut web = Web::connect(lb.addr).await;
    let r = Req::from(&ip(1));
    let bytes = r.encode();
    web.s.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    // lb has read the first half when the stop comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        web.s.write_all(&bytes[bytes.len() / 2..]).await.unwrap();
        let a = web.answer(&r, 0).await;
        (a, web.closed().await)
    };
    let ((a, closed), ()) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(rest, lb.dp.shutdown())
    })
    .await
    .expect("request finished and shutdown completed");
    assert_eq!(a.expect("answered, not cut off").status, 200);
    assert!(closed, "closed after its answer");
    assert_eq!(fake.requests(), 1);
}

/// A stalled t1 answers again: a session routed to it from `user` reaches it on its second
/// connection (the first, given up, left its pool slot free).
async fn slot_is_free_again(t1: &FakeBackend, web: &mut Web, user: &str) {
    t1.set_mode(Mode::Answer);
    let a = web
        .request(&Req::from(user).cookie("JSESSIONID=s.t1"))
        .await
        .unwrap();
    assert_eq!((a.status, a.backend()), (200, "t1"));
    assert_eq!(t1.connections.load(SeqCst), 2);
}

#[tokio::test]
async fn web_tier_closing_mid_request_abandons_it_without_replay() {
    // No reply_timeout: only the web tier's close ends the wait.
    let (t1, t2, lb) = stalled_pair(AjpConfig {
        reply_timeout: Duration::ZERO,
        ..AjpConfig::default()
    })
    .await;
    let user = (0..200).map(ip).find(|i| lb.by_address(i) == "t1").unwrap();
    let mut web = Web::connect(lb.addr).await;
    let req = Req::from(&user).body(b"order=1");
    let pending = tokio::spawn(async move {
        let _ = web.request(&req).await;
    });
    assert!(eventually(|| t1.requests() == 1).await);
    assert_eq!(lb.backend_counters("t1").in_flight, 1);
    // The web tier gives up: its connection closes.
    pending.abort();
    let _ = pending.await;
    assert!(
        eventually(|| t1.stalls_closed.load(SeqCst) == 1).await,
        "lb closed the backend connection of the abandoned request"
    );
    assert!(eventually(|| lb.backend_counters("t1").in_flight == 0).await);
    let c = lb.backend_counters("t1");
    assert_eq!((c.pool_idle, c.pool_busy, c.retries), (0, 0, 0));
    assert_eq!(lb.counters().abandoned, 1);
    // Never replayed: t2 got nothing, and t1 only the one request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((t1.requests(), t2.requests()), (1, 0));
    // The slot is free: the next request routed to t1 gets there, on a new connection.
    slot_is_free_again(&t1, &mut Web::connect(lb.addr).await, &user).await;
}

#[tokio::test]
async fn partial_packets_and_idle_connections_are_closed_while_others_are_served() {
    let fakes = [
        FakeBackend::start("t1", Mode::Answer).await,
        FakeBackend::start("t2", Mode::Answer).await,
    ];
    let lb = Lb::start(
        &[("t1", fakes[0].addr, false), ("t2", fakes[1].addr, false)],
        AjpConfig {
            request_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(1500),
            ..AjpConfig::default()
        },
    );
    // Half a packet header, and a whole header whose payload never comes.
    let mut half = TcpStream::connect(lb.addr).await.unwrap();
    half.write_all(&[0x12, 0x34]).await.unwrap();
    let mut short = TcpStream::connect(lb.addr).await.unwrap();
    short.write_all(&[0x12, 0x34, 0x00, 0x40, 0x02]).await.unwrap();
    // A connection that sends nothing, and a web tier that keeps working meanwhile.
    let mut silent = TcpStream::connect(lb.addr).await.unwrap();
    let mut web = Web::connect(lb.addr).await;
    let a = web.request(&Req::from(&ip(1))).await.unwrap();
    assert_eq!(a.status, 200);
    assert!(closed_by_lb(&mut half).await, "half a header: closed");
    assert!(
        closed_by_lb(&mut short).await,
        "header without its payload: closed"
    );
    assert_eq!(lb.counters().request_timeouts, 2);
    // A request body lb waits for counts as a packet too: a Forward Request announcing a body
    // that never comes is closed, before any backend is involved.
    let mut no_body = TcpStream::connect(lb.addr).await.unwrap();
    no_body
        .write_all(&Req::from(&ip(2)).body(b"never sent").encode())
        .await
        .unwrap();
    assert!(
        closed_by_lb(&mut no_body).await,
        "announced body never sent: closed"
    );
    assert_eq!(lb.counters().request_timeouts, 3);
    assert_eq!(fakes[0].requests() + fakes[1].requests(), 1);
    // The working connection is not idle-closed while it keeps sending requests.
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = web.request(&Req::from(&ip(3 + i))).await.unwrap();
        assert_eq!(a.status, 200);
    }
    assert!(closed_by_lb(&mut silent).await, "idle past idle_timeout: closed");
    assert_eq!(lb.counters().idle_closed, 1);
}

/// A web tier that stops reading in the middle of a response cannot hold its connection, nor the
/// backend's only pool slot: lb's writes to it give up after `request_timeout` without progress.
#[tokio::test]
async fn a_web_tier_that_stops_reading_is_closed_after_request_timeout() {
    let t1 = FakeBackend::start("t1", Mode::Large).await;
    let lb = Lb::start(
        &[("t1", t1.addr, false)],
        AjpConfig {
            pool_size: 1,
            request_timeout: Duration::from_millis(300),
            ..AjpConfig::default()
        },
    );
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(lb.addr).await.unwrap();
    stuck.write_all(&Req::from(&ip(1)).encode()).await.unwrap();
    // It reads nothing from here on.
    assert!(
        eventually(|| lb.counters().request_timeouts == 1).await,
        "lb gave up on the web tier that stopped reading"
    );
    assert!(eventually(|| lb.backend_counters("t1").in_flight == 0).await);
    assert_eq!(
        lb.backend_counters("t1").pool_idle,
        0,
        "the backend connection is not pooled"
    );
    // The only slot is free: the next request gets t1 on a new connection.
    slot_is_free_again(&t1, &mut Web::connect(lb.addr).await, &ip(1)).await;
    drop(stuck);
}

/// During a request the web tier speaks only to answer a Get Body Chunk. Bytes it sends
/// otherwise (here a CPing) would be taken for a body packet or the next request that were never
/// sent, so they close the web-tier connection (and the backend's) as a protocol error: with the
/// request, or while the request waits for its backend.
#[tokio::test]
async fn bytes_the_web_tier_sends_unasked_during_a_request_close_its_connection() {
    let t1 = FakeBackend::start("t1", Mode::Slow).await;
    let lb = Lb::start(
        &[("t1", t1.addr, false)],
        AjpConfig {
            pool_size: 1,
            ..AjpConfig::default()
        },
    );
    // Sent right behind the request, in the same write (read with it, as a rule: then refused
    // before any backend sees the request).
    let mut web = Web::connect(lb.addr).await;
    let mut both = Req::from(&ip(1)).encode();
    both.extend_from_slice(&crate::ajp::CPING);
    web.s.write_all(&both).await.unwrap();
    assert!(closed_by_lb(&mut web.s).await, "with the request: closed");
    assert_eq!(lb.counters().protocol_errors, 1);
    assert!(eventually(|| lb.backend_counters("t1").in_flight == 0).await);
    // Sent while the request waits for its (slow) backend.
    let (requests, connections) = (t1.requests(), t1.connections.load(SeqCst));
    let mut web = Web::connect(lb.addr).await;
    web.s.write_all(&Req::from(&ip(1)).encode()).await.unwrap();
    assert!(eventually(|| t1.requests() == requests + 1).await);
    web.s.write_all(&crate::ajp::CPING).await.unwrap();
    assert!(closed_by_lb(&mut web.s).await, "while waiting: closed");
    assert_eq!(lb.counters().protocol_errors, 2);
    assert!(eventually(|| lb.backend_counters("t1").in_flight == 0).await);
    // The backend connection went with it (its only pool slot is free): the next request is
    // served on a new one.
    t1.set_mode(Mode::Answer);
    let a = Web::connect(lb.addr)
        .await
        .request(&Req::from(&ip(1)).cookie("JSESSIONID=s.t1"))
        .await
        .unwrap();
    assert_eq!((a.status, a.backend()), (200, "t1"));
    assert_eq!(
        t1.connections.load(SeqCst),
        connections + 2,
        "the waiting one and a new one"
    );
}

/// A reset (`on_down = "reset"`, `disable --reset`) decided on one snapshot while another change
/// removes the backend: it resets what that snapshot's runtime holds (nothing here) instead of
/// looking the backend up in a newer state that no longer has it (which took the daemon down).
#[tokio::test]
async fn a_reset_racing_the_backends_removal_resets_from_its_own_snapshot() {
    let (_fakes, lb) = three(Mode::Answer).await;
    let before = lb.balancer.snapshot();
    let svc = before.state.service("ajp").unwrap();
    let t1 = svc.backend("t1").unwrap();
    lb.run(Command::RemoveBackend {
        service: "ajp".into(),
        backend: "t1".into(),
    });
    assert_eq!(lb.dp.reset_backend(svc, t1, &before.runtime(svc, t1)), 0);
}
