//! The accepting side the user-space datapaths share: one listening socket per service, bound with
//! SO_REUSEADDR (waiting briefly for a just-removed service's socket on the same address), an
//! accept loop bounded by `max_connections` permits (a permit is taken before `accept`, so excess
//! clients wait in the kernel's backlog), resizing, stopping and shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::limit::Limit;
use super::{DatapathError, Drained, workers};

/// How long adding a service waits for a removed one's socket on the same address to close.
const REBIND_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (EMFILE and the like) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Descriptors the datapaths leave free below the open-file limit, for what must go on while
/// clients hold all the others: health checks, AJP pool connections, the control socket.
pub const DESCRIPTOR_HEADROOM: u64 = 64;

/// Removed services whose accept loop may still hold the socket, by address. One for the process,
/// not one per datapath: a service that moves to another datapath (ajp → proxy) binds again
/// through the other datapath's [`Listeners`].
static CLOSING: LazyLock<Mutex<HashMap<SocketAddr, Receiver<()>>>> = LazyLock::new(Mutex::default);

struct Listener<S> {
    listen: SocketAddr,
    /// The address actually bound (differs from `listen` for port 0).
    local: SocketAddr,
    stop: CancellationToken,
    limit: Arc<Limit>,
    /// Disconnects once the accept loop has dropped its socket.
    closed: Receiver<()>,
    /// What the datapath keeps per service.
    service: Arc<S>,
}

/// The listeners of one datapath's services, each with the datapath's per-service value `S`.
pub struct Listeners<S> {
    /// Which datapath, for log lines.
    what: &'static str,
    map: Mutex<HashMap<String, Listener<S>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Accept and serve on the [`workers`] (one runtime per CPU) instead of the caller's runtime.
    on_workers: bool,
}

impl<S: Send + Sync + 'static> Listeners<S> {
    /// Listeners accepting and serving on the caller's runtime.
    pub fn new(what: &'static str) -> Self {
        Listeners {
            what,
            map: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            on_workers: false,
        }
    }

    /// Listeners whose services each accept on every [`workers`] runtime, a connection served on
    /// the worker that accepted it or, when that one serves more than another, on the least loaded.
    pub fn on_workers(what: &'static str) -> Self {
        Listeners {
            on_workers: true,
            ..Listeners::new(what)
        }
    }

    /// Listens on `listen` for service `name` and serves each accepted connection with
    /// `serve(connection, peer, service, stop)` as a task of its own.
    pub fn start<F, Fut>(
        &self,
        name: &str,
        listen: SocketAddr,
        max_connections: u32,
        service: Arc<S>,
        serve: F,
    ) -> Result<(), DatapathError>
    where
        F: Fn(TcpStream, SocketAddr, Arc<S>, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let bind_error = |source| DatapathError::Bind {
            service: name.to_string(),
            listen,
            source,
        };
        let closing = CLOSING.lock().unwrap().remove(&listen);
        if let Some(closed) = closing {
            let _ = closed.recv_timeout(REBIND_WAIT);
        }
        let listener = bind(listen).map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let stop = self.shutdown.child_token();
        let limit = Limit::new(max_connections);
        let (closed_tx, closed) = sync_channel(0);
        info!(service = name, %listen, max_connections, "{} listening", self.what);
        let serve = Arc::new(serve);
        let workers = if self.on_workers { workers::handles() } else { &[] };
        let runtimes = if workers.is_empty() {
            vec![Handle::current()]
        } else {
            workers.to_vec()
        };
        // One socket, one descriptor per runtime: each registers it with its own reactor. All are
        // made before any accept loop starts, so a failure leaves nothing running.
        let descriptors = runtimes
            .iter()
            .map(|_| listener.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(bind_error)?;
        for (runtime, listener) in runtimes.into_iter().zip(descriptors) {
            let accept = accept_loop(
                name.to_string(),
                listener,
                limit.clone(),
                service.clone(),
                stop.clone(),
                self.tasks.clone(),
                serve.clone(),
            );
            let closed_tx = closed_tx.clone();
            runtime.spawn(self.tasks.track_future(async move {
                accept.await;
                drop(closed_tx);
            }));
        }
        self.map.lock().unwrap().insert(
            name.to_string(),
            Listener {
                listen,
                local,
                stop,
                limit,
                closed,
                service,
            },
        );
        Ok(())
    }

    /// Stops accepting for `name` (open connections continue); returns its service value.
    pub fn stop(&self, name: &str) -> Option<Arc<S>> {
        let l = self.map.lock().unwrap().remove(name)?;
        l.stop.cancel();
        // Port 0 (tests) binds anew each time: nothing to wait for.
        if l.listen.port() != 0 {
            CLOSING.lock().unwrap().insert(l.listen, l.closed);
        }
        info!(service = %name, "{} stopped listening; open connections continue", self.what);
        Some(l.service)
    }

    /// Follows a changed `max_connections` (lowered as far as open connections allow at once, the
    /// rest as they close).
    pub fn resize(&self, name: &str, want: u32) {
        if let Some(l) = self.map.lock().unwrap().get(name) {
            l.limit.resize(want);
        }
    }

    /// The service value of `name`.
    pub fn service(&self, name: &str) -> Option<Arc<S>> {
        self.map.lock().unwrap().get(name).map(|l| l.service.clone())
    }

    /// Every service value (for shutdown work such as closing idle pools).
    pub fn services(&self) -> Vec<Arc<S>> {
        self.map
            .lock()
            .unwrap()
            .values()
            .map(|l| l.service.clone())
            .collect()
    }

    /// The address `name` is bound to.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.map.lock().unwrap().get(name).map(|l| l.local)
    }

    /// Runs `task` alongside the connections (shutdown waits for it too).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// A token cancelled when `name` stops listening or the datapath shuts down.
    pub fn stop_token(&self, name: &str) -> Option<CancellationToken> {
        self.map.lock().unwrap().get(name).map(|l| l.stop.clone())
    }

    /// Stops every accept loop; the future ends when every connection task has finished.
    pub fn shutdown(&self) -> Drained<'_> {
        self.shutdown.cancel();
        self.tasks.close();
        Box::pin(self.tasks.wait())
    }
}

