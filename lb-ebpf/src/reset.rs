//! Answering a packet with a TCP RST from XDP instead of a silent drop, so the sender learns at
//! once that the connection is gone (RFC 793 "Reset Generation", numbers from
//! [`lb_common::rst::answer`]). The packet itself becomes the reset: addresses, ports and MACs
//! swapped, trimmed to its 54 bytes ([`Frame::resize`]), both checksums computed, and sent back
//! out the interface it came in on (a redirect to the ingress interface, see [`answer`]). Resets are rate-limited per CPU (a token bucket in
//! `lb_rst_bucket`): over the limit the packet is dropped and counted as `rst_limited`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{csum, maps::global_counter as gc, rst};

use crate::frame::Frame;
use crate::net::{ETH_P_IPV4, EthHdr, IPPROTO_TCP, Ipv4Hdr, TcpHdr};
use crate::{Verdict, count, drop, ptr_at};

#[map(name = "lb_rst_bucket")]
static RST_BUCKET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const _: () = assert!(crate::str_eq(lb_common::maps::MAP_RST_BUCKET, "lb_rst_bucket"));

/// Length of the reset frame: Ethernet, IPv4 without options, TCP without options.
const RST_FRAME: usize = EthHdr::LEN + 40;

/// Rewrites the packet (IPv4 header of `ihl` words at `ip`, TCP header of `doff` words at `tcp`)
/// into the RST answering it and sends it back out the ingress interface, with `reason` counted. A reset is never
/// answered, and over the rate limit nothing is sent: both are dropped.
#[inline(always)]
pub(crate) fn answer(
    ctx: &impl Frame,
    ip: *const Ipv4Hdr,
    tcp: *const TcpHdr,
    ihl: usize,
    doff: usize,
    now: u64,
    reason: u32,
) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(reason);
    };
    // SAFETY: the caller bounds-checked both headers in this run and nothing moved the packet;
    // everything needed is read before the packet is rewritten.
    let (src_mac, dst_mac, saddr, daddr, tot_len_be, sport, dport, seq_be, ack_be, flags_be) = unsafe {
        (
            (*eth).src,
            (*eth).dst,
            (*ip).saddr_be,
            (*ip).daddr_be,
            (*ip).tot_len_be,
            (*tcp).source_be,
            (*tcp).dest_be,
            (*tcp).seq_be,
            (*tcp).ack_seq_be,
            (*tcp).doff_flags_be,
        )
    };
    let payload = u32::from(u16::from_be(tot_len_be)).saturating_sub(((ihl + doff) * 4) as u32);
    let flags = u16::from_be(flags_be) as u8;
    let Some(reset) = rst::answer(u32::from_be(seq_be), u32::from_be(ack_be), flags, payload) else {
        return drop(reason);
    };
    if !take_token(now) {
        count(gc::RST_LIMITED, 0);
        return drop(reason);
    }
    // Every pointer is taken again below.
    if !ctx.resize(RST_FRAME) {
        return drop(reason);
    }
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN),
        ptr_at::<TcpHdr>(ctx, EthHdr::LEN + 20),
    ) else {
        return drop(reason);
    };
    // SAFETY: ptr_at checked all three headers lie in the (trimmed) packet.
    unsafe {
        (*eth).dst = src_mac;
        (*eth).src = dst_mac;
        (*eth).ether_type_be = ETH_P_IPV4.to_be();
        (*ip).version_ihl = rst::RST_VERSION_IHL;
        (*ip).tos = 0;
        (*ip).tot_len_be = rst::RST_TOT_LEN.to_be();
        (*ip).id_be = 0;
        (*ip).frag_off_be = rst::RST_FRAG_DF.to_be();
        (*ip).ttl = rst::RST_TTL;
        (*ip).protocol = IPPROTO_TCP;
        (*ip).check_be = rst::ipv4_check(daddr, saddr);
        (*ip).saddr_be = daddr;
        (*ip).daddr_be = saddr;
        (*tcp).source_be = dport;
        (*tcp).dest_be = sport;
        (*tcp).seq_be = reset.seq.to_be();
        (*tcp).ack_seq_be = reset.ack.to_be();
        (*tcp).doff_flags_be = rst::doff_flags(&reset).to_be();
        (*tcp).window_be = 0;
        (*tcp).urg_ptr_be = 0;
        (*tcp).check_be = rst::tcp_check(daddr, saddr, dport, sport, &reset);
    }
    ctx.finish_segment(EthHdr::LEN + 20, csum::pseudo_v4(daddr, saddr, 20));
    count(gc::RST_SENT, RST_FRAME as u64);
    // Out the interface it came in on. A redirect to it rather than XDP_TX: on a veth, XDP_TX
    // frames reach the peer only when the peer runs an XDP program of its own (the kernel wakes
    // the peer's NAPI for them only then), while a redirect is flushed to the peer like the
    // forwarded packets are. On a NIC both end in the same transmit queue.
    Verdict {
        action: ctx.redirect(ctx.ingress()),
        reason: Some(reason),
    }
}

/// Takes one token from this CPU's bucket, if it has one.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(tat) = RST_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, written only by this CPU.
    unsafe {
        let (ok, next) = rst::admit(*tat, now);
        if ok {
            *tat = next;
        }
        ok
    }
}
