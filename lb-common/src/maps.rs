//! eBPF map names and the types stored in them. One definition for kernel and user space:
//! `#[repr(C)]`, explicit padding, no bool/usize/enum, a size assertion for each.

/// Per-CPU global counters, indexed by [`GlobalCounter`] values.
pub const MAP_GLOBAL_STATS: &str = "lb_global";

/// Indexes into [`MAP_GLOBAL_STATS`].
pub mod global_counter {
    /// Packets seen by the XDP program.
    pub const PACKETS: u32 = 0;
    /// Packets passed to the kernel stack untouched (not for a VIP).
    pub const PASSED: u32 = 1;
    /// Packets too short to hold the headers they claim.
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
