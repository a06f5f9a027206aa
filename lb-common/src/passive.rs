//! Kernel passive health (issue #12): what the XDP program learns about each backend from the
//! handshakes it forwards, and how it keeps new connections away from a backend that refuses them.
//!
//! - [`MAP_PASSIVE`]: per backend, per CPU, [`PassiveCounters`]: SYNs of new connections forwarded,
//!   the backend's first answer to each (SYN-ACK, or RST: refused), and SYNs steered away from it.
//!   User space polls them (every [`POLL_MS`] ms) into passive health: refused SYNs and SYNs left
//!   unanswered after `connect_timeout` are connect failures, SYN-ACKs successes.
//! - [`MAP_REFUSING`]: per backend, when the kernel last saw it answer a SYN with an RST (coarse
//!   monotonic ns, 0 = never). A new connection whose choice (affinity or ring) refused within
//!   [`REFUSING_NS`] goes elsewhere: the next [`RING_PROBES`] ring slots, else a backup of
//!   [`MAP_FALLBACK`]. While checks run, user space keeps the mark fresh until a check succeeds
//!   after it, and clears it then.
//! - [`MAP_FALLBACK`]: per service slot, the backups that take new clients while the ring is made
//!   of primaries: where a client goes when every primary it probes refuses.

/// `PERCPU_ARRAY<u32, PassiveCounters>`, indexed by backend index (as `lb_backends`).
pub const MAP_PASSIVE: &str = "lb_be_passive";
/// `ARRAY<u32, u64>`, indexed by backend index: coarse monotonic ns of the last refused SYN
/// (kept fresh by user space until a check passes), 0 = not refusing.
pub const MAP_REFUSING: &str = "lb_refusing";
/// `ARRAY<u32, Fallback>`, indexed by service slot.
pub const MAP_FALLBACK: &str = "lb_fallback";

/// How long a refused SYN keeps new connections away from its backend on the kernel's own word
/// (user space, while it runs and the service has checks, extends this until a check passes).
pub const REFUSING_NS: u64 = 1_000_000_000;
/// Ring slots looked at, from the client's own, for a backend that is not refusing.
pub const RING_PROBES: u32 = 8;
/// Entries of a service's fallback list (a power of two: the kernel indexes it with a mask).
pub const FALLBACK_SLOTS: usize = 8;
/// How often user space reads the counters (ms): well inside the 50 ms failover target.
pub const POLL_MS: u64 = 10;

/// Flow flag (reply entry): the backend's first answer to the SYN (SYN-ACK or RST) was counted.
/// Byte 0, beside `FLOW_TO_BACKEND`, `FLOW_HALF_OPEN`, `FLOW_TS` and `FLOW_RESET`.
pub const FLOW_ANSWERED: u32 = 1 << 2;

/// One backend's handshake counters on one CPU (user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveCounters {
    /// SYNs of new connections forwarded to the backend (retransmissions not counted).
    pub syns: u64,
    /// SYN-ACKs: the backend's first answer to a SYN was a SYN-ACK.
    pub answered: u64,
    /// RSTs: the backend's first answer to a SYN was an RST (nothing listens: refused).
    pub refused: u64,
    /// SYNs whose choice was this backend, sent elsewhere because it was refusing.
    pub avoided: u64,
}
const _: () = assert!(core::mem::size_of::<PassiveCounters>() == 32);

impl PassiveCounters {
    /// Field-wise sum (of two CPUs' cells).
    pub const fn add(&self, o: &PassiveCounters) -> PassiveCounters {
        PassiveCounters {
            syns: self.syns + o.syns,
            answered: self.answered + o.answered,
            refused: self.refused + o.refused,
            avoided: self.avoided + o.avoided,
        }
    }
}

/// A service's backups that take new clients, used only while its ring is made of primaries: the
/// list repeated over the [`FALLBACK_SLOTS`] entries (so a client's hash picks among them evenly).
/// Each entry is a backend index + 1; 0 = none (a map entry user space has not written yet holds
/// no backup), all 0 when there are none (or the ring already holds the backups).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fallback {
    pub backends: [u32; FALLBACK_SLOTS],
}
const _: () = assert!(core::mem::size_of::<Fallback>() == 32);

impl Fallback {
    /// No backup to fall back to.
    pub const NONE: Fallback = Fallback {
        backends: [0; FALLBACK_SLOTS],
    };

    /// The list of backend indices `backups` (at most [`FALLBACK_SLOTS`] are used), repeated to
    /// fill the entries.
    pub fn of(backups: &[u32]) -> Fallback {
        let mut list = Fallback::NONE;
        let n = backups.len().min(FALLBACK_SLOTS);
        if n > 0 {
            for (i, slot) in list.backends.iter_mut().enumerate() {
                *slot = backups[i % n].wrapping_add(1);
            }
        }
        list
    }
}

/// Whether a refusing mark set at `marked_ns` (0 = none) still holds at `now_ns`.
#[inline(always)]
pub const fn refusing(marked_ns: u64, now_ns: u64) -> bool {
    marked_ns != 0 && now_ns.saturating_sub(marked_ns) < REFUSING_NS
}

#[cfg(feature = "user")]
mod pod {
    use super::{Fallback, PassiveCounters};
    // SAFETY: plain old data, repr(C), no padding.
    unsafe impl aya::Pod for PassiveCounters {}
    unsafe impl aya::Pod for Fallback {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_holds_for_the_window_only() {
        assert!(!refusing(0, 5));
        assert!(refusing(10, 10));
        assert!(refusing(10, 10 + REFUSING_NS - 1));
        assert!(!refusing(10, 10 + REFUSING_NS));
        // Written by user space a little ahead of the kernel's coarse clock: still holds.
        assert!(refusing(100, 50));
    }

    #[test]
    fn fallback_lists_repeat_their_backups() {
        assert_eq!(Fallback::of(&[]), Fallback::NONE);
        assert_eq!(Fallback::of(&[4, 9, 2]).backends, [5, 10, 3, 5, 10, 3, 5, 10]);
        assert_eq!(Fallback::of(&[0; 12]).backends, [1; 8]);
    }

    #[test]
    fn counters_add_field_wise() {
        let a = PassiveCounters {
            syns: 1,
            answered: 2,
            refused: 3,
            avoided: 4,
        };
        assert_eq!(
            a.add(&a),
            PassiveCounters {
                syns: 2,
                answered: 4,
                refused: 6,
                avoided: 8
            }
        );
    }
}
