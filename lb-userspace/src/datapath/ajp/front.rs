//! One web-tier connection: reads its packets, answers CPing, refuses Shutdown, and routes every
//! Forward Request on its own (session route, then the browser's address), relaying the response
//! packets unchanged and the request body on demand, with a retry on the next backend when one
//! fails before answering.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Service;
use super::pool::{Conn, Pool, PoolError};
use crate::ajp::codec::{
    self, CodecError, ContainerMessage, Direction, ForwardRequest, FrameDecoder, ServerMessage, attr, kind,
};
use crate::ajp::route::session_route;
use crate::balancer::{Chosen, Reason};

/// What became of the front connection after a packet.
enum Next {
    Continue,
    Close,
}

/// Time limits of [`read_frame`] (zero: none).
#[derive(Clone, Copy)]
struct Limits {
    /// For the first byte of a packet.
    idle: Duration,
    /// From a packet's first byte to its last.
    packet: Duration,
}

impl Limits {
    const NONE: Limits = Limits {
        idle: Duration::ZERO,
        packet: Duration::ZERO,
    };
}

/// Which of [`Limits`] ran out: the payload of the `TimedOut` error [`read_frame`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum Timeout {
    #[error("idle_timeout")]
    Idle,
    #[error("request_timeout")]
    Packet,
    /// A write to the web tier made no progress (it stopped reading).
    #[error("request_timeout (the web tier stopped reading)")]
    Write,
}

/// Reads one whole packet within `limits` (a packet already begun, bytes kept from earlier reads,
/// is timed from now). `Ok(None)`: a clean end of stream, or `stop` cancelled, both only between
/// packets: a packet already begun is read to its end.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    decoder: &FrameDecoder,
    limits: Limits,
    stop: Option<&CancellationToken>,
) -> std::io::Result<Option<codec::Frame>> {
    let deadline = |d: Duration| (!d.is_zero()).then(|| tokio::time::Instant::now() + d);
    let idle_until = deadline(limits.idle);
    let mut packet_until = None;
    loop {
        if let Some(f) = decoder.decode(buf).map_err(invalid)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        let between = buf.is_empty();
        let (until, why) = if between {
            (idle_until, Timeout::Idle)
        } else {
            (
                *packet_until.get_or_insert_with(|| deadline(limits.packet)),
                Timeout::Packet,
            )
        };
        let read = async {
            match until {
                Some(t) => tokio::time::timeout_at(t, stream.read_buf(buf))
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why))),
                None => stream.read_buf(buf).await,
            }
        };
        let read = match stop {
            Some(stop) if between => tokio::select! {
                () = stop.cancelled() => return Ok(None),
                r = read => r,
            },
            _ => read.await,
        };
        if read? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Why the web tier's connection ended a request that waited for its backend.
enum FrontGone {
    /// Closed or failed: the web tier gave up.
    Closed(String),
    /// It sent bytes nobody asked for. In AJP the web tier speaks during a request only to answer
    /// a Get Body Chunk, so such bytes could only be taken for a body packet or a request that
    /// were never sent: the stream's framing is lost.
    Unasked(usize),
}

/// Resolves when the web tier closes its connection, fails, or sends anything while a request
/// waits for its backend.
async fn front_gone(stream: &mut TcpStream) -> FrontGone {
    let mut probe = [0u8; 64];
    match stream.read(&mut probe).await {
        Ok(0) => FrontGone::Closed("closed by the web tier".into()),
        Ok(n) => FrontGone::Unasked(n),
        Err(e) => FrontGone::Closed(e.to_string()),
    }
}

/// Writes all of `bytes` to the web tier, each write making progress within `request_timeout`
/// (zero: no limit). A web tier that stops reading cannot hold its connection, a `max_connections`
/// slot and a backend's pool slot for good: after `request_timeout` without progress the write
/// fails (`TimedOut`, counted in `request_timeouts`).
async fn write_front(
    stream: &mut TcpStream,
    bytes: &[u8],
    svc: &Service,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let written = write_within(stream, bytes, svc.settings().ajp.request_timeout).await;
    if let Err(e) = &written
        && e.kind() == std::io::ErrorKind::TimedOut
    {
        timed_out(svc, peer, e);
    }
    written
}

async fn write_within(stream: &mut TcpStream, mut bytes: &[u8], wait: Duration) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = if wait.is_zero() {
            stream.write(bytes).await?
        } else {
            tokio::time::timeout(wait, stream.write(bytes))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, Timeout::Write))??
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// How long, and for how many bytes, a connection lb closes after its own response reads on.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Waits `d`, or forever when `d` is zero.
async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(d).await;
}

/// Writes `bytes` to a backend, bounded as the reads from it are: by a reset of the backend, and
/// by `reply_timeout` without it taking them all (a backend that stops reading, or asks for body
/// packets without reading them, cannot hold the request). `failed` names a write error.
async fn write_backend(
    stream: &mut TcpStream,
    bytes: &[u8],
    reset: &CancellationToken,
    reply_timeout: Duration,
    responded: bool,
    failed: impl FnOnce(String) -> Outcome,
) -> Result<(), Outcome> {
    tokio::select! {
        r = stream.write_all(bytes) => r.map_err(|e| failed(e.to_string())),
        () = reset.cancelled() => Err(Outcome::reset(responded)),
        () = sleep_unless_zero(reply_timeout) => Err(Outcome::ReplyTimeout { responded }),
    }
}

