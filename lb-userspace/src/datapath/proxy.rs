//! The user-space proxy datapath (`datapath = "proxy"`): a tokio full proxy.
//!
//! One listener per service ([`super::listener`], bounded by `max_connections`). Each connection
//! asks the [`Balancer`] for a backend, connects with a timeout, tries the next candidate on
//! failure (a healthy backup last, while every primary fails), records affinity, then relays both
//! directions until both sides have closed (half-close passed on): with a buffer per direction
//! (`splice = "off"`) or with splice(2) through a pipe ([`super::pipe`], `splice = "pipe"`). Every connect
//! outcome goes to passive health ([`crate::health::passive`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::listener::Listeners;
use super::pipe;
use crate::balancer::{Balancer, Choice, SelectError};
use crate::config::{DatapathKind, SpliceMode};
use crate::datapath::{Datapath, DatapathError, Drained, ServiceTraffic};
use crate::health::passive::Passive;
use crate::runtime::{BackendRuntime, Snapshot};
use crate::state::{Effect, Service};

/// Bytes one read moves (`splice = "off"`), from one buffer per thread.
const BUFFER: usize = 64 * 1024;
/// Most backends tried for one client connection.
const MAX_ATTEMPTS: usize = 4;

/// One proxied service, shared by its connections.
pub struct ProxyService {
    name: String,
    balancer: Arc<Balancer>,
    /// Clients closed because no backend could be reached.
    failed: AtomicU64,
    /// Where connect outcomes go (passive health).
    passive: Passive,
}

impl ProxyService {
    /// Reports a failed connect to the backend `choice` to passive health.
    fn connect_failed(&self, choice: &Choice, why: &str) {
        let snapshot = self.balancer.snapshot();
        let Ok(svc) = snapshot.state.service(&self.name) else {
            return;
        };
        if let Some(be) = svc.backends.iter().find(|b| b.id == choice.backend_id)
            && self.passive.failed(svc, be, &choice.runtime, why)
        {
            warn!(service = %self.name, backend = %choice.address, "passive health: backend marked down after connect failures");
        }
    }
}

pub struct ProxyDatapath {
    balancer: Arc<Balancer>,
    listeners: Listeners<ProxyService>,
    passive: Passive,
}

impl ProxyDatapath {
    /// A proxy datapath choosing from `balancer`, reporting connect outcomes to `passive`.
    pub fn new(balancer: Arc<Balancer>, passive: Passive) -> Self {
        ProxyDatapath {
            balancer,
            listeners: Listeners::on_workers("proxy"),
            passive,
        }
    }
}

