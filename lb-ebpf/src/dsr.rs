//! `forwarding = "dsr"`: direct server return. A packet to a dsr service is wrapped, untouched, in
//! an outer IPv4 header (IPIP, protocol 4) from the LB's address toward the backend to the backend,
//! and sent to the next hop like a NAT packet; the backend unwraps it (its ipip tunnel device),
//! finds the VIP on a local interface and answers the client directly. No SNAT port, no reply entry:
//! only the client → backend entry ([`FLOW_DSR`]) is kept, so established packets go where the SYN
//! went, and `lb which` and the counters read it as for NAT.
//!
//! A non-SYN packet without an entry (its connection crossed another LB node that died, or its
//! entry was forgotten) is forwarded to the backend its client maps to now: the affinity entry,
//! else the ring, which every node with the same config and seed computes alike (Katran's
//! behaviour). It gets an entry and is counted (`dsr_mid_flow`), never reset or dropped.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    ipip,
    maps::{
        BackendValue, FLOW_DSR, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_HALF_OPEN, FLOW_TO_BACKEND, FlowKey,
        FlowValue, GlobalConfig, ServiceValue, global_counter as gc,
    },
};

use crate::frame::Frame;
use crate::net::{ETH_P_IPV4, EthHdr, Ipv4Hdr};
use crate::{CONNTRACK, Verdict, count, count_traffic, drop, forward, ptr_at, set_flags};

/// Each CPU's scratch entries for a new flow (slot 0: a dsr flow's, and a NAT flow's client →
/// backend entry; slot 1: a NAT flow's reply entry): built in map memory, not on the stack, which
/// the NAT path already nearly fills (the verifier allows 512 bytes). Not pinned.
#[map(name = "lb_dsr_scratch")]
pub(crate) static SCRATCH: PerCpuArray<FlowValue> = PerCpuArray::with_max_entries(2, 0);

const _: () = assert!(crate::str_eq(lb_common::maps::MAP_DSR_SCRATCH, "lb_dsr_scratch"));

/// A new flow of a dsr service toward `backend` (chosen by the shared rules): a SYN, or a mid-flow
/// packet this node has no entry for. Records the client → backend entry and sends the packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_flow(
    ctx: &impl Frame,
    key: &FlowKey,
    service: &ServiceValue,
    backend_index: u32,
    backend: &BackendValue,
    syn: bool,
    seq_be: u32,
    now: u64,
    cfg: &GlobalConfig,
    len: u64,
) -> Verdict {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return drop(gc::NO_BACKEND);
    };
    // SAFETY: this CPU's slot, used only within this run.
    let value = unsafe { &mut *scratch };
    value.new_src_be = backend.snat_be;
    value.new_dst_be = backend.addr_be;
    value.new_sport_be = 0;
    value.new_dport_be = 0;
    value.backend = backend_index;
    value.service_slot = service.slot;
    value.flags = FLOW_TO_BACKEND | FLOW_DSR | if syn { FLOW_HALF_OPEN } else { 0 };
    value.next_hop_ifindex = 0;
    value.last_seen_ns = now;
    value.ts_delta = 0;
    value.syn_seq_be = if syn { seq_be } else { 0 };
    let verdict = encapsulate(ctx, value, now, cfg.cpus);
    // Without an entry (the LRU map refused it) the packet still goes: the next one finds the
    // same backend by affinity or the ring.
    #[allow(
        clippy::needless_borrows_for_generic_args,
        reason = "a reference into the scratch map: `*value` would copy the entry onto the stack"
    )]
    let _ = CONNTRACK.insert(key, &*value, 0);
    if syn {
        count(gc::NEW_FLOWS, len);
    } else {
        count(gc::DSR_MID_FLOW, len);
    }
    count_traffic(value, true, len, syn);
    verdict
}

/// A packet of a known dsr flow `f`. The LB sees only the client's half of the connection, so the
/// client's FIN closes the flow (it ages out after `closed_timeout`; a half-closed connection's
/// later packets are still forwarded, by the mid-flow rule).
#[inline(always)]
pub(crate) fn known_flow(ctx: &impl Frame, f: &mut FlowValue, now: u64, cfg: &GlobalConfig) -> Verdict {
    if f.flags & FLOW_FIN_CLIENT != 0 {
        set_flags(&mut f.flags, FLOW_FIN_BACKEND);
    }
    encapsulate(ctx, f, now, cfg.cpus)
}

/// Wraps the packet in the outer header of flow `f` (`new_src_be` → `new_dst_be`) and forwards
/// it to the next hop. The inner packet is not touched.
#[inline(always)]
fn encapsulate(ctx: &impl Frame, f: &mut FlowValue, now: u64, cpus: u32) -> Verdict {
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return drop(gc::TRUNCATED);
    };
    // SAFETY: ptr_at checked the inner header lies in the packet.
    let (tos, inner_len, frag_be) = unsafe {
        (
            (*inner).tos,
            u16::from_be((*inner).tot_len_be),
            (*inner).frag_off_be,
        )
    };
    let Some(outer_len) = inner_len.checked_add(ipip::OUTER_LEN) else {
        return drop(gc::TOO_BIG);
    };
    // Every packet pointer is taken again below.
    if !ctx.push_ipip(ipip::OUTER_LEN) {
        return drop(gc::TOO_BIG);
    }
    let (Some(eth), Some(outer)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)) else {
        return drop(gc::TRUNCATED);
    };
    let tot_len_be = outer_len.to_be();
    let frag_off_be = (u16::from_be(frag_be) & ipip::IP_DF).to_be();
    // SAFETY: ptr_at checked both headers lie in the grown packet.
    unsafe {
        (*eth).ether_type_be = ETH_P_IPV4.to_be();
        (*outer).version_ihl = ipip::OUTER_VERSION_IHL;
        (*outer).tos = tos;
        (*outer).tot_len_be = tot_len_be;
        (*outer).id_be = 0;
        (*outer).frag_off_be = frag_off_be;
        (*outer).ttl = ipip::OUTER_TTL;
        (*outer).protocol = ipip::IPPROTO_IPIP;
        (*outer).saddr_be = f.new_src_be;
        (*outer).daddr_be = f.new_dst_be;
        (*outer).check_be = ipip::outer_check(tos, tot_len_be, frag_off_be, f.new_src_be, f.new_dst_be);
    }
    // The cached next hop skips the FIB, and with it the MTU check: a packet larger than any the
    // path has taken looks the next hop up again (too big: dropped and counted `too_big`).
    if u32::from(outer_len) > f.ts_delta {
        f.next_hop_ifindex = 0;
    }
    // Not into a peer: the backend may decapsulate with lb_decap at its XDP hook.
    let verdict = forward(ctx, f, now, cpus, false);
    if verdict.reason.is_none() && u32::from(outer_len) > f.ts_delta {
        f.ts_delta = u32::from(outer_len);
    }
    verdict
}