/// What to check after a failed bind, as the tail of the error's message: only an address in use
/// suggests another program; an address no interface has, or a low port without the right, say so.
pub fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "; is another program using that address?",
        std::io::ErrorKind::AddrNotAvailable => {
            "; no interface of this host has that address (see `ip addr`)"
        }
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need root or CAP_NET_BIND_SERVICE",
        _ => "",
    }
}

/// Whether service `name` could listen on `listen` now: binds a socket there without listening
/// (no client can reach it) and closes it.
pub fn can_listen(name: &str, listen: SocketAddr) -> Result<(), DatapathError> {
    bound(listen).map(drop).map_err(|source| DatapathError::Bind {
        service: name.to_string(),
        listen,
        source,
    })
}

/// A socket bound with SO_REUSEADDR, so a restart does not wait for TIME_WAIT.
fn bound(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Listens on `addr` ([`bound`]) with TCP_NODELAY, which every accepted connection inherits (one
/// setsockopt per listener instead of per connection).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = bound(addr)?;
    socket.set_nodelay(true)?;
    socket.listen(1024)?.into_std()
}

#[tracing::instrument(skip_all, fields(service = %name))]
async fn accept_loop<S, F, Fut>(
    name: String,
    listener: std::net::TcpListener,
    limit: Arc<Limit>,
    service: Arc<S>,
    stop: CancellationToken,
    tasks: TaskTracker,
    serve: Arc<F>,
) where
    S: Send + Sync + 'static,
    F: Fn(TcpStream, SocketAddr, Arc<S>, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let worker = workers::current();
    // SAFETY: the AsyncFd owns the std listener, whose descriptor stays open and the same until
    // both are dropped together.
    let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot register the listening socket; this runtime does not accept");
            return;
        }
    };
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = limit.acquire() => p,
        };
        let (connection, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = accept(&listener) => match r {
                Ok((c, _)) if !leaves_headroom(c.as_raw_fd()) => {
                    drop(c);
                    let e = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
                    crate::health::warn_short_of_resources(&name, &e, HEADROOM_REACHED);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                Ok(c) => c,
                Err(e) if crate::health::lb_short_of_resources(&e) => {
                    crate::health::warn_short_of_resources(&name, &e, "new connections wait in the listen backlog");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // A worker serving more connections than another hands the new one to the least loaded:
        // not yet registered with any reactor, it costs that worker only a wakeup.
        let load = worker.map(workers::Served::least_loaded_unless);
        let to = load.as_ref().map(workers::Served::worker);
        let (service, stop, serve) = (service.clone(), stop.clone(), serve.clone());
        let task = async move {
            debug_assert_eq!(workers::current(), to, "served where it is counted");
            match TcpStream::from_std(connection) {
                Ok(connection) => serve(connection, peer, service, stop).await,
                Err(e) => warn!(error = %e, "cannot register an accepted connection; closed"),
            }
            drop((permit, load));
        };
        match to.filter(|&to| Some(to) != worker) {
            Some(to) => tasks.spawn_on(task, &workers::handles()[to]),
            None => tasks.spawn(task),
        };
    }
}

/// The next connection on `listener`, non-blocking and not yet registered with a reactor, with its
/// peer's address.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|l| accept4(l.get_ref())) {
            Err(_would_block) => {}
            // A connection that failed before it was accepted, or a signal: the next one is
            // taken at once (accept(2), "Error handling").
            Ok(Err(e)) if e.raw_os_error().is_some_and(gone_before_accept) => {}
            Ok(accepted) => return accepted,
        }
    }
}