impl Datapath for ProxyDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Proxy
    }

    fn can_listen(&self, name: &str, listen: std::net::SocketAddr) -> Result<(), DatapathError> {
        super::listener::can_listen(name, listen)
    }

    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError> {
        match effect {
            Effect::ServiceAdded(name) => {
                let svc = snapshot
                    .state
                    .service(name)
                    .expect("effect names a present service");
                let service = Arc::new(ProxyService {
                    name: name.clone(),
                    balancer: self.balancer.clone(),
                    failed: AtomicU64::new(0),
                    passive: self.passive.clone(),
                });
                self.listeners.start(
                    name,
                    svc.settings.listen,
                    svc.settings.max_connections,
                    service,
                    |client, peer, service, _stop| async move { handle(client, peer, &service).await },
                )
            }
            Effect::ServiceRemoved { name, .. } => {
                self.listeners.stop(name);
                Ok(())
            }
            // Settings and backends are read from the balancer at each new connection.
            Effect::ServiceChanged(name) => {
                if let Ok(svc) = snapshot.state.service(name) {
                    self.listeners.resize(name, svc.settings.max_connections);
                }
                Ok(())
            }
            Effect::Nothing => Ok(()),
        }
    }

    fn traffic(&self, service: &Service) -> ServiceTraffic {
        let name = &service.settings.name;
        ServiceTraffic {
            failed_connections: Some(
                self.listeners
                    .service(name)
                    .map_or(0, |s| s.failed.load(Ordering::Relaxed)),
            ),
            // The runtime's user-space counters, which the engine reads itself.
            backends: HashMap::new(),
            ajp: None,
        }
    }

    fn shutdown(&self) -> Drained<'_> {
        self.listeners.shutdown()
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, svc: &ProxyService) {
    let (service, balancer) = (svc.name.as_str(), &*svc.balancer);
    // TCP_NODELAY comes from the listening socket (see `listener::bind`).
    let mut exclude = Vec::new();
    for attempt in 0..MAX_ATTEMPTS {
        let (connect_timeout, splice, idle_timeout) = match balancer.snapshot().state.service(service) {
            Ok(s) => (
                s.settings.connect_timeout,
                s.settings.splice,
                s.settings.idle_timeout,
            ),
            Err(_) => return, // service removed meanwhile
        };
        // While every primary fails (before the checks mark them down), a healthy backup is the
        // last resort: when the ring has nobody left to try, and for the last attempt.
        let picked = if attempt + 1 == MAX_ATTEMPTS && !exclude.is_empty() {
            balancer
                .last_resort(service, &exclude)
                .or_else(|_| balancer.choose(service, peer.ip(), Instant::now(), &exclude))
        } else {
            balancer
                .choose(service, peer.ip(), Instant::now(), &exclude)
                .or_else(|e| match e {
                    SelectError::NoBackend(_) if !exclude.is_empty() => {
                        balancer.last_resort(service, &exclude)
                    }
                    e => Err(e),
                })
        };
        let choice = match picked {
            Ok(c) => c,
            Err(SelectError::NoBackend(_) | SelectError::State(_)) => break,
        };
        match tokio::time::timeout(connect_timeout, connect(choice.address)).await {
            Ok(Ok(backend)) => {
                svc.passive.connected(&choice.runtime);
                balancer.confirm(service, peer.ip(), choice.chosen(), Instant::now());
                relay(client, backend, &choice.runtime, splice, idle_timeout).await;
                return;
            }
            Ok(Err(e)) if crate::health::lb_short_of_resources(&e) => {
                // Not the backend's fault, and every other backend would fail the same way.
                crate::health::warn_short_of_resources(service, &e, crate::health::BACKEND_CONNECTION_CLOSED);
                break;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                debug!(%peer, backend = %choice.address, error = %e, "backend reset the connection it had just accepted; trying next");
                svc.connect_failed(&choice, &e.to_string());
            }
            Ok(Err(e)) => {
                debug!(%peer, backend = %choice.address, error = %e, "connect failed; trying next");
                svc.connect_failed(&choice, &e.to_string());
            }
            Err(_) => {
                debug!(%peer, backend = %choice.address, "connect timed out; trying next");
                svc.connect_failed(
                    &choice,
                    &format!("connect timed out after {} ms", connect_timeout.as_millis()),
                );
            }
        }
        choice
            .runtime
            .stats
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        exclude.push(choice.backend_id);
    }
    svc.failed.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, "no backend reachable; closing client");
}

/// Connects to `address` with TCP_NODELAY set. Asks the socket for its error (SO_ERROR) only when
/// epoll reported an error or a hang-up: tokio's own connect always asks, one syscall per
/// connection more.
async fn connect(address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    match nix::sys::socket::connect(
        socket.as_raw_fd(),
        &nix::sys::socket::SockaddrStorage::from(address),
    ) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    // SAFETY: the socket's descriptor, owned from here on by the stream made of it.
    let stream = TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) })?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// When a relayed connection last moved bytes, either way: kept by the copies (a clock read per
