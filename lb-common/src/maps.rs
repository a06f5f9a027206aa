//! eBPF map names and the types stored in them. One definition for kernel and user space:
//! `#[repr(C)]`, explicit padding, no bool/usize/enum, a size assertion for each. Fields ending in
//! `_be` hold network byte order exactly as in the packet.

/// Bumped whenever a map's layout changes; `lb run` adopts pinned maps only of the same version.
pub const LAYOUT_VERSION: u32 = 10;

/// Per-CPU global counters (`PERCPU_ARRAY<u32, Counter>`), indexed by the [`global_counter`] values.
/// User space sums each index over all CPUs.
pub const MAP_GLOBAL_STATS: &str = "lb_global";
/// `ARRAY<u32, GlobalConfig>` with one entry: hashing and timeouts.
pub const MAP_CONFIG: &str = "lb_config";
/// `HASH<ServiceKey, ServiceValue>`: which (VIP, port, protocol) are services.
pub const MAP_SERVICES: &str = "lb_services";
/// `ARRAY<u32, BackendValue>`, indexed by a global backend index.
pub const MAP_BACKENDS: &str = "lb_backends";
/// `ARRAY<u32, u32>`: Maglev rings, `ring[service_slot * ring_size + slot]` = backend index.
pub const MAP_RING: &str = "lb_ring";
/// `LRU_HASH<FlowKey, FlowValue>`: both directions of every forwarded connection.
pub const MAP_CONNTRACK: &str = "lb_conntrack";
/// `LRU_HASH<AffinityKey, AffinityValue>`: client IP → backend, with last-seen time.
pub const MAP_AFFINITY: &str = "lb_affinity";
/// `PERCPU_ARRAY<u32, u32>` with one entry: each CPU's SNAT port cursor. Every CPU walks the whole
/// `snat_ports` range (from its own offset); [`MAP_SNAT_LOCKS`] keeps two CPUs off one port.
pub const MAP_SNAT: &str = "lb_snat";
/// `HASH<FlowKey, u32>`: the reply keys (backend → SNAT address and port) a CPU is claiming at this
/// instant. Taken with BPF_NOEXIST and removed by its taker within the same program run: only the
/// holder may remove a port's stale or half-open entries and insert its own, so no CPU ever removes
/// an entry another CPU has just inserted, and no port is handed to two flows.
pub const MAP_SNAT_LOCKS: &str = "lb_snat_locks";
/// `HASH<u32, u32>`: the LB's SNAT source addresses (`BackendValue::snat_be`, network order) → 1.
/// A TCP packet to one of them on a SNAT port without a live flow is a stray backend reply: it is
/// dropped (`no_reply_flow`), never passed to the LB's own stack (which would reset it).
pub const MAP_SNAT_ADDRS: &str = "lb_snat_addrs";
/// `PERCPU_ARRAY<u32, u64>` with one entry: each CPU's reset rate limit (the theoretical arrival
/// time of its next RST, [`crate::rst::admit`]). Not pinned: a restart starts a fresh bucket.
pub const MAP_RST_BUCKET: &str = "lb_rst_bucket";
/// `PERCPU_ARRAY<u32, FlowValue>` with two entries: each CPU's scratch space for a new flow's
/// entries (kept off the program's stack). Not pinned.
pub const MAP_DSR_SCRATCH: &str = "lb_dsr_scratch";
/// `PERCPU_ARRAY<u32, NextHop>`: each CPU's recent FIB answers, shared by new flows (`lb-ebpf`'s
/// `hop` module). Not pinned.
pub const MAP_NEXT_HOPS: &str = "lb_next_hops";
/// `HASH<u32, u8>`: the veth ends (interface indexes) of the load balancer's network namespace
/// whose other end lives in another namespace, while `[xdp] redirect_peer` is on: at the TC hook a
/// NAT flow's packet for one of them goes straight into that namespace (`bpf_redirect_peer`). Kept
/// by user space; not pinned.
pub const MAP_PEER_IFACES: &str = "lb_peer_ifaces";
/// Most entries of [`MAP_PEER_IFACES`] (more veth ends forward without the shortcut).
pub const MAX_PEER_IFACES: u32 = 4096;
/// `PERCPU_ARRAY<u32, TrafficCounters>`, indexed by service slot.
pub const MAP_SERVICE_STATS: &str = "lb_svc_stats";
/// `PERCPU_ARRAY<u32, TrafficCounters>`, indexed by backend index.
pub const MAP_BACKEND_STATS: &str = "lb_be_stats";

/// Default map sizes (user space may change them at load time).
pub const DEFAULT_MAX_SERVICES: u32 = 16;
pub const DEFAULT_MAX_BACKENDS: u32 = 1024;
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 262_144;
/// Entries of [`MAP_SNAT_LOCKS`]: ports being claimed at this instant (at most one per CPU).
pub const DEFAULT_SNAT_LOCKS: u32 = 1024;
/// Entries of [`MAP_SNAT_ADDRS`] (one per source address toward backends).
pub const DEFAULT_SNAT_ADDRS: u32 = 256;
/// Entries of [`MAP_GLOBAL_STATS`]: one slot per [`global_counter`] index.
pub const GLOBAL_STATS_ENTRIES: u32 = global_counter::COUNT;