fn invalid(e: CodecError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Serves one web-tier connection until it closes, fails, or lb shuts down while it is idle.
pub async fn serve(mut front: TcpStream, peer: SocketAddr, svc: Arc<Service>, stop: CancellationToken) {
    let _ = front.set_nodelay(true);
    if let Err(e) = super::keepalive::enable(&front) {
        debug!(service = %svc.name, %peer, error = %e, "TCP keepalive not set on a web-tier connection");
    }
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        let settings = svc.settings();
        let decoder = FrameDecoder::new(Direction::ToContainer, settings.max_packet);
        // A stop ends the connection only between requests: one under way finishes first.
        let frame = read_frame(
            &mut front,
            &mut buf,
            &decoder,
            Limits {
                idle: settings.ajp.idle_timeout,
                packet: settings.ajp.request_timeout,
            },
            Some(&stop),
        )
        .await;
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    svc.counters.protocol_errors.fetch_add(1, Relaxed);
                    warn!(service = %svc.name, %peer, error = %e, "AJP protocol error from the web tier; connection closed");
                } else if e.kind() == std::io::ErrorKind::TimedOut {
                    timed_out(&svc, peer, &e);
                } else {
                    debug!(service = %svc.name, %peer, error = %e, "web-tier connection ended");
                }
                return;
            }
        };
        let next = match ServerMessage::decode(frame.payload(), false) {
            Ok(ServerMessage::ForwardRequest(req)) => {
                Request::new(&mut front, &mut buf, peer, &svc, *req, frame.into_bytes())
                    .run()
                    .await
            }
            Ok(ServerMessage::CPing) => {
                if svc.takes_requests() {
                    svc.counters.cpings_answered.fetch_add(1, Relaxed);
                    match write_front(&mut front, &crate::ajp::CPONG, &svc, peer).await {
                        Ok(()) => Next::Continue,
                        Err(_) => Next::Close,
                    }
                } else {
                    debug!(service = %svc.name, %peer, "CPing not answered: no backend takes requests");
                    Next::Continue
                }
            }
            Ok(ServerMessage::Shutdown) => {
                svc.counters.refused_shutdown.fetch_add(1, Relaxed);
                warn!(service = %svc.name, %peer, "AJP Shutdown packet refused (never forwarded); connection closed");
                Next::Close
            }
            Ok(ServerMessage::Ping | ServerMessage::Body(_)) => {
                svc.counters.protocol_errors.fetch_add(1, Relaxed);
                warn!(service = %svc.name, %peer, "unsupported AJP Ping (type 8); connection closed");
                Next::Close
            }
            Err(e) => {
                svc.counters.protocol_errors.fetch_add(1, Relaxed);
                warn!(service = %svc.name, %peer, error = %e, "AJP protocol error from the web tier; connection closed");
                Next::Close
            }
        };
        if let Next::Close = next {
            return;
        }
    }
}

/// Counts and logs a web-tier connection closed by `idle_timeout` or `request_timeout`.
fn timed_out(svc: &Service, peer: SocketAddr, e: &std::io::Error) {
    match e.get_ref().and_then(|e| e.downcast_ref::<Timeout>()) {
        Some(Timeout::Idle) => {
            svc.counters.idle_closed.fetch_add(1, Relaxed);
            debug!(service = %svc.name, %peer, "idle web-tier connection closed (idle_timeout)");
        }
        Some(Timeout::Write) => {
            svc.counters.request_timeouts.fetch_add(1, Relaxed);
            info!(service = %svc.name, %peer, "web tier took nothing lb sent for request_timeout; connection closed");
        }
        _ => {
            svc.counters.request_timeouts.fetch_add(1, Relaxed);
            info!(service = %svc.name, %peer, "web-tier packet not complete within request_timeout; connection closed");
        }
    }
}

/// How the backend for an attempt was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pick {
    Route,
    Address,
    RouteFailover,
}

/// Why a request met [`Outcome::Reset`].
const RESET: &str = "backend reset (on_down = \"reset\" or disable --reset)";

/// Whether a request with AJP method code `method` may run twice with the effect of once (RFC 9110
/// 9.2.2): OPTIONS, GET, HEAD, PUT, DELETE, TRACE. Only those go to another backend after one
/// failed with the request in hand, as nginx and mod_jk do; a POST gets a 502 instead.
fn idempotent(method: u8) -> bool {
    matches!(method, 1..=3 | 5..=7)
}

/// The backend of one attempt.
struct Target {
    id: u32,
    pool: Arc<Pool>,
    pick: Pick,
    /// What the balancer chose (for the affinity entry a completed request confirms).
    chosen: Chosen,
    /// Cancelled when the backend is marked down with `on_down = "reset"`.
    reset: CancellationToken,
}

