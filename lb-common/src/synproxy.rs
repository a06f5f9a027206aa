//! SYN cookies for the XDP SYN proxy (`[xdp] syn_cookies`): the cookie a SYN is answered with, its
//! check on the client's ACK, and the checksums of the headers the proxy writes (the SYN-ACK toward
//! the client, the SYN and the ACK toward the backend). Pure and `const`-friendly, so the kernel and
//! the tests compute them the same way; values ending in `_be` are network order as in packet memory.
//!
//! A cookie is the initial sequence number of the SYN-ACK lb answers with while cookies are on:
//! bits 0-1 the index of the client's MSS in [`MSS_TABLE`], bit 2 the parity of the time slot
//! ([`COOKIE_SLOT_SHIFT`]) and bits 3-31 a keyed hash (HalfSipHash-2-4 with the secret user space
//! fills with random bytes at start) of the 4-tuple, the client's initial sequence number, the slot
//! and the MSS index. A cookie is valid in its slot and the next one (64-128 s).

/// `ARRAY<u32, SynCookieConfig>` with one entry: whether SYNs are answered with cookies, and the
/// secret. Not pinned: a restart draws a new secret (cookies in flight then fail: their clients
/// get an RST and reconnect).
pub const MAP_SYNCOOKIE: &str = "lb_syncookie";
/// `PROG_ARRAY<u32, u32>`: the programs `lb_xdp` tail-calls; [`PROG_SYNPROXY`] is the SYN proxy.
/// Not pinned (user space fills it at every start).
pub const MAP_PROGS: &str = "lb_progs";
/// Index of `lb_synproxy` in [`MAP_PROGS`].
pub const PROG_SYNPROXY: u32 = 0;
/// Name of the SYN-proxy program in the object.
pub const SYNPROXY_PROGRAM: &str = "lb_synproxy";
/// Name of the datapath's TC ingress entry point (`[xdp] mode = "tc"`): the same logic and maps as
/// `lb_xdp`, as a SCHED_CLS program.
pub const TC_PROGRAM: &str = "lb_tc";
/// `PROG_ARRAY<u32, u32>`: [`MAP_PROGS`] for `lb_tc` (a tail call stays within its program
/// type), holding [`TC_SYNPROXY_PROGRAM`] at [`PROG_SYNPROXY`]. Not pinned, like [`MAP_PROGS`].
pub const MAP_TC_PROGS: &str = "lb_tc_progs";
/// Name of the SYN-proxy program for the TC hook.
pub const TC_SYNPROXY_PROGRAM: &str = "lb_synproxy_tc";

/// Flow flag (both entries): a connection set up by the SYN proxy. While [`crate::maps::FLOW_HALF_OPEN`]
/// the backend has not answered the SYN made from the client's ACK; the client → backend entry keeps
/// the initial sequence number toward the backend in `syn_seq_be` (network order) and the client's
/// window in `ts_delta`, the reply entry the cookie in `syn_seq_be` (network order) and the client
/// delta in `ts_delta`. Once the backend's SYN-ACK came, both entries hold (host order) the backend
/// delta (the backend's initial sequence number minus the cookie) in `ts_delta` and the client
/// delta (the initial sequence number toward the backend minus the client's) in `syn_seq_be`:
/// added toward the backend (client delta to the sequence number, backend delta to the
/// acknowledgment), subtracted toward the client. Never with `FLOW_TS`: cookies carry no
/// timestamps. Byte 0 (bit 7).
pub const FLOW_COOKIE: u32 = 1 << 7;

/// The client MSS values a cookie can carry (2 bits); a SYN's MSS is rounded down to one of them.
pub const MSS_TABLE: [u16; 4] = [536, 1220, 1440, 1460];
/// A time slot is 2^36 ns (68.7 s) of the kernel's monotonic clock.
pub const COOKIE_SLOT_SHIFT: u32 = 36;
/// The receive window of the cookie SYN-ACK (no window scaling while cookies are on).
pub const SYN_ACK_WINDOW: u16 = 65_535;
/// TCP option kind and length of MSS.
pub const TCPOPT_MSS: u8 = 2;
pub const TCPOLEN_MSS: u8 = 4;

/// Mode word of [`SynCookieConfig::enabled`]: SYNs to NAT services are answered with cookies.
pub const COOKIES_ON: u32 = 1;

/// The kernel's cookie settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynCookieConfig {
    /// [`COOKIES_ON`] or 0. Cookie ACKs are checked whatever this says (cookies sent just before
    /// it was switched off still complete).
    pub enabled: u32,
    pub _pad: u32,
    /// The hash key (random at every start).
    pub secret: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SynCookieConfig>() == 24);

#[cfg(feature = "user")]
// SAFETY: plain old data, repr(C), explicit padding.
unsafe impl aya::Pod for SynCookieConfig {}

