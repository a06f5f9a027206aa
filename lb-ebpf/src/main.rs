//! `lb-ebpf`: the XDP datapath of `lb`, built for `bpfel-unknown-none` by `cargo xtask build`
//! (nightly, `-Z build-std=core`, linked by `bpf-linker`) and embedded into the `lb` binary.
//!
//! Tour:
//! - [`lb_xdp`] / [`lb_tc`]: the entry points at the XDP hook and at TC ingress (`[xdp] mode =
//!   "tc"`); both map the result of [`try_lb`] to a verdict and count it. Everything below is
//!   written once against [`frame::Frame`], which holds what differs between the two hooks.
//! - [`try_lb`]: parses Ethernet, IPv4 (honouring IHL) and TCP; a packet of a known connection
//!   (conntrack, either direction) is rewritten and forwarded; a SYN to a service picks a backend
//!   ([`select_backend`]: affinity, else the Maglev ring), claims a SNAT port ([`claim_snat`]) and both
//!   directions recorded. A SYN on a known 4-tuple is a retransmission only with the same sequence
//!   number and a live reply entry; otherwise the client reused its port and it starts a new flow
//!   ([`retransmitted_syn`]). A non-SYN for a NAT service without a live flow (`no_conntrack`), a
//!   backend packet to a SNAT address and port without one (`no_reply_flow`) and any packet of a
//!   flow marked for reset (`reset_flow`) are answered with an RST ([`reset::answer`]).
//!   Everything else is passed to the kernel untouched.
//! - [`dsr`]: services with `forwarding = "dsr"`: IPIP encapsulation toward the backend instead of
//!   the NAT rewrite, one entry per flow, and mid-flow packets without an entry forwarded by
//!   affinity or the ring instead of reset.
//! - [`decap`]: `lb_decap`, a second program for dsr backends without the ipip module.
//! - [`passive`]: per-backend handshake counters (SYNs forwarded, the backend's SYN-ACK or RST to
//!   each) for passive health in user space; a backend that answered a SYN with an RST is marked
//!   refusing, and [`select_backend`] sends a new SYN whose choice it is elsewhere.
//! - [`synproxy`]: `lb_synproxy`, reached by a tail call: SYN cookies (`[xdp] syn_cookies`), the
//!   flows they set up and the sequence translation of those flows ([`synproxy::translate`]).
//! - [`rewrite`] / [`forward`]: full-NAT rewrite with incremental checksums, next hop by
//!   `bpf_fib_lookup` (cached per flow for a second, and per CPU for the new flows asking the same
//!   question: [`hop`]), out by `XDP_TX` or redirect; unknown neighbour → `XDP_PASS` so the kernel
//!   resolves it.
//! - [`ptr_at`]: the only way to touch packet bytes: a bounds check the verifier can follow.
//! - Validation first ([`check_ip`], [`impossible_source`], the TCP data offset and SYN flags):
//!   frames whose lengths disagree are passed, SYNs with RST or FIN and impossible sources dropped,
//!   each counted, before conntrack, affinity or SNAT is looked at.
//! - Maps: names and layouts once in `lb_common::maps`; counters are per-CPU. The only log lines
//!   (aya-log, forwarded into `lb`'s tracing) are for actionable events: SNAT ports exhausted,
//!   no route for a rewritten packet; `logs` rate-limits them per reason.
#![no_std]
#![no_main]

mod decap;
mod dsr;
mod frame;
mod hop;
mod logs;
mod net;
mod passive;
mod reset;
mod synproxy;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    csum::Delta,
    maps::{
        AffinityKey, AffinityValue, BACKEND_ADMITS_KNOWN, BACKEND_PRESENT, BackendValue, Counter,
        DEFAULT_AFFINITY_ENTRIES, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
        DEFAULT_SNAT_ADDRS, DEFAULT_SNAT_LOCKS, FLOW_AFFINITY_PENDING, FLOW_DSR, FLOW_FIN_BACKEND,
        FLOW_FIN_CLIENT, FLOW_HALF_OPEN, FLOW_RESET, FLOW_RST, FLOW_TO_BACKEND, FLOW_TS, FlowKey, FlowValue,
        GLOBAL_STATS_ENTRIES, GlobalConfig, NEXT_HOP_CACHE_NS, SERVICE_DSR, ServiceKey, ServiceValue,
        TrafficCounters, global_counter as gc, hop_stamp, second_stamp,
    },
    passive::{FLOW_ANSWERED, FLOW_HELD, Stale},
    select::{AffinitySlot, BackendTable, Policy, Ring, next_entry, select},
    synproxy::FLOW_COOKIE,
};

use crate::frame::{Frame, pull_headers, tc_action};
use crate::logs::{LOG_NO_ROUTE, LOG_SNAT_EXHAUSTED, may_log};
use crate::net::{ETH_P_IPV4, EthHdr, IPPROTO_TCP, Ipv4Hdr, TcpHdr};

// `#[map]` needs literal names: they must equal the constants in lb_common::maps (checked below).
#[map(name = "lb_global")]
static GLOBAL: PerCpuArray<Counter> = PerCpuArray::with_max_entries(GLOBAL_STATS_ENTRIES, 0);
#[map(name = "lb_config")]
static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);
#[map(name = "lb_services")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map(name = "lb_backends")]
static BACKENDS: Array<BackendValue> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map(name = "lb_ring")]
static RING: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES * 65537, 0);
#[map(name = "lb_conntrack")]
static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);
#[map(name = "lb_affinity")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);
#[map(name = "lb_snat")]
static SNAT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "lb_snat_locks")]
static SNAT_LOCKS: HashMap<FlowKey, u32> = HashMap::with_max_entries(DEFAULT_SNAT_LOCKS, 0);
#[map(name = "lb_snat_addrs")]
static SNAT_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_SNAT_ADDRS, 0);
#[map(name = "lb_svc_stats")]
static SERVICE_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map(name = "lb_be_stats")]
static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

const _: () = {
    use lb_common::maps::{
        MAP_AFFINITY, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_GLOBAL_STATS, MAP_RING,
        MAP_SERVICE_STATS, MAP_SERVICES, MAP_SNAT, MAP_SNAT_ADDRS, MAP_SNAT_LOCKS,
    };
    assert!(str_eq(MAP_GLOBAL_STATS, "lb_global"));
    assert!(str_eq(MAP_CONFIG, "lb_config"));
    assert!(str_eq(MAP_SERVICES, "lb_services"));
    assert!(str_eq(MAP_BACKENDS, "lb_backends"));
    assert!(str_eq(MAP_RING, "lb_ring"));
    assert!(str_eq(MAP_CONNTRACK, "lb_conntrack"));
    assert!(str_eq(MAP_AFFINITY, "lb_affinity"));
    assert!(str_eq(MAP_SNAT, "lb_snat"));
    assert!(str_eq(MAP_SNAT_ADDRS, "lb_snat_addrs"));
    assert!(str_eq(MAP_SNAT_LOCKS, "lb_snat_locks"));
    assert!(str_eq(MAP_SERVICE_STATS, "lb_svc_stats"));
    assert!(str_eq(MAP_BACKEND_STATS, "lb_be_stats"));
};

const AF_INET: u8 = 2;
/// IPv4 "more fragments" flag and fragment offset mask (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// TCP flags in the low byte of `doff_flags` (host order).
const TCP_FIN: u16 = 0x01;
const TCP_SYN: u16 = 0x02;
const TCP_RST: u16 = 0x04;
const TCP_ACK: u16 = 0x10;
/// SNAT ports tried before giving up on a SYN. The first [`SNAT_WALK`] are consecutive cursor
/// values (the ports ahead of this CPU's cursor are the ones it claimed longest ago, so the first
/// try nearly always succeeds); the rest are random ports of the whole range, so one busy stretch
/// (another CPU's recent claims) never fails a SYN while free ports exist elsewhere.
const SNAT_TRIES: u32 = 16;
const SNAT_WALK: u32 = 4;
/// Random tries after which a half-open flow's port is taken when no free port turned up.
const SNAT_RANDOM_BEFORE_RECLAIM: u32 = 4;
/// Marks a free port the claim loop found without any reply entry (see [`claim_snat`]).
const EMPTY_PORT: u32 = 1 << 31;
/// A half-open flow gives its port up only once it has waited this long for the client's ACK (a
/// real client's ACK follows its SYN-ACK within a round trip, even on a machine a flood saturates;
/// a spoofed SYN's never comes).
const HALF_OPEN_RECLAIM_NS: u64 = 1_000_000_000;
/// A closed connection (RST, or FIN both ways) keeps its SNAT port for `closed_timeout` so late
/// packets still find it, unless a new flow needs the port once the connection has been quiet
/// this long since its last FIN or RST (its last ACK follows within a round trip; the backend's
/// TIME_WAIT accepts the new SYN: timestamps toward backends follow the LB's clock). A client
/// further away than this, on a backend whose ports all turn over within its round trip, could see
/// its last ACK meet the port's next flow.
const CLOSED_REUSE_NS: u64 = 100_000_000;