/// How an attempt on one backend ended.
enum Outcome {
    /// End Response relayed; the backend's status.
    Done(u16),
    /// The request did not reach the backend (no connection, or sending it failed).
    BackendBeforeResponse(String),
    /// The request reached the backend, which failed before any response packet reached the web
    /// tier: it may have run the request.
    NoAnswer(String),
    /// The backend was reset (`on_down = "reset"`, `disable --reset`) before it answered: its
    /// connection is closed; like `NoAnswer`, but never tried again on the same backend.
    Reset,
    /// The backend failed after part of the response was relayed: the front must close.
    BackendAfterResponse(String),
    /// The backend sent nothing for `reply_timeout` (`responded`: after part of the response
    /// was relayed). The request reached it: never retried elsewhere.
    ReplyTimeout { responded: bool },
    /// The web tier closed its connection while the request waited for its backend.
    Abandoned(String),
    /// The web tier sent this many bytes nobody asked for (see [`FrontGone::Unasked`]).
    Unasked(usize),
    /// The web tier's connection failed or misbehaved.
    Front(String),
    /// Every connection of the backend's pool stayed busy with other requests: the request did
    /// not reach it.
    Full(String),
}

impl Outcome {
    /// The backend was reset during the request: `Reset` before any response packet reached the
    /// web tier (`responded` false), else a failure after the response began.
    fn reset(responded: bool) -> Outcome {
        if responded {
            Outcome::BackendAfterResponse(RESET.into())
        } else {
            Outcome::Reset
        }
    }
}

/// How long a request bound to its backend by its session waits for a connection when that
/// backend is busy (its pool full, or slow to answer a new connection's CPing) and
/// `reply_timeout` is 0; otherwise it waits `reply_timeout`, as long as for an answer.
const ROUTE_PATIENCE: Duration = Duration::from_secs(60);

/// How often a request waiting on its busy backend looks whether that one is still in service.
const SERVICE_POLL: Duration = Duration::from_millis(100);

/// How long a request picked by `pick` waits for a connection to its backend: a session stays on
/// its backend while that one is only busy, waiting as long as for an answer instead of moving
/// (and losing the session); any other request `connect_timeout`.
fn patience(pick: Pick, settings: &super::Settings) -> Duration {
    match (pick, settings.ajp.reply_timeout) {
        (Pick::Route, t) if t.is_zero() => ROUTE_PATIENCE,
        (Pick::Route, t) => t,
        _ => settings.connect_timeout,
    }
}

/// The retry buffer holds at most one body chunk per this many bytes of its size.
const HELD_CHUNK_MIN: usize = 512;

/// The request body as it passes: what has been read from the web tier, kept while it fits the
/// retry buffer so another backend can be given the same body.
struct Body {
    /// Data read so far, in order (only while `held`).
    chunks: Vec<Bytes>,
    held_bytes: usize,
    /// Every byte read from the web tier so far is in `chunks`.
    held: bool,
    /// The web tier has no more data (content-length reached, or its empty packet).
    done: bool,
    /// Bytes still due by content-length (None: unknown length).
    remaining: Option<u64>,
    /// The first chunk goes to the backend unasked (content-length > 0).
    first_unasked: bool,
}

impl Body {
    fn keep(&mut self, data: Bytes, limit: usize) {
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(data.len() as u64);
            if *r == 0 {
                self.done = true;
            }
        }
        if data.is_empty() {
            self.done = true;
        }
        // Held chunks are copies (a slice of the read buffer would keep the whole buffer alive),
        // and at most one per HELD_CHUNK_MIN bytes of the limit: a body trickled in tiny packets
        // costs little more than its data.
        let room = data.is_empty() || self.chunks.len() < limit / HELD_CHUNK_MIN + 1;
        if self.held && room && self.held_bytes + data.len() <= limit {
            self.held_bytes += data.len();
            if !data.is_empty() {
                self.chunks.push(Bytes::copy_from_slice(&data));
            }
            return;
        }
        // Too much to hold: keep only the latest part, which the current backend still needs.
        self.held = false;
        self.chunks.clear();
        if !data.is_empty() {
            self.chunks.push(data);
        }
    }
}

struct Request<'a> {
    front: &'a mut TcpStream,
    fbuf: &'a mut BytesMut,
    peer: SocketAddr,
    svc: &'a Arc<Service>,
    req: ForwardRequest,
    /// The Forward Request packet as it came (forwarded as is unless it must be rewritten).
    raw: Bytes,
    started: Instant,
}

impl<'a> Request<'a> {
    fn new(
        front: &'a mut TcpStream,
        fbuf: &'a mut BytesMut,
        peer: SocketAddr,
        svc: &'a Arc<Service>,
        req: ForwardRequest,
        raw: Bytes,
    ) -> Self {
        Request {
            front,
            fbuf,
            peer,
            svc,
            req,
            raw,
            started: Instant::now(),
        }
    }

