//! The SYN proxy (`[xdp] syn_cookies`): `lb_synproxy`, a second XDP program `lb_xdp` reaches by a
//! tail call (`lb_progs`), so its paths do not count against `lb_xdp`'s verifier budget.
//!
//! - A SYN to a NAT service without a connection, while cookies are on: answered from XDP with a
//!   SYN-ACK whose sequence number is a SYN cookie ([`lb_common::synproxy`]), MSS option only (no
//!   window scaling, SACK or timestamps while cookies are on). No state.
//! - The client's ACK without a connection: if its acknowledgment minus one is a valid cookie, the
//!   flow is set up as a SYN would set it up (backend by affinity or ring, SNAT port, both
//!   entries, marked [`FLOW_COOKIE`] and half-open) and the ACK becomes the SYN toward the backend
//!   (the client's initial sequence number, the MSS from the cookie). Otherwise it is answered with
//!   an RST, as without cookies.
//! - A client packet while the backend has not answered: sent as that SYN again (the client
//!   retransmits its data).
//! - The backend's SYN-ACK: becomes the ACK toward the backend (sent back out where it came from);
//!   the flow is established and `lb_xdp` translates every later packet ([`translate`]). A
//!   backend's RST is passed on to the client in the client's sequence space.
//!
//! Both directions' sequence numbers are translated. The backend's: the SYN-ACK the client saw
//! carried the cookie, the backend picks its own. The client's: the SYN toward the backend does
//! not carry the client's initial sequence number but one from the LB's clock ([`isn_toward`]),
//! because it carries no timestamps: a backend still holding an earlier connection on the same
//! SNAT port in TIME_WAIT accepts a SYN without timestamps only when its sequence number is
//! beyond that connection's, which a clock guarantees and a client's random ISN does not.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::{classifier, map, xdp},
    maps::{Array, ProgramArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    csum::{self, Delta},
    maps::{
        FLOW_HALF_OPEN, FLOW_RST, FLOW_TO_BACKEND, FlowKey, FlowValue, SERVICE_DSR, ServiceKey,
        global_counter as gc,
    },
    synproxy::{
        self as sp, CookieTuple, FLOW_COOKIE, MSS_TABLE, PROG_SYNPROXY, SYN_ACK_WINDOW, Segment,
        SynCookieConfig,
    },
};

use crate::frame::Frame;
use crate::net::{ETH_P_IPV4, EthHdr, IPPROTO_TCP, Ipv4Hdr, TcpHdr};
use crate::{
    CONFIG, CONNTRACK, SERVICES, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Verdict, affinity_pending, claim_snat,
    clear_affinity_pending, clear_low_flag, count, count_traffic, drop, forward, pass, passive, ptr_at,
    reset, retire, retire_for, rewrite, same_flow, select_backend, set_flags_both, write_affinity,
};

#[map(name = "lb_syncookie")]
static SYNCOOKIE: Array<SynCookieConfig> = Array::with_max_entries(1, 0);
#[map(name = "lb_progs")]
static PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map(name = "lb_tc_progs")]
static TC_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

const _: () = {
    assert!(crate::str_eq(sp::MAP_SYNCOOKIE, "lb_syncookie"));
    assert!(crate::str_eq(sp::MAP_PROGS, "lb_progs"));
    assert!(crate::str_eq(sp::MAP_TC_PROGS, "lb_tc_progs"));
};

/// Offset of the TCP header: the proxy only takes frames whose IPv4 header has no options.
const L4: usize = EthHdr::LEN + 20;
/// Frames the proxy writes: with the MSS option (SYN-ACK, SYN), without (ACK).
const SYN_FRAME: usize = L4 + 24;
const ACK_FRAME: usize = L4 + 20;
/// Most TCP option bytes walked looking for the MSS option.
const MAX_OPTION_STEPS: usize = 8;

/// Whether SYNs are answered with cookies now.
#[inline(always)]
pub(crate) fn cookies_on() -> bool {
    SYNCOOKIE.get(0).is_some_and(|c| c.enabled == sp::COOKIES_ON)
}