/// A verdict with the reason counter that explains it (or none).
struct Verdict {
    action: u32,
    reason: Option<u32>,
}

const fn pass(reason: Option<u32>) -> Verdict {
    Verdict {
        action: xdp_action::XDP_PASS,
        reason,
    }
}
const fn drop(reason: u32) -> Verdict {
    Verdict {
        action: xdp_action::XDP_DROP,
        reason: Some(reason),
    }
}

/// XDP entry point: parse, decide, count.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = Frame::len(&ctx);
    count(gc::PACKETS, len);
    conclude(try_lb(&ctx, len), len)
}

/// TC ingress entry point (`[xdp] mode = "tc"`): the same decisions on the skb (see [`frame`]).
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let len = Frame::len(&ctx);
    count(gc::PACKETS, len);
    pull_headers(&ctx);
    tc_action(conclude(try_lb(&ctx, len), len))
}

/// Counts `verdict`'s reason (if any) and its action; returns the action.
#[inline(always)]
pub(crate) fn conclude(verdict: Verdict, len: u64) -> u32 {
    if let Some(reason) = verdict.reason {
        count(reason, len);
    }
    count(
        match verdict.action {
            xdp_action::XDP_PASS => gc::PASSED,
            xdp_action::XDP_DROP | xdp_action::XDP_ABORTED => gc::DROPPED,
            _ => gc::FORWARDED,
        },
        len,
    );
    verdict.action
}