    async fn run(mut self) -> Next {
        let settings = self.svc.settings();
        let max = settings.max_packet;
        let decoder = FrameDecoder::new(Direction::ToContainer, max);
        let length = self.req.content_length();
        let mut body = Body {
            chunks: Vec::new(),
            held_bytes: 0,
            held: true,
            done: length == Some(0),
            remaining: length,
            first_unasked: length.is_some_and(|n| n > 0),
        };
        // A peer without the secret is answered at once and let go (Tomcat closes such a
        // connection too): nothing of it is waited for or held (not even the body it announced),
        // and it cannot try secret after secret on one connection.
        if !self.secret_matches(&settings) {
            return self.respond_and_close(403, "Forbidden").await;
        }
        // With a content-length the web server sends the first body packet unasked.
        if body.first_unasked {
            match self.read_body(&decoder).await {
                Ok(data) => body.keep(data, settings.retry_buffer),
                Err(e) => return self.front_failed(&e),
            }
        }
        if !self.fbuf.is_empty() {
            return self.unasked(self.fbuf.len());
        }
        if self.attribute_refused(&settings) {
            return self.respond(403, "Forbidden").await;
        }
        let route: Option<Vec<u8>> = session_route(&self.req, &settings.keys).map(<[u8]>::to_vec);
        let client = self
            .req
            .remote_addr
            .as_deref()
            .and_then(|a| std::str::from_utf8(a).ok())
            .and_then(|a| {
                a.trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .ok()
            })
            .unwrap_or(self.peer.ip());
        // Re-encoded only when the secret must be replaced; otherwise passed on without a copy.
        let forward = if settings.backend_secret.is_some() {
            self.req.replace_secret(settings.backend_secret.as_ref());
            let mut encoded = BytesMut::new();
            if let Err(e) = self.req.encode(&mut encoded, max) {
                warn!(service = %self.svc.name, error = %e, "request does not fit max_packet_size after rewriting; answered 503");
                self.svc.counters.unavailable.fetch_add(1, Relaxed);
                return self.respond(503, "Service Unavailable").await;
            }
            encoded.freeze()
        } else {
            self.raw.clone()
        };

        let mut exclude: Vec<u32> = Vec::new();
        let mut failures = 0u32;
        loop {
            let primaries_only = failures <= settings.retries;
            let Some(target) = self.pick(route.as_deref(), client, &exclude, primaries_only) else {
                break;
            };
            let c = &target.pool.counters;
            c.requests.fetch_add(1, Relaxed);
            match target.pick {
                Pick::Route => c.route_hits.fetch_add(1, Relaxed),
                Pick::Address => c.address_hits.fetch_add(1, Relaxed),
                Pick::RouteFailover => {
                    c.address_hits.fetch_add(1, Relaxed);
                    c.route_failovers.fetch_add(1, Relaxed)
                }
            };
            c.in_flight.fetch_add(1, Relaxed);
            let outcome = self.attempt(&target, &forward, &mut body, &settings).await;
            c.in_flight.fetch_sub(1, Relaxed);
            let Target {
                id,
                pool,
                pick,
                chosen,
                ..
            } = target;
            let c = &pool.counters;
            match outcome {
                Outcome::Done(status) => {
                    c.response(status);
                    c.latency.observe(self.started.elapsed());
                    if pick == Pick::Route {
                        pool.runtime.stats.session_seen();
                    } else {
                        self.svc
                            .balancer
                            .confirm(&self.svc.name, client, chosen, Instant::now());
                    }
                    return Next::Continue;
                }
                Outcome::NoAnswer(_) | Outcome::Reset if !idempotent(self.req.method) => {
                    let why = match outcome {
                        Outcome::NoAnswer(why) => why,
                        _ => RESET.into(),
                    };
                    c.response(502);
                    warn!(service = %self.svc.name, backend = %pool.address, reason = %why, method = self.req.method,
                        "backend failed after the request reached it; not idempotent, so not run again elsewhere: 502");
                    return self.respond(502, "Bad Gateway").await;
                }
                Outcome::Reset => {
                    debug!(service = %self.svc.name, backend = %pool.address, "backend reset before it answered; request moves on");
                    if !body.held {
                        break;
                    }
                    c.retries.fetch_add(1, Relaxed);
                    exclude.push(id);
                    failures += 1;
                }
                Outcome::Full(why) if pick == Pick::Route => {
                    let patience = patience(pick, &settings);
                    warn!(service = %self.svc.name, backend = %pool.address, reason = %why, ?patience,
                        "session's backend busy: no connection free in time; the session stays there, request answered 503");
                    break;
                }
                Outcome::BackendBeforeResponse(why) | Outcome::NoAnswer(why) | Outcome::Full(why) => {
                    debug!(service = %self.svc.name, backend = %pool.address, reason = %why, "backend failed before answering");
                    if !body.held {
                        info!(service = %self.svc.name, backend = %pool.address, reason = %why, "backend failed before answering; body too large to retry: 503");
                        break;
                    }
                    c.retries.fetch_add(1, Relaxed);
                    exclude.push(id);
                    failures += 1;
                }
                Outcome::BackendAfterResponse(why) => {
                    info!(service = %self.svc.name, backend = %pool.address, reason = %why, "backend failed during its response; web-tier connection closed");
                    return Next::Close;
                }
                Outcome::ReplyTimeout { responded } => {
                    c.reply_timeouts.fetch_add(1, Relaxed);
                    let after = settings.ajp.reply_timeout;
                    if responded {
                        warn!(service = %self.svc.name, backend = %pool.address, ?after, "backend silent during its response (reply_timeout); both connections closed");
                        return Next::Close;
                    }
                    warn!(service = %self.svc.name, backend = %pool.address, ?after, "backend did not answer (reply_timeout); its connection closed, request answered 503 (not retried: it reached the backend)");
                    break;
                }
                Outcome::Abandoned(why) => {
                    self.svc.counters.abandoned.fetch_add(1, Relaxed);
                    info!(service = %self.svc.name, peer = %self.peer, backend = %pool.address, reason = %why, "web tier gave up on a request under way; backend connection closed, request not retried");
                    return Next::Close;
                }
                Outcome::Front(why) => {
                    debug!(service = %self.svc.name, peer = %self.peer, reason = %why, "web-tier connection failed during a request");
                    return Next::Close;
                }
                Outcome::Unasked(bytes) => return self.unasked(bytes),
            }
        }
        self.svc.counters.unavailable.fetch_add(1, Relaxed);
        self.respond(503, "Service Unavailable").await
    }

