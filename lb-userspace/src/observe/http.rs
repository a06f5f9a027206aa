//! The `/metrics` endpoint (`[metrics] listen`): an HTTP/1 server on hyper that answers
//! `GET /metrics` with [`render`] of a fresh snapshot.
//!
//! One request per connection, at most [`MAX_CONNECTIONS`] at once, [`READ_TIMEOUT`] to send the
//! request and [`WRITE_TIMEOUT`] to take the answer. Other paths and methods get a 404, a request
//! that is not HTTP/1 a 400. Snapshots are taken on the blocking pool, one at a time, so a scrape
//! never stalls the proxy's tasks or the control socket.

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
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::{Format, render};
use crate::config::MetricsConfig;
use crate::control::protocol::StatsView;
use crate::engine::Engine;

/// Most metrics connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head accepted, in bytes (hyper's smallest read buffer).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {listen} for [metrics]: {source}; is another program using that address?")]
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
        info!(listen = %addr, "metrics endpoint listening (GET /metrics)");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // One snapshot at a time: scrapes queue here instead of piling up on the blocking pool.
    let one_at_a_time = Arc::new(Mutex::new(()));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
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
        let scrape = Scrape {
            snapshot: snapshot.clone(),
            one_at_a_time: one_at_a_time.clone(),
        };
        tokio::spawn(async move {
            connection(stream, peer, scrape).await;
            drop(permit);
        });
    }
}

/// What a connection needs to answer a scrape.
#[derive(Clone)]
struct Scrape {
    snapshot: Snapshot,
    one_at_a_time: Arc<Mutex<()>>,
}

/// The start of an HTTP/2 connection, which hyper's HTTP/1 server drops without an answer.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

/// One connection: one request, then close. The answer must be taken within [`WRITE_TIMEOUT`]
/// of being ready.
async fn connection(stream: TcpStream, peer: SocketAddr, scrape: Scrape) {
    let start = tokio::time::Instant::now();
    let mut first = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(READ_TIMEOUT, stream.peek(&mut first)).await {
        Err(_) => return debug!(%peer, "metrics request timed out"),
        Ok(Err(e)) => return debug!(%peer, error = %e, "metrics connection failed"),
        Ok(Ok(n)) if first[..n] == *H2_PREFACE => {
            debug!(%peer, "metrics request refused: HTTP/2");
            return bad_request(stream).await;
        }
        Ok(Ok(_)) => {}
    }
    let answered = Arc::new(Notify::new());
    let service = {
        let answered = answered.clone();
        hyper::service::service_fn(move |req| {
            let (scrape, answered) = (scrape.clone(), answered.clone());
            async move {
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

/// `GET` (or `HEAD`) `/metrics` → the metrics in the format `Accept` asks for; anything else → 404.
async fn respond(req: &Request<Incoming>, scrape: &Scrape) -> Response<Full<Bytes>> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) || req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found; the metrics are at /metrics\n");
    }
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let rendered = {
        let _one = scrape.one_at_a_time.lock().await;
        let snapshot = scrape.snapshot.clone();
        tokio::task::spawn_blocking(move || render(&snapshot(), format)).await
    };
    match rendered {
        Ok(Ok(body)) => answer(StatusCode::OK, format.content_type(), body),
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
