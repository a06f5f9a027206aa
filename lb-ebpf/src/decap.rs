//! `lb_decap`: the backend's half of `forwarding = "dsr"` as a tiny XDP program, for backend hosts
//! whose kernel has no `ipip` module (CONFIG_NET_IPIP unset). It strips the outer IPv4 header of
//! every IPIP packet and passes the inner packet to the stack, as if it had arrived on the
//! interface itself. Backends with the ipip module use the `tunl0` device instead (README, DSR).
//! The test suite attaches it to its backends.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext};
use lb_common::ipip;

use crate::net::{ETH_P_IPV4, EthHdr, Ipv4Hdr};
use crate::ptr_at;

/// XDP entry point on a dsr backend: IPIP in, the inner packet passed; everything else passed
/// untouched.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<u32> {
    let eth = ptr_at::<[u8; EthHdr::LEN]>(ctx, 0)?;
    let outer = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // The inner header must be there too.
    ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + usize::from(ipip::OUTER_LEN))?;
    // SAFETY: ptr_at checked the Ethernet and both IPv4 headers lie in the packet.
    let header = unsafe {
        let ether_type_be = u16::from_ne_bytes([(*eth)[12], (*eth)[13]]);
        if ether_type_be != ETH_P_IPV4.to_be()
            || (*outer).version_ihl != ipip::OUTER_VERSION_IHL
            || (*outer).protocol != ipip::IPPROTO_IPIP
        {
            return None;
        }
        *eth
    };
    // SAFETY: shrinking the frame at its head; the Ethernet header is taken again below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, i32::from(ipip::OUTER_LEN)) } != 0 {
        return Some(xdp_action::XDP_DROP);
    }
    let eth = ptr_at::<[u8; EthHdr::LEN]>(ctx, 0)?;
    // SAFETY: ptr_at checked the new Ethernet header lies in the packet.
    unsafe { *eth = header };
    Some(xdp_action::XDP_PASS)
}
