//! Next hops shared by new flows. Each CPU keeps its last FIB answers in a small direct-mapped
//! table keyed by the question (destination, source, TOS, ingress interface), and a flow entry without
//! a next hop yet copies one from there instead of asking the FIB: in a connection-per-request
//! load, every connection to one backend (and every reply to one client) asks the same question,
//! twice per connection. An answer is trusted as long as a flow's own copy ([`NEXT_HOP_CACHE_NS`]
//! from the lookup that produced it), so a route change reaches new and established flows alike
//! within that time. Per CPU: no locks, no cache lines bouncing. Not pinned: a restart starts empty.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::maps::{FlowValue, NEXT_HOP_CACHE_NS, hop_stamp};

use crate::Verdict;
use crate::frame::Frame;

/// Slots per CPU; the slot of a question is a hash of it (a collision costs a FIB lookup).
const SLOTS: u32 = 256;

/// One FIB answer: the question (`dst_be`, `src_be`, `tos`, `ingress`), and the egress interface
/// and MACs (destination, source) it gave at `at_ns`. `ifindex` 0: an empty slot.
#[repr(C)]
pub struct NextHop {
    dst_be: u32,
    src_be: u32,
    ingress: u32,
    ifindex: u32,
    macs: [u8; 12],
    tos: u32,
    at_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 40);

#[map(name = "lb_next_hops")]
static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(SLOTS, 0);
const _: () = assert!(crate::str_eq(lb_common::maps::MAP_NEXT_HOPS, "lb_next_hops"));

/// This CPU's slot for the question (`dst_be`, `src_be`, `ingress`).
#[inline(always)]
fn slot(dst_be: u32, src_be: u32, ingress: u32) -> Option<*mut NextHop> {
    let h = (dst_be ^ src_be.rotate_left(16) ^ ingress).wrapping_mul(0x9e37_79b1);
    NEXT_HOPS.get_ptr_mut(h >> 24)
}

/// [`crate::forward`] for `flow`'s packet (its IPv4 header's `tos`), sharing next hops: a flow
/// without one yet takes this CPU's fresh answer to its question, and the answer the FIB gives it
/// is kept for the flows asking next.
#[inline(always)]
pub fn forward<C: Frame>(ctx: &C, flow: &mut FlowValue, tos: u8, now: u64, cpus: u32) -> Verdict {
    let fresh = flow.next_hop_ifindex == 0;
    if fresh {
        fill(flow, ctx.ingress(), tos, now);
    }
    let verdict = crate::forward(ctx, flow, now, cpus, true);
    if fresh {
        remember(flow, ctx.ingress(), tos, now);
    }
    verdict
}

/// Gives `flow` (which has no next hop yet) the answer this CPU has to its question, if fresh at
/// `now`. The flow's rewritten packet asks: to `new_dst_be` from `new_src_be` with `tos`, come in
/// on `ingress`.
#[inline(always)]
fn fill(flow: &mut FlowValue, ingress: u32, tos: u8, now: u64) {
    let Some(slot) = slot(flow.new_dst_be, flow.new_src_be, ingress) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for this run.
    let h = unsafe { &*slot };
    if h.ifindex != 0
        && h.dst_be == flow.new_dst_be
        && h.src_be == flow.new_src_be
        && h.ingress == ingress
        && h.tos == u32::from(tos)
        && now.saturating_sub(h.at_ns) <= NEXT_HOP_CACHE_NS
    {
        flow.next_hop_ifindex = h.ifindex;
        flow.next_hop_macs = h.macs;
        flow.next_hop_at = hop_stamp(h.at_ns);
    }
}

/// Records the next hop `flow` got from the FIB at `now` (a flow whose copy is older got it from
/// here, or earlier).
#[inline(always)]
fn remember(flow: &FlowValue, ingress: u32, tos: u8, now: u64) {
    if flow.next_hop_at != hop_stamp(now) || flow.next_hop_ifindex == 0 {
        return;
    }
    let Some(slot) = slot(flow.new_dst_be, flow.new_src_be, ingress) else {
        return;
    };
    // SAFETY: this CPU's slot, written only by this CPU within this run.
    let h = unsafe { &mut *slot };
    h.dst_be = flow.new_dst_be;
    h.src_be = flow.new_src_be;
    h.ingress = ingress;
    h.tos = u32::from(tos);
    h.ifindex = flow.next_hop_ifindex;
    h.macs = flow.next_hop_macs;
    h.at_ns = now;
}
