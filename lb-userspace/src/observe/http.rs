//! The `/metrics` endpoint (`[metrics] listen`): an HTTP/1 server on hyper that answers
//! `GET /metrics` with [`render`] of a fresh snapshot, and serves the read-only status page:
//! `GET /` (HTML, [`super::status::page`]) and `GET /status.json` (the same snapshot as JSON).
//!
//! One request per connection, [`READ_TIMEOUT`] to send the request and [`WRITE_TIMEOUT`] to take
//! the answer. The limit is on busy connections ([`MAX_BUSY`] requests at once), not on open
//! sockets: connections are always accepted, and when [`MAX_OPEN`] are open the one idle longest
//! (no complete request head yet) is closed to make room, so idle sockets never keep scrapes out.
//! Other paths and methods get a 404, a request that is not HTTP/1 a 400. Snapshots are taken on
//! the blocking pool, one at a time, so a scrape never stalls the proxy's tasks or the control
//! socket.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::{Format, render};
use super::status;
use crate::config::MetricsConfig;
use crate::control::protocol::StatsView;
use crate::datapath::listener::bind_hint;
use crate::engine::Engine;

/// Most requests served at once (a request head read and not yet answered and taken); more
/// requests wait for one of them to finish.
pub const MAX_BUSY: usize = 16;
/// Most open metrics connections. When all are open, the one that has waited longest without
/// sending a complete request head is closed to make room, so idle sockets cannot keep scrapes
/// out.
pub const MAX_OPEN: usize = 256;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head accepted, in bytes (hyper's smallest read buffer).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a new connection waits for a closed one's place when every open one is busy.
const ROOM_WAIT: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {listen} for [metrics]: {source}{}", bind_hint(source))]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
}

/// Takes a snapshot of the counters; called on the blocking pool.
pub type Snapshot = Arc<dyn Fn() -> StatsView + Send + Sync>;

/// Binds the metrics listener (SO_REUSEADDR, so a restart does not wait for TIME_WAIT).
pub fn bind(config: &MetricsConfig) -> Result<TcpListener, HttpError> {
    let listen = config.listen;
    let err = |source| HttpError::Bind { listen, source };
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(listen).map_err(err)?;
    socket.listen(128).map_err(err)
}

/// Serves `GET /metrics` with the engine's counters until `shutdown`.
pub async fn run(listener: TcpListener, engine: Arc<Engine>, shutdown: CancellationToken) {
    serve(listener, Arc::new(move || engine.stats()), shutdown).await;
}

/// Serves `GET /metrics` with the counters of `snapshot` until `shutdown`.
pub async fn serve(listener: TcpListener, snapshot: Snapshot, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "metrics endpoint listening (GET /metrics; status page at /, /status.json)");
    }
    let open = Arc::new(Semaphore::new(MAX_OPEN));
    let waiting = Arc::new(Waiting::default());
    let busy = Arc::new(Semaphore::new(MAX_BUSY));
    // One snapshot at a time: scrapes queue here instead of piling up on the blocking pool.
    let one_at_a_time = Arc::new(Mutex::new(()));
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(place) = room(&open, &waiting).await else {
            debug!(%peer, "metrics connection dropped: every open connection is busy");
            continue;
        };
        next_id += 1;
        let id = next_id;
        let evict = waiting.add(id);
        let scrape = Scrape {
            snapshot: snapshot.clone(),
            one_at_a_time: one_at_a_time.clone(),
            busy: busy.clone(),
            waiting: waiting.clone(),
            id,
        };
        let waiting = waiting.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection(stream, peer, scrape) => {}
                () = evict.cancelled() => debug!(%peer, "idle metrics connection closed to make room"),
            }
            waiting.remove(id);
            drop(place);
        });
    }
}

/// A place among the [`MAX_OPEN`] open connections: a free one, else the place of the connection
/// that has waited longest for its request head, which is closed. `None` when every open
/// connection is busy for longer than [`ROOM_WAIT`].
async fn room(open: &Arc<Semaphore>, waiting: &Waiting) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = open.clone().try_acquire_owned() {
        return Some(p);
    }
    waiting.evict_oldest();
    tokio::time::timeout(ROOM_WAIT, open.clone().acquire_owned())
        .await
        .ok()
        .map(|p| p.expect("semaphore never closed"))
}

/// Open connections still waiting for their request head, oldest first, each with the token
/// that closes it.
#[derive(Default)]
struct Waiting(std::sync::Mutex<BTreeMap<u64, CancellationToken>>);

impl Waiting {
    fn add(&self, id: u64) -> CancellationToken {
        let token = CancellationToken::new();
        self.0.lock().unwrap().insert(id, token.clone());
        token
    }