    /// Whether the request carries the service's `secret` (if it has one); a refusal is counted
    /// and logged.
    fn secret_matches(&self, settings: &super::Settings) -> bool {
        let Some(want) = &settings.secret else {
            return true;
        };
        let ok = self
            .req
            .attributes
            .iter()
            .filter_map(|a| a.coded_value(attr::SECRET))
            .any(|got| got.as_deref().is_some_and(|g| constant_time_eq(g, want)));
        if !ok {
            self.svc.counters.refused_secret.fetch_add(1, Relaxed);
            // A client may send these at will: one line a second, with the count.
            if let Some(times) = self.svc.secret_refusals.due() {
                warn!(service = %self.svc.name, peer = %self.peer, times, "requests without the right AJP secret refused (403, connection closed)");
            }
        }
        ok
    }

    /// Whether the request carries an attribute `attributes` does not allow (counted and logged).
    fn attribute_refused(&self, settings: &super::Settings) -> bool {
        for a in &self.req.attributes {
            if let codec::Attribute::Request { name, .. } = a {
                let allowed = name.as_deref().is_some_and(|n| settings.ajp.attribute_allowed(n));
                if !allowed {
                    self.svc.counters.refused_attribute.fetch_add(1, Relaxed);
                    let shown = name
                        .as_deref()
                        .map(|n| String::from_utf8_lossy(&n[..n.len().min(64)]).into_owned())
                        .unwrap_or_default();
                    // Debug-quoted: the name comes off the wire, and a line break in it must not
                    // start a forged log line.
                    warn!(service = %self.svc.name, peer = %self.peer, attribute = ?shown, "request attribute not allowed; request refused (403)");
                    return true;
                }
            }
        }
        false
    }

    /// The backend for the next attempt: the session route's, else by the browser's address,
    /// else (when retries are used up, or no primary is left) a healthy backup.
    ///
    /// A backend the published state still lists may have lost its pool already (a removal the
    /// datapath applies just before the state is published): it is passed over like an excluded
    /// one, so its requests move on instead of getting a 503.
    fn pick(&self, route: Option<&[u8]>, client: IpAddr, exclude: &[u32], primaries: bool) -> Option<Target> {
        let snap = self.svc.balancer.snapshot();
        let state = snap.state.service(&self.svc.name).ok()?;
        let target = |chosen: Chosen, pick| {
            let id = chosen.backend_id;
            let be = state.backend_by_id(id)?;
            Some(Target {
                id,
                pool: self.svc.pool(id)?,
                pick,
                chosen,
                reset: snap.runtime(state, be).reset_token(),
            })
        };
        let mut failover = false;
        if let Some(r) = route
            && let Some(be) = state.backends.iter().find(|be| super::route_of(&be.config) == r)
        {
            if be.admits_known()
                && !exclude.contains(&be.id)
                && let Some(t) = target(Chosen::new(be.id, Reason::Affinity), Pick::Route)
            {
                return Some(t);
            }
            failover = true;
        }
        let pick = if failover {
            Pick::RouteFailover
        } else {
            Pick::Address
        };
        let mut passed = exclude.to_vec();
        while primaries
            && let Ok(c) = self
                .svc
                .balancer
                .choose(&self.svc.name, client, Instant::now(), &passed)
        {
            match target(c.chosen(), pick) {
                Some(t) => return Some(t),
                None => passed.push(c.backend_id),
            }
        }
        while let Some(id) = self.svc.balancer.choose_backup(&self.svc.name, &passed) {
            match target(Chosen::new(id, Reason::Backup), pick) {
                Some(t) => return Some(t),
                None => passed.push(id),
            }
        }
        None
    }

