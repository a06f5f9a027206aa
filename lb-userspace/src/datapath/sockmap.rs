//! `splice = "sockmap"`: the kernel relays a connection's payload socket to socket (a stream
//! verdict program on a SOCKHASH, lb-ebpf/src/sockmap.rs); user space keeps only the lifecycle.
//!
//! [`Sockmap::get`] loads the programs once per process (maps sized by
//! `lb_common::sockmap::DEFAULT_SOCK_ENTRIES`; the object's XDP maps are created at their smallest).
//! [`Sockmap::link`] puts a connected client/backend pair in: both sockets become redirect
//! targets, each gets its peer, then both get the verdict program, and a `SO_RCVLOWAT` write makes
//! the kernel look at bytes that arrived before (they are relayed first, in order). The returned
//! [`Link`] takes the pair out again when dropped.
//!
//! [`copy`] waits for one direction's end: the source's EOF (or bytes the verdict left for user
//! space, written on by hand), then until the destination has taken every byte the source received
//! (its `tcpi_bytes_acked` plus its send queue reach the source's `tcpi_bytes_received`), so
//! nothing queued in the kernel is lost, and only then passes the half-close on.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use lb_common::maps::{
    MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNTRACK, MAP_RING, MAP_SERVICE_STATS, MAP_SERVICES,
    MAP_SNAT_ADDRS, MAP_SNAT_LOCKS,
};
use lb_common::sockmap::{
    MAP_SOCK_ACTIVE, MAP_SOCK_PEERS, MAP_SOCK_TARGETS, SOCK_AF_INET, SOCK_AF_INET6, SOCK_VERDICT_PROGRAM, SockKey,
};
use nix::libc;
use tokio::io::Interest;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("splice = \"sockmap\" needs the eBPF object: {0}")]
    Object(#[from] crate::ebpf::LoadError),
    #[error("loading the sockmap programs failed (root or CAP_BPF and CAP_NET_ADMIN needed): {0}")]
    Load(String),
    #[error("sockmap: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("sockmap: socket address: {0}")]
    Address(#[from] io::Error),
}

struct Maps {
    targets: SockHash<MapData, SockKey>,
    active: SockHash<MapData, SockKey>,
    peers: BpfHashMap<MapData, SockKey, SockKey>,
}

/// The loaded programs and maps (one per process).
pub struct Sockmap {
    maps: Mutex<Maps>,
    /// Keeps the program attached.
    _ebpf: Mutex<Ebpf>,
}

static LOADED: OnceLock<Result<Sockmap, String>> = OnceLock::new();

impl Sockmap {
    /// The process's sockmap relay, loaded on first use.
    pub fn get() -> Result<&'static Sockmap, SockmapError> {
        LOADED
            .get_or_init(|| Sockmap::load().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| SockmapError::Load(e.clone()))
    }

    fn load() -> Result<Sockmap, SockmapError> {
        let object = crate::ebpf::object().ok_or(crate::ebpf::LoadError::NotEmbedded)?;
        let mut loader = EbpfLoader::new();
        // The XDP datapath's maps come with the object; nothing here uses them.
        for name in [
            MAP_SERVICES,
            MAP_SERVICE_STATS,
            MAP_BACKENDS,
            MAP_BACKEND_STATS,
            MAP_RING,
            MAP_CONNTRACK,
            MAP_AFFINITY,
            MAP_SNAT_LOCKS,
            MAP_SNAT_ADDRS,
        ] {
            loader.map_max_entries(name, 16);
        }
        let load = |e: &dyn std::fmt::Display| SockmapError::Load(e.to_string());
        let mut ebpf = loader.load(object).map_err(|e| load(&e))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| SockmapError::Load(format!("map {name} missing from the object")))
        };
        let targets = SockHash::try_from(take(&mut ebpf, MAP_SOCK_TARGETS)?)?;
        let active: SockHash<MapData, SockKey> = SockHash::try_from(take(&mut ebpf, MAP_SOCK_ACTIVE)?)?;
        let peers = BpfHashMap::try_from(take(&mut ebpf, MAP_SOCK_PEERS)?)?;
        let program: &mut SkSkb = ebpf
            .program_mut(SOCK_VERDICT_PROGRAM)
            .ok_or_else(|| SockmapError::Load(format!("program {SOCK_VERDICT_PROGRAM} missing from the object")))?
            .try_into()
            .map_err(|e| load(&e))?;
        program.load().map_err(|e| load(&e))?;
        program.attach(active.fd()).map_err(|e| load(&e))?;
        Ok(Sockmap {
            maps: Mutex::new(Maps { targets, active, peers }),
            _ebpf: Mutex::new(ebpf),
        })
    }

    /// Relays `a` ↔ `b` in the kernel until the returned [`Link`] is dropped.
    pub fn link(&'static self, a: &TcpStream, b: &TcpStream) -> Result<Link, SockmapError> {
        let (ka, kb) = (key(a)?, key(b)?);
        let link = Link { sockmap: self, keys: [ka, kb] };
        {
            let mut m = self.maps.lock().unwrap();
            m.targets.insert(ka, a.as_raw_fd(), 0)?;
            m.targets.insert(kb, b.as_raw_fd(), 0)?;
            m.peers.insert(ka, kb, 0)?;
            m.peers.insert(kb, ka, 0)?;
            m.active.insert(ka, a.as_raw_fd(), 0)?;
            m.active.insert(kb, b.as_raw_fd(), 0)?;
        }
        // Setting SO_RCVLOWAT runs the socket's data-ready hook, now the verdict: bytes that
        // arrived before the sockets joined are relayed first.
        for s in [a, b] {
            let one: libc::c_int = 1;
            // SAFETY: SO_RCVLOWAT takes an int.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error().into());
            }
        }
        Ok(link)
    }

    /// Sockets currently in the target map (tests).
    pub fn sockets(&self) -> usize {
        self.maps.lock().unwrap().targets.keys().count()
    }
}