/// Errors accept(2) reports for the pending connection it tried to take (Linux passes its network
/// errors on), or for an interrupting signal: not the listener's.
fn gone_before_accept(errno: i32) -> bool {
    use nix::libc::{
        ECONNABORTED, EHOSTDOWN, EHOSTUNREACH, EINTR, ENETDOWN, ENETUNREACH, ENONET, ENOPROTOOPT, EOPNOTSUPP,
        EPROTO,
    };
    [
        ECONNABORTED,
        EINTR,
        EPROTO,
        ENOPROTOOPT,
        ENETDOWN,
        ENETUNREACH,
        EHOSTDOWN,
        EHOSTUNREACH,
        ENONET,
        EOPNOTSUPP,
    ]
    .contains(&errno)
}

/// accept4(2) with the new socket non-blocking and close-on-exec (no fcntl after it).
fn accept4(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage};
    // SAFETY: sockaddr_storage is plain bytes; all zeroes is a valid (empty) value.
    let mut addr: nix::libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&addr) as nix::libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes, which accept4 writes and shortens.
    let fd = unsafe {
        nix::libc::accept4(
            listener.as_raw_fd(),
            (&raw mut addr).cast(),
            &raw mut len,
            nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    // SAFETY: accept4 filled `len` bytes of `addr`.
    let peer = unsafe { SockaddrStorage::from_raw((&raw const addr).cast(), Some(len)) }
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                })
        })
        .ok_or_else(|| std::io::Error::other("accept4 returned no IP peer address"))?;
    Ok((stream, peer))
}

const HEADROOM_REACHED: &str =
    "connection closed, the last descriptors are kept for health checks and the control socket";

/// The soft limit on open files as last read (0: not yet), and the accepts since.
static NOFILE: AtomicU64 = AtomicU64::new(0);
static ACCEPTS: AtomicU64 = AtomicU64::new(0);
/// Accepts between two reads of the limit while descriptors are far below it.
const NOFILE_REREAD: u64 = 1024;