    /// One try on one backend; a pooled connection that turns out dead is replaced by a fresh one
    /// once (not counted as a retry).
    async fn attempt(
        &mut self,
        target: &Target,
        forward: &Bytes,
        body: &mut Body,
        settings: &super::Settings,
    ) -> Outcome {
        let (id, pool, reset) = (target.id, &target.pool, &target.reset);
        let patience = patience(target.pick, settings);
        let mut fresh = false;
        loop {
            let acquired = tokio::select! {
                r = pool.acquire(settings.connect_timeout, patience, settings.ajp.ping_after_idle, fresh) => r,
                // A session waiting on its busy backend stops waiting once that one is down or
                // out of service: it fails over as any request whose route is down.
                () = self.out_of_service(id), if patience > settings.connect_timeout => {
                    return Outcome::BackendBeforeResponse("backend left service while the request waited for it".into());
                }
            };
            let mut conn = match acquired {
                Ok(c) => c,
                Err(e) => {
                    match &e {
                        PoolError::Connect(_, io) if crate::health::lb_short_of_resources(io) => {
                            crate::health::warn_short_of_resources(
                                &self.svc.name,
                                io,
                                crate::health::BACKEND_CONNECTION_CLOSED,
                            );
                        }
                        // A backend answering other requests is busy, not down: its silence to
                        // a new connection's CPing is not held against it.
                        PoolError::NoPong(_) if pool.runtime.stats.busy_within(patience) => {
                            debug!(backend = %pool.address, "CPing unanswered by a backend busy with other requests; not counted against it");
                        }
                        PoolError::Connect(..) | PoolError::Timeout(_) | PoolError::NoPong(_) => {
                            self.svc.connect_outcome(id, &pool.runtime, Some(&e.to_string()));
                        }
                        PoolError::Full(_) => return Outcome::Full(e.to_string()),
                    }
                    return Outcome::BackendBeforeResponse(e.to_string());
                }
            };
            let reused = conn.reused;
            if !reused {
                self.svc.connect_outcome(id, &pool.runtime, None);
            }
            let outcome = self.exchange(&mut conn, reset, forward, body, settings).await;
            // A pooled connection the backend had closed: one more try on a new connection to the
            // same backend; for a request that reached it, only if it is idempotent (it may have
            // run).
            let stale = reused
                && !fresh
                && body.held
                && match &outcome {
                    Err(Outcome::BackendBeforeResponse(_)) => true,
                    Err(Outcome::NoAnswer(_)) => idempotent(self.req.method),
                    _ => false,
                };
            match outcome {
                Ok((status, reuse)) => {
                    if reuse {
                        pool.release(conn);
                    }
                    return Outcome::Done(status);
                }
                Err(Outcome::BackendBeforeResponse(why) | Outcome::NoAnswer(why)) if stale => {
                    debug!(backend = %pool.address, reason = %why, "pooled connection failed; trying a new one");
                    fresh = true;
                }
                Err(o) => return o,
            }
        }
    }

    /// Returns once backend `id` no longer takes its known clients (down, maintenance, removed),
    /// looking every [`SERVICE_POLL`].
    async fn out_of_service(&self, id: u32) {
        loop {
            tokio::time::sleep(SERVICE_POLL).await;
            let snap = self.svc.balancer.snapshot();
            let takes = snap
                .state
                .service(&self.svc.name)
                .ok()
                .and_then(|s| s.backend_by_id(id))
                .is_some_and(crate::state::Backend::admits_known);
            if !takes {
                return;
            }
        }
    }