/// One SipRound of HalfSipHash.
#[inline(always)]
const fn round(v: &mut [u32; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(5);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(16);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(8);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(7);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(16);
}

#[inline(always)]
const fn absorb(v: &mut [u32; 4], m: u32) {
    v[3] ^= m;
    round(v);
    round(v);
    v[0] ^= m;
}

/// HalfSipHash-2-4 of four words under a 64-bit key (two of the secret's words; the other two
/// are folded into the initial state): loop-free, so the verifier walks it once.
#[inline(always)]
const fn keyed_hash(secret: &[u32; 4], m: [u32; 4]) -> u32 {
    let mut v = [
        secret[0],
        secret[1] ^ secret[2],
        0x6c79_6765 ^ secret[0],
        0x7465_6462 ^ secret[1] ^ secret[3],
    ];
    absorb(&mut v, m[0]);
    absorb(&mut v, m[1]);
    absorb(&mut v, m[2]);
    absorb(&mut v, m[3]);
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[1] ^ v[3]
}

/// The connection a cookie is bound to, as the client's SYN carries it (network order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieTuple {
    pub client_be: u32,
    pub vip_be: u32,
    pub client_port_be: u16,
    pub vip_port_be: u16,
    /// The client's initial sequence number (host order).
    pub client_isn: u32,
}

#[inline(always)]
const fn cookie_hash(secret: &[u32; 4], t: &CookieTuple, slot: u32, mss_index: u32) -> u32 {
    let ports = ((t.client_port_be as u32) << 16) | t.vip_port_be as u32;
    keyed_hash(
        secret,
        [
            t.client_be ^ slot.rotate_left(16),
            t.vip_be,
            ports ^ mss_index,
            t.client_isn,
        ],
    )
}

/// The time slot of `now_ns` (the kernel's monotonic clock).
#[inline(always)]
pub const fn slot(now_ns: u64) -> u32 {
    (now_ns >> COOKIE_SLOT_SHIFT) as u32
}

/// The index in [`MSS_TABLE`] of the largest value not above `mss` (0 for anything below 1220,
/// including SYNs without an MSS option, which RFC 9293 says mean 536).
#[inline(always)]
pub const fn mss_index(mss: u16) -> u32 {
    if mss >= MSS_TABLE[3] {
        3
    } else if mss >= MSS_TABLE[2] {
        2
    } else if mss >= MSS_TABLE[1] {
        1
    } else {
        0
    }
}

/// The cookie answering a SYN of `t` at `now_ns` whose MSS option said `mss` (536 without one).
#[inline(always)]
pub const fn make(secret: &[u32; 4], t: &CookieTuple, now_ns: u64, mss: u16) -> u32 {
    let s = slot(now_ns);
    let index = mss_index(mss);
    (cookie_hash(secret, t, s, index) & !7) | ((s & 1) << 2) | index
}

/// The client MSS carried by `cookie` if it is valid for `t` at `now_ns` (made in this slot or
/// the previous one), else `None`.
#[inline(always)]
pub const fn check(secret: &[u32; 4], t: &CookieTuple, now_ns: u64, cookie: u32) -> Option<u16> {
    let now_slot = slot(now_ns);
    // The slot with the cookie's parity: now or the one before.
    let s = if (cookie >> 2) & 1 == now_slot & 1 {
        now_slot
    } else {
        now_slot.wrapping_sub(1)
    };
    let index = cookie & 3;
    if cookie_hash(secret, t, s, index) & !7 == cookie & !7 {
        Some(MSS_TABLE[index as usize])
    } else {
        None
    }
}

/// The 16-bit words of a 32-bit value as it sits in memory.
#[inline(always)]
const fn halves(v: u32) -> u32 {
    (v >> 16) + (v & 0xffff)
}

#[inline(always)]
const fn finish(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Version 4, IHL 5; DF; TTL of the headers the proxy writes.
pub const VERSION_IHL: u8 = 0x45;
pub const FRAG_DF: u16 = 0x4000;
pub const TTL: u8 = 64;

/// Header checksum of an options-free IPv4 header with id 0, DF, [`TTL`], TCP, `tot_len` bytes.
#[inline(always)]
pub const fn ipv4_check(saddr_be: u32, daddr_be: u32, tot_len: u16) -> u16 {
    let s = u16::from_ne_bytes([VERSION_IHL, 0]) as u32
        + tot_len.to_be() as u32
        + FRAG_DF.to_be() as u32
        + u16::from_ne_bytes([TTL, 6]) as u32
        + halves(saddr_be)
        + halves(daddr_be);
    finish(s)
}

/// A TCP header the proxy writes: no payload, urgent pointer 0, and an MSS option when `mss` is
/// not 0 (then data offset 6, else 5). Host order except the addresses and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub mss: u16,
}

impl Segment {
    /// TCP header length in bytes.
    #[inline(always)]
    pub const fn tcp_len(&self) -> u16 {
        if self.mss != 0 { 24 } else { 20 }
    }

    /// Data offset and flags, host order.
    #[inline(always)]
    pub const fn doff_flags(&self) -> u16 {
        ((self.tcp_len() / 4) << 12) | self.flags as u16
    }

