//! Connections to one backend: at most `pool_size` open, idle ones reused last-in first-out.
//!
//! A connection goes back to the pool only after an End Response that allows reuse. Before reuse
//! it is checked without I/O (a closed or chatty socket is dropped), and after `ping_after_idle`
//! it must answer a CPing first (mod_jk's `ping_mode`). Idle connections older than
//! `pool_idle_timeout`, or of a backend that is down or in maintenance, are closed by the reaper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use super::counters::BackendCounters;
use crate::ajp::{CPING, CPONG};
use crate::datapath::limit::{Limit, Slot};
use crate::runtime::BackendRuntime;

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("{0} did not answer the CPing")]
    NoPong(SocketAddr),
    #[error("all {0} connections to the backend are busy")]
    Full(u32),
}

/// An open connection to the backend, with its read buffer.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Taken from the pool rather than opened for this request.
    pub reused: bool,
    last_used: Instant,
    pool: Arc<Pool>,
    _slot: Slot,
}

impl Conn {
    /// The backend's shared connection and byte counters.
    pub fn stats(&self) -> Arc<BackendRuntime> {
        self.pool.runtime.clone()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Relaxed);
        self.pool.runtime.stats.active_connections.fetch_sub(1, Relaxed);
    }
}

/// The pool of one backend.
pub struct Pool {
    pub address: SocketAddr,
    pub counters: BackendCounters,
    /// The backend's connection and byte counters shared with the other datapaths' views.
    pub runtime: Arc<BackendRuntime>,
    idle: Mutex<Vec<Conn>>,
    slots: Arc<Limit>,
    open: AtomicU64,
    /// False while the backend is down or in maintenance, and after shutdown: returned
    /// connections are closed instead of kept.
    usable: AtomicBool,
    /// Wakes every request waiting on a full pool when a connection comes back to `idle` (each
    /// looks again; one that skips idle connections must not take the wakeup from the others).
    released: Notify,
}

impl Pool {
    pub fn new(address: SocketAddr, size: u32, runtime: Arc<BackendRuntime>) -> Arc<Pool> {
        Arc::new(Pool {
            address,
            counters: BackendCounters::default(),
            runtime,
            idle: Mutex::new(Vec::new()),
            slots: Limit::new(size),
            open: AtomicU64::new(0),
            usable: AtomicBool::new(true),
            released: Notify::new(),
        })
    }

    /// (idle, open) connections.
    pub fn sizes(&self) -> (u64, u64) {
        (self.idle.lock().unwrap().len() as u64, self.open.load(Relaxed))
    }

    /// Follows a changed `pool_size`: shrinking closes idle connections above it at once, and
    /// connections in use as they come back.
    pub fn resize(&self, want: u32) {
        self.slots.resize(want);
        let mut idle = self.idle.lock().unwrap();
        let over = (self.slots.debt() as usize).min(idle.len());
        // The oldest first (idle is last-in first-out).
        let closed: Vec<Conn> = idle.drain(..over).collect();
        drop(idle);
        drop(closed);
    }

    /// Marks the backend usable or not; closes the idle connections when not.
    pub fn set_usable(&self, usable: bool) {
        self.usable.store(usable, Relaxed);
        if !usable {
            self.close_idle();
        }
    }

    pub fn close_idle(&self) -> usize {
        let drained: Vec<Conn> = std::mem::take(&mut *self.idle.lock().unwrap());
        drained.len()
    }