    /// Sends the request, feeds the body on demand, relays the response. Ok: (status, reuse).
    async fn exchange(
        &mut self,
        conn: &mut Conn,
        reset: &CancellationToken,
        forward: &Bytes,
        body: &mut Body,
        settings: &super::Settings,
    ) -> Result<(u16, bool), Outcome> {
        let max = settings.max_packet;
        let wait = settings.ajp.reply_timeout;
        let runtime = conn.stats();
        let stats = &runtime.stats;
        write_backend(
            &mut conn.stream,
            forward,
            reset,
            wait,
            false,
            Outcome::BackendBeforeResponse,
        )
        .await?;
        stats.bytes_in.fetch_add(forward.len() as u64, Relaxed);
        // Replay position in the held body.
        let mut cursor = (0usize, 0usize);
        if body.first_unasked {
            let packet = next_held(body, &mut cursor, codec::max_body_data(max));
            write_backend(
                &mut conn.stream,
                &packet,
                reset,
                wait,
                false,
                Outcome::BackendBeforeResponse,
            )
            .await?;
            stats.bytes_in.fetch_add(packet.len() as u64, Relaxed);
        }
        let decoder = FrameDecoder::new(Direction::ToServer, max);
        let front_decoder = FrameDecoder::new(Direction::ToContainer, max);
        let mut responded = false;
        let mut status = 0u16;
        // Response packets not yet written to the web tier: packets that arrived together leave
        // together, in one write.
        let mut out = BytesMut::new();
        loop {
            // Bytes read with the request or a body packet, beyond it: sent unasked.
            if !self.fbuf.is_empty() {
                return Err(Outcome::Unasked(self.fbuf.len()));
            }
            let failed = |why: String, responded: bool| {
                if responded {
                    Outcome::BackendAfterResponse(why)
                } else {
                    Outcome::NoAnswer(why)
                }
            };
            let read = tokio::select! {
                r = read_frame(&mut conn.stream, &mut conn.buf, &decoder, Limits::NONE, None) => r,
                () = reset.cancelled() => {
                    return Err(Outcome::reset(responded));
                }
                () = sleep_unless_zero(wait) => {
                    return Err(Outcome::ReplyTimeout { responded });
                }
                gone = front_gone(self.front) => {
                    return Err(match gone {
                        FrontGone::Closed(why) => Outcome::Abandoned(why),
                        FrontGone::Unasked(n) => Outcome::Unasked(n),
                    });
                }
            };
            let frame = match read {
                Ok(Some(f)) => {
                    stats.bytes_out.fetch_add(f.len() as u64, Relaxed);
                    stats.answered();
                    f
                }
                Ok(None) => return Err(failed("connection closed".into(), responded)),
                Err(e) => return Err(failed(e.to_string(), responded)),
            };
            match frame.kind() {
                Some(kind::SEND_HEADERS) => {
                    match ContainerMessage::decode(frame.payload()) {
                        Ok(ContainerMessage::SendHeaders(h)) => status = h.status,
                        _ => return Err(failed("malformed Send Headers".into(), responded)),
                    }
                    responded = true;
                    self.relay(&mut out, frame.into_bytes(), has_frame(&conn.buf))
                        .await?;
                }
                Some(kind::SEND_BODY_CHUNK) => {
                    // Checked, not only passed on: a chunk longer than its packet would throw the
                    // web tier's reading of the stream off.
                    if !matches!(
                        ContainerMessage::decode(frame.payload()),
                        Ok(ContainerMessage::SendBodyChunk(_))
                    ) {
                        return Err(failed("malformed Send Body Chunk".into(), responded));
                    }
                    responded = true;
                    self.relay(&mut out, frame.into_bytes(), has_frame(&conn.buf))
                        .await?;
                }
                Some(kind::GET_BODY_CHUNK) => {
                    let asked = match ContainerMessage::decode(frame.payload()) {
                        Ok(ContainerMessage::GetBodyChunk(n)) => usize::from(n),
                        _ => return Err(failed("malformed Get Body Chunk".into(), responded)),
                    };
                    let limit = asked.min(codec::max_body_data(max));
                    let packet = if cursor.0 < body.chunks.len() {
                        next_held(body, &mut cursor, limit)
                    } else if body.done {
                        Bytes::from_static(&[0x12, 0x34, 0, 0])
                    } else {
                        // Ask the web tier for the next part, relay it unchanged.
                        let _ = ContainerMessage::GetBodyChunk(limit as u16).encode(&mut out, max);
                        self.send_front(&out).await?;
                        out.clear();
                        let (packet, data) = self
                            .read_body_packet(&front_decoder)
                            .await
                            .map_err(|e| Outcome::Front(e.to_string()))?;
                        body.keep(data, settings.retry_buffer);
                        // Held chunks already sent: the new one is past them.
                        cursor = (body.chunks.len(), 0);
                        packet
                    };
                    write_backend(&mut conn.stream, &packet, reset, wait, responded, |why| {
                        failed(why, responded)
                    })
                    .await?;
                    stats.bytes_in.fetch_add(packet.len() as u64, Relaxed);
                }
                Some(kind::END_RESPONSE) => {
                    let reuse = matches!(
                        ContainerMessage::decode(frame.payload()),
                        Ok(ContainerMessage::EndResponse { reuse: true })
                    );
                    // lb keeps the web tier's connection whatever the backend does with its own.
                    let _ = ContainerMessage::EndResponse { reuse: true }.encode(&mut out, max);
                    self.send_front(&out).await?;
                    return Ok((status, reuse));
                }
                other => {
                    return Err(failed(
                        format!("unexpected packet type {other:?} from the backend"),
                        responded,
                    ));
                }
            }
        }
    }

    /// Passes a response packet on: queued while more packets are already read, written (with
    /// the queue) otherwise.
    async fn relay(&mut self, out: &mut BytesMut, packet: Bytes, more: bool) -> Result<(), Outcome> {
        const QUEUE: usize = 64 * 1024;
        if out.is_empty() && !more {
            // Nothing else waiting: the packet goes out as read, without a copy.
            return self.send_front(&packet).await;
        }
        out.extend_from_slice(&packet);
        if !more || out.len() >= QUEUE {
            self.send_front(out).await?;
            out.clear();
        }
        Ok(())
    }

    async fn send_front(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        write_front(self.front, bytes, self.svc, self.peer)
            .await
            .map_err(|e| Outcome::Front(e.to_string()))
    }