/// Parses one frame and decides its verdict.
#[inline(always)]
fn try_lb<C: Frame>(ctx: &C, len: u64) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(Some(gc::TRUNCATED));
    };
    // SAFETY (all header reads and writes below): ptr_at checked the header lies in the packet.
    if unsafe { (*eth).ether_type_be } != ETH_P_IPV4.to_be() {
        return pass(None); // ARP, IPv6, VLAN, …
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return pass(Some(gc::TRUNCATED));
    };
    let (version_ihl, proto) = unsafe { ((*ip).version_ihl, (*ip).protocol) };
    if version_ihl >> 4 != 4 || proto != IPPROTO_TCP {
        return pass(None); // ICMP, UDP, …: the kernel's business
    }
    // Validation before any state (see `validate`): nothing below runs for a frame whose headers
    // disagree, a SYN carrying RST or FIN, or an impossible source.
    let ihl = (version_ihl & 0x0f) as usize;
    let ip_len = u16::from_be(unsafe { (*ip).tot_len_be }) as usize;
    if let Some(verdict) = check_ip(len as usize - EthHdr::LEN, ihl, ip_len) {
        return verdict;
    }
    let (saddr_be, daddr_be) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    if impossible_source(saddr_be, daddr_be) {
        return drop(gc::BAD_SOURCE);
    }
    let l4_off = EthHdr::LEN + ihl * 4;
    let frag = u16::from_be(unsafe { (*ip).frag_off_be });
    if frag & (IP_MF | IP_OFFSET) != 0 {
        // The first fragment of a segment to a service: dropped, since the host's kernel would
        // reassemble it, find no socket on the VIP's port and reset the client's connection.
        // Later fragments go up to wait in reassembly until they time out.
        if frag & IP_OFFSET == 0
            && let Some(ports) = ptr_at::<[u16; 2]>(ctx, l4_off)
            && unsafe { SERVICES.get(ServiceKey::tcp(daddr_be, (*ports)[1])) }.is_some()
        {
            return drop(gc::FRAGMENT);
        }
        return pass(Some(gc::FRAGMENT));
    }
    if ip_len < ihl * 4 + TcpHdr::LEN {
        return pass(Some(gc::MALFORMED)); // no room for a TCP header within the total length
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_off) else {
        return pass(Some(gc::TRUNCATED));
    };
    let mut flags = u16::from_be(unsafe { (*tcp).doff_flags_be });
    let doff = (flags >> 12) as usize;
    if doff < 5 || doff * 4 > ip_len - ihl * 4 {
        return pass(Some(gc::MALFORMED));
    }
    if flags & TCP_SYN != 0 && flags & (TCP_RST | TCP_FIN) != 0 {
        return drop(gc::BAD_TCP_FLAGS);
    }
    let key = FlowKey {
        src_be: saddr_be,
        dst_be: daddr_be,
        sport_be: unsafe { (*tcp).source_be },
        dport_be: unsafe { (*tcp).dest_be },
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let Some(cfg) = CONFIG.get(0) else {
        return pass(None);
    };
    // Coarse time (jiffies resolution) is plenty for timeouts and much cheaper per packet.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    // SAFETY: ptr_at checked the TCP header.
    let seq_be = unsafe { (*tcp).seq_be };
    if let Some(flow) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for this program run; racing writers only touch
        // last_seen/flags (flags atomically), for which a torn read is harmless.
        let f = unsafe { &mut *flow };
        if !f.expired(now, cfg) && !(syn && !retransmitted_syn(&key, f, seq_be, now, cfg)) {
            // Reset by the operator or on_down = "reset": the sender learns by an RST (a reset it
            // sends itself is forwarded, so the other end learns too). The connection is closed
            // (both entries age out after closed_timeout) but stays marked, so the other end's
            // next packet gets its RST as well.
            if f.flags & FLOW_RESET != 0 && flags & TCP_RST == 0 {
                set_flags_both(&key, f, FLOW_RST, now);
                return reset::answer(ctx, ip, tcp, ihl, doff, now, gc::RESET_FLOW);
            }
            // A reply entry's first packet: when its SYN was forwarded (precise, see below).
            let sent_ns = f.last_seen_ns;
            // The coarse clock ticks every few ms: skip the write (and the cache-line bounce
            // between CPUs) while it has not moved.
            if f.last_seen_ns != now {
                f.last_seen_ns = now;
            }
            let to_backend = f.flags & FLOW_TO_BACKEND != 0;
            let mut stale_rst = false;
            // Checksum changes, applied once before the packet leaves (see `frame`).
            let mut rest = Delta::default();
            if !to_backend && f.flags & (FLOW_HALF_OPEN | FLOW_ANSWERED) == FLOW_HALF_OPEN {
                // The backend's first answer to a SYN: passive health counts it.
                let syn_ack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
                let mut rst = flags & TCP_RST != 0;
                if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_ACK && f.flags & FLOW_COOKIE == 0 {
                    // A bare ACK of an old connection: TIME_WAIT with no listener becomes an RST,
                    // so the client learns at once (see passive::stale_answer). A SYN-cookie
                    // flow's client is connected already: the SYN proxy answers it instead.
                    let stale = passive::stale_answer(tcp, f, sent_ns, &mut rest);
                    stale_rst = stale != Stale::Collision;
                    rst = stale == Stale::Refused;
                    if stale_rst {
                        flags |= TCP_RST;
                    }
                }
                passive::answer(f, rst, syn_ack, now);
            }
            if f.flags & FLOW_COOKIE != 0 && f.half_open() {
                // A SYN-cookie flow whose backend has not answered: the SYN proxy's.
                ctx.hand_over();
                return Verdict {
                    action: xdp_action::XDP_DROP,
                    reason: None,
                };
            }
            // The sequence number that follows this segment: its payload, and one for a FIN.
            let seq = u32::from_be(seq_be);
            let seq_end = seq
                .wrapping_add((ip_len - ihl * 4 - doff * 4) as u32)
                .wrapping_add(u32::from(flags & TCP_FIN != 0));
            if f.flags & FLOW_HALF_OPEN != 0 && to_backend && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
            {
                // The client's ACK completes its handshake: the flow is established.
                // SAFETY: ptr_at checked the TCP header.
                established(
                    &key,
                    f,
                    seq,
                    seq_end,
                    u32::from_be(unsafe { (*tcp).ack_seq_be }),
                    now,
                );
            }
            if f.flags & (FLOW_HALF_OPEN | FLOW_DSR) == 0 {
                // Established NAT flow: `next_seq_be` follows this direction's next sequence number.
                let next = u32::from_be(f.next_seq_be);
                if flags & TCP_RST != 0 {
                    if !rst_closes(&key, f, seq, next) {
                        // Forwarded for the endpoint to judge, without marking the flow.
                        count(gc::RST_NOT_TAKEN, len);
                        flags &= !(TCP_RST | TCP_FIN);
                    }
                } else {
                    // Whether the segment continues what was sent, as the receiving stack would
                    // take it: it reaches `next` from at or before it (in order, or resent), or
                    // starts past a gap (reordered before the LB) the receiver has acknowledged
                    // up to it. A blind attacker must hit the very number.
                    let continues = ((next.wrapping_sub(seq) as i32) >= 0
                        && (seq_end.wrapping_sub(next) as i32) >= 0)
                        || (within(seq, next, -1, SEQ_BEHIND) && acknowledged(&key, f, seq));
                    if flags & TCP_FIN != 0 && !continues {
                        // Not this connection's end: marks nothing (a FIN past a gap not yet
                        // acknowledged leaves the flow to idle_timeout, unless resent).
                        flags &= !TCP_FIN;
                    }
                    // From the sender's own place in its stream (at most `NEAR` behind what it
                    // has sent, as a challenge ACK or a resent segment is), not a guess at it.
                    let near = within(seq, next, NEAR, 0);
                    if near && f.flags & FLOW_RST != 0 && f.flags & FLOW_RESET == 0 {
                        // Traffic after an RST: an endpoint did not take it (answered it with a
                        // challenge ACK, RFC 5961), so the connection lives on. After a real
                        // reset the last word is an RST again (a closed socket answers each
                        // segment still in flight with one), which marks the flow once more.
                        clear_rst_both(&key, f);
                    }
                    // `next` moves as the receiving stack's does, so a blind stream of segments
                    // cannot drag it to a number it then knows. Segments without payload or FIN
                    // send nothing.
                    if flags & TCP_SYN == 0
                        && continues
                        && seq_end != seq
                        && (seq_end.wrapping_sub(next) as i32) > 0
                    {
                        f.next_seq_be = seq_end.to_be();
                    }
                    // What the sender has received of the other direction (see `rst_closes`); a
                    // NAT flow's `syn_seq_be` is free once established.
                    if near && f.flags & FLOW_COOKIE == 0 && flags & TCP_ACK != 0 {
                        // SAFETY: ptr_at checked the TCP header.
                        let ack = u32::from_be(unsafe { (*tcp).ack_seq_be });
                        if within(ack, u32::from_be(f.syn_seq_be), -1, SEQ_BEHIND) {
                            f.syn_seq_be = ack.to_be();
                        }
                    }
                }
            }
            if flags & (TCP_FIN | TCP_RST) != 0 {
                let bit = if flags & TCP_RST != 0 {
                    FLOW_RST
                } else if to_backend {
                    FLOW_FIN_CLIENT
                } else {
                    FLOW_FIN_BACKEND
                };
                // Atomic: the client's and the backend's FIN often cross on two CPUs, and a
                // lost bit leaves one direction open for idle_timeout.
                set_flags_both(&key, f, bit, now);
                if bit == FLOW_FIN_BACKEND && f.flags & FLOW_FIN_CLIENT != 0 {
                    // The backend closes second: until the client's last ACK reaches it, it
                    // holds the 4-tuple in LAST_ACK and answers a new SYN there with a challenge
                    // ACK, which must not be taken for a dead listener's TIME_WAIT.
                    passive::hold(f);
                }
            }
            count_traffic(f, to_backend, len, false);
            if f.flags & FLOW_DSR != 0 {
                return dsr::known_flow(ctx, f, now, cfg);
            }
            let pseudo = rewrite(ip, tcp, &key, f, &mut rest);
            if f.flags & FLOW_TS != 0 {
                rest = translate_timestamps(ctx, l4_off, doff, to_backend, f.ts_delta, stale_rst, rest);
            }
            if f.flags & FLOW_COOKIE != 0 {
                rest = synproxy::translate(tcp, to_backend, f, rest);
            }
            // SAFETY: the IPv4 header was bounds-checked above (and is read before the checksum
            // helpers, after which the TC hook's packet pointers are no longer valid).
            let tos = unsafe { (*ip).tos };
            ctx.fix_l4(l4_off, pseudo, rest);
            // A reply entry's first packet has no next hop yet: see `hop`.
            return hop::forward(ctx, f, tos, now, cfg.cpus);
        }
    }

    let service_key = ServiceKey::tcp(key.dst_be, key.dport_be);
    let Some(service) = (unsafe { SERVICES.get(service_key) }) else {
        if stray_reply(&key, cfg) {
            return reset::answer(ctx, ip, tcp, ihl, doff, now, gc::NO_REPLY_FLOW);
        }
        return pass(None);
    };
    let dsr = service.flags & SERVICE_DSR != 0;
    // The SYN proxy answers IPv4 headers without options (real clients send none): with cookies
    // on, a SYN with options would open a flow past them.
    if !dsr && syn && ihl != 5 && synproxy::cookies_on() {
        return drop(gc::SYN_IP_OPTIONS);
    }
    // SYN cookies (NAT services, IPv4 headers without options): a SYN while they are on, and any
    // ACK without a connection (it may carry a cookie), go to the SYN proxy.
    if !dsr
        && ihl == 5
        && (if syn {
            synproxy::cookies_on()
        } else {
            flags & (TCP_ACK | TCP_RST) == TCP_ACK
        })
    {
        ctx.hand_over();
    }
    if !syn && !dsr {
        // A connection the LB does not know (idle timeout, LRU eviction, a restart after `lb
        // cleanup`): the client learns by an RST and reconnects instead of retransmitting for minutes.
        return reset::answer(ctx, ip, tcp, ihl, doff, now, gc::NO_CONNTRACK);
    }
    clear_affinity_pending();
    let Some((backend_index, backend)) = select_backend(service, key.src_be, cfg, now, len) else {
        return drop(gc::NO_BACKEND);
    };
    if dsr {
        // No handshake to wait for (the backend answers the client directly).
        if affinity_pending() {
            write_affinity(service.slot, key.src_be, backend_index, now);
        }
        // Mid-flow packets too: see the `dsr` module.
        return dsr::new_flow(
            ctx,
            &key,
            service,
            backend_index,
            &backend,
            syn,
            seq_be,
            now,
            cfg,
            len,
        );
    }
    // Both entries are built in this CPU's scratch slots, not on the stack (the program's stack is
    // nearly full): the client → backend one in slot 0, the reply entry in slot 1.
    let (Some(forward_slot), Some(reply_slot)) = (dsr::SCRATCH.get_ptr_mut(0), dsr::SCRATCH.get_ptr_mut(1))
    else {
        return drop(gc::SNAT_EXHAUSTED);
    };
    // SAFETY: this CPU's slots, used only within this run.
    let (forward_value, reply_value) = unsafe { (&mut *forward_slot, &mut *reply_slot) };
    *reply_value = FlowValue {
        new_src_be: key.dst_be,
        new_dst_be: key.src_be,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        backend: backend_index,
        service_slot: service.slot,
        flags: FLOW_HALF_OPEN,
        // Precise: a stale answer compares it with the backend's last SYN-ACK (passive).
        last_seen_ns: passive::precise_now(),
        // The client's SYN, for an answer that refuses it (passive::stale_answer).
        syn_seq_be: seq_be,
        ..FlowValue::default()
    };
    // Toward the backend, timestamps follow the LB's clock (see FlowValue::ts_delta).
    let ts_delta = timestamp_option(ctx, l4_off, doff)
        .and_then(|at| ptr_at::<u32>(ctx, at))
        // SAFETY: ptr_at checked the TSval lies in the packet.
        .map(|tsval| ((now / 1_000_000) as u32).wrapping_sub(u32::from_be(unsafe { *tsval })));
    if let Some(delta) = ts_delta {
        reply_value.flags |= FLOW_TS;
        reply_value.ts_delta = delta;
    }
    let Some(snat_port_be) = claim_snat(&backend, cfg, now, reply_value, len) else {
        // Actionable (widen [xdp] snat_ports): worth a log line, unlike per-packet events; under a
        // flood it repeats per packet, hence the rate limit.
        if let Some(suppressed) = may_log(LOG_SNAT_EXHAUSTED, now, cfg.cpus) {
            aya_log_ebpf::warn!(
                ctx,
                "no free SNAT port toward backend {:i} ({} such lines suppressed before this one)",
                u32::from_be(backend.addr_be),
                suppressed
            );
        }
        return drop(gc::SNAT_EXHAUSTED);
    };
    forward_value.new_src_be = backend.snat_be;
    forward_value.new_dst_be = backend.addr_be;
    forward_value.new_sport_be = snat_port_be;
    forward_value.new_dport_be = backend.port_be;
    forward_value.backend = backend_index;
    forward_value.service_slot = service.slot;
    // Read from memory, not carried in a register from the selection: the verifier would
    // otherwise walk the rest of the path twice.
    forward_value.flags = FLOW_TO_BACKEND | FLOW_HALF_OPEN | (forward_value.flags & FLOW_AFFINITY_PENDING);
    forward_value.next_hop_ifindex = 0;
    forward_value.next_hop_macs = [0; 12];
    forward_value.last_seen_ns = now;
    forward_value.next_hop_at = 0;
    forward_value.next_seq_be = 0;
    forward_value.ts_delta = 0;
    forward_value.syn_seq_be = seq_be;
    let mut rest = Delta::default();
    let pseudo = rewrite(ip, tcp, &key, forward_value, &mut rest);
    if let Some(delta) = ts_delta {
        forward_value.flags |= FLOW_TS;
        forward_value.ts_delta = delta;
        rest = translate_timestamps(ctx, l4_off, doff, true, delta, false, rest);
    }
    // SAFETY: as above (read before the checksum helpers).
    let tos = unsafe { (*ip).tos };
    ctx.fix_l4(l4_off, pseudo, rest);
    // The next hop is found before the entry is stored, so it is stored with it.
    let verdict = hop::forward(ctx, forward_value, tos, now, cfg.cpus);
    // The client reused a port of an earlier connection still on record: that connection is over
    // (its reply entry, if still its own, ages out as closed; its port is free after closed_timeout),
    // and the new flow's entry is stored over its entry (`store_forward`). Looked up again, not
    // the top lookup's pointer: claim_snat may have removed that entry (a half-open flow whose
    // port it reclaimed), and an element removed from an LRU map is reused at once, so only a
    // lookup now says the element is this 4-tuple's.
    let mut stored = false;
    if let Some(p) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for this run.
        let old = unsafe { &*p };
        retire_for(&key, old, forward_value);
        stored = old.flags & FLOW_TO_BACKEND != 0 && store_forward(p, forward_value);
    }
    #[allow(
        clippy::needless_borrows_for_generic_args,
        reason = "a reference into the scratch map: `*forward_value` would copy the entry onto the stack"
    )]
    let stored = stored || CONNTRACK.insert(&key, &*forward_value, 0).is_ok();
    if !stored {
        let _ = CONNTRACK.remove(FlowKey::reverse_of(forward_value));
        return drop(gc::SNAT_EXHAUSTED);
    }
    count(gc::NEW_FLOWS, len);
    passive::syn_sent(backend_index);
    count_traffic(forward_value, true, len, true);
    verdict
}

