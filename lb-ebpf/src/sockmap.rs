//! The proxy's sockmap relay (`splice = "sockmap"`): a stream verdict program that redirects the
//! payload a relayed socket receives to its peer's send path, in the kernel. Maps and their roles
//! are described in `lb_common::sockmap`; user space keeps the connection's lifecycle (half-close,
//! close, reset).

use aya_ebpf::{
    bindings::sk_action,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use lb_common::sockmap::{DEFAULT_SOCK_ENTRIES, SOCK_AF_INET, SockKey};

#[map(name = "lb_sk_targets")]
static TARGETS: SockHash<SockKey> = SockHash::with_max_entries(DEFAULT_SOCK_ENTRIES, 0);
#[map(name = "lb_sk_active")]
static ACTIVE: SockHash<SockKey> = SockHash::with_max_entries(DEFAULT_SOCK_ENTRIES, 0);
#[map(name = "lb_sk_peers")]
static PEERS: HashMap<SockKey, SockKey> = HashMap::with_max_entries(DEFAULT_SOCK_ENTRIES, 0);

const _: () = {
    use lb_common::sockmap::{MAP_SOCK_ACTIVE, MAP_SOCK_PEERS, MAP_SOCK_TARGETS};
    assert!(crate::str_eq(MAP_SOCK_TARGETS, "lb_sk_targets"));
    assert!(crate::str_eq(MAP_SOCK_ACTIVE, "lb_sk_active"));
    assert!(crate::str_eq(MAP_SOCK_PEERS, "lb_sk_peers"));
};

/// The receiving socket's key, as user space computes it from getsockname/getpeername.
#[inline(always)]
fn own_key(ctx: &SkBuffContext) -> SockKey {
    let family = ctx.skb.family();
    let mut key = SockKey {
        family,
        local_port: ctx.skb.local_port(),
        remote_port: remote_port(ctx.skb.remote_port()),
        ..SockKey::default()
    };
    if family == SOCK_AF_INET {
        key.local[0] = ctx.skb.local_ipv4();
        key.remote[0] = ctx.skb.remote_ipv4();
    } else {
        // One load per word at a constant offset from the context (the verifier refuses a
        // pointer into it that was moved first, as a whole-array copy compiles to).
        let skb = ctx.skb.skb;
        // SAFETY: `skb` is the program's context; each field is read at its fixed offset.
        unsafe {
            key.local[0] = core::ptr::read_volatile(&raw const (*skb).local_ip6[0]);
            key.local[1] = core::ptr::read_volatile(&raw const (*skb).local_ip6[1]);
            key.local[2] = core::ptr::read_volatile(&raw const (*skb).local_ip6[2]);
            key.local[3] = core::ptr::read_volatile(&raw const (*skb).local_ip6[3]);
            key.remote[0] = core::ptr::read_volatile(&raw const (*skb).remote_ip6[0]);
            key.remote[1] = core::ptr::read_volatile(&raw const (*skb).remote_ip6[1]);
            key.remote[2] = core::ptr::read_volatile(&raw const (*skb).remote_ip6[2]);
            key.remote[3] = core::ptr::read_volatile(&raw const (*skb).remote_ip6[3]);
        }
    }
    key
}

/// `__sk_buff.remote_port` holds the port in network byte order, in the upper 16 bits on
/// little-endian machines (the kernel shifts it there) and in the lower ones otherwise.
#[inline(always)]
fn remote_port(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u32::from(u16::from_be(be as u16))
}

/// Payload of a socket with a peer goes to the peer; anything else stays with the socket (user
/// space reads it).
#[stream_verdict]
fn lb_sk_verdict(ctx: SkBuffContext) -> u32 {
    let key = own_key(&ctx);
    // SAFETY: the value is copied out at once; a concurrent delete cannot free it under us.
    let Some(peer) = (unsafe { PEERS.get(&key) }) else {
        return sk_action::SK_PASS;
    };
    let mut peer = *peer;
    TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32
}