    /// The connection sent its request (or ended): it can no longer be closed to make room.
    fn remove(&self, id: u64) {
        self.0.lock().unwrap().remove(&id);
    }

    fn evict_oldest(&self) {
        if let Some((_, token)) = self.0.lock().unwrap().pop_first() {
            token.cancel();
        }
    }
}

/// What a connection needs to answer a scrape.
#[derive(Clone)]
struct Scrape {
    snapshot: Snapshot,
    one_at_a_time: Arc<Mutex<()>>,
    busy: Arc<Semaphore>,
    waiting: Arc<Waiting>,
    id: u64,
}

/// The start of an HTTP/2 connection, which hyper's HTTP/1 server drops without an answer.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

/// One connection: one request, then close. The request head must come within
/// [`READ_TIMEOUT`]; the answer must be taken within [`WRITE_TIMEOUT`] of being ready. From its
/// request head on, the connection holds one of the [`MAX_BUSY`] places until it ends.
async fn connection(stream: TcpStream, peer: SocketAddr, scrape: Scrape) {
    let start = tokio::time::Instant::now();
    let mut first = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(READ_TIMEOUT, stream.peek(&mut first)).await {
        Err(_) => return debug!(%peer, "metrics request timed out"),
        Ok(Err(e)) => return debug!(%peer, error = %e, "metrics connection failed"),
        Ok(Ok(n)) if first[..n] == *H2_PREFACE => {
            debug!(%peer, "metrics request refused: HTTP/2");
            scrape.waiting.remove(scrape.id);
            return bad_request(stream).await;
        }
        Ok(Ok(_)) => {}
    }
    let answered = Arc::new(Notify::new());
    let held = Arc::new(std::sync::Mutex::new(None));
    let service = {
        let (answered, held) = (answered.clone(), held.clone());
        hyper::service::service_fn(move |req| {
            let (scrape, answered, held) = (scrape.clone(), answered.clone(), held.clone());
            async move {
                scrape.waiting.remove(scrape.id);
                let permit = scrape
                    .busy
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed");
                *held.lock().unwrap() = Some(permit);
                let response = respond(&req, &scrape).await;
                answered.notify_one();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT.saturating_sub(start.elapsed()))
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let taken_in_time = async {
        answered.notified().await;
        tokio::time::sleep(WRITE_TIMEOUT).await;
    };
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(%peer, error = %e, "metrics connection ended");
        },
        () = taken_in_time => debug!(%peer, "metrics answer not taken in time"),
    }
}

/// A 400 written by hand, for what hyper does not answer. What the client sent is read (up to
/// [`MAX_REQUEST_HEAD`] bytes) before closing, so the close does not reset the answer away.
async fn bad_request(mut stream: TcpStream) {
    let answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let sent = async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut read = 0;
        while read < MAX_REQUEST_HEAD {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sent).await;
}

/// What a `GET` asks for.
#[derive(Clone, Copy)]
enum Page {
    Metrics(Format),
    StatusHtml,
    StatusJson,
}

/// `GET` (or `HEAD`) `/metrics` → the metrics in the format `Accept` asks for; `/` (or
/// `/index.html`) → the status page; `/status.json` → its data; anything else → 404.
async fn respond(req: &Request<Incoming>, scrape: &Scrape) -> Response<Full<Bytes>> {
    let page = match req.uri().path() {
        "/metrics" => {
            let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            Page::Metrics(Format::from_accept(accept))
        }
        "/" | "/index.html" => Page::StatusHtml,
        "/status.json" => Page::StatusJson,
        _ => return not_found(),
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return not_found();
    }
    let rendered = {
        let _one = scrape.one_at_a_time.lock().await;
        let snapshot = scrape.snapshot.clone();
        tokio::task::spawn_blocking(move || {
            let view = snapshot();
            match page {
                Page::Metrics(format) => render(&view, format).map(|body| (format.content_type(), body)),
                Page::StatusHtml => Ok((HTML, status::page(&view))),
                Page::StatusJson => Ok((JSON, status::json(&view).expect("a stats view serializes"))),
            }
        })
        .await
    };
    match rendered {
        Ok(Ok((content_type, body))) => answer(StatusCode::OK, content_type, body),
        Ok(Err(e)) => {
            warn!(error = %e, "metrics rendering failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")
        }
        Err(e) => {
            warn!(error = %e, "metrics snapshot failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "snapshot failed\n")
        }
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";

fn not_found() -> Response<Full<Bytes>> {
    plain(
        StatusCode::NOT_FOUND,
        "not found; the metrics are at /metrics, the status page at / and its data at /status.json (GET only)\n",
    )
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    answer(status, "text/plain", body.to_string())
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