/// The IPv4 header's lengths against each other and the frame (`ip_bytes`: the frame after
/// Ethernet): a verdict when they disagree. Rule: such frames are passed, never dropped, and
/// counted. The kernel's own input checks drop them as well (and count them in its SNMP
/// counters), and the host's own traffic is never judged by the load balancer; what matters is
/// that none of them reaches the conntrack, affinity or SNAT code.
/// - `ihl` < 5, or the total length shorter than the header: `malformed`;
/// - the frame shorter than the total length: `truncated` (Ethernet padding makes a frame longer
///   than its total length; that is fine).
///
/// The TCP header must then fit in the total length, and its data offset too (`malformed`).
#[inline(always)]
fn check_ip(ip_bytes: usize, ihl: usize, ip_len: usize) -> Option<Verdict> {
    if ihl < 5 || ip_len < ihl * 4 {
        return Some(pass(Some(gc::MALFORMED)));
    }
    if ip_bytes < ip_len {
        return Some(pass(Some(gc::TRUNCATED)));
    }
    None
}

/// A source no TCP peer can have: 0.0.0.0/8, loopback 127/8, multicast 224/4, the limited broadcast
/// 255.255.255.255, or the destination address itself (a VIP "talking to itself": Linux would drop
/// it as a martian, but lb sets accept_local on its interfaces). Class E (240/4) stays allowed:
/// Linux accepts it as unicast. Rule: dropped and counted (`bad_source`), for every destination.
#[inline(always)]
fn impossible_source(saddr_be: u32, daddr_be: u32) -> bool {
    let s = u32::from_be(saddr_be);
    let first = s >> 24;
    first == 0 || first == 127 || s >> 28 == 0xe || s == u32::MAX || saddr_be == daddr_be
}

/// Picks the backend for a SYN without a connection by the shared rules
/// ([`lb_common::select::select`]: affinity, else the Maglev ring, with the failover home), over
/// this service's affinity entry, the backends array and its slice of the ring. A choice that has
/// just refused a SYN is replaced by another backend when one is not refusing ([`passive`]).
#[inline(always)]
fn select_backend(
    service: &ServiceValue,
    client_be: u32,
    cfg: &GlobalConfig,
    now: u64,
    len: u64,
) -> Option<(u32, BackendValue)> {
    let policy = Policy {
        seed: cfg.seed,
        affinity_timeout_ns: service.affinity_timeout_ns,
    };
    let mut affinity = KernelAffinity::new(
        AffinityKey {
            service_slot: service.slot,
            client_be,
        },
        policy.affinity_timeout_ns,
    );
    let view = KernelService {
        slot: service.slot,
        ring_size: cfg.ring_size,
    };
    let choice = select(
        &policy,
        None,
        u32::from_be(client_be),
        now,
        &mut affinity,
        &view,
        &view,
        |_| false,
        1,
    )?;
    let mut index = choice.backend;
    if passive::is_refusing(index, now)
        && let Some(other) = passive::elsewhere(service.slot, u32::from_be(client_be), cfg, index, now)
    {
        // The client failed over: its affinity entry remembers the refusing one as its home.
        if policy.affinity_timeout_ns != 0 {
            affinity.put(&next_entry(affinity.get(), other, now));
        }
        count(gc::REFUSING_AVOIDED, len);
        index = other;
    }
    // A copy, read once: user space may clear the entry at any moment (a backend removed), and
    // the fields read later must be the ones checked here.
    let backend = *BACKENDS.get(index)?;
    (backend.flags & BACKEND_PRESENT != 0).then_some((index, backend))
}

/// A hit refreshes its affinity entry's `last_seen_ns` at most this often (and at most every
/// sixteenth of the service's `affinity_timeout`), by a store into the entry rather than an LRU
/// insert per SYN. An entry can thus expire up to that step before `affinity_timeout` has passed
/// since the client's last SYN: at most 1 s, and never more than 1/16 of the timeout.
const AFFINITY_REFRESH_NS: u64 = 1_000_000_000;

/// A client's affinity entry in the `AFFINITY` map, looked up once per SYN.
struct KernelAffinity {
    key: AffinityKey,
    /// Where the entry found lives (until an insert replaces it) and what it held (or what was
    /// last stored).
    slot: Option<*mut AffinityValue>,
    value: Option<AffinityValue>,
    /// Refresh step: a hit younger than this leaves the entry alone.
    step_ns: u64,
}

impl KernelAffinity {
    #[inline(always)]
    fn new(key: AffinityKey, timeout_ns: u64) -> KernelAffinity {
        // Affinity off: the selection never asks.
        let slot = if timeout_ns == 0 {
            None
        } else {
            AFFINITY.get_ptr_mut(key)
        };
        KernelAffinity {
            key,
            slot,
            // SAFETY: map value pointer valid for this run (racing CPUs replace the entry by an
            // insert, which links a new element, or store its last_seen: one word).
            value: slot.map(|p| unsafe { *p }),
            step_ns: if timeout_ns / 16 < AFFINITY_REFRESH_NS {
                timeout_ns / 16
            } else {
                AFFINITY_REFRESH_NS
            },
        }
    }
}

impl AffinitySlot for KernelAffinity {
    #[inline(always)]
    fn get(&self) -> Option<AffinityValue> {
        self.value
    }
    /// The same backend and home (a hit): `last_seen_ns` is written in place, and only once the
    /// entry is a step old. Safe between CPUs: it is one aligned 8-byte store of the only field
    /// that changes, so a reader sees the old or the new time, never a mix; two CPUs refreshing at
    /// once both store a current time. Anything else (a miss, another backend or home) is an
    /// insert, which replaces the whole entry at once.
    #[inline(always)]
    fn put(&mut self, value: &AffinityValue) {
        if let (Some(p), Some(old)) = (self.slot, self.value)
            && old.backend == value.backend
            && old.home == value.home
        {
            if value.last_seen_ns.saturating_sub(old.last_seen_ns) >= self.step_ns {
                // SAFETY: map value pointer valid for this run (see above).
                unsafe { (*p).last_seen_ns = value.last_seen_ns };
                self.value = Some(*value);
            }
            return;
        }
        if self.slot.is_none() && self.value.is_none() {
            // A client the map does not hold: its entry waits (see `affinity_pending`). A second
            // put in this run (the choice refusing, so a failover home to remember) inserts.
            self.value = Some(*value);
            mark_affinity_pending();
            return;
        }
        let _ = AFFINITY.insert(self.key, value, 0);
        self.slot = None;
        self.value = Some(*value);
    }
}

/// A new client's affinity entry is written when its handshake completes ([`established`], with
/// [`FLOW_AFFINITY_PENDING`] on its flow), not on its SYN: SYNs from spoofed addresses, which never
/// complete one, would otherwise push real clients' entries out of the LRU map (and so their
/// sessions off their backends) without ever showing a SYN flood. The mark is kept in the flags of
/// this CPU's scratch flow entry, which the new flow's entry is then built in.
#[inline(always)]
fn mark_affinity_pending() {
    if let Some(p) = dsr::SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, used only within this run.
        unsafe { (*p).flags = FLOW_AFFINITY_PENDING };
    }
}

#[inline(always)]
pub(crate) fn clear_affinity_pending() {
    if let Some(p) = dsr::SCRATCH.get_ptr_mut(0) {
        // SAFETY: as above.
        unsafe { (*p).flags = 0 };
    }
}