/// Hands the packet to `lb_synproxy`; returns only when that is not possible (no program in
/// `lb_progs`: `syn_cookies = "off"`, or user space is not running), and the caller goes on as
/// without cookies.
#[inline(always)]
pub(crate) fn hand_over_xdp(ctx: &impl Frame) {
    // SAFETY: a tail call into an XDP program of the same object; on failure control comes back.
    unsafe { PROGS.tail_call(ctx, PROG_SYNPROXY) };
}

/// [`hand_over_xdp`] at TC: `lb_synproxy_tc` in `lb_tc_progs`.
#[inline(always)]
pub(crate) fn hand_over_tc(ctx: &TcContext) {
    // SAFETY: a tail call into a TC program of the same object; on failure control comes back.
    unsafe { TC_PROGS.tail_call(ctx, PROG_SYNPROXY) };
}

/// An established cookie flow's sequence translation (`f`: its entry for this direction).
/// Toward the backend the sequence number gains the client delta and the acknowledgment the
/// backend delta; toward the client both lose them. Returns `rest` with the checksum changes added.
#[inline(always)]
pub(crate) fn translate(tcp: *mut TcpHdr, to_backend: bool, f: &FlowValue, rest: Delta) -> Delta {
    let (backend_delta, client_delta) = (f.ts_delta, f.syn_seq_be);
    let (seq_delta, ack_delta) = if to_backend {
        (client_delta, backend_delta)
    } else {
        (backend_delta.wrapping_neg(), client_delta.wrapping_neg())
    };
    // SAFETY: the caller bounds-checked the TCP header in this run.
    unsafe {
        let (old_seq, old_ack) = ((*tcp).seq_be, (*tcp).ack_seq_be);
        let new_seq = u32::from_be(old_seq).wrapping_add(seq_delta).to_be();
        let new_ack = u32::from_be(old_ack).wrapping_add(ack_delta).to_be();
        (*tcp).seq_be = new_seq;
        (*tcp).ack_seq_be = new_ack;
        rest.word4(old_seq, new_seq).word4(old_ack, new_ack)
    }
}

/// The initial sequence number of a SYN toward a backend: the LB's clock in 64 ns ticks (15.6
/// million a second: a later connection on the same SNAT port always starts beyond an earlier
/// one's, for the 137 s after which sequence numbers wrap; TIME_WAIT lasts 60) plus 16 random bits.
#[inline(always)]
fn isn_toward(now: u64) -> u32 {
    ((now >> 6) as u32).wrapping_add(unsafe { bpf_get_prandom_u32() } & 0xffff)
}

/// XDP program reached from `lb_xdp` by a tail call (which counted the packet): decide, count
/// the verdict.
#[xdp]
pub fn lb_synproxy(ctx: XdpContext) -> u32 {
    let len = Frame::len(&ctx);
    crate::conclude(try_synproxy(&ctx, len), len)
}

/// [`lb_synproxy`] at TC, reached from `lb_tc` (which pulled the headers in).
#[classifier]
pub fn lb_synproxy_tc(ctx: TcContext) -> i32 {
    let len = Frame::len(&ctx);
    crate::frame::tc_action(crate::conclude(try_synproxy(&ctx, len), len))
}

const fn silent_drop() -> Verdict {
    Verdict {
        action: xdp_action::XDP_DROP,
        reason: None,
    }
}