/// read or write, no timer), looked at by one timer per connection that sleeps until the
/// connection could have been idle for the limit.
pub struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes moved now.
    pub fn moved(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once no bytes moved for `limit`; never for a zero limit.
    async fn idle_for(&self, limit: Duration) {
        if limit.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let until = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit;
            if tokio::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

/// Copies both directions until both have reached EOF; an error in either ends both, and so does
/// `idle_timeout` without a byte moving either way.
async fn relay(
    client: TcpStream,
    backend: TcpStream,
    runtime: &BackendRuntime,
    mode: SpliceMode,
    idle_timeout: Duration,
) {
    let stats = &runtime.stats;
    stats.active_connections.fetch_add(1, Ordering::Relaxed);
    stats.total_connections.fetch_add(1, Ordering::Relaxed);
    let reset = runtime.reset_token();
    let activity = Activity::new();
    let both = async {
        match mode {
            SpliceMode::Off => {
                let done = AtomicBool::new(false);
                let up = copy_counted(&client, &backend, &stats.bytes_in, &done, &activity);
                let down = copy_counted(&backend, &client, &stats.bytes_out, &done, &activity);
                tokio::try_join!(up, down).map(|_| ())
            }
            SpliceMode::Pipe => {
                let up = pipe::copy(&client, &backend, &stats.bytes_in, &activity);
                let down = pipe::copy(&backend, &client, &stats.bytes_out, &activity);
                tokio::try_join!(up, down).map(|_| ())
            }
        }
    };
    let was_reset = tokio::select! {
        r = both => {
            if let Err(e) = r {
                debug!(error = %e, "relay ended with an error");
            }
            false
        }
        () = reset.cancelled() => true,
        () = activity.idle_for(idle_timeout) => {
            debug!(?idle_timeout, "no bytes moved for idle_timeout; connection closed");
            false
        }
    };
    if was_reset {
        // Linger 0: closing sends an RST to both peers rather than a FIN.
        for s in [&client, &backend] {
            let _ = nix::sys::socket::setsockopt(
                s,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
        }
        debug!("connection reset: backend marked down");
    }
    drop((client, backend));
    stats.active_connections.fetch_sub(1, Ordering::Relaxed);
}

thread_local! {
    /// The read buffer of every connection relayed on this thread: a read lands here and is
    /// written on at once; only what the destination cannot take yet is copied to the connection.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; BUFFER]);
}

/// One read from `src` into the thread's buffer, written on to `dst` as far as it takes it now.
/// Returns the bytes read (0 at EOF); what `dst` did not take is left in `pending`.
///
/// A read shorter than the buffer emptied the socket's receive queue (TCP's recvmsg copies until
/// the queue or the buffer runs out), so it also clears `src`'s readiness, as an `EAGAIN` would:
/// the next read waits for the next readiness event instead of costing a syscall that finds
/// nothing. tokio clears only the readiness it saw before the read, so data arriving after it
/// still wakes the task.
fn read_and_forward(src: &TcpStream, dst: &TcpStream, pending: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        READ_BUFFER.with_borrow_mut(|buf| {
            // SAFETY: reading into the thread's buffer, at most its length.
            let n = unsafe { nix::libc::recv(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            let mut sent = 0;
            while sent < n {
                match dst.try_write(&buf[sent..n]) {
                    Ok(m) => sent += m,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            pending.extend_from_slice(&buf[sent..n]);
            got = Some(n);
            if n > 0 && n < buf.len() {
                Err(std::io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        })
    });
    match (r, got) {
        (Ok(n), _) => Ok(n),
        (Err(e), Some(n)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(n),
        (Err(e), _) => Err(e),
    }
}

/// Relays `src` to `dst` until `src` reaches EOF, then half-closes `dst` (unless the other
/// direction has ended already: then both sockets are closed at once, and the close sends the FIN
/// the shutdown would have; `done` is shared by the two directions). A connection holds no
/// buffer of its own while the destination takes every read whole (idle connections cost only
/// their sockets); otherwise the rest waits in `pending` and nothing more is read until it has
/// gone out, so a slow reader holds the sender back through TCP.
async fn copy_counted(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
    done: &AtomicBool,
    activity: &Activity,
) -> std::io::Result<()> {
    let mut pending = Vec::new();
    loop {
        let n = loop {
            src.readable().await?;
            match read_and_forward(src, dst, &mut pending) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        activity.moved();
        if n == 0 {
            if done.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            // Pass the half-close on: the peer sees EOF but may still send.
            return nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write).or_else(
                |e| {
                    if e == nix::errno::Errno::ENOTCONN {
                        Ok(())
                    } else {
                        Err(e.into())
                    }
                },
            );
        }
        let mut sent = 0;
        while sent < pending.len() {
            match dst.try_write(&pending[sent..]) {
                Ok(m) => {
                    sent += m;
                    activity.moved();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        pending = Vec::new();
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let (a, b) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (a.unwrap(), b.unwrap().0)
    }

    /// A sender that writes everything and half-closes at once (its FIN queued behind the data
    /// before the relay reads), with sizes around the read size: every byte arrives, then EOF,
    /// the counter says how many, and the other direction stays open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fin_right_behind_the_data_is_passed_on_after_every_byte() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        for (i, len) in [1, 1000, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER + 7]
            .into_iter()
            .enumerate()
        {
            let (mut sender, src) = pair(&listener).await;
            let (dst, mut reader) = pair(&listener).await;
            let data: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            sender.write_all(&data).await.unwrap();
            sender.shutdown().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let (counter, done) = (AtomicU64::new(0), AtomicBool::new(false));
            let read = tokio::spawn(async move {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).await.map(|_| got)
            });
            copy_counted(&src, &dst, &counter, &done, &Activity::new())
                .await
                .unwrap();
            assert_eq!(counter.load(Ordering::Relaxed), len as u64, "{len} bytes");
            assert!(done.load(Ordering::Relaxed), "{len} bytes: the direction is over");
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .expect("the reader sees EOF: the half-close was passed on")
                .unwrap()
                .unwrap();
            assert!(got == data, "{len} bytes arrive exactly ({} arrived)", got.len());
            // The other direction stays open: the sender still reads what comes back.
            let mut src = src;
            src.write_all(b"after").await.unwrap();
            let mut back = [0u8; 5];
            sender.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"after");
        }
    }

    /// Whether `s` reaches EOF (or an error) within `wait`, skipping what arrives before.
    async fn ends_within(s: &mut TcpStream, wait: Duration) -> bool {
        let mut b = [0u8; 256];
        let end = async { while s.read(&mut b).await.is_ok_and(|n| n > 0) {} };
        tokio::time::timeout(wait, end).await.is_ok()
    }

    /// `idle_timeout`, for each splice mode: a connection that moves bytes either way now and
    /// then stays open past it; one that moves nothing is closed on both sides, also when one
    /// side has half-closed already (its peer could otherwise hold it forever); zero never closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_close_after_idle_timeout_and_busy_ones_stay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = Duration::from_millis(400);
        for mode in [SpliceMode::Off, SpliceMode::Pipe] {
            let runtime = Arc::new(BackendRuntime::default());
            let start = |limit: Duration| {
                let (listener, runtime) = (&listener, runtime.clone());
                async move {
                    let (client, relay_client) = pair(listener).await;
                    let (relay_backend, backend) = pair(listener).await;
                    let task = tokio::spawn(async move {
                        relay(relay_client, relay_backend, &runtime, mode, limit).await;
                    });
                    (client, backend, task)
                }
            };
            // Busy: a byte each way every 150 ms for three times the limit.
            let (mut client, mut backend, busy) = start(idle).await;
            for i in 0..8u8 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let (from, to) = if i % 2 == 0 {
                    (&mut client, &mut backend)
                } else {
                    (&mut backend, &mut client)
                };
                from.write_all(&[i]).await.unwrap();
                let mut b = [0u8; 1];
                to.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], i, "{mode:?}: relayed while busy");
            }
            assert!(!busy.is_finished(), "{mode:?}: a busy connection stays open");
            // Quiet from here on: both sides see the end within the limit and a margin.
            let t = std::time::Instant::now();
            assert!(
                ends_within(&mut client, Duration::from_secs(3)).await,
                "{mode:?}: client closed"
            );
            assert!(
                ends_within(&mut backend, Duration::from_secs(3)).await,
                "{mode:?}: backend closed"
            );
            assert!(
                t.elapsed() >= Duration::from_millis(350),
                "{mode:?}: not before the limit"
            );
            busy.await.unwrap();
            // The backend half-closes, the client never answers: closed all the same.
            let (mut client, backend, half) = start(idle).await;
            let backend = backend.into_std().unwrap();
            backend.shutdown(std::net::Shutdown::Write).unwrap();
            assert!(
                ends_within(&mut client, Duration::from_secs(3)).await,
                "{mode:?}: half-closed one"
            );
            tokio::time::timeout(Duration::from_secs(3), half)
                .await
                .expect("relay over after a half-close and idle_timeout")
                .unwrap();
            assert_eq!(runtime.stats.active_connections.load(Ordering::Relaxed), 0);
            // Zero: no limit.
            let (_client, _backend, forever) = start(Duration::ZERO).await;
            tokio::time::sleep(idle * 2).await;
            assert!(!forever.is_finished(), "{mode:?}: idle_timeout = 0 never closes");
            forever.abort();
        }
    }

    /// `connect`: a listening backend is connected (with TCP_NODELAY), a closed port is refused
    /// with the kernel's reason (read from the socket only then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_succeeds_or_says_why() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let stream = connect(open).await.expect("a listening port");
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY set before the connect");
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
        drop((stream, accepted));
        let refused = connect(closed).await.map(drop).map_err(|e| e.kind());
        assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    }
}