#[inline(always)]
pub(crate) fn affinity_pending() -> bool {
    // SAFETY: as above.
    dsr::SCRATCH
        .get_ptr_mut(0)
        .is_some_and(|p| unsafe { (*p).flags } & FLOW_AFFINITY_PENDING != 0)
}

/// A client's first affinity entry (no failover home), unless one of its other connections has
/// written one meanwhile.
#[inline(always)]
pub(crate) fn write_affinity(service_slot: u32, client_be: u32, backend: u32, now: u64) {
    let entry = AffinityValue {
        backend,
        home: lb_common::maps::NO_BACKEND,
        last_seen_ns: now,
    };
    let owner = AffinityKey {
        service_slot,
        client_be,
    };
    let _ = AFFINITY.insert(owner, entry, u64::from(BPF_NOEXIST));
}

/// One service's backends (by its slot) and its slice of the `RING` array.
struct KernelService {
    slot: u32,
    ring_size: u32,
}

impl BackendTable for KernelService {
    #[inline(always)]
    fn admits_known(&self, index: u32) -> bool {
        let want = BACKEND_PRESENT | BACKEND_ADMITS_KNOWN;
        BACKENDS
            .get(index)
            .is_some_and(|b| b.flags & want == want && b.service_slot == self.slot)
    }
}

impl Ring for KernelService {
    #[inline(always)]
    fn size(&self) -> u32 {
        self.ring_size
    }
    #[inline(always)]
    fn get(&self, slot: u32) -> Option<u32> {
        RING.get(self.slot.wrapping_mul(self.ring_size).wrapping_add(slot))
            .copied()
    }
}

/// Whether a SYN on the known flow `f` (entry `key`) retransmits the SYN that opened it: a
/// client → backend entry of an open connection, the same initial sequence number, and the reply
/// entry still this flow's own and live. Anything else is a new connection on a reused 4-tuple: it
/// gets a new flow (and SNAT port). Forwarding it on the old entry would send it out on the old
/// SNAT port, whose reply entry may already be gone or another flow's; the backend's SYN-ACK would
/// then miss the program and the LB's own stack would reset it.
#[inline(always)]
fn retransmitted_syn(key: &FlowKey, f: &FlowValue, seq_be: u32, now: u64, cfg: &GlobalConfig) -> bool {
    // Its backend went down (or was disabled) or refused a SYN meanwhile: the client's retry
    // chooses again instead of waiting on it.
    if f.flags & FLOW_TO_BACKEND == 0 || f.closed() || passive::given_up(f.backend, now) {
        return false;
    }
    // An established connection that neither side has begun to close keeps its 4-tuple: a SYN on
    // it, whatever its sequence number, goes to its backend, whose stack answers with a challenge
    // ACK (RFC 5961 4.2). A blind attacker's SYN so replaces nothing; a client that lost its side
    // of the connection answers the challenge with an RST, which closes the flow, and its next
    // SYN opens a new one. After a FIN (the other one may have been missed) the client may
    // rightly reuse the 4-tuple: a new flow, as for a SYN with a new sequence number below.
    if f.flags & (FLOW_HALF_OPEN | FLOW_DSR | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND) == 0 {
        return true;
    }
    // An established NAT flow's `syn_seq_be` is an acknowledgment number by now.
    if f.syn_seq_be != seq_be || f.flags & (FLOW_HALF_OPEN | FLOW_DSR) == 0 {
        return false;
    }
    if f.flags & FLOW_DSR != 0 {
        return true; // no reply entry to check
    }
    other_entry(key, f).is_some_and(|reply| !reply.expired(now, cfg))
}

/// The other entry of the flow whose entry at `key` is `f`, while it is still this flow's (a new
/// flow may have taken its SNAT port).
#[inline(always)]
fn other_entry(key: &FlowKey, f: &FlowValue) -> Option<&'static FlowValue> {
    // SAFETY: read-only use of a map value for this run.
    unsafe { CONNTRACK.get(FlowKey::reverse_of(f)) }.filter(|o| same_flow(&FlowKey::reverse_of(o), key))
}

/// The last acknowledgment the receiver of the established NAT flow `f` (at `key`) sent: its
/// entry's `syn_seq_be`. None for SYN-cookie flows, which keep a sequence delta there.
#[inline(always)]
fn receiver_ack(key: &FlowKey, f: &FlowValue) -> Option<u32> {
    if f.flags & FLOW_COOKIE != 0 {
        return None;
    }
    other_entry(key, f).map(|r| u32::from_be(r.syn_seq_be))
}

/// Field-wise key equality (a derived `==` compiles to a `bcmp` call the verifier rejects).
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    a.src_be == b.src_be && a.dst_be == b.dst_be && a.sport_be == b.sport_be && a.dport_be == b.dport_be
}

/// [`retire`] for the earlier connection `old` replaced by the new flow whose client → backend
/// entry is `new`. When the new flow got the earlier one's very SNAT port back (its closed or
/// half-open flow's port reclaimed), the reply entry there is the new flow's: left alone.
#[inline(always)]
pub(crate) fn retire_for(key: &FlowKey, old: &FlowValue, new: &FlowValue) {
    if old.new_sport_be != new.new_sport_be
        || old.new_src_be != new.new_src_be
        || old.new_dst_be != new.new_dst_be
        || old.new_dport_be != new.new_dport_be
    {
        retire(key, old);
    }
}

/// Ends the earlier connection recorded under `key` (replaced by a new flow): its reply entry, if it
/// is still that connection's, is marked reset so it ages out after closed_timeout.
#[inline(always)]
fn retire(key: &FlowKey, old: &FlowValue) {
    if old.flags & FLOW_TO_BACKEND == 0 {
        return;
    }
    if let Some(reply) = CONNTRACK.get_ptr_mut(FlowKey::reverse_of(old)) {
        // SAFETY: valid map value pointer for this run.
        let r = unsafe { &mut *reply };
        if same_flow(&FlowKey::reverse_of(r), key) {
            set_flags(&mut r.flags, FLOW_RST);
        }
    }
}

/// Stores the new flow's client → backend entry `value` over the earlier flow's entry `p` (just
/// looked up under the same 4-tuple) instead of an LRU insert (which takes a free element, links
/// it and frees the old one: the SYN path's dearest map operation when clients reuse 4-tuples);
/// false when another CPU's store got mixed in (the caller then inserts). Why this is safe
/// between CPUs, writer by writer:
/// - Packets of the earlier connection (late, on another CPU) may read the entry while it is
///   written and see a mix of both translations. That connection is over (its client opened a
///   new one on the same 4-tuple, so it holds no socket for it any more): such a packet would be
///   forwarded on the new flow's entry after an insert as well, and a mix reaches at worst a port
///   the backend answers with an RST, which finds no flow (`no_reply_flow`). Their own stores
///   (flag bytes, last_seen, next hop) land before or after this store, as after an insert.
/// - Two SYNs of this 4-tuple on two CPUs at the same instant (a duplicate; RSS keeps a
///   4-tuple's packets on one queue) may both store here, each with its own SNAT port. The
///   fields of the two values differ only in port, times and `ts_delta`; the port and
///   `ts_delta` must be one flow's (its reply entry translates timestamps back by the same
///   delta). Each CPU reads them back after its store: one that finds another CPU's there
///   (false) replaces the entry by an insert (atomic). The last CPU to store a field reads the
///   final state, so a mix left behind is always replaced; the other's reply entry ages out unused.
/// - Removal or LRU eviction of the element between the lookup and this store (a few
///   instructions) is the hazard every store into a map value in this program has; an insert
///   instead would free the old element under the pointers other CPUs hold to it.
#[inline(always)]
fn store_forward(p: *mut FlowValue, value: &FlowValue) -> bool {
    // SAFETY: map value pointer valid for this run; volatile reads so the check reads memory
    // (other CPUs' stores), not the values just written.
    unsafe {
        core::ptr::copy_nonoverlapping(value, p, 1);
        core::ptr::read_volatile(&raw const (*p).new_sport_be) == value.new_sport_be
            && core::ptr::read_volatile(&raw const (*p).ts_delta) == value.ts_delta
    }
}

/// Whether a packet for no service and no live flow is a backend's reply that lost its flow:
/// addressed to one of the LB's SNAT addresses on a SNAT port. It is answered with an RST (the
/// backend learns its connection is gone), never passed to the LB's own stack. Anything else is
/// the host's own traffic and passed.
#[inline(always)]
fn stray_reply(key: &FlowKey, cfg: &GlobalConfig) -> bool {
    let port = u16::from_be(key.dport_be);
    port >= cfg.snat_port_lo && port <= cfg.snat_port_hi && unsafe { SNAT_ADDRS.get(key.dst_be) }.is_some()
}