/// Whether an accepted connection's descriptor `fd` leaves [`DESCRIPTOR_HEADROOM`] free below the
/// soft limit on open files. Descriptors are handed out lowest first, so a number this high means
/// those below it are all in use. The limit is read again near it (an operator may have raised it
/// with prlimit) and every [`NOFILE_REREAD`] accepts (or lowered it), not at each accept.
fn leaves_headroom(fd: std::os::fd::RawFd) -> bool {
    headroom_by(fd, &NOFILE, &ACCEPTS, || {
        use nix::sys::resource::{Resource, getrlimit};
        getrlimit(Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft)
    })
}

/// [`leaves_headroom`] with the limit as last read in `cached`, the accepts counted in `accepts`,
/// and `read` reading it anew (`None`: cannot tell, so the connection is kept).
fn headroom_by(
    fd: std::os::fd::RawFd,
    cached: &AtomicU64,
    accepts: &AtomicU64,
    read: impl FnOnce() -> Option<u64>,
) -> bool {
    let Ok(fd) = u64::try_from(fd) else {
        return true;
    };
    let known = cached.load(Ordering::Relaxed);
    let near = fd.saturating_add(DESCRIPTOR_HEADROOM) >= known;
    let soft = if near
        || accepts
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(NOFILE_REREAD)
    {
        let Some(soft) = read() else {
            return true;
        };
        cached.store(soft, Ordering::Relaxed);
        soft
    } else {
        known
    };
    fd.saturating_add(DESCRIPTOR_HEADROOM) < soft
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit is not read at every accept, but a raised one is seen as soon as a descriptor
    /// comes near the old one, and a lowered one within `NOFILE_REREAD` accepts.
    #[test]
    fn the_limit_is_read_near_it_and_every_so_many_accepts() {
        // One accept counted already: the next read falls due NOFILE_REREAD - 1 accepts on.
        let (cached, accepts) = (AtomicU64::new(0), AtomicU64::new(1));
        let reads = std::cell::Cell::new(0);
        let limit = std::cell::Cell::new(1000u64);
        let judge = |fd: i32| {
            headroom_by(fd, &cached, &accepts, || {
                reads.set(reads.get() + 1);
                Some(limit.get())
            })
        };
        assert!(judge(10), "first accept: read");
        assert_eq!(reads.get(), 1);
        for _ in 0..100 {
            assert!(judge(10));
        }
        assert_eq!(reads.get(), 1, "far below the limit: not read again");
        // Raised to 5000: 990 is near the old 1000, so it is read and let in.
        limit.set(5000);
        assert!(judge(990));
        assert_eq!(reads.get(), 2);
        // Lowered to 50 while descriptors stay low: seen within NOFILE_REREAD accepts.
        limit.set(50);
        let refused_after = (0..=NOFILE_REREAD).position(|_| !judge(10));
        assert!(refused_after.is_some(), "a lowered limit was never read");
        assert_eq!(reads.get(), 3);
        // Unreadable: the connection is kept.
        assert!(headroom_by(4990, &cached, &accepts, || None));
    }

    #[test]
    fn the_last_descriptors_below_the_limit_are_headroom() {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let at = |n: u64| i32::try_from(n).unwrap();
        assert!(leaves_headroom(3));
        assert!(leaves_headroom(at(soft - DESCRIPTOR_HEADROOM - 1)));
        assert!(!leaves_headroom(at(soft - DESCRIPTOR_HEADROOM)));
        assert!(!leaves_headroom(at(soft - 1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_moving_to_another_datapath_binds_its_address_again() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let datapaths = [Listeners::<()>::new("ajp"), Listeners::<()>::new("proxy")];
        let serve = |_: TcpStream, _: SocketAddr, _: Arc<()>, _: CancellationToken| async {};
        tokio::task::spawn_blocking(move || {
            datapaths[0].start("svc", addr, 4, Arc::new(()), serve).unwrap();
            // Back and forth: each move stops one datapath's listener and binds the other's at once.
            for round in 0..50 {
                let (from, to) = (&datapaths[round % 2], &datapaths[(round + 1) % 2]);
                assert!(from.stop("svc").is_some());
                if let Err(e) = to.start("svc", addr, 4, Arc::new(()), serve) {
                    panic!("round {round}: {e}");
                }
            }
        })
        .await
        .unwrap();
    }
}