    /// Closes idle connections older than `timeout` or closed by the backend.
    pub fn reap(&self, timeout: Duration) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|c| now.duration_since(c.last_used) < timeout && alive(&c.stream));
    }

    /// A connection for one request: a pooled one if a good one is idle, else a new one, waiting
    /// at most `timeout` for the connect, and at most `patience` (at least `timeout`) in all for
    /// a free slot, the connect and the CPong (a busy backend is slow to read a CPing). `fresh`
    /// skips the idle ones.
    pub async fn acquire(
        self: &Arc<Self>,
        timeout: Duration,
        patience: Duration,
        ping_after_idle: Duration,
        fresh: bool,
    ) -> Result<Conn, PoolError> {
        let patience = patience.max(timeout);
        let deadline = tokio::time::Instant::now() + patience;
        // A pooled connection that comes back, or a free slot, whichever comes first.
        let slot = loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !fresh {
                while let Some(mut c) = self.pop_idle() {
                    if !alive(&c.stream) {
                        continue;
                    }
                    if c.last_used.elapsed() > ping_after_idle {
                        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
                        match cping(&mut c.stream, wait.max(timeout)).await {
                            Ping::Pong => {}
                            Ping::Closed => {
                                debug!(backend = %self.address, "pooled connection closed; trying another");
                                continue;
                            }
                            // A backend that takes no CPing takes no request either.
                            Ping::Silent => return Err(PoolError::NoPong(self.address)),
                        }
                    }
                    c.reused = true;
                    return Ok(c);
                }
            }
            tokio::select! {
                slot = self.slots.acquire() => break slot,
                () = &mut released => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(PoolError::Full(self.slots.size()));
                }
            }
        };
        let connect_by = deadline.min(tokio::time::Instant::now() + timeout);
        let mut stream = match tokio::time::timeout_at(connect_by, TcpStream::connect(self.address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // lb's own shortage (out of descriptors, say) is not the backend's failure.
                if !crate::health::lb_short_of_resources(&e) {
                    self.runtime.stats.connect_failures.fetch_add(1, Relaxed);
                }
                return Err(PoolError::Connect(self.address, e));
            }
            Err(_) => {
                self.runtime.stats.connect_failures.fetch_add(1, Relaxed);
                return Err(PoolError::Timeout(self.address));
            }
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = super::keepalive::enable(&stream) {
            debug!(backend = %self.address, error = %e, "TCP keepalive not set on a backend connection");
        }
        // A new connection answers a CPing before its first request (mod_jk's ping_mode C), so a
        // backend that accepts connections but serves nothing is left for the next one.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if cping(&mut stream, left).await != Ping::Pong {
            self.runtime.stats.connect_failures.fetch_add(1, Relaxed);
            return Err(PoolError::NoPong(self.address));
        }
        self.open.fetch_add(1, Relaxed);
        self.runtime.stats.active_connections.fetch_add(1, Relaxed);
        self.runtime.stats.total_connections.fetch_add(1, Relaxed);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(8192),
            reused: false,
            last_used: Instant::now(),
            pool: self.clone(),
            _slot: slot,
        })
    }

    fn pop_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap().pop()
    }

    /// Returns a connection after an End Response that allows reuse.
    pub fn release(&self, mut conn: Conn) {
        // Closed when the backend is not to be used, the connection sent something unasked, or
        // the pool is above a lowered `pool_size`.
        if !self.usable.load(Relaxed) || !conn.buf.is_empty() || self.slots.debt() > 0 {
            return;
        }
        conn.last_used = Instant::now();
        self.idle.lock().unwrap().push(conn);
        self.released.notify_waiters();
    }
}

/// Whether an idle connection is still open and has sent nothing (checked without waiting).
fn alive(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// How a CPing went.
#[derive(Debug, PartialEq, Eq)]
enum Ping {
    Pong,
    /// The connection failed, closed or answered something else.
    Closed,
    /// No answer within the timeout.
    Silent,
}

/// Sends a CPing and waits up to `timeout` for the CPong.
async fn cping(stream: &mut TcpStream, timeout: Duration) -> Ping {
    let exchange = async {
        stream.write_all(&CPING).await?;
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply == CPONG)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(true)) => Ping::Pong,
        Ok(_) => Ping::Closed,
        Err(_) => Ping::Silent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on loopback that answers every CPing with a CPong and keeps its connections open.
    async fn ponging_backend() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut ping = [0; 5];
                    while c.read_exact(&mut ping).await.is_ok() && ping == CPING {
                        if c.write_all(&CPONG).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    /// `pool_size` lowered by a reload while every connection is busy: the pool holds the new
    /// size once they come back (returned connections above it are closed, not pooled), and
    /// gives out no more than it afterwards.
    #[tokio::test]
    async fn a_pool_size_lowered_under_load_holds_once_connections_come_back() {
        let pool = Pool::new(ponging_backend().await, 4, Arc::default());
        let t = Duration::from_secs(2);
        let quick = Duration::from_millis(100);
        let mut busy = Vec::new();
        for _ in 0..4 {
            busy.push(pool.acquire(t, t, t, false).await.unwrap());
        }
        pool.resize(1);
        for c in busy.drain(..) {
            pool.release(c);
        }
        assert_eq!(pool.sizes(), (1, 1), "one pooled, three closed");
        let one = pool.acquire(t, t, t, false).await.unwrap();
        assert!(one.reused);
        assert!(
            matches!(
                pool.acquire(quick, quick, t, false).await,
                Err(PoolError::Full(1))
            ),
            "a second connection waits for a slot"
        );
        drop(one);
        // Raised again: at once.
        pool.resize(3);
        for _ in 0..3 {
            busy.push(pool.acquire(t, t, t, false).await.unwrap());
        }
        assert!(matches!(
            pool.acquire(quick, quick, t, false).await,
            Err(PoolError::Full(3))
        ));
    }

    /// Lowered with idle connections above the new size: those close at once.
    #[tokio::test]
    async fn a_lowered_pool_size_closes_idle_connections_above_it() {
        let pool = Pool::new(ponging_backend().await, 3, Arc::default());
        let t = Duration::from_secs(2);
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.acquire(t, t, t, false).await.unwrap());
        }
        for c in conns {
            pool.release(c);
        }
        assert_eq!(pool.sizes(), (3, 3));
        pool.resize(1);
        assert_eq!(pool.sizes(), (1, 1));
    }
}