#[inline(always)]
fn try_synproxy(ctx: &impl Frame, len: u64) -> Verdict {
    let (Some(ip), Some(tcp)) = (ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN), ptr_at::<TcpHdr>(ctx, L4)) else {
        return drop(gc::TRUNCATED);
    };
    // SAFETY (all header accesses below): ptr_at checked the headers lie in the packet, and
    // every function that moves the packet's end takes its pointers again.
    let flags = u16::from_be(unsafe { (*tcp).doff_flags_be });
    let doff = (flags >> 12) as usize;
    let key = FlowKey {
        src_be: unsafe { (*ip).saddr_be },
        dst_be: unsafe { (*ip).daddr_be },
        sport_be: unsafe { (*tcp).source_be },
        dport_be: unsafe { (*tcp).dest_be },
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let (Some(cfg), Some(cookies)) = (CONFIG.get(0), SYNCOOKIE.get(0)) else {
        return pass(None);
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return syn_ack(ctx, &key, doff, cookies, now);
    }
    if let Some(flow) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer valid for this run.
        let f = unsafe { &mut *flow };
        if f.flags & FLOW_COOKIE != 0 && f.half_open() && !f.expired(now, cfg) {
            if f.flags & FLOW_TO_BACKEND != 0 {
                if flags & TCP_RST != 0 {
                    return silent_drop();
                }
                // The backend has not answered: this client packet is its SYN once more.
                count(gc::COOKIE_SYN_RESENT, len);
                let ack = u32::from_be(unsafe { (*tcp).ack_seq_be });
                let mss = MSS_TABLE[(ack.wrapping_sub(1) & 3) as usize];
                let verdict = send_syn(ctx, f, mss, now, cfg.cpus);
                count_traffic(f, true, len, false);
                return verdict;
            }
            return backend_answer(ctx, &key, f, flags, now, cfg.cpus, len);
        }
    }
    if flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_ACK {
        return reset::answer(ctx, ip, tcp, 5, doff, now, gc::NO_CONNTRACK);
    }
    let seq = u32::from_be(unsafe { (*tcp).seq_be });
    let cookie = u32::from_be(unsafe { (*tcp).ack_seq_be }).wrapping_sub(1);
    let tuple = CookieTuple {
        client_be: key.src_be,
        vip_be: key.dst_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        client_isn: seq.wrapping_sub(1),
    };
    let Some(mss) = sp::check(&cookies.secret, &tuple, now, cookie) else {
        count(gc::COOKIE_INVALID, len);
        return reset::answer(ctx, ip, tcp, 5, doff, now, gc::NO_CONNTRACK);
    };
    let window = u16::from_be(unsafe { (*tcp).window_be });
    new_flow(ctx, &key, tuple.client_isn, cookie, window, mss, now, cfg, len)
}

/// Answers the SYN `key` with the cookie SYN-ACK, back out the interface it came in on.
#[inline(always)]
fn syn_ack(ctx: &impl Frame, key: &FlowKey, doff: usize, cookies: &SynCookieConfig, now: u64) -> Verdict {
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, L4) else {
        return drop(gc::TRUNCATED);
    };
    let client_isn = u32::from_be(unsafe { (*tcp).seq_be });
    let client_mss = mss_option(ctx, doff);
    let tuple = CookieTuple {
        client_be: key.src_be,
        vip_be: key.dst_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        client_isn,
    };
    let cookie = sp::make(&cookies.secret, &tuple, now, client_mss);
    // A SYN on the 4-tuple of a connection on record that `lb_xdp` did not take for its
    // retransmission: the client reused its port, that connection is over (as without cookies,
    // where the new flow replaces it). Left in place, it would carry the client's ACK.
    if let Some(old) = unsafe { CONNTRACK.get(*key) } {
        retire(key, old);
        let _ = CONNTRACK.remove(key);
    }
    let segment = Segment {
        saddr_be: key.dst_be,
        daddr_be: key.src_be,
        sport_be: key.dport_be,
        dport_be: key.sport_be,
        seq: cookie,
        ack: client_isn.wrapping_add(1),
        flags: (TCP_SYN | TCP_ACK) as u8,
        window: SYN_ACK_WINDOW,
        // What the client can take, as the cookie carries it (the paths are symmetric).
        mss: MSS_TABLE[(cookie & 3) as usize],
    };
    if !write_back(ctx, &segment) {
        return silent_drop();
    }
    back_out(ctx, Some(gc::COOKIES_SENT))
}

