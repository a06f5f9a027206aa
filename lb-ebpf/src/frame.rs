//! The two hooks the datapath runs at, behind one trait: [`Frame`] for XDP (`lb_xdp`, a frame
//! before the kernel made an skb of it) and for TC ingress (`lb_tc`, the skb itself). Everything
//! else in this crate is written once against [`Frame`] and compiled for both.
//!
//! What differs, and why TC exists at all: on veth (containers, namespaces) native XDP must copy
//! every frame a local TCP stack sent (the sender keeps a clone) and build an skb again on the far
//! side; at TC the (GRO-merged) skb is redirected without a copy. In exchange:
//! - only the linear part of an skb is reachable directly (`data_end`), so headers are pulled in
//!   first; [`Frame::len`] is the whole packet's length;
//! - the stack may have left the TCP checksum partial (the field holds the pseudo header's sum
//!   and the rest is added on transmit: offloaded, or GRO-merged), which only the kernel's
//!   `bpf_l4_csum_replace` handles: rewrites hand it their collected [`Delta`]s
//!   ([`Frame::fix_l4`]), segments built from scratch their two diffs ([`Frame::finish_segment`]);
//!   those helpers move the packet, so callers take pointers again afterwards;
//! - "back out the interface it came in on" and "out another one" are both redirects, and the
//!   verdicts are TC's; this crate decides in XDP's vocabulary and [`tc_action`] translates.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::{
        bpf_l4_csum_replace, bpf_redirect, bpf_redirect_peer, bpf_skb_adjust_room, bpf_skb_change_tail,
        bpf_skb_change_type, bpf_skb_pull_data, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::map,
    maps::HashMap,
    programs::{TcContext, XdpContext},
};
use lb_common::csum::{self, Delta};
use lb_common::maps::{MAP_PEER_IFACES, MAX_PEER_IFACES};

use crate::net::{EthHdr, TcpHdr};
use crate::ptr_at;

/// See [`lb_common::maps::MAP_PEER_IFACES`].
#[map(name = "lb_peer_ifaces")]
static PEER_IFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PEER_IFACES, 0);
const _: () = assert!(crate::str_eq(MAP_PEER_IFACES, "lb_peer_ifaces"));

/// `skb->pkt_type` of a frame addressed to the interface it arrived on (linux/if_packet.h).
const PACKET_HOST: u32 = 0;

/// Offset of the checksum field in the TCP header.
const TCP_CHECK: usize = 16;

