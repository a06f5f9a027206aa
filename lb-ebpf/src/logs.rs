//! Rate limits for the program's log lines: per reason, at most [`LINES_PER_SECOND`] lines a second
//! over all CPUs, the lines held back counted and reported in the next line that is written.
//!
//! State is per CPU (no atomics, no contention): each CPU may write one line per reason every
//! `cpus / LINES_PER_SECOND` seconds, so all CPUs together stay within the budget.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// A reason to log: its slot in [`LOG_LIMITS`].
pub const LOG_SNAT_EXHAUSTED: u32 = 0;
pub const LOG_NO_ROUTE: u32 = 1;
const LOG_REASONS: u32 = 2;

/// Lines per second and reason, over all CPUs.
const LINES_PER_SECOND: u64 = 4;

/// One CPU's state for one reason. Kernel-only (never pinned nor read by user space), so it
/// lives here rather than in lb-common.
#[repr(C)]
pub struct LogLimit {
    /// When this CPU may write its next line of this reason (coarse monotonic ns).
    next_ns: u64,
    /// Lines held back since the last one written.
    suppressed: u64,
}

#[map(name = "lb_log_limit")]
static LOG_LIMITS: PerCpuArray<LogLimit> = PerCpuArray::with_max_entries(LOG_REASONS, 0);

/// Whether a line of `reason` may be written now: `Some(lines held back since the last one)`, to be
/// reported in it, or `None` (the line is counted as held back).
#[inline(always)]
pub fn may_log(reason: u32, now: u64, cpus: u32) -> Option<u64> {
    let cell = LOG_LIMITS.get_ptr_mut(reason)?;
    // SAFETY: this CPU's own slot, valid for the program run.
    let limit = unsafe { &mut *cell };
    if now < limit.next_ns {
        limit.suppressed += 1;
        return None;
    }
    let suppressed = limit.suppressed;
    let cpus = if cpus == 0 { 1 } else { u64::from(cpus) };
    limit.suppressed = 0;
    limit.next_ns = now + cpus * (1_000_000_000 / LINES_PER_SECOND);
    Some(suppressed)
}