/// The value of the SYN's MSS option, or 536 (RFC 9293's default) without one.
#[inline(always)]
fn mss_option(ctx: &impl Frame, doff: usize) -> u16 {
    let end = L4 + doff * 4;
    let mut at = L4 + 20;
    for _ in 0..MAX_OPTION_STEPS {
        if at + 4 > end {
            break;
        }
        // SAFETY: ptr_at bounds-checks the read.
        let Some(p) = ptr_at::<[u8; 4]>(ctx, at) else {
            break;
        };
        let [kind, len, hi, lo] = unsafe { *p };
        match kind {
            0 => break,
            1 => at += 1,
            sp::TCPOPT_MSS if len == sp::TCPOLEN_MSS => return u16::from_be_bytes([hi, lo]),
            _ => {
                if len < 2 {
                    break;
                }
                at += len as usize;
            }
        }
    }
    MSS_TABLE[0]
}

/// Sets the frame to the length `segment` needs (Ethernet, IPv4, TCP), swapping the Ethernet
/// addresses (back where it came from), and writes the headers. False when the frame cannot be
/// resized.
#[inline(always)]
fn write_back(ctx: &impl Frame, segment: &Segment) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let (src, dst) = unsafe { ((*eth).src, (*eth).dst) };
    if !ctx.resize(L4 + segment.tcp_len() as usize) {
        return false;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    unsafe {
        (*eth).dst = src;
        (*eth).src = dst;
        (*eth).ether_type_be = ETH_P_IPV4.to_be();
    }
    write_headers(ctx, segment)
}

/// Writes the IPv4 and TCP headers of `segment` (the frame has its length already).
#[inline(always)]
fn write_headers(ctx: &impl Frame, s: &Segment) -> bool {
    let (Some(ip), Some(tcp)) = (ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN), ptr_at::<TcpHdr>(ctx, L4)) else {
        return false;
    };
    let tot_len = 20 + s.tcp_len();
    // SAFETY: ptr_at checked both headers lie in the packet.
    unsafe {
        (*ip).version_ihl = sp::VERSION_IHL;
        (*ip).tos = 0;
        (*ip).tot_len_be = tot_len.to_be();
        (*ip).id_be = 0;
        (*ip).frag_off_be = sp::FRAG_DF.to_be();
        (*ip).ttl = sp::TTL;
        (*ip).protocol = IPPROTO_TCP;
        (*ip).check_be = sp::ipv4_check(s.saddr_be, s.daddr_be, tot_len);
        (*ip).saddr_be = s.saddr_be;
        (*ip).daddr_be = s.daddr_be;
        (*tcp).source_be = s.sport_be;
        (*tcp).dest_be = s.dport_be;
        (*tcp).seq_be = s.seq.to_be();
        (*tcp).ack_seq_be = s.ack.to_be();
        (*tcp).doff_flags_be = s.doff_flags().to_be();
        (*tcp).window_be = s.window.to_be();
        (*tcp).urg_ptr_be = 0;
        (*tcp).check_be = s.tcp_check();
    }
    if s.mss != 0 {
        let Some(opt) = ptr_at::<[u8; 4]>(ctx, L4 + 20) else {
            return false;
        };
        let [hi, lo] = s.mss.to_be_bytes();
        // SAFETY: ptr_at checked the option lies in the packet.
        unsafe { *opt = [sp::TCPOPT_MSS, sp::TCPOLEN_MSS, hi, lo] };
    }
    ctx.finish_segment(L4, csum::pseudo_v4(s.saddr_be, s.daddr_be, s.tcp_len()));
    true
}

/// Out the interface the packet came in on (a redirect, not XDP_TX: see `reset::answer`).
#[inline(always)]
fn back_out(ctx: &impl Frame, reason: Option<u32>) -> Verdict {
    Verdict {
        action: ctx.redirect(ctx.ingress()),
        reason,
    }
}