/// A packet at one of the two hooks.
pub(crate) trait Frame: EbpfContext {
    /// Start and end of the bytes reachable directly.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (an skb's may exceed `data_end - data`).
    fn len(&self) -> u64;
    /// The interface the packet came in on.
    fn ingress(&self) -> u32;
    /// `tot_len` for `bpf_fib_lookup`'s MTU check: XDP passes the packet's; TC passes 0 so that
    /// the kernel checks the skb itself (a GRO-merged skb is longer than the MTU, and fine).
    fn fib_tot_len(&self, ip_tot_len: u16) -> u16;
    /// Applies the changes collected while rewriting the TCP segment at `l4_off`: `pseudo` to
    /// pseudo-header fields (addresses), `rest` to the others. Packet pointers are stale after.
    fn fix_l4(&self, l4_off: usize, pseudo: Delta, rest: Delta);
    /// The TCP segment at `l4_off` was written from scratch with its complete checksum; `pseudo`
    /// is its pseudo header's sum (see [`csum::segment_diffs`]). Packet pointers are stale after.
    fn finish_segment(&self, l4_off: usize, pseudo: u32);
    /// Grows or trims the packet to `want` bytes. Packet pointers are stale after.
    fn resize(&self, want: usize) -> bool;
    /// Opens `bytes` after the Ethernet header for an outer IPv4 header (IPIP). Packet pointers
    /// are stale after.
    fn push_ipip(&self, bytes: u16) -> bool;
    /// Out `ifindex` (XDP_REDIRECT in this crate's vocabulary, or XDP_DROP when refused).
    fn redirect(&self, ifindex: u32) -> u32;
    /// Out `ifindex` as [`Frame::redirect`]; at TC, when `ifindex` is a veth end whose other end
    /// lives in another network namespace ([`PEER_IFACES`]), straight into that namespace's stack
    /// (`bpf_redirect_peer`): the packet skips the veth's transmit and the backlog queue it would
    /// wait in before the other end's stack takes it. Only for packets the other end's stack takes
    /// as they are: an XDP program there (`lb_decap`) would not see them.
    fn redirect_into(&self, ifindex: u32) -> u32;
    /// Out the interface the packet came in on, toward where it came from.
    fn transmit(&self) -> u32;
    /// Hands the packet to the hook's SYN proxy program (returns only when there is none).
    fn hand_over(&self);
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn fib_tot_len(&self, ip_tot_len: u16) -> u16 {
        ip_tot_len
    }
    #[inline(always)]
    fn fix_l4(&self, l4_off: usize, pseudo: Delta, rest: Delta) {
        if let Some(tcp) = ptr_at::<TcpHdr>(self, l4_off) {
            // SAFETY: ptr_at checked the TCP header lies in the frame.
            unsafe { (*tcp).check_be = rest.apply(pseudo.apply((*tcp).check_be)) };
        }
    }
    #[inline(always)]
    fn finish_segment(&self, _l4_off: usize, _pseudo: u32) {}
    #[inline(always)]
    fn resize(&self, want: usize) -> bool {
        let have = XdpContext::data_end(self) - XdpContext::data(self);
        // SAFETY: resizing a frame the program owns; callers take every pointer again.
        have == want || unsafe { bpf_xdp_adjust_tail(self.ctx, want as i32 - have as i32) } == 0
    }
    #[inline(always)]
    fn push_ipip(&self, bytes: u16) -> bool {
        // Grows the frame at its head; the caller writes a new Ethernet header there.
        // SAFETY: as for resize.
        unsafe { bpf_xdp_adjust_head(self.ctx, -i32::from(bytes)) == 0 }
    }
    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        // SAFETY: a plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
    #[inline(always)]
    fn redirect_into(&self, ifindex: u32) -> u32 {
        self.redirect(ifindex)
    }
    #[inline(always)]
    fn transmit(&self) -> u32 {
        xdp_action::XDP_TX
    }
    #[inline(always)]
    fn hand_over(&self) {
        crate::synproxy::hand_over_xdp(self);
    }
}

