//! The user-space proxy datapath (`datapath = "proxy"`): a tokio full proxy.
//!
//! One accept loop per service, bounded by `max_connections` (a permit is taken before `accept`, so
//! excess clients wait in the kernel's backlog). Each connection asks the [`Balancer`] for a backend,
//! connects with a timeout, tries the next candidate on failure, records affinity, then relays both
//! directions with fixed buffers until both sides have closed (half-close passed on).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::balancer::{Balancer, SelectError};
use crate::config::DatapathKind;
use crate::datapath::{Datapath, DatapathError, Drained, ServiceTraffic};
use crate::runtime::{BackendRuntime, BackendStats, Snapshot};
use crate::state::{Backend, Effect, Service, State};

/// Relay buffer per direction.
const BUFFER: usize = 16 * 1024;
/// Most backends tried for one client connection.
const MAX_ATTEMPTS: usize = 4;

/// Service-level counters of the proxy.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Clients closed because no backend could be reached.
    pub failed: std::sync::atomic::AtomicU64,
}

struct Listener {
    listen: SocketAddr,
    stop: CancellationToken,
    stats: Arc<ServiceStats>,
    limit: Arc<Semaphore>,
    max_connections: u32,
    /// Disconnects once the accept loop has dropped its socket.
    closed: std::sync::mpsc::Receiver<()>,
}

/// How long adding a service waits for a removed one's socket on the same address to close.
const REBIND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct ProxyDatapath {
    balancer: Arc<Balancer>,
    listeners: Mutex<HashMap<String, Listener>>,
    /// Removed services whose accept loop may still hold the socket, by address.
    closing: Mutex<HashMap<SocketAddr, std::sync::mpsc::Receiver<()>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ProxyDatapath {
    pub fn new(balancer: Arc<Balancer>) -> Self {
        ProxyDatapath {
            balancer,
            listeners: Mutex::new(HashMap::new()),
            closing: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Counters of a proxied service.
    pub fn service_stats(&self, service: &str) -> Option<Arc<ServiceStats>> {
        self.listeners
            .lock()
            .unwrap()
            .get(service)
            .map(|l| l.stats.clone())
    }

    fn start(&self, name: &str, state: &State) -> Result<(), DatapathError> {
        let svc = state.service(name).expect("effect names a present service");
        let listen = svc.settings.listen;
        let bind_error = |source| DatapathError::Bind {
            service: name.to_string(),
            listen,
            source,
        };
        // A service just removed from this address may still be closing its socket.
        if let Some(closed) = self.closing.lock().unwrap().remove(&listen) {
            let _ = closed.recv_timeout(REBIND_WAIT);
        }
        let std_listener = bind(listen).map_err(bind_error)?;
        let listener = TcpListener::from_std(std_listener).map_err(bind_error)?;
        let stop = self.shutdown.child_token();
        let stats = Arc::new(ServiceStats::default());
        let max_connections = svc.settings.max_connections;
        let limit = Arc::new(Semaphore::new(max_connections as usize));
        let (closed_tx, closed) = std::sync::mpsc::sync_channel(0);
        info!(service = name, %listen, max_connections, "proxy listening");
        let accept = accept_loop(
            name.to_string(),
            listener,
            limit.clone(),
            self.balancer.clone(),
            stats.clone(),
            stop.clone(),
            self.tasks.clone(),
        );
        self.tasks.spawn(async move {
            accept.await;
            drop(closed_tx);
        });
        let l = Listener {
            listen,
            stop,
            stats,
            limit,
            max_connections,
            closed,
        };
        self.listeners.lock().unwrap().insert(name.to_string(), l);
        Ok(())
    }

    /// Follows a changed `max_connections` by adding or forgetting permits.
    fn resize(&self, name: &str, state: &State) {
        let Ok(svc) = state.service(name) else { return };
        let mut listeners = self.listeners.lock().unwrap();
        let Some(l) = listeners.get_mut(name) else { return };
        let want = svc.settings.max_connections;
        if want > l.max_connections {
            l.limit.add_permits((want - l.max_connections) as usize);
            l.max_connections = want;
        } else {
            // Only free permits can be taken back; open connections keep theirs.
            let forgotten = l.limit.forget_permits((l.max_connections - want) as usize) as u32;
            l.max_connections -= forgotten;
            if l.max_connections != want {
                warn!(
                    service = name,
                    limit = l.max_connections,
                    "max_connections lowered only as far as open connections allow; apply again later"
                );
            }
        }
    }
}

/// Binds with SO_REUSEADDR so a restart does not wait for TIME_WAIT.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

impl Datapath for ProxyDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Proxy
    }

    fn apply(&self, effect: &Effect, snapshot: &Snapshot) -> Result<(), DatapathError> {
        let state = &snapshot.state;
        match effect {
            Effect::ServiceAdded(name) => self.start(name, state),
            Effect::ServiceRemoved { name, .. } => {
                if let Some(l) = self.listeners.lock().unwrap().remove(name) {
                    l.stop.cancel();
                    self.closing.lock().unwrap().insert(l.listen, l.closed);
                    info!(service = %name, "proxy stopped listening; open connections continue");
                }
                Ok(())
            }
            // Settings and backends are read from the balancer at each new connection.
            Effect::ServiceChanged(name) => {
                self.resize(name, state);
                Ok(())
            }
            Effect::Nothing => Ok(()),
        }
    }

    fn reset_backend(&self, service: &Service, backend: &Backend) -> usize {
        let runtime = self.balancer.snapshot().runtime(service, backend);
        let open = BackendStats::get(&runtime.stats.active_connections) as usize;
        runtime.reset_connections();
        open
    }

    fn traffic(&self, service: &Service) -> ServiceTraffic {
        let name = &service.settings.name;
        ServiceTraffic {
            affinity_entries: self.balancer.affinity_len(name) as u64,
            failed_connections: Some(
                self.service_stats(name)
                    .map_or(0, |st| st.failed.load(Ordering::Relaxed)),
            ),
            // The runtime's user-space counters, which the engine reads itself.
            backends: HashMap::new(),
            ajp: None,
        }
    }

    fn shutdown(&self) -> Drained<'_> {
        self.shutdown.cancel();
        self.tasks.close();
        Box::pin(self.tasks.wait())
    }
}