/// [`set_flags`] on the entry `f` (found by `key`) and on its other direction's entry, while that
/// is still this flow's: a client that reused its 4-tuple for a newer flow (on another SNAT port)
/// has that flow's entry there, which a late FIN or RST of the old flow must not mark. The other
/// entry's `last_seen_ns` moves up to `now` too, so either entry alone tells when the connection
/// last closed a direction (a reply entry decides when its port may be reused: [`classify`]).
#[inline(always)]
pub(crate) fn set_flags_both(key: &FlowKey, f: &mut FlowValue, bit: u32, now: u64) {
    set_flags(&mut f.flags, bit);
    if let Some(other) = CONNTRACK.get_ptr_mut(FlowKey::reverse_of(f)) {
        // SAFETY: valid map value pointer for this run.
        let other = unsafe { &mut *other };
        if same_flow(&FlowKey::reverse_of(other), key) {
            set_flags(&mut other.flags, bit);
            other.last_seen_ns = now;
        }
    }
}

/// Sets one of the FLOW_FIN_CLIENT / FLOW_FIN_BACKEND / FLOW_RST bits, which other CPUs may set
/// at the same time (the client's and the backend's FIN often cross on two CPUs). Each of these
/// bits has a byte of its own, so setting it is a one-byte store, not a read-modify-write of the
/// whole word that could undo another CPU's bit (BPF has no 32-bit atomic OR before CPU v3).
#[inline(always)]
fn set_flags(flags: &mut u32, bit: u32) {
    if *flags & bit != bit {
        let byte = bit.trailing_zeros() / 8;
        // SAFETY: `byte` < 4 indexes into the u32; the target is little-endian (bpfel).
        unsafe {
            *core::ptr::from_mut::<u32>(flags).cast::<u8>().add(byte as usize) = (bit >> (byte * 8)) as u8;
        };
    }
}

/// Clears [`FLOW_HALF_OPEN`] on the client → backend entry `f` (at `key`) and on its reply entry
/// while that is still this flow's. Byte 0 of the flags is stored whole with its other bits kept
/// (they are set at creation; FIN/RST bits live in bytes of their own). From here on each entry's
/// `next_seq_be` holds the next sequence number its direction's sender has sent (see
/// [`rst_closes`]): the client's after this ACK (`client_next`), the backend's as the client
/// acknowledges it (`backend_next`); and `syn_seq_be` what that sender has acknowledged of the
/// other direction (see [`rst_closes`]): the backend, with its SYN-ACK, the ACK's own
/// sequence number (`client_seq`).
#[inline(always)]
fn established(
    key: &FlowKey,
    f: &mut FlowValue,
    client_seq: u32,
    client_next: u32,
    backend_next: u32,
    now: u64,
) {
    if f.flags & FLOW_AFFINITY_PENDING != 0 {
        // The client's first completed handshake: its affinity entry.
        write_affinity(f.service_slot, key.src_be, f.backend, now);
    }
    f.next_seq_be = client_next.to_be();
    f.syn_seq_be = backend_next.to_be();
    clear_low_flag(&mut f.flags, FLOW_HALF_OPEN);
    if let Some(reply) = CONNTRACK.get_ptr_mut(FlowKey::reverse_of(f)) {
        // SAFETY: valid map value pointer for this run.
        let r = unsafe { &mut *reply };
        if same_flow(&FlowKey::reverse_of(r), key) {
            r.next_seq_be = backend_next.to_be();
            r.syn_seq_be = client_seq.to_be();
            clear_low_flag(&mut r.flags, FLOW_HALF_OPEN);
        }
    }
}

/// How far behind its sender's next sequence number a segment may start, and an acknowledgment
/// lag, and still be taken for the connection's own: what was in flight (Linux's largest default
/// receive window is 6 MiB); also how far past a gap an acknowledged segment may start.
const SEQ_BEHIND: i32 = 8 << 20;
/// How far behind its sender's next sequence number a segment may start and still clear an RST
/// mark or move its sender's acknowledgment: a challenge ACK or a bare ACK is at `next`, a resent
/// segment a little behind.
const NEAR: i32 = 64 << 10;

/// Whether the receiver of the established NAT flow `f` (at `key`) has acknowledged up to `seq`
/// of `f`'s sender: then a segment starting there, past `f`'s next sequence number, came after a
/// gap the LB did not see filled (reordering before it), not from a blind attacker. SYN-cookie
/// flows keep no acknowledgment: their next number waits for the gap to be filled.
#[inline(always)]
fn acknowledged(key: &FlowKey, f: &FlowValue, seq: u32) -> bool {
    receiver_ack(key, f).is_some_and(|acked| (acked.wrapping_sub(seq) as i32) >= 0)
}

/// Whether `seq` lies from `behind` before `next` to `ahead` after it (sequence space wraps).
#[inline(always)]
fn within(seq: u32, next: u32, behind: i32, ahead: i32) -> bool {
    (-behind..=ahead).contains(&(seq.wrapping_sub(next) as i32))
}

/// Whether an RST with sequence number `seq` on the established NAT flow `f` (at `key`, sender's
/// next sequence number `next`) closes the flow: only at a number where the receiving stack takes
/// an RST (RFC 5961 3.2, and Linux's `tcp_reset_check`): exactly `next` or what the receiver
/// acknowledged last, or one below either (a receiver that has taken the sender's FIN also takes
/// the FIN's own number). Any other RST is still forwarded, for the endpoint to judge (it answers
/// one in its window with a challenge ACK, at most twice a second), but changes nothing here: a
/// blind attacker's RSTs end a connection through the LB no more often than one sent straight to
/// the endpoint, and a real RST is never lost, even when a spoofed stream has moved `next`.
///
/// The receiver's acknowledgment is its entry's `syn_seq_be`, not used when it is more than
/// [`SEQ_BEHIND`] behind `next` (that entry missed a big one) nor for SYN-cookie flows (a delta is
/// kept there).
#[inline(always)]
fn rst_closes(key: &FlowKey, f: &FlowValue, seq: u32, next: u32) -> bool {
    if within(seq, next, 1, 0) {
        return true;
    }
    receiver_ack(key, f).is_some_and(|acked| within(acked, next, SEQ_BEHIND, 0) && within(seq, acked, 1, 0))
}

/// Clears [`FLOW_RST`] on `f` (at `key`) and on its other entry, only while that is still this
/// flow's: once a new flow has taken the SNAT port of the reset one, the reset stands (reviving
/// the old entry would send its packets into the new connection).
#[inline(always)]
fn clear_rst_both(key: &FlowKey, f: &mut FlowValue) {
    if let Some(other) = CONNTRACK.get_ptr_mut(FlowKey::reverse_of(f)) {
        // SAFETY: valid map value pointer for this run.
        let other = unsafe { &mut *other };
        if same_flow(&FlowKey::reverse_of(other), key) {
            clear_rst(&mut other.flags);
            clear_rst(&mut f.flags);
        }
    }
}

/// Zeroes the byte that holds [`FLOW_RST`] alone.
#[inline(always)]
fn clear_rst(flags: &mut u32) {
    let byte = FLOW_RST.trailing_zeros() / 8;
    // SAFETY: `byte` < 4 indexes into the u32.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::from_mut::<u32>(flags).cast::<u8>().add(byte as usize),
            0,
        );
    }
}

/// Clears `bit` (of byte 0) with a one-byte store that keeps byte 0's other bits.
#[inline(always)]
fn clear_low_flag(flags: &mut u32, bit: u32) {
    // SAFETY: byte 0 of the u32 (little-endian target).
    unsafe {
        let p = core::ptr::from_mut::<u32>(flags).cast::<u8>();
        let b = core::ptr::read_volatile(p);
        if u32::from(b) & bit != 0 {
            core::ptr::write_volatile(p, b & !(bit as u8));
        }
    }
}

/// What a SNAT port toward one backend holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortUse {
    /// No reply entry at all: taken without the port's lock (see [`take_port`]).
    Empty,
    /// No live flow: a reply entry expired whose client → backend entry (if it still points at the
    /// port) expired too. Taken under the port's lock (see [`take_port`]).
    Free,
    /// A half-open flow within its `syn_timeout`, quiet for [`HALF_OPEN_RECLAIM_NS`]: taken only
    /// when no port is free.
    HalfOpen,
    /// A closed connection quiet for [`CLOSED_REUSE_NS`], within its `closed_timeout`: taken like a
    /// free port (counted `closed_reused`).
    Closed,
    /// A live established (or closing) flow: never taken.
    Busy,
}