/// A client/backend pair in the maps; dropping it takes both out.
pub struct Link {
    sockmap: &'static Sockmap,
    keys: [SockKey; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        let mut m = self.sockmap.maps.lock().unwrap();
        for k in &self.keys {
            // A closed socket has left the SOCKHASHes by itself; the peer entries have not.
            let _ = m.active.remove(k);
            let _ = m.targets.remove(k);
            let _ = m.peers.remove(k);
        }
    }
}

/// The key the verdict program computes for `s`: its addresses as it sees them.
fn key(s: &TcpStream) -> io::Result<SockKey> {
    let (local, remote) = (s.local_addr()?, s.peer_addr()?);
    let mut k = SockKey {
        local_port: u32::from(local.port()),
        remote_port: u32::from(remote.port()),
        ..SockKey::default()
    };
    let words = |o: [u8; 16]| -> [u32; 4] {
        core::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
    };
    match (local.ip(), remote.ip()) {
        (std::net::IpAddr::V4(l), std::net::IpAddr::V4(r)) => {
            k.family = SOCK_AF_INET;
            k.local[0] = u32::from_ne_bytes(l.octets());
            k.remote[0] = u32::from_ne_bytes(r.octets());
        }
        (l, r) => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V6(a) => a.octets(),
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            k.family = SOCK_AF_INET6;
            k.local = words(v6(l));
            k.remote = words(v6(r));
        }
    }
    Ok(k)
}

/// (`tcpi_state`, `tcpi_bytes_acked`, `tcpi_bytes_received`) of a TCP socket.
fn tcp_bytes(fd: RawFd) -> io::Result<(u8, u64, u64)> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` has room for `len` bytes; the kernel writes at most that.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &raw mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 136 {
        return Err(io::Error::other("TCP_INFO without tcpi_bytes_received (kernel older than 4.1)"));
    }
    let at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
    // struct tcp_info (linux/tcp.h): tcpi_bytes_acked at 120, tcpi_bytes_received at 128.
    Ok((info[0], at(120), at(128)))
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// Bytes in a socket's send queue, sent or not, not yet acknowledged (SIOCOUTQ).
fn unacked(fd: RawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// Relays `src` → `dst` (the kernel moves the payload) until `src`'s EOF has been passed on.
pub async fn copy(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        src.readable().await?;
        // Bytes the verdict left with the socket (none while linked) are written on here.
        let n = match src.try_io(Interest::READABLE, || {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        let mut sent = 0;
        while sent < n {
            match dst.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
    // EOF: wait until dst has taken everything src received (read TCP_INFO before SIOCOUTQ: the
    // sum can only fall short, never overshoot).
    // tcpi_bytes_received counts the FIN's sequence number too.
    let received = tcp_bytes(src.as_raw_fd())?.2.saturating_sub(1);
    let mut pause = Duration::from_micros(200);
    loop {
        let (state, acked, _) = tcp_bytes(dst.as_raw_fd())?;
        let queued = unacked(dst.as_raw_fd())?;
        if acked + queued >= received {
            break;
        }
        // Only ESTABLISHED and CLOSE_WAIT still send; anything else lost the bytes with the peer.
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            return Err(dst.take_error().ok().flatten().unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionReset, "peer closed before the relay drained")
            }));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    counter.fetch_add(received, Ordering::Relaxed);
    nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write).or_else(|e| {
        if e == nix::errno::Errno::ENOTCONN {
            Ok(())
        } else {
            Err(e.into())
        }
    })
}