/// A valid cookie ACK: the flow is set up as for a SYN and the ACK becomes the SYN toward the
/// backend.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn new_flow(
    ctx: &impl Frame,
    key: &FlowKey,
    client_isn: u32,
    cookie: u32,
    window: u16,
    mss: u16,
    now: u64,
    cfg: &lb_common::maps::GlobalConfig,
    len: u64,
) -> Verdict {
    let service_key = ServiceKey::tcp(key.dst_be, key.dport_be);
    let Some(service) = (unsafe { SERVICES.get(service_key) }) else {
        return drop(gc::NO_CONNTRACK);
    };
    if service.flags & SERVICE_DSR != 0 {
        return drop(gc::NO_CONNTRACK);
    }
    // The client holds an open connection already: it learns by an RST when none can be made
    // (a SYN would be dropped and retried instead).
    clear_affinity_pending();
    let Some((backend_index, backend)) = select_backend(service, key.src_be, cfg, now, len) else {
        return refuse(ctx, now, gc::NO_BACKEND);
    };
    // The cookie proved the client's address: its affinity entry is written at once.
    if affinity_pending() {
        write_affinity(service.slot, key.src_be, backend_index, now);
    }
    let isn = isn_toward(now);
    let mut reply_value = FlowValue {
        new_src_be: key.dst_be,
        new_dst_be: key.src_be,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        backend: backend_index,
        service_slot: service.slot,
        flags: FLOW_HALF_OPEN | FLOW_COOKIE,
        last_seen_ns: now,
        syn_seq_be: cookie.to_be(),
        // The client delta, until the flow is established.
        ts_delta: isn.wrapping_sub(client_isn),
        ..FlowValue::default()
    };
    let Some(snat_port_be) = claim_snat(&backend, cfg, now, &mut reply_value, len) else {
        return refuse(ctx, now, gc::SNAT_EXHAUSTED);
    };
    let forward_value = FlowValue {
        new_src_be: backend.snat_be,
        new_dst_be: backend.addr_be,
        new_sport_be: snat_port_be,
        new_dport_be: backend.port_be,
        backend: backend_index,
        service_slot: service.slot,
        flags: FLOW_TO_BACKEND | FLOW_HALF_OPEN | FLOW_COOKIE,
        last_seen_ns: now,
        syn_seq_be: isn.to_be(),
        ts_delta: u32::from(window),
        ..FlowValue::default()
    };
    // The client's ACK and its first data can reach two CPUs at once, each with a valid cookie:
    // one flow only. Without an entry on record the insert must be the first (the loser's SNAT
    // port is given back and its packet dropped: the client retransmits into the winner's flow).
    let flags = match unsafe { CONNTRACK.get(*key) } {
        Some(old) => {
            retire_for(key, old, &forward_value);
            0
        }
        None => u64::from(BPF_NOEXIST),
    };
    if CONNTRACK.insert(key, forward_value, flags).is_err() {
        let _ = CONNTRACK.remove(FlowKey::reverse_of(&forward_value));
        return silent_drop();
    }
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return silent_drop();
    };
    count(gc::COOKIE_VALID, len);
    count(gc::NEW_FLOWS, len);
    passive::syn_sent(backend_index);
    count_traffic(&forward_value, true, len, true);
    // SAFETY: map value pointer valid for this run (the next hop is cached in it).
    send_syn(ctx, unsafe { &mut *entry }, mss, now, cfg.cpus)
}

/// Answers the client's packet with an RST (`reason` counted), as for a packet without a
/// connection.
#[inline(always)]
fn refuse(ctx: &impl Frame, now: u64, reason: u32) -> Verdict {
    let (Some(ip), Some(tcp)) = (ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN), ptr_at::<TcpHdr>(ctx, L4)) else {
        return drop(reason);
    };
    let doff = (u16::from_be(unsafe { (*tcp).doff_flags_be }) >> 12) as usize;
    reset::answer(ctx, ip, tcp, 5, doff, now, reason)
}

/// Turns the client's packet into the SYN of the half-open cookie flow `f` (client → backend
/// entry: the ISN toward the backend, the client's window) toward the backend, with the MSS option `mss` (none when
/// the frame cannot grow), and sends it to the backend.
#[inline(always)]
fn send_syn(ctx: &impl Frame, f: &mut FlowValue, mss: u16, now: u64, cpus: u32) -> Verdict {
    let mut segment = Segment {
        saddr_be: f.new_src_be,
        daddr_be: f.new_dst_be,
        sport_be: f.new_sport_be,
        dport_be: f.new_dport_be,
        seq: u32::from_be(f.syn_seq_be),
        ack: 0,
        flags: TCP_SYN as u8,
        window: f.ts_delta as u16,
        mss,
    };
    if !ctx.resize(SYN_FRAME) {
        // No tailroom (a 54-byte ACK): the SYN goes without the option (536 toward the client).
        segment.mss = 0;
        if !ctx.resize(ACK_FRAME) {
            return silent_drop();
        }
    }
    if !write_headers(ctx, &segment) {
        return silent_drop();
    }
    forward(ctx, f, now, cpus, true)
}

