//! Kernel passive health ([`lb_common::passive`]): per-backend handshake counters polled by user
//! space, and steering new connections away from a backend that has just refused one.
//!
//! - [`syn_sent`]: a new connection's SYN went to a backend.
//! - [`answer`]: the backend's first answer to it (the reply entry still half-open and not yet
//!   [`FLOW_ANSWERED`]): a SYN-ACK is counted as answered; an RST as refused, and the backend is
//!   marked refusing ([`MAP_REFUSING`](lb_common::passive::MAP_REFUSING)) at once.
//! - [`stale_answer`]: the backend's first answer is a bare ACK of an old connection on the SNAT
//!   4-tuple, judged by [`lb_common::passive::stale_answer`]: TIME_WAIT with no listener (the
//!   backend silent since the SYN left) is made an RST acknowledging the SYN, so the client learns
//!   at once, and from the second in a row the backend is marked refusing; a connection a live
//!   backend still holds is forwarded as it is and counted as a collision.
//! - [`given_up`]: a client's retransmitted SYN whose backend went down or refuses meanwhile
//!   starts a new flow (chosen again) instead of following the old one.
//! - [`elsewhere`]: a SYN whose choice is refusing takes the first backend that is not among the
//!   next [`RING_PROBES`] ring slots from the client's own, else a backup of the service's
//!   fallback list; with none, the choice stands (its RST tells the client at once).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    csum::Delta,
    hash::{client_hash, ring_slot},
    maps::{
        BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, FlowValue,
        GlobalConfig, NO_BACKEND, global_counter as gc,
    },
    passive::{
        FALLBACK_SLOTS, FLOW_ANSWERED, FLOW_HELD, Fallback, Liveness, PassiveCounters, RING_PROBES, Stale,
        refusing,
    },
};

use crate::net::TcpHdr;
use crate::{BACKENDS, RING, TCP_RST};

#[map(name = "lb_be_passive")]
static PASSIVE: PerCpuArray<PassiveCounters> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map(name = "lb_refusing")]
static REFUSING: Array<u64> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map(name = "lb_fallback")]
static FALLBACK: Array<Fallback> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map(name = "lb_be_alive")]
static ALIVE: Array<Liveness> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

const _: () = {
    use lb_common::passive::{MAP_ALIVE, MAP_FALLBACK, MAP_PASSIVE, MAP_REFUSING};
    assert!(crate::str_eq(MAP_ALIVE, "lb_be_alive"));
    assert!(crate::str_eq(MAP_PASSIVE, "lb_be_passive"));
    assert!(crate::str_eq(MAP_REFUSING, "lb_refusing"));
    assert!(crate::str_eq(MAP_FALLBACK, "lb_fallback"));
};

/// This CPU's counters of backend `index`.
#[inline(always)]
fn cell(index: u32) -> Option<&'static mut PassiveCounters> {
    // SAFETY: per-CPU slot, written only by this CPU during this run.
    PASSIVE.get_ptr_mut(index).map(|p| unsafe { &mut *p })
}

/// A new connection's SYN was forwarded to backend `index`.
#[inline(always)]
pub(crate) fn syn_sent(index: u32) {
    if let Some(c) = cell(index) {
        c.syns += 1;
    }
}

/// The backend's first answer to the SYN of the flow whose reply entry is `f`: `rst` (refused,
/// and the backend marked refusing at `now`) or a SYN-ACK (`syn_ack`). Anything else waits.
#[inline(always)]
pub(crate) fn answer(f: &mut FlowValue, rst: bool, syn_ack: bool, now: u64) {
    if !rst && !syn_ack {
        return;
    }
    // A SYN-ACK shows the backend holds nothing else on the 4-tuple any more.
    set_low_flag(f, FLOW_ANSWERED, if syn_ack { FLOW_HELD } else { 0 });
    let index = f.backend;
    if let Some(c) = cell(index) {
        if rst {
            c.refused += 1;
        } else {
            c.answered += 1;
        }
    }
    if syn_ack && let Some(alive) = ALIVE.get_ptr_mut(index) {
        // SAFETY: valid map value pointer; a plain 8-byte store (any CPU may write the latest).
        unsafe { (*alive).synack_ns = precise_now() };
    }
    if rst && let Some(mark) = REFUSING.get_ptr_mut(index) {
        // SAFETY: valid map value pointer; a plain 8-byte store (any CPU may write the latest).
        unsafe { *mark = now };
    }
}