    /// The MSS option's first word (kind, length) as it sits in memory.
    #[inline(always)]
    pub const fn mss_kind_len() -> u16 {
        u16::from_ne_bytes([TCPOPT_MSS, TCPOLEN_MSS])
    }

    /// The TCP checksum with its pseudo header.
    #[inline(always)]
    pub const fn tcp_check(&self) -> u16 {
        let pseudo = halves(self.saddr_be)
            + halves(self.daddr_be)
            + u16::from_ne_bytes([0, 6]) as u32
            + self.tcp_len().to_be() as u32;
        let mut header = self.sport_be as u32
            + self.dport_be as u32
            + halves(self.seq.to_be())
            + halves(self.ack.to_be())
            + self.doff_flags().to_be() as u32
            + self.window.to_be() as u32;
        if self.mss != 0 {
            header += Self::mss_kind_len() as u32 + self.mss.to_be() as u32;
        }
        finish(pseudo + header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::checksum;

    const SECRET: [u32; 4] = [0x0123_4567, 0x89ab_cdef, 0xdead_beef, 0x0bad_f00d];

    fn tuple(isn: u32) -> CookieTuple {
        CookieTuple {
            client_be: u32::from_ne_bytes([10, 0, 0, 10]),
            vip_be: u32::from_ne_bytes([10, 0, 0, 100]),
            client_port_be: 40_000u16.to_be(),
            vip_port_be: 80u16.to_be(),
            client_isn: isn,
        }
    }

    #[test]
    fn a_cookie_checks_in_its_slot_and_the_next_only() {
        let now = 1000u64 << COOKIE_SLOT_SHIFT;
        for mss in [0u16, 536, 1300, 1440, 1460, 9000] {
            let c = make(&SECRET, &tuple(7), now, mss);
            let want = MSS_TABLE[mss_index(mss) as usize];
            assert_eq!(check(&SECRET, &tuple(7), now, c), Some(want));
            assert_eq!(
                check(&SECRET, &tuple(7), now + (1 << COOKIE_SLOT_SHIFT), c),
                Some(want)
            );
            assert_eq!(check(&SECRET, &tuple(7), now + (2 << COOKIE_SLOT_SHIFT), c), None);
            assert_eq!(check(&SECRET, &tuple(8), now, c), None, "another ISN");
            let mut other = tuple(7);
            other.client_port_be = 40_001u16.to_be();
            assert_eq!(check(&SECRET, &other, now, c), None, "another port");
            let key = [1, 2, 3, 4];
            assert_eq!(check(&key, &tuple(7), now, c), None, "another secret");
        }
    }

    #[test]
    fn forged_cookies_almost_never_check() {
        let now = 5u64 << COOKIE_SLOT_SHIFT;
        let mut x = 0x9e37_79b9u32;
        let mut hits = 0;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if check(&SECRET, &tuple(1), now, x).is_some() {
                hits += 1;
            }
        }
        // 2^-29 per guess: 200k guesses hit with probability ~0.04%.
        assert!(hits <= 1, "{hits} random cookies checked");
    }

    #[test]
    fn checksums_verify_over_the_written_headers() {
        let (src, dst) = ([10u8, 0, 0, 100], [10u8, 0, 0, 11]);
        for mss in [0u16, 1460] {
            let s = Segment {
                saddr_be: u32::from_ne_bytes(src),
                daddr_be: u32::from_ne_bytes(dst),
                sport_be: 80u16.to_be(),
                dport_be: 40_000u16.to_be(),
                seq: 0xfeed_f00d,
                ack: 12_345,
                flags: 0x12,
                window: SYN_ACK_WINDOW,
                mss,
            };
            let tcp_len = s.tcp_len() as usize;
            let mut ip = [0u8; 20];
            ip[0] = VERSION_IHL;
            ip[2..4].copy_from_slice(&(20 + tcp_len as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&FRAG_DF.to_be_bytes());
            ip[8] = TTL;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            let c = ipv4_check(s.saddr_be, s.daddr_be, 20 + tcp_len as u16);
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            assert_eq!(checksum(&ip, 0), 0);
            let mut tcp = [0u8; 24];
            tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&40_000u16.to_be_bytes());
            tcp[4..8].copy_from_slice(&s.seq.to_be_bytes());
            tcp[8..12].copy_from_slice(&s.ack.to_be_bytes());
            tcp[12..14].copy_from_slice(&s.doff_flags().to_be_bytes());
            tcp[14..16].copy_from_slice(&s.window.to_be_bytes());
            tcp[20..22].copy_from_slice(&[TCPOPT_MSS, TCPOLEN_MSS]);
            tcp[22..24].copy_from_slice(&mss.to_be_bytes());
            tcp[16..18].copy_from_slice(&s.tcp_check().to_ne_bytes());
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&src);
            pseudo[4..8].copy_from_slice(&dst);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            let initial: u32 = pseudo
                .chunks(2)
                .map(|c| u32::from(u16::from_ne_bytes([c[0], c[1]])))
                .sum();
            assert_eq!(checksum(&tcp[..tcp_len], initial), 0, "mss {mss}");
        }
    }
}