#[tracing::instrument(skip_all, fields(service = %service))]
async fn accept_loop(
    service: String,
    listener: TcpListener,
    limit: Arc<Semaphore>,
    balancer: Arc<Balancer>,
    stats: Arc<ServiceStats>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (client, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (balancer, service, stats) = (balancer.clone(), service.clone(), stats.clone());
        tasks.spawn(async move {
            handle(client, peer, &service, &balancer, &stats).await;
            drop(permit);
        });
    }
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    service: &str,
    balancer: &Balancer,
    stats: &ServiceStats,
) {
    let _ = client.set_nodelay(true);
    let mut exclude = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let connect_timeout = match balancer.snapshot().state.service(service) {
            Ok(s) => s.settings.connect_timeout,
            Err(_) => return, // service removed meanwhile
        };
        let choice = match balancer.choose(service, peer.ip(), Instant::now(), &exclude) {
            Ok(c) => c,
            Err(SelectError::NoBackend(_) | SelectError::State(_)) => break,
        };
        match tokio::time::timeout(connect_timeout, TcpStream::connect(choice.address)).await {
            Ok(Ok(backend)) => {
                balancer.confirm(service, peer.ip(), choice.backend_id, Instant::now());
                let _ = backend.set_nodelay(true);
                relay(client, backend, &choice.runtime).await;
                return;
            }
            Ok(Err(e)) => debug!(%peer, backend = %choice.address, error = %e, "connect failed; trying next"),
            Err(_) => debug!(%peer, backend = %choice.address, "connect timed out; trying next"),
        }
        choice
            .runtime
            .stats
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        exclude.push(choice.backend_id);
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, "no backend reachable; closing client");
}

/// Copies both directions until both have reached EOF; an error in either ends both.
async fn relay(client: TcpStream, backend: TcpStream, runtime: &BackendRuntime) {
    let stats = &runtime.stats;
    stats.active_connections.fetch_add(1, Ordering::Relaxed);
    stats.total_connections.fetch_add(1, Ordering::Relaxed);
    let reset = runtime.reset_token();
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = backend.into_split();
    let up = copy_counted(&mut cr, &mut bw, &stats.bytes_in);
    let down = copy_counted(&mut br, &mut cw, &stats.bytes_out);
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => {
            if let Err(e) = r {
                debug!(error = %e, "relay ended with an error");
            }
        }
        () = reset.cancelled() => {
            // Linger 0: closing sends an RST to both peers rather than a FIN.
            for s in [cw.as_ref(), bw.as_ref()] {
                let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 });
            }
            // Dropping a write half would send a FIN first; forget them so the close is the RST.
            cw.forget();
            bw.forget();
            debug!("connection reset: backend marked down");
        }
    }
    stats.active_connections.fetch_sub(1, Ordering::Relaxed);
}

async fn copy_counted<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on: the peer sees EOF but may still send.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