    /// Reads one request body packet from the web tier: (the packet as read, its data).
    async fn read_body_packet(&mut self, decoder: &FrameDecoder) -> std::io::Result<(Bytes, Bytes)> {
        let wait = self.svc.settings().ajp.request_timeout;
        // Waiting for a body packet lb asked for is never idleness.
        let limits = Limits {
            idle: wait,
            packet: wait,
        };
        let frame = read_frame(self.front, self.fbuf, decoder, limits, None)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => std::io::Error::new(e.kind(), Timeout::Packet),
                _ => e,
            })?
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let data = codec::decode_body(frame.payload()).map_err(invalid)?;
        Ok((frame.into_bytes(), data))
    }

    async fn read_body(&mut self, decoder: &FrameDecoder) -> std::io::Result<Bytes> {
        self.read_body_packet(decoder).await.map(|(_, d)| d)
    }

    /// The web tier sent `bytes` no one asked for during a request: counted as a protocol error,
    /// its connection closed (and the backend's, if the request had reached one), nothing retried.
    fn unasked(&self, bytes: usize) -> Next {
        self.svc.counters.protocol_errors.fetch_add(1, Relaxed);
        warn!(service = %self.svc.name, peer = %self.peer, bytes,
            "AJP protocol error: the web tier sent data no one asked for during a request; connection closed, request not retried");
        Next::Close
    }

    fn front_failed(&self, e: &std::io::Error) -> Next {
        if e.kind() == std::io::ErrorKind::TimedOut {
            timed_out(self.svc, self.peer, e);
        } else if e.kind() == std::io::ErrorKind::InvalidData {
            self.svc.counters.protocol_errors.fetch_add(1, Relaxed);
            warn!(service = %self.svc.name, peer = %self.peer, error = %e, "AJP protocol error in a request body; connection closed");
        }
        Next::Close
    }

    /// Sends lb's own response (403 or 503); the connection goes on.
    async fn respond(&mut self, status: u16, reason: &str) -> Next {
        let response = codec::own_response(status, reason, true, self.svc.settings().max_packet);
        match write_front(self.front, &response, self.svc, self.peer).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close,
        }
    }

    /// Sends lb's own response saying the connection ends (End Response without reuse), then
    /// closes it: its side first, then whatever the web tier still sends (a body it announced) is
    /// read and dropped for a moment, so the close does not reset the connection before the
    /// response is read.
    async fn respond_and_close(&mut self, status: u16, reason: &str) -> Next {
        let response = codec::own_response(status, reason, false, self.svc.settings().max_packet);
        if write_front(self.front, &response, self.svc, self.peer)
            .await
            .is_ok()
            && self.front.shutdown().await.is_ok()
        {
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            let drain = async {
                while left > 0 {
                    match self.front.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
        Next::Close
    }
}

/// The next held body bytes (at most `limit`) as a body packet, advancing `cursor`; the
/// end-of-body packet when nothing is left.
fn next_held(body: &Body, cursor: &mut (usize, usize), limit: usize) -> Bytes {
    let mut out = BytesMut::new();
    let Some(chunk) = body.chunks.get(cursor.0) else {
        let _ = codec::encode_body(&[], &mut out, usize::MAX);
        return out.freeze();
    };
    let end = (cursor.1 + limit).min(chunk.len());
    let _ = codec::encode_body(&chunk[cursor.1..end], &mut out, codec::MAX_MAX_PACKET);
    *cursor = if end == chunk.len() {
        (cursor.0 + 1, 0)
    } else {
        (cursor.0, end)
    };
    out.freeze()
}

/// Whether `buf` already holds a whole packet (of either direction; only the length is read).
fn has_frame(buf: &BytesMut) -> bool {
    buf.len() >= codec::HEADER_LEN
        && buf.len() >= codec::HEADER_LEN + usize::from(u16::from_be_bytes([buf[2], buf[3]]))
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            chunks: Vec::new(),
            held_bytes: 0,
            held: true,
            done: false,
            remaining: None,
            first_unasked: false,
        }
    }

    /// Packets of the usual size are held up to the limit, with the end packet; a body trickled in
    /// one-byte packets stops being held at the chunk count, keeping only its latest part.
    #[test]
    fn the_retry_buffer_holds_bytes_and_a_bounded_number_of_chunks() {
        let limit = 64 * 1024;
        let mut b = body();
        for _ in 0..8 {
            b.keep(Bytes::from(vec![7u8; 8186]), limit);
        }
        b.keep(Bytes::new(), limit);
        assert!(b.held && b.done && b.chunks.len() == 8);
        let mut b = body();
        for _ in 0..=limit / HELD_CHUNK_MIN {
            b.keep(Bytes::from_static(b"x"), limit);
        }
        assert!(b.held, "as many chunks as the limit allows");
        b.keep(Bytes::from_static(b"y"), limit);
        assert!(!b.held);
        assert_eq!(b.chunks, [Bytes::from_static(b"y")], "only the latest part");
    }
}