/// A TC redirect helper's return in this crate's vocabulary: XDP_REDIRECT, or XDP_DROP when refused.
#[inline(always)]
fn redirected(ret: i64) -> u32 {
    if ret == i64::from(TC_ACT_REDIRECT) {
        xdp_action::XDP_REDIRECT
    } else {
        xdp_action::XDP_DROP
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        u64::from(TcContext::len(self))
    }
    #[inline(always)]
    fn ingress(&self) -> u32 {
        // SAFETY: the program's own context.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn fib_tot_len(&self, _ip_tot_len: u16) -> u16 {
        0
    }
    #[inline(always)]
    fn fix_l4(&self, l4_off: usize, pseudo: Delta, rest: Delta) {
        let at = (l4_off + TCP_CHECK) as u32;
        // SAFETY: helper calls on the program's own skb; the kernel bounds-checks `at`.
        unsafe {
            bpf_l4_csum_replace(
                self.skb.skb,
                at,
                0,
                u64::from(pseudo.sum()),
                u64::from(BPF_F_PSEUDO_HDR),
            );
            bpf_l4_csum_replace(self.skb.skb, at, 0, u64::from(rest.sum()), 0);
        }
    }
    #[inline(always)]
    fn finish_segment(&self, l4_off: usize, pseudo: u32) {
        let Some(tcp) = ptr_at::<TcpHdr>(self, l4_off) else {
            return;
        };
        // SAFETY: ptr_at checked the header; the helpers bounds-check `at` themselves.
        unsafe {
            let (first, second) = csum::segment_diffs((*tcp).check_be, pseudo);
            (*tcp).check_be = 0;
            let at = (l4_off + TCP_CHECK) as u32;
            bpf_l4_csum_replace(self.skb.skb, at, 0, u64::from(first), u64::from(BPF_F_PSEUDO_HDR));
            bpf_l4_csum_replace(self.skb.skb, at, 0, u64::from(second), 0);
        }
    }
    #[inline(always)]
    fn resize(&self, want: usize) -> bool {
        // SAFETY: a helper call on the program's own skb; callers take every pointer again.
        TcContext::len(self) as usize == want
            || unsafe { bpf_skb_change_tail(self.skb.skb, want as u32, 0) } == 0
    }
    #[inline(always)]
    fn push_ipip(&self, bytes: u16) -> bool {
        // Room after the MAC header; the Ethernet header stays where it is.
        // SAFETY: as for resize.
        unsafe {
            bpf_skb_adjust_room(
                self.skb.skb,
                i32::from(bytes),
                BPF_ADJ_ROOM_MAC,
                u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4),
            ) == 0
        }
    }
    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        // SAFETY: a plain helper call.
        redirected(unsafe { bpf_redirect(ifindex, 0) })
    }
    #[inline(always)]
    fn redirect_into(&self, ifindex: u32) -> u32 {
        // SAFETY: a lookup in a map of plain integers, and a plain helper call.
        if unsafe { PEER_IFACES.get(ifindex) }.is_none() {
            return self.redirect(ifindex);
        }
        // The other end's stack does not classify the frame again (a veth's transmit would, by
        // its new destination MAC): one that reached lb not addressed to its interface (promiscuous
        // mode, a bridge port) is the other end's own now. Kernels before 6.8 keep the type.
        // SAFETY: helper calls on the program's own skb.
        unsafe { bpf_skb_change_type(self.skb.skb, PACKET_HOST) };
        redirected(unsafe { bpf_redirect_peer(ifindex, 0) })
    }
    #[inline(always)]
    fn transmit(&self) -> u32 {
        self.redirect(self.ingress())
    }
    #[inline(always)]
    fn hand_over(&self) {
        crate::synproxy::hand_over_tc(self);
    }
}

/// Brings the headers of a nonlinear skb into its linear part (Ethernet, IPv4 and TCP with their
/// options, as far as the packet has them), so that direct access reaches them. Nearly always
/// they are there already (the stack and GRO keep them linear) and nothing is pulled: a pull
/// beyond them would copy payload, and may reallocate the skb's head, for every packet.
#[inline(always)]
pub(crate) fn pull_headers(ctx: &TcContext) {
    let (data, end) = (TcContext::data(ctx), TcContext::data_end(ctx));
    let mut want = HEADERS_MAX;
    if data + EthHdr::LEN + 20 <= end {
        // SAFETY: checked just above.
        let ihl = unsafe { *((data + EthHdr::LEN) as *const u8) } & 0x0f;
        let l4 = EthHdr::LEN + usize::from(ihl) * 4;
        if data + l4 + 13 <= end {
            // SAFETY: checked just above; byte 12 of the TCP header holds the data offset.
            let doff = unsafe { *((data + l4 + 12) as *const u8) } >> 4;
            want = l4 + usize::from(doff) * 4;
        }
    }
    let want = (want as u32).min(TcContext::len(ctx));
    if ((end - data) as u32) < want {
        // SAFETY: a helper call on the program's own skb, before any pointer is taken.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}

/// The most header bytes the program reads: Ethernet, IPv4 and TCP with all their options.
const HEADERS_MAX: usize = EthHdr::LEN + 60 + 60;

/// This crate's verdict (XDP's vocabulary) as TC's.
#[inline(always)]
pub(crate) const fn tc_action(action: u32) -> i32 {
    match action {
        xdp_action::XDP_PASS => TC_ACT_OK,
        xdp_action::XDP_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT,
    }
}