/// The reply key of SNAT port `port_be` toward `backend`.
#[inline(always)]
fn port_key(backend: &BackendValue, port_be: u16) -> FlowKey {
    FlowKey {
        src_be: backend.addr_be,
        dst_be: backend.snat_be,
        sport_be: backend.port_be,
        dport_be: port_be,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// The client → backend entry of the flow whose reply entry is `reply`, if it still points at
/// `key`'s port (the client may have reused its 4-tuple for a newer flow on another port).
#[inline(always)]
fn forward_of(key: &FlowKey, reply: &FlowValue) -> Option<(FlowKey, &'static FlowValue)> {
    let fwd_key = FlowKey::reverse_of(reply);
    // SAFETY: read-only use of a map value for this run.
    let fwd = unsafe { CONNTRACK.get(fwd_key) }?;
    (fwd.new_sport_be == key.dport_be && fwd.new_dst_be == key.src_be && fwd.new_src_be == key.dst_be)
        .then_some((fwd_key, fwd))
}

/// Classifies the port whose reply key is `key`.
#[inline(always)]
fn port_use(key: &FlowKey, cfg: &GlobalConfig, now: u64) -> PortUse {
    // SAFETY: read-only use of a map value for this run.
    match unsafe { CONNTRACK.get(*key) } {
        Some(old) => classify(key, old, cfg, now),
        None => PortUse::Empty,
    }
}

/// Classifies the port whose reply key is `key` and whose reply entry is `old`.
#[inline(always)]
fn classify(key: &FlowKey, old: &FlowValue, cfg: &GlobalConfig, now: u64) -> PortUse {
    if old.closed() {
        // Closed (a FIN or RST marks both entries and moves both their last_seen up): the reply
        // entry alone decides, and the client → backend entry is not looked up (in a
        // connection-per-request load nearly every port holds one). The only packet that may
        // follow is a last ACK, a round trip after the last FIN. A handshake ended by an RST
        // (still half-open) waits as long as a half-open flow does: computed without a branch,
        // which would double the verifier's states here.
        let quiet = now.saturating_sub(old.last_seen_ns);
        let half_open = u64::from((old.flags & FLOW_HALF_OPEN) >> FLOW_HALF_OPEN.trailing_zeros());
        let wait = CLOSED_REUSE_NS + half_open * (HALF_OPEN_RECLAIM_NS - CLOSED_REUSE_NS);
        return if old.expired(now, cfg) {
            PortUse::Free
        } else if quiet > wait {
            PortUse::Closed
        } else {
            PortUse::Busy
        };
    }
    let fwd = forward_of(key, old);
    let live = !old.expired(now, cfg) || fwd.is_some_and(|(_, f)| !f.expired(now, cfg));
    if !live {
        return PortUse::Free;
    }
    // Time since the flow's last packet either way.
    let last = match fwd {
        Some((_, f)) if f.last_seen_ns > old.last_seen_ns => f.last_seen_ns,
        _ => old.last_seen_ns,
    };
    let quiet = now.saturating_sub(last);
    let half_open = old.half_open() && fwd.is_none_or(|(_, f)| f.half_open());
    // A young half-open flow may be a real client whose ACK is on the way: it keeps its port.
    if half_open && quiet > HALF_OPEN_RECLAIM_NS {
        PortUse::HalfOpen
    } else {
        PortUse::Busy
    }
}

/// A port the claim loop found `Empty` (no reply entry): inserting `reply` with BPF_NOEXIST is
/// itself the atomic claim, no lock needed. Locks only keep two CPUs from both writing over one
/// old entry; a CPU holding this port's lock writes in place only over an entry it finds under the
/// lock (this insert, if it won, is one: it then finds the port busy), else it inserts with
/// BPF_NOEXIST too, so one port never goes to two flows either way.
#[inline(always)]
fn take_empty_port(key: &FlowKey, reply: &FlowValue) -> bool {
    CONNTRACK.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok()
}

/// Under the port's lock: if the port is (still) `Empty`, `Free` or `Closed`, or `HalfOpen` when
/// `reclaim`, stores `reply` as its reply entry: over the old flow's entry, in place (an LRU delete
/// and insert cost more than the rest of the claim; packets of the old flow, quiet for a while, meet
/// the new entry either way), else by an insert with BPF_NOEXIST. A half-open flow goes whole: its
/// client → backend entry is removed too, while it points at this port.
#[inline(always)]
fn take_port(
    key: &FlowKey,
    cfg: &GlobalConfig,
    now: u64,
    reply: &mut FlowValue,
    reclaim: bool,
    len: u64,
) -> bool {
    if SNAT_LOCKS.insert(key, 1, u64::from(BPF_NOEXIST)).is_err() {
        return false; // another CPU is claiming this port at this instant
    }
    let entry = CONNTRACK.get_ptr_mut(*key);
    let was = match entry {
        // SAFETY: map value pointer valid for this run.
        Some(p) => classify(key, unsafe { &*p }, cfg, now),
        None => PortUse::Empty,
    };
    let usable = match was {
        PortUse::Empty | PortUse::Free | PortUse::Closed => true,
        PortUse::HalfOpen => reclaim,
        PortUse::Busy => false,
    };
    let mut taken = false;
    if usable {
        if let Some(p) = entry {
            // SAFETY: map value pointer valid for this run; no other CPU claims the port while
            // its lock is held, and a lockless claim (`take_empty_port`) finds the key present.
            let old = unsafe { &*p };
            // So a flood's entries never pile up in the LRU map and push established ones out. A
            // closed or idle flow's client → backend entry stays (a new SYN on that 4-tuple
            // replaces it): removing it could race with that very SYN inserting its own entry on
            // another CPU.
            if old.half_open()
                && let Some((fwd_key, _)) = forward_of(key, old)
            {
                let _ = CONNTRACK.remove(fwd_key);
            }
            // The backend may still hold the 4-tuple (passive::stale_answer): the old flow was
            // half-open (reclaimed, or expired), or held it, or was a SYN-cookie flow (its SYN
            // carried no timestamps, so the backend's TIME_WAIT judges a new SYN by its sequence
            // number alone and turns down about half of them with a bare ACK).
            if old.flags & (FLOW_HALF_OPEN | FLOW_HELD | FLOW_COOKIE) != 0 {
                reply.flags |= FLOW_HELD;
            }
            // SAFETY: as above.
            unsafe { core::ptr::copy_nonoverlapping(reply, p, 1) };
            taken = true;
        } else {
            let entry: &FlowValue = reply;
            taken = CONNTRACK.insert(key, entry, u64::from(BPF_NOEXIST)).is_ok();
        }
    }
    let _ = SNAT_LOCKS.remove(key);
    if taken {
        match was {
            PortUse::Closed => count(gc::CLOSED_REUSED, len),
            PortUse::HalfOpen => count(gc::HALF_OPEN_RECLAIMED, len),
            _ => {}
        }
    }
    taken
}

/// Claims a SNAT source port toward `backend` by inserting the connection's reply entry `reply`.
///
/// Every CPU may use the whole `snat_ports` range: it walks it with a cursor of its own (CPU k
/// starting k/cpus of the way in), then tries random ports. A port is taken only under its lock
/// ([`SNAT_LOCKS`], inserted with BPF_NOEXIST and removed in the same run), re-checked under it, so
/// two CPUs never write each other's fresh entries or hand one port to two flows. The first port
/// with no live flow is taken: no reply entry (taken without the lock, [`take_empty_port`]), an
/// expired one, or a closed connection quiet for [`CLOSED_REUSE_NS`] (the ports ahead of the
/// cursor are the ones claimed longest ago, so when they hold closed connections, every port
/// does: more tries would only cost lookups). When none turns up, the first half-open flow seen
/// gives its port up, with both its entries; a live established flow never does.
#[inline(always)]
fn claim_snat(
    backend: &BackendValue,
    cfg: &GlobalConfig,
    now: u64,
    reply: &mut FlowValue,
    len: u64,
) -> Option<u16> {
    let cursor = SNAT.get_ptr_mut(0)?;
    let lo = u32::from(cfg.snat_port_lo);
    let range = u32::from(cfg.snat_port_hi).checked_sub(lo)? + 1;
    let cpus = if cfg.cpus == 0 { 1 } else { cfg.cpus };
    let offset = (unsafe { bpf_get_smp_processor_id() } % cpus) * (range / cpus);
    // The loop only looks (read-only lookups: a small body keeps the verifier's work bounded);
    // the port is taken after it.
    // Bit 31 set: the free port has no reply entry at all (`PortUse::Empty`); indexes are < 2^16.
    let mut free = u32::MAX;
    // The port to reclaim when none is free: the first quiet half-open one.
    let mut reclaim = u32::MAX;
    for i in 0..SNAT_TRIES {
        // No `break`: every path leaves the loop at the same point with the same few states, so the
        // verifier checks the rest of the program once per state, not once per iteration.
        if free != u32::MAX || (reclaim != u32::MAX && i >= SNAT_WALK + SNAT_RANDOM_BEFORE_RECLAIM) {
            continue;
        }
        // SAFETY: per-CPU slot, written only by this CPU.
        let index = unsafe {
            if i < SNAT_WALK {
                let c = *cursor;
                *cursor = c.wrapping_add(1);
                c.wrapping_add(offset) % range
            } else {
                let r = bpf_get_prandom_u32() % range;
                // The walk goes on from the random port next time.
                *cursor = r.wrapping_add(range - offset).wrapping_add(1);
                r
            }
        };
        match port_use(&port_key(backend, ((lo + index) as u16).to_be()), cfg, now) {
            PortUse::Empty => free = index | EMPTY_PORT,
            PortUse::Free | PortUse::Closed => free = index,
            PortUse::HalfOpen if reclaim == u32::MAX => reclaim = index,
            _ => {}
        }
    }
    if free != u32::MAX {
        let key = port_key(backend, ((lo + (free & !EMPTY_PORT)) as u16).to_be());
        let taken = if free & EMPTY_PORT != 0 {
            // No entry: right after a start that made the maps, the backend may still hold an
            // earlier instance's connection on the port (passive::stale_answer).
            if second_stamp(now) < cfg.collisions_until {
                reply.flags |= FLOW_HELD;
            }
            take_empty_port(&key, reply)
        } else {
            take_port(&key, cfg, now, reply, false, len)
        };
        if taken {
            return Some(key.dport_be);
        }
    }
    if reclaim != u32::MAX {
        let key = port_key(backend, ((lo + reclaim) as u16).to_be());
        return take_port(&key, cfg, now, reply, true, len).then_some(key.dport_be);
    }
    None
}

/// Most TCP option bytes walked looking for the timestamp option.
const MAX_OPTION_STEPS: usize = 12;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_TIMESTAMP: u8 = 8;

/// Packet offset of the TSval of the TCP timestamp option, if the header has one at an even
/// offset (so the 32-bit checksum updates stay word-aligned; Linux, BSD and Windows always place it so).
#[inline(always)]
fn timestamp_option(ctx: &impl Frame, l4_off: usize, doff: usize) -> Option<usize> {
    let end = l4_off + doff * 4;
    // The layout of every segment after the handshake from Linux (and of most from others): two
    // NOPs, then the option, first. SAFETY: ptr_at bounds-checks the read.
    if doff >= 8
        && let Some(p) = ptr_at::<[u8; 4]>(ctx, l4_off + 20)
        && unsafe { *p } == [TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10]
    {
        return Some(l4_off + 24);
    }
    let mut at = l4_off + 20;
    for _ in 0..MAX_OPTION_STEPS {
        if at + 2 > end {
            return None;
        }
        // Kind and length read together: a one-byte read lets LLVM turn the bounds check into a
        // form the verifier cannot use. SAFETY: ptr_at bounds-checks the read.
        let [kind, len] = unsafe { *ptr_at::<[u8; 2]>(ctx, at)? };
        let len = len as usize;
        match kind {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => at += 1,
            _ => {
                if kind == TCPOPT_TIMESTAMP {
                    let aligned = (at + 2 - l4_off).is_multiple_of(2);
                    return (len == 10 && at + 10 <= end && aligned).then_some(at + 2);
                }
                if len < 2 {
                    return None;
                }
                at += len;
            }
        }
    }
    None
}

/// Toward the backend adds `delta` to TSval; toward the client subtracts it from TSecr, or with
/// `clear` zeroes it (an RST made of a stale answer: its echo is the old connection's, which the
/// client would take for a bogus answer and ignore the RST). Returns `rest` with the checksum
/// change added.
#[inline(always)]
fn translate_timestamps(
    ctx: &impl Frame,
    l4_off: usize,
    doff: usize,
    to_backend: bool,
    delta: u32,
    clear: bool,
    rest: Delta,
) -> Delta {
    let Some(at) = timestamp_option(ctx, l4_off, doff) else {
        return rest;
    };
    let field = if to_backend { at } else { at + 4 };
    let Some(p) = ptr_at::<u32>(ctx, field) else {
        return rest;
    };
    // SAFETY: ptr_at checked the field lies in the packet.
    unsafe {
        let old = *p;
        let value = u32::from_be(old);
        let new = if to_backend {
            value.wrapping_add(delta)
        } else if clear {
            0
        } else {
            value.wrapping_sub(delta)
        }
        .to_be();
        *p = new;
        rest.word4(old, new)
    }
}

/// Rewrites addresses and ports to `value`'s. The address change is collected once: it fixes the
/// IPv4 header checksum here and is returned as the TCP checksum's pseudo-header change; the ports'
/// is added to `rest` (both for [`Frame::fix_l4`]).
#[inline(always)]
fn rewrite(ip: *mut Ipv4Hdr, tcp: *mut TcpHdr, key: &FlowKey, value: &FlowValue, rest: &mut Delta) -> Delta {
    let addresses = Delta::default()
        .word4(key.src_be, value.new_src_be)
        .word4(key.dst_be, value.new_dst_be);
    // SAFETY: both headers were bounds-checked by ptr_at in this run and nothing moved the packet.
    unsafe {
        (*ip).check_be = addresses.apply((*ip).check_be);
        (*ip).saddr_be = value.new_src_be;
        (*ip).daddr_be = value.new_dst_be;
        *rest = rest
            .word2(key.sport_be, value.new_sport_be)
            .word2(key.dport_be, value.new_dport_be);
        (*tcp).source_be = value.new_sport_be;
        (*tcp).dest_be = value.new_dport_be;
    }
    addresses
}

/// Sends the rewritten packet to its next hop: the flow's cached one while fresh, else the
/// kernel's FIB (and the answer is cached in the flow). Transmit or redirect; `into_peer`: the
/// packet may go straight into a veth peer's namespace ([`Frame::redirect_into`]).
#[inline(always)]
fn forward<C: Frame>(ctx: &C, hop: &mut FlowValue, now: u64, cpus: u32, into_peer: bool) -> Verdict {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)) else {
        return drop(gc::TRUNCATED);
    };
    let ingress = ctx.ingress();
    if hop.next_hop_ifindex == 0
        || hop_stamp(now).wrapping_sub(hop.next_hop_at) > hop_stamp(NEXT_HOP_CACHE_NS)
    {
        // SAFETY: zeroed bytes are a valid bpf_fib_lookup.
        let mut params: FibParams = unsafe { core::mem::zeroed() };
        unsafe {
            params.family = AF_INET;
            params.l4_protocol = IPPROTO_TCP;
            params.__bindgen_anon_1.tot_len = ctx.fib_tot_len(u16::from_be((*ip).tot_len_be));
            params.ifindex = ingress;
            params.__bindgen_anon_2.tos = (*ip).tos;
            params.__bindgen_anon_3.ipv4_src = (*ip).saddr_be;
            params.__bindgen_anon_4.ipv4_dst = (*ip).daddr_be;
        }
        let ret = unsafe {
            bpf_fib_lookup(
                ctx.as_ptr(),
                &raw mut params,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if ret == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            return pass(Some(gc::NO_NEIGH));
        }
        if ret == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
            return drop(gc::TOO_BIG);
        }
        if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
            if let Some(suppressed) = may_log(LOG_NO_ROUTE, now, cpus) {
                let dst = u32::from_be(unsafe { (*ip).daddr_be });
                aya_log_ebpf::warn!(
                    ctx,
                    "no route for rewritten packet to {:i} (fib lookup {}; {} such lines suppressed before this one)",
                    dst,
                    ret,
                    suppressed
                );
            }
            return drop(gc::FIB_FAILED);
        }
        hop.next_hop_ifindex = params.ifindex;
        hop.next_hop_macs[..6].copy_from_slice(&params.dmac);
        hop.next_hop_macs[6..].copy_from_slice(&params.smac);
        hop.next_hop_at = hop_stamp(now);
    }
    // SAFETY: the Ethernet header was bounds-checked above.
    unsafe {
        (*eth).dst.copy_from_slice(&hop.next_hop_macs[..6]);
        (*eth).src.copy_from_slice(&hop.next_hop_macs[6..]);
    }
    let action = if hop.next_hop_ifindex == ingress {
        ctx.transmit()
    } else if into_peer {
        ctx.redirect_into(hop.next_hop_ifindex)
    } else {
        ctx.redirect(hop.next_hop_ifindex)
    };
    Verdict { action, reason: None }
}

/// A pointer to a `T` at `offset` bytes into the packet, or None if it would reach past `data_end`.
#[inline(always)]
fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Adds one packet of `len` bytes to this CPU's slot of global counter `index`.
#[inline(always)]
fn count(index: u32, len: u64) {
    if let Some(c) = GLOBAL.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, so no other CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// Per-service and per-backend traffic of a forwarded packet.
#[inline(always)]
fn count_traffic(flow: &FlowValue, to_backend: bool, len: u64, new_flow: bool) {
    add_traffic(
        SERVICE_STATS.get_ptr_mut(flow.service_slot),
        to_backend,
        len,
        new_flow,
    );
    add_traffic(BACKEND_STATS.get_ptr_mut(flow.backend), to_backend, len, new_flow);
}

#[inline(always)]
fn add_traffic(cell: Option<*mut TrafficCounters>, to_backend: bool, len: u64, new_flow: bool) {
    let Some(c) = cell else { return };
    // SAFETY: per-CPU slot.
    unsafe {
        if to_backend {
            (*c).packets_in += 1;
            (*c).bytes_in += len;
        } else {
            (*c).packets_out += 1;
            (*c).bytes_out += len;
        }
        if new_flow {
            (*c).new_flows += 1;
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