/// "No backend" in rings and affinity homes.
pub const NO_BACKEND: u32 = u32::MAX;

/// Indexes into [`MAP_GLOBAL_STATS`], from the counter taxonomy in [`crate::counters`].
///
/// `PACKETS` counts every packet. Verdict counters (`PASSED`, `FORWARDED`, `DROPPED`) count each packet
/// once and sum to `PACKETS`. Reason counters say why a packet got its verdict and come on top.
pub use crate::counters::global_counter;

/// One per-CPU counter cell: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Traffic of one service or backend ("in" = client → backend, "out" = backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 48);

/// Hashing parameters and timeouts shared by all services.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    pub layout_version: u32,
    pub seed: u32,
    pub ring_size: u32,
    /// SNAT source ports, inclusive, host order.
    pub snat_port_lo: u16,
    pub snat_port_hi: u16,
    /// Number of possible CPUs (each CPU starts its SNAT port walk at its own offset).
    pub cpus: u32,
    /// Until this [`second_stamp`] of the monotonic clock, a new flow that takes a SNAT port with
    /// no entry in conntrack is marked [`crate::passive::FLOW_HELD`] (a bare ACK answering its SYN
    /// is a collision, never a refusal): lb made its maps at this start (none pinned to adopt),
    /// so the backends may still hold connections of an earlier instance, or from before a
    /// reboot, on 4-tuples lb has no record of. 0 = never.
    pub collisions_until: u32,
    /// Idle time after which an open connection's entry is forgotten.
    pub idle_timeout_ns: u64,
    /// Idle time after which a closed (RST, or FIN both ways) connection's entry is forgotten.
    pub closed_timeout_ns: u64,
    /// Idle time after which a half-open connection (SYN seen, the client's handshake not
    /// completed: [`FLOW_HALF_OPEN`]) is forgotten.
    pub syn_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 48);

/// A service: destination address, port and protocol of client packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// IP protocol number of TCP, the only protocol services have.
pub const IPPROTO_TCP: u8 = 6;

impl ServiceKey {
    /// The key of the TCP service on `vip_be`:`port_be` (both in network byte order).
    pub const fn tcp(vip_be: u32, port_be: u16) -> ServiceKey {
        ServiceKey {
            vip_be,
            port_be,
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }
}

/// Service flag: `forwarding = "dsr"`: packets are IPIP-encapsulated toward the backend, untouched
/// inside (no SNAT); the backend answers the client directly.
pub const SERVICE_DSR: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index of the service's ring and stats.
    pub slot: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
    /// 0 = no affinity.
    pub affinity_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// Backend flag: the entry describes a live backend.
pub const BACKEND_PRESENT: u16 = 1;
/// Backend flag: takes clients with affinity (active or drain, and healthy).
pub const BACKEND_ADMITS_KNOWN: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub addr_be: u32,
    /// Source address the LB uses toward this backend.
    pub snat_be: u32,
    pub port_be: u16,
    pub flags: u16,
    pub service_slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 16);

/// One direction of a connection as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Flow flag: this entry is the client → backend direction.
pub const FLOW_TO_BACKEND: u32 = 1;
/// Flow flag: FIN seen from the client. FIN and RST bits each sit in a byte of their own: two CPUs
/// may set two of them at once, and the XDP program sets one with a single-byte store.
pub const FLOW_FIN_CLIENT: u32 = 1 << 8;
/// Flow flag: FIN seen from the backend (own byte, see [`FLOW_FIN_CLIENT`]).
pub const FLOW_FIN_BACKEND: u32 = 1 << 16;
/// Flow flag: RST seen (own byte, see [`FLOW_FIN_CLIENT`]).
pub const FLOW_RST: u32 = 1 << 24;
/// Flow flag: TCP timestamps are translated (`ts_delta` is valid).
pub const FLOW_TS: u32 = 16;
/// Flow flag (both entries): half-open, the client's SYN was forwarded and its handshake is not
/// complete yet. Set at creation, cleared (byte 0 stored whole, other bits kept) by the client's
/// first ACK. A half-open flow lives at most `syn_timeout` and is the first to give its SNAT port
/// (and both entries) up when no port is free; an established flow is never evicted for a new one.
pub const FLOW_HALF_OPEN: u32 = 1 << 1;
/// Flow flag: reset by the operator or `on_down = "reset"` (set by user space on both entries):
/// the next packet in either direction is answered with an RST toward its sender instead of
/// being forwarded. Byte 0, beside [`FLOW_TO_BACKEND`] and [`FLOW_TS`].
pub const FLOW_RESET: u32 = 1 << 5;
/// Flow flag (client → backend entry): the client had no affinity entry when its SYN came; the
/// entry is written when its handshake completes, so SYNs from addresses that never complete one
/// (spoofed) push no real client's entry out of the LRU map. Byte 0.
pub const FLOW_AFFINITY_PENDING: u32 = 1 << 3;
/// Flow flag: a flow of a dsr service (only the client → backend entry exists): its packets are
/// IPIP-encapsulated from `new_src_be` (the LB's address toward the backend) to `new_dst_be` (the
/// backend), unchanged inside; the ports are 0 (no reply entry). Byte 0.
pub const FLOW_DSR: u32 = 1 << 6;

