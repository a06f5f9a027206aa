//! `lb-ebpf`: the XDP datapath of `lb`, built for `bpfel-unknown-none` by `cargo xtask build`
//! (nightly, `-Z build-std=core`, linked by `bpf-linker`) and embedded into the `lb` binary.
//!
//! Tour:
//! - [`lb_xdp`]: the XDP entry point. It only maps the result of [`try_lb_xdp`] to a verdict and
//!   counts it; all parsing lives in `try_lb_xdp`.
//! - [`try_lb_xdp`]: parses Ethernet, then IPv4 (honouring IHL), then the TCP/UDP header. For now
//!   every packet is passed to the kernel (`XDP_PASS`); VIP matching and NAT forwarding come later.
//! - [`ptr_at`]: the only way to read packet bytes: a bounds check against `data_end` that the
//!   verifier can follow.
//! - [`LB_GLOBAL`]: per-CPU counters (`lb_common::maps::MAP_GLOBAL_STATS`), indexed by
//!   `lb_common::maps::global_counter`. Per-CPU because eBPF has no cheap atomic add; user space
//!   sums over CPUs. Counters, never per-packet logs.
//! - [`net`]: the on-wire header layouts this program reads.
//!
//! Map names, key/value types and sizes live once in `lb-common`; this crate only declares the maps.
#![no_std]
#![no_main]

mod net;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::maps::{Counter, GLOBAL_STATS_ENTRIES, MAP_GLOBAL_STATS, global_counter};

use crate::net::{ETH_P_IPV4, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, TcpHdr, UdpHdr};

/// Per-CPU global counters. The `#[map]` attribute needs a literal name; the assertion below keeps
/// it equal to the one definition in `lb-common`.
#[map(name = "lb_global")]
static LB_GLOBAL: PerCpuArray<Counter> = PerCpuArray::with_max_entries(GLOBAL_STATS_ENTRIES, 0);
const _: () = assert!(str_eq(MAP_GLOBAL_STATS, "lb_global"));

/// Why a packet could not be parsed. Each maps to a reason counter.
enum ParseError {
    /// A header did not fit between `data` and `data_end`.
    Truncated,
}

/// XDP entry point: parse, count, and (for now) pass everything to the kernel stack.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    count(global_counter::PACKETS, len);
    let action = match try_lb_xdp(&ctx) {
        Ok(action) => action,
        Err(ParseError::Truncated) => {
            count(global_counter::TRUNCATED, len);
            xdp_action::XDP_PASS
        }
    };
    if action == xdp_action::XDP_PASS {
        count(global_counter::PASSED, len);
    }
    action
}

/// Parses the headers of one frame and decides its verdict.
#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Result<u32, ParseError> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole header lies inside the packet.
    if unsafe { (*eth).ether_type_be } != ETH_P_IPV4.to_be() {
        // ARP, IPv6, VLAN-tagged, …: not ours (yet).
        return Ok(xdp_action::XDP_PASS);
    }

    let ip_off = EthHdr::LEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ip_off)?;
    // SAFETY: as above.
    let (version_ihl, proto) = unsafe { ((*ip).version_ihl, (*ip).protocol) };
    if version_ihl >> 4 != 4 {
        return Ok(xdp_action::XDP_PASS);
    }
    // IHL counts 32-bit words, 5..=15; anything below 5 is malformed, which the kernel handles.
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Ok(xdp_action::XDP_PASS);
    }
    let l4_off = ip_off + ihl * 4;
    // The options must fit too, even though we do not read them.
    let _end_of_ip: *const [u8; 0] = ptr_at(ctx, l4_off)?;

    match proto {
        IPPROTO_TCP => {
            let _tcp: *const TcpHdr = ptr_at(ctx, l4_off)?;
        }
        IPPROTO_UDP => {
            let _udp: *const UdpHdr = ptr_at(ctx, l4_off)?;
        }
        _ => {}
    }
    Ok(xdp_action::XDP_PASS)
}

/// A pointer to a `T` at `offset` bytes into the packet, or `Truncated` if it would reach past
/// `data_end`. The only way this program touches packet memory.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(ParseError::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// Adds one packet of `len` bytes to this CPU's slot of counter `index`.
#[inline(always)]
fn count(index: u32, len: u64) {
    if let Some(c) = LB_GLOBAL.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, so no other CPU writes it; the map outlives the program run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// `a == b` for strings, usable in constant assertions.
const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects anything that could panic.
    loop {}
}

/// GPL-compatible licence: required for helpers such as `bpf_fib_lookup`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
