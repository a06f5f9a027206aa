//! eBPF map names and the types stored in them. One definition for kernel and user space:
//! `#[repr(C)]`, explicit padding, no bool/usize/enum, a size assertion for each.

/// Per-CPU global counters (`PERCPU_ARRAY<u32, Counter>`), indexed by the [`global_counter`] values.
/// User space sums each index over all CPUs.
pub const MAP_GLOBAL_STATS: &str = "lb_global";

/// `max_entries` of [`MAP_GLOBAL_STATS`]: one slot per [`global_counter`] index.
pub const GLOBAL_STATS_ENTRIES: u32 = global_counter::COUNT;

/// Indexes into [`MAP_GLOBAL_STATS`].
///
/// `PACKETS` counts every packet the program sees. Verdict counters (`PASSED`, later the forwarding
/// and drop verdicts) count each packet exactly once, so they sum to `PACKETS`. Reason counters
/// (`TRUNCATED`) say why a packet got its verdict and come on top: a truncated frame counts in both
/// `TRUNCATED` and `PASSED`.
pub mod global_counter {
    /// Packets seen by the XDP program.
    pub const PACKETS: u32 = 0;
    /// Packets handed to the kernel stack untouched (`XDP_PASS`: not for a VIP, or malformed).
    pub const PASSED: u32 = 1;
    /// Packets too short to hold the headers they claim (reason; also counted in their verdict).
    pub const TRUNCATED: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}

/// One per-CPU counter cell: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: plain old data, repr(C), no padding.
unsafe impl aya::Pod for Counter {}
