//! The proxy's sockmap relay (`splice = "sockmap"`), shared by its kernel programs
//! (lb-ebpf/src/sockmap.rs) and their loader (lb-userspace/src/datapath/sockmap.rs).
//!
//! Three maps, all keyed by a socket's own [`SockKey`] (its addresses as the socket sees them):
//! - [`MAP_SOCK_TARGETS`] (SOCKHASH, no program): every relayed socket, where payload is
//!   redirected to;
//! - [`MAP_SOCK_PEERS`] (HASH): a socket's key → its peer's key;
//! - [`MAP_SOCK_ACTIVE`] (SOCKHASH, with the stream verdict program): the sockets whose received
//!   payload the kernel redirects to the peer. A socket joins it only once its peer is a target,
//!   so the verdict never meets a missing peer.

/// SOCKHASH of redirect targets.
pub const MAP_SOCK_TARGETS: &str = "lb_sk_targets";
/// SOCKHASH the stream verdict program is attached to.
pub const MAP_SOCK_ACTIVE: &str = "lb_sk_active";
/// HASH: socket key → peer socket key.
pub const MAP_SOCK_PEERS: &str = "lb_sk_peers";
/// Name of the stream verdict program in the object.
pub const SOCK_VERDICT_PROGRAM: &str = "lb_sk_verdict";
/// Sockets each map holds by default (two per relayed connection).
pub const DEFAULT_SOCK_ENTRIES: u32 = 65_536;

/// AF_INET and AF_INET6, as `SockKey::family` holds them.
pub const SOCK_AF_INET: u32 = 2;
pub const SOCK_AF_INET6: u32 = 10;

/// A TCP socket by its addresses as it sees them. Addresses are in network byte order as the
/// kernel stores them (an IPv4 address in `local[0]`/`remote[0]`, the rest zero); ports in host
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: u32,
    pub local_port: u32,
    pub remote_port: u32,
    pub _pad: u32,
    pub local: [u32; 4],
    pub remote: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<SockKey>() == 48);

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, explicit padding: every bit pattern is a valid value.
unsafe impl aya::Pod for SockKey {}