/// How long a flow's cached next hop (egress interface and MACs) is trusted before the FIB is
/// asked again.
pub const NEXT_HOP_CACHE_NS: u64 = 1_000_000_000;

/// A time in nanoseconds as the flow keeps its next hop's age: units of 2^20 ns (about a
/// millisecond), wrapping after 52 days, so it fits 4 bytes of the 64-byte [`FlowValue`].
pub const fn hop_stamp(ns: u64) -> u32 {
    (ns >> 20) as u32
}

/// A monotonic time in nanoseconds in units of 2^30 ns (about a second), as
/// [`GlobalConfig::collisions_until`] keeps it.
pub const fn second_stamp(ns: u64) -> u32 {
    (ns >> 30) as u32
}

/// How to rewrite a packet of the flow: the new addresses and ports, all network order, and the
/// next hop found for them (so established packets need no FIB lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub new_src_be: u32,
    pub new_dst_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub backend: u32,
    pub service_slot: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// Egress interface of the cached next hop; 0 = none cached.
    pub next_hop_ifindex: u32,
    /// Destination then source MAC, as in the Ethernet header.
    pub next_hop_macs: [u8; 12],
    pub last_seen_ns: u64,
    /// When the next hop was looked up, as a [`hop_stamp`].
    pub next_hop_at: u32,
    /// Established flows that are not [`FLOW_DSR`] (network order): the next sequence number this
    /// entry's sender has sent, in its own sequence space. An RST far from it is dropped.
    pub next_seq_be: u32,
    /// TCP timestamp translation (with [`FLOW_TS`]): added to the client's TSval toward the
    /// backend, subtracted from the backend's TSecr toward the client. It puts the backend-facing
    /// timestamps on the LB's clock, so a SNAT port reused toward a backend that still holds the
    /// previous connection in TIME_WAIT always shows a newer timestamp (PAWS accepts the SYN);
    /// clients randomise their timestamps per connection, which would otherwise fail half the time.
    /// [`FLOW_DSR`] flows (no timestamp translation) keep here the largest encapsulated packet the
    /// path to the backend has taken: a larger one asks the FIB again, which checks the MTU.
    pub ts_delta: u32,
    /// Both entries: the sequence number of the client's SYN (network order). A SYN with another
    /// sequence number on the same 4-tuple is a new connection (the client reused its port), never
    /// a retransmission of this one; on the reply entry, what an RST made of a stale answer
    /// acknowledges (`lb_common::passive::stale_answer`). Once a NAT flow is established: the last
    /// acknowledgment number its sender sent (an RST below it is dropped); [`crate::synproxy::FLOW_COOKIE`] flows
    /// keep the client's sequence delta here instead.
    pub syn_seq_be: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);

impl FlowKey {
    /// The key of the other direction of the flow this value rewrites to.
    pub const fn reverse_of(v: &FlowValue) -> FlowKey {
        FlowKey {
            src_be: v.new_dst_be,
            dst_be: v.new_src_be,
            sport_be: v.new_dport_be,
            dport_be: v.new_sport_be,
            proto: 6,
            _pad: [0; 3],
        }
    }
}

impl FlowValue {
    /// Whether the connection is over (RST, or FIN both ways).
    pub const fn closed(&self) -> bool {
        self.flags & FLOW_RST != 0
            || self.flags & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND) == (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND)
    }

    /// Whether the client's handshake is still incomplete ([`FLOW_HALF_OPEN`]).
    pub const fn half_open(&self) -> bool {
        self.flags & FLOW_HALF_OPEN != 0
    }

    /// Whether the entry has outlived its timeout at `now_ns`.
    pub const fn expired(&self, now_ns: u64, cfg: &GlobalConfig) -> bool {
        let timeout = if self.closed() {
            cfg.closed_timeout_ns
        } else if self.half_open() {
            cfg.syn_timeout_ns
        } else {
            cfg.idle_timeout_ns
        };
        now_ns.saturating_sub(self.last_seen_ns) > timeout
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_slot: u32,
    pub client_be: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: u32,
    /// The backend the client had before it failed over, or [`NO_BACKEND`].
    pub home: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

#[cfg(feature = "user")]
mod pod {
    use super::{
        AffinityKey, AffinityValue, BackendValue, Counter, FlowKey, FlowValue, GlobalConfig, ServiceKey,
        ServiceValue, TrafficCounters,
    };
    // SAFETY: all of these are plain old data, repr(C), with explicit padding fields.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}
