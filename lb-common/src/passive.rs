//! Kernel passive health (issue #12): what the XDP program learns about each backend from the
//! handshakes it forwards, and how it keeps new connections away from a backend that refuses them.
//!
//! - [`MAP_PASSIVE`]: per backend, per CPU, [`PassiveCounters`]: SYNs of new connections forwarded,
//!   the backend's first answer to each (SYN-ACK, or RST: refused), and SYNs steered away from it.
//!   User space polls them (every [`POLL_MS`] ms) into passive health: refused SYNs and SYNs left
//!   unanswered after `connect_timeout` are connect failures, SYN-ACKs successes.
//! - [`MAP_REFUSING`]: per backend, when the kernel last saw it answer a SYN with an RST, or with
//!   a second stale answer in a row ([`stale_answer`]) (coarse monotonic ns, 0 = never). A new connection whose choice (affinity or ring) refused within
//!   [`REFUSING_NS`] goes elsewhere: the next [`RING_PROBES`] ring slots, else a backup of
//!   [`MAP_FALLBACK`]. While checks run, user space keeps the mark fresh until a check succeeds
//!   after it, and clears it then.
//! - [`MAP_FALLBACK`]: per service slot, the backups that take new clients while the ring is made
//!   of primaries: where a client goes when every primary it probes refuses.
//! - [`MAP_ALIVE`]: per backend, [`Liveness`]: when the kernel last saw it answer a SYN with a
//!   SYN-ACK, and its last stale answer (precise monotonic ns): what tells a stale answer's two
//!   causes apart ([`stale_answer`]).
//!
//! A SYN whose SNAT 4-tuple the backend still holds is not answered by a SYN-ACK. A live backend
//! takes a SYN on a TIME_WAIT 4-tuple whose timestamp is newer (the LB puts the backend-facing
//! timestamps on its own clock, and a port is reused only after 100 ms of quiet), so with no
//! listener left TIME_WAIT answers it with a bare ACK of the old connection: a refusal, which the
//! client would only learn from its SYN retransmission a second later. But a live backend answers
//! a bare ACK too where it still holds the 4-tuple half-open (a port taken from a half-open flow
//! under a SYN flood: [`FLOW_HELD`]) or established (an entry forgotten after idle_timeout):
//! a collision, not a refusal. [`stale_answer`] is the rule.

/// `PERCPU_ARRAY<u32, PassiveCounters>`, indexed by backend index (as `lb_backends`).
pub const MAP_PASSIVE: &str = "lb_be_passive";
/// `ARRAY<u32, u64>`, indexed by backend index: coarse monotonic ns of the last refused SYN
/// (kept fresh by user space until a check passes), 0 = not refusing.
pub const MAP_REFUSING: &str = "lb_refusing";
/// `ARRAY<u32, Fallback>`, indexed by service slot.
pub const MAP_FALLBACK: &str = "lb_fallback";
/// `ARRAY<u32, Liveness>`, indexed by backend index. Plain stores from any CPU (the latest wins).
pub const MAP_ALIVE: &str = "lb_be_alive";

/// How long after a start that made new maps (nothing pinned to adopt) a SNAT port with no entry
/// is taken as one a backend may hold ([`crate::maps::GlobalConfig::collisions_until`]): Linux
/// keeps TIME_WAIT for 60 s (`TCP_TIMEWAIT_LEN`), the state a reused port most often meets.
pub const FRESH_MAPS_HELD_NS: u64 = 60_000_000_000;

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
/// Flow flag (reply entry): the backend may still hold a connection on this SNAT 4-tuple that
/// answers a SYN with a bare ACK, so such an answer is a collision, never a refusal. Set at
/// creation (byte 0) when the port was taken from a half-open flow (reclaimed when the SNAT ports
/// are all held, as under a SYN flood, or expired: the backend may hold it half-open), or from a
/// flow that had the flag, or was a SYN-cookie flow (no timestamps: its TIME_WAIT turns down a
/// new SYN whose sequence number is not beyond its own): it passes on with the port. A stale answer sets it too (the RST goes to the client, the
/// backend keeps its connection): the port's next flow does not take the same answer for news. So
/// does the backend's FIN after the client's (until the client's last ACK reaches it, the backend
/// holds the 4-tuple in LAST_ACK), and, for [`FRESH_MAPS_HELD_NS`] after a start that made new
/// maps, taking a port with no entry (an earlier instance's connection may hold it). A SYN-ACK to
/// the flow's SYN clears it (the backend holds nothing else on the 4-tuple).
pub const FLOW_HELD: u32 = 1 << 3;

/// A backend's liveness as the kernel last saw it (precise monotonic ns, `bpf_ktime_get_ns`; 0 =
/// never).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Its last SYN-ACK to a SYN.
    pub synack_ns: u64,
    /// Its last stale answer ([`Stale::First`]).
    pub stale_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Liveness>() == 16);

/// What a stale answer is ([`stale_answer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// A connection a live backend still holds on the 4-tuple (or no timestamp to tell): forwarded
    /// to the client as it is (the client resets it and retransmits its SYN).
    Collision,
    /// The backend is silent since the SYN left, for the first time since its last SYN-ACK: the
    /// client gets an RST (it fails at once instead of in a second), the backend is not marked.
    First,
    /// Silent since the SYN left, and a stale answer came before since its last SYN-ACK: refused.
    /// The client gets an RST and the backend is marked refusing.
    Refused,
}