/// A packet of the backend (`key`, reply entry `r`) of a half-open cookie flow: its SYN-ACK
/// becomes the ACK toward it and establishes the flow; its RST goes to the client; anything else
/// is dropped.
#[inline(always)]
fn backend_answer(
    ctx: &impl Frame,
    key: &FlowKey,
    r: &mut FlowValue,
    flags: u16,
    now: u64,
    cpus: u32,
    len: u64,
) -> Verdict {
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, L4) else {
        return drop(gc::TRUNCATED);
    };
    let (seq, ack) = unsafe { (u32::from_be((*tcp).seq_be), u32::from_be((*tcp).ack_seq_be)) };
    let cookie = u32::from_be(r.syn_seq_be);
    let client_delta = r.ts_delta;
    if flags & TCP_RST != 0 {
        // The backend refused: the client hears it in its own sequence space (its next expected
        // sequence number is the cookie's plus one).
        r.syn_seq_be = client_delta;
        r.ts_delta = seq.wrapping_sub(cookie.wrapping_add(1));
        set_flags_both(key, r, FLOW_RST, now);
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return drop(gc::TRUNCATED);
        };
        let mut rest = Delta::default();
        let pseudo = rewrite(ip, tcp, key, r, &mut rest);
        rest = translate(tcp, false, r, rest);
        ctx.fix_l4(L4, pseudo, rest);
        count_traffic(r, false, len, false);
        return forward(ctx, r, now, cpus, true);
    }
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_ACK {
        // A bare ACK: the backend still holds an earlier connection on this SNAT 4-tuple (in
        // TIME_WAIT, or half-open from before a flood turned cookies on: the LB forgets those
        // sooner than the backend does) and took the SYN for out of window. The RST made of its
        // own numbers clears that connection; the client's next packet sends the SYN again.
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return drop(gc::TRUNCATED);
        };
        return reset::answer(ctx, ip, tcp, 5, (flags >> 12) as usize, now, gc::STALE_COLLISION);
    }
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK {
        return silent_drop();
    }
    let Some(fwd) = CONNTRACK.get_ptr_mut(FlowKey::reverse_of(r)) else {
        return silent_drop();
    };
    // SAFETY: map value pointer valid for this run.
    let f = unsafe { &mut *fwd };
    let isn = u32::from_be(f.syn_seq_be);
    if !same_flow(&FlowKey::reverse_of(f), key) || ack != isn.wrapping_add(1) {
        return silent_drop();
    }
    let window = f.ts_delta as u16;
    // The deltas first, then established: another CPU translates only established flows.
    let backend_delta = seq.wrapping_sub(cookie);
    f.ts_delta = backend_delta;
    r.ts_delta = backend_delta;
    f.syn_seq_be = client_delta;
    r.syn_seq_be = client_delta;
    // Each sender's next sequence number, in its own space, for the RST window: the client's
    // after its cookie ACK, the backend's after this SYN-ACK.
    f.next_seq_be = isn.wrapping_sub(client_delta).wrapping_add(1).to_be();
    r.next_seq_be = seq.wrapping_add(1).to_be();
    clear_low_flag(&mut f.flags, FLOW_HALF_OPEN);
    clear_low_flag(&mut r.flags, FLOW_HALF_OPEN);
    count_traffic(r, false, len, false);
    let segment = Segment {
        saddr_be: key.dst_be,
        daddr_be: key.src_be,
        sport_be: key.dport_be,
        dport_be: key.sport_be,
        seq: isn.wrapping_add(1),
        ack: seq.wrapping_add(1),
        flags: TCP_ACK as u8,
        window,
        mss: 0,
    };
    if !write_back(ctx, &segment) {
        return silent_drop();
    }
    back_out(ctx, None)
}