/// Precise monotonic ns: when a SYN leaves and a SYN-ACK comes are compared at the scale of a
/// round trip (the coarse clock's ticks are milliseconds).
#[inline(always)]
pub(crate) fn precise_now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The backend's first answer to the SYN of the flow whose reply entry is `f` (forwarded at
/// `sent_ns`, precise) is the bare ACK at `tcp`: what it is, by
/// [`lb_common::passive::stale_answer`], counted ([`Stale::Refused`] is counted by the caller, with
/// [`answer`], as a refusal). [`Stale::First`] and [`Stale::Refused`] answers are rewritten into
/// an RST acknowledging the client's SYN (`f.syn_seq_be`); the caller clears its timestamp echo
/// (the old connection's, for which the client would drop the RST). An ACK that does acknowledge
/// the SYN is no stale answer (a collision, left alone). The checksum changes go to `rest`.
#[inline(always)]
pub(crate) fn stale_answer(tcp: *mut TcpHdr, f: &mut FlowValue, sent_ns: u64, rest: &mut Delta) -> Stale {
    let want = u32::from_be(f.syn_seq_be).wrapping_add(1).to_be();
    // SAFETY: ptr_at checked the TCP header in this run and nothing moved the packet.
    let old_ack = unsafe { (*tcp).ack_seq_be };
    if f.syn_seq_be == 0 || old_ack == want {
        return Stale::Collision;
    }
    let Some(live) = ALIVE.get_ptr_mut(f.backend) else {
        return Stale::Collision;
    };
    let now = precise_now();
    // SAFETY: valid map value pointer; its 8-byte fields are read and stored plainly.
    let stale = lb_common::passive::stale_answer(f.flags, sent_ns, unsafe { &*live }, now);
    match stale {
        Stale::Collision => {
            if let Some(c) = cell(f.backend) {
                c.collided += 1;
            }
            crate::count(gc::STALE_COLLISION, 0);
            return Stale::Collision;
        }
        Stale::First => {
            if let Some(c) = cell(f.backend) {
                c.stale += 1;
            }
        }
        Stale::Refused => {}
    }
    crate::count(gc::STALE_ANSWER, 0);
    // The backend keeps its connection on the 4-tuple: the port's next flow inherits this.
    set_low_flag(f, FLOW_HELD, 0);
    // SAFETY: as above.
    unsafe {
        (*live).stale_ns = now;
        let old_flags = (*tcp).doff_flags_be;
        let new_flags = (u16::from_be(old_flags) | TCP_RST).to_be();
        (*tcp).ack_seq_be = want;
        (*tcp).doff_flags_be = new_flags;
        *rest = rest.word4(old_ack, want).word2(old_flags, new_flags);
    }
    stale
}

/// Sets `set` and clears `clear` (bits of byte 0) in a reply entry's flags, byte 0 stored whole: its other bits are set at creation
/// (the client's ACK, which clears FLOW_HALF_OPEN, can only follow the backend's answer to its SYN)
/// and the FIN/RST bits other CPUs may set live in other bytes.
#[inline(always)]
fn set_low_flag(f: &mut FlowValue, set: u32, clear: u32) {
    // SAFETY: byte 0 of the u32 (little-endian target).
    unsafe {
        let p = core::ptr::from_mut::<u32>(&mut f.flags).cast::<u8>();
        core::ptr::write_volatile(p, (core::ptr::read_volatile(p) & !(clear as u8)) | set as u8);
    }
}

/// Marks the reply entry `f` [`FLOW_HELD`]: the backend may still hold its 4-tuple after the flow
/// has closed, and the port's next flow inherits the mark (see `take_port`).
#[inline(always)]
pub(crate) fn hold(f: &mut FlowValue) {
    set_low_flag(f, FLOW_HELD, 0);
}

/// Whether backend `index` refused a SYN within the window (or user space keeps it marked).
#[inline(always)]
pub(crate) fn is_refusing(index: u32, now: u64) -> bool {
    REFUSING.get(index).is_some_and(|t| refusing(*t, now))
}

/// Whether a SYN retransmitted toward backend `index` should choose again: the backend no longer
/// takes clients with affinity (down, disabled, gone) or is refusing.
#[inline(always)]
pub(crate) fn given_up(index: u32, now: u64) -> bool {
    let want = BACKEND_PRESENT | BACKEND_ADMITS_KNOWN;
    !BACKENDS.get(index).is_some_and(|b| b.flags & want == want) || is_refusing(index, now)
}

/// A backend for a SYN of `client` (host order) to service `slot` whose choice `avoid` is
/// refusing: the first ring slot of the next [`RING_PROBES`] from the client's own whose backend is
/// not refusing, else the first backup of the fallback list (from a place the client's hash picks)
/// that is not. `None`: nobody better, the choice stands. Counts the avoidance on `avoid`.
#[inline(always)]
pub(crate) fn elsewhere(slot: u32, client: u32, cfg: &GlobalConfig, avoid: u32, now: u64) -> Option<u32> {
    let size = cfg.ring_size;
    if size == 0 {
        return None;
    }
    let first = ring_slot(cfg.seed, client, size);
    let base = slot.wrapping_mul(size);
    let mut found = NO_BACKEND;
    for step in 0..RING_PROBES {
        if found != NO_BACKEND {
            continue;
        }
        let at = (first + step) % size;
        let b = RING.get(base.wrapping_add(at)).copied().unwrap_or(NO_BACKEND);
        if b != NO_BACKEND && b != avoid && !is_refusing(b, now) {
            found = b;
        }
    }
    if found == NO_BACKEND
        && let Some(list) = FALLBACK.get(slot)
    {
        let start = client_hash(cfg.seed, client) as usize;
        for i in 0..FALLBACK_SLOTS {
            if found != NO_BACKEND {
                continue;
            }
            // Entries are index + 1 (0: none).
            let b = list.backends[(start + i) & (FALLBACK_SLOTS - 1)].wrapping_sub(1);
            if b != NO_BACKEND && b != avoid && !is_refusing(b, now) {
                found = b;
            }
        }
    }
    if found == NO_BACKEND {
        return None;
    }
    if let Some(c) = cell(avoid) {
        c.avoided += 1;
    }
    Some(found)
}