/// What the backend's first answer to a SYN is when it is a bare ACK (no SYN, RST or FIN) that
/// does not acknowledge the SYN, given the reply entry's `flags`, when the SYN was forwarded
/// (`sent_ns`, precise) and the backend's [`Liveness`] at `now_ns` (precise).
///
/// A [`Stale::Collision`] when:
/// - the SYN carried no timestamp ([`FLOW_TS`](crate::maps::FLOW_TS) unset): without one a live
///   TIME_WAIT accepts the SYN only if its sequence number is higher, else answers this ACK;
/// - the port was taken from a half-open flow, or met a stale answer before ([`FLOW_HELD`]): the
///   backend's half-open connection answers so;
/// - the backend answered another SYN with a SYN-ACK after this SYN left: it is alive, the ACK
///   comes from a connection it still holds on the 4-tuple (established, or half-open).
///
/// Otherwise [`Stale::Refused`] when an earlier stale answer came within [`REFUSING_NS`] and after
/// its last SYN-ACK, else [`Stale::First`]. After a kill no SYN-ACK comes any more, so the second
/// SYN that meets TIME_WAIT marks the backend; a live backend under a SYN flood answers SYN-ACKs
/// many times a millisecond, so that two stale answers ever come with none between is unlikely
/// (one alone, where its answer overtook every other, happens now and then: measured in
/// `xdp_flood`, about one in 4,000 SYNs).
#[inline(always)]
pub const fn stale_answer(flags: u32, sent_ns: u64, live: &Liveness, now_ns: u64) -> Stale {
    if flags & crate::maps::FLOW_TS == 0 || flags & FLOW_HELD != 0 || live.synack_ns > sent_ns {
        return Stale::Collision;
    }
    if live.stale_ns > live.synack_ns && now_ns.saturating_sub(live.stale_ns) < REFUSING_NS {
        Stale::Refused
    } else {
        Stale::First
    }
}

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
    /// SYNs answered by a bare ACK judged [`Stale::First`] (made an RST toward the client, not
    /// counted in `refused`; [`Stale::Refused`] ones are).
    pub stale: u64,
    /// SYNs answered by a bare ACK judged [`Stale::Collision`] (forwarded to the client).
    pub collided: u64,
}
const _: () = assert!(core::mem::size_of::<PassiveCounters>() == 48);

impl PassiveCounters {
    /// Field-wise sum (of two CPUs' cells).
    pub const fn add(&self, o: &PassiveCounters) -> PassiveCounters {
        PassiveCounters {
            syns: self.syns + o.syns,
            answered: self.answered + o.answered,
            refused: self.refused + o.refused,
            avoided: self.avoided + o.avoided,
            stale: self.stale + o.stale,
            collided: self.collided + o.collided,
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
    use super::{Fallback, Liveness, PassiveCounters};
    // SAFETY: plain old data, repr(C), no padding.
    unsafe impl aya::Pod for PassiveCounters {}
    unsafe impl aya::Pod for Liveness {}
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
            stale: 5,
            collided: 6,
        };
        assert_eq!(
            a.add(&a),
            PassiveCounters {
                syns: 2,
                answered: 4,
                refused: 6,
                avoided: 8,
                stale: 10,
                collided: 12,
            }
        );
    }

    #[test]
    fn a_bare_ack_refuses_only_from_a_backend_silent_since_the_syn_the_second_time() {
        use crate::maps::{FLOW_HALF_OPEN, FLOW_TS};
        let flags = FLOW_HALF_OPEN | FLOW_TS;
        let live = |synack_ns, stale_ns| Liveness { synack_ns, stale_ns };
        // Killed: its last SYN-ACK came before this SYN left (or never). The first stale answer
        // since then only fails its client; the second is a refusal.
        assert_eq!(stale_answer(flags, 1_000, &live(999, 0), 1_100), Stale::First);
        assert_eq!(stale_answer(flags, 1_000, &live(1_000, 500), 1_100), Stale::First);
        assert_eq!(stale_answer(flags, 1_000, &live(0, 0), 1_100), Stale::First);
        assert_eq!(stale_answer(flags, 1_000, &live(900, 950), 1_100), Stale::Refused);
        assert_eq!(stale_answer(flags, 1_000, &live(0, 950), 1_100), Stale::Refused);
        // ... within REFUSING_NS of the earlier one.
        assert_eq!(
            stale_answer(flags, 1_000, &live(0, 950), 950 + REFUSING_NS),
            Stale::First
        );
        // Alive: it answered another SYN after this one left.
        assert_eq!(
            stale_answer(flags, 1_000, &live(1_001, 1_050), 1_100),
            Stale::Collision
        );
        // The port came from a half-open flow the backend may still hold.
        assert_eq!(
            stale_answer(flags | FLOW_HELD, 1_000, &live(0, 950), 1_100),
            Stale::Collision
        );
        // No timestamp: a live TIME_WAIT may answer so.
        assert_eq!(
            stale_answer(FLOW_HALF_OPEN, 1_000, &live(0, 950), 1_100),
            Stale::Collision
        );
    }
}
