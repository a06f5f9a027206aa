//! Backend selection by the rules of DESIGN.md, written once for the kernel (over BPF maps), the
//! user-space datapaths (over their own tables) and `lb which` (over read-only map views):
//!
//! 1. an existing connection keeps its backend (the caller looks up its conntrack);
//! 2. a client with a live affinity entry goes to that backend while it admits known clients;
//! 3. otherwise the Maglev ring decides, and the affinity entry is recorded, remembering the
//!    backend the client failed over from (its "home", for `failback`).
//!
//! Storage is abstracted by three small traits, so each side keeps its own tables.

use crate::hash::ring_slot;
use crate::maps::{AffinityValue, NO_BACKEND};

/// The affinity entry of one client in one service.
pub trait AffinitySlot {
    fn get(&self) -> Option<AffinityValue>;
    /// Records the entry (a read-only view ignores it).
    fn put(&mut self, value: &AffinityValue);
}

/// A client's entry as read, for a selection that must not write (`lb which`, or user space
/// before a connection is up): what the selection would record is dropped.
pub struct Peek(pub Option<AffinityValue>);

impl AffinitySlot for Peek {
    fn get(&self) -> Option<AffinityValue> {
        self.0
    }
    fn put(&mut self, _: &AffinityValue) {}
}

/// Which backends may take clients that have affinity to them.
pub trait BackendTable {
    /// Present in the service, active or draining, and healthy.
    fn admits_known(&self, backend: u32) -> bool;
}

/// A service's Maglev ring: backend per slot ([`NO_BACKEND`] when nobody takes new clients).
pub trait Ring {
    fn size(&self) -> u32;
    fn get(&self, slot: u32) -> Option<u32>;
}

/// Why a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Conntrack,
    Affinity,
    Ring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub backend: u32,
    pub reason: Reason,
    /// The ring slot looked up (for [`Reason::Ring`]).
    pub slot: u32,
}

/// Per-service parameters of the rules.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub seed: u32,
    /// 0: affinity off.
    pub affinity_timeout_ns: u64,
}

/// Picks the backend for a new connection of `client` (host order) at `now`, and records or
/// refreshes its affinity entry. `existing` is the backend of the client's open connection, if the
/// caller's conntrack has one. `exclude` skips backends (user space: ones whose connect just
/// failed); the ring is then walked on for at most `walk` slots (the kernel passes 1 and a
/// closure that excludes nothing, so no loop is left after inlining).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn select(
    policy: &Policy,
    existing: Option<u32>,
    client: u32,
    now: u64,
    affinity: &mut impl AffinitySlot,
    backends: &impl BackendTable,
    ring: &impl Ring,
    exclude: impl Fn(u32) -> bool,
    walk: u32,
) -> Option<Choice> {
    if let Some(backend) = existing {
        return Some(Choice {
            backend,
            reason: Reason::Conntrack,
            slot: 0,
        });
    }
    let live = if policy.affinity_timeout_ns != 0 {
        affinity
            .get()
            .filter(|a| now.saturating_sub(a.last_seen_ns) < policy.affinity_timeout_ns)
    } else {
        None
    };
    if let Some(a) = live
        && backends.admits_known(a.backend)
        && !exclude(a.backend)
    {
        affinity.put(&next_entry(live, a.backend, now));
        return Some(Choice {
            backend: a.backend,
            reason: Reason::Affinity,
            slot: 0,
        });
    }
    let size = ring.size();
    if size == 0 {
        return None;
    }
    let first = ring_slot(policy.seed, client, size);
    for step in 0..walk {
        let slot = (first + step) % size;
        let backend = ring.get(slot)?;
        if backend == NO_BACKEND {
            return None;
        }
        if exclude(backend) {
            continue;
        }
        if policy.affinity_timeout_ns != 0 {
            affinity.put(&next_entry(live, backend, now));
        }
        return Some(Choice {
            backend,
            reason: Reason::Ring,
            slot,
        });
    }
    None
}

/// The affinity entry of a client that reached `backend` at `now`, given its live entry before.
/// A client moving to another backend remembers the one it failed over from (its home, kept
/// across further moves) until it is back home.
#[inline(always)]
pub fn next_entry(live: Option<AffinityValue>, backend: u32, now: u64) -> AffinityValue {
    let home = match live {
        Some(p) if p.backend != backend => {
            if p.home == NO_BACKEND {
                p.backend
            } else {
                p.home
            }
        }
        Some(p) => p.home,
        None => NO_BACKEND,
    };
    AffinityValue {
        backend,
        home: if home == backend { NO_BACKEND } else { home },
        last_seen_ns: now,
    }
}

/// Whether an affinity entry belongs to a client that failed over away from `backend` (forgotten
/// when `backend` is healthy again and the service fails clients back).
pub fn failed_over_from(entry: &AffinityValue, backend: u32) -> bool {
    entry.home == backend
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slot(Option<AffinityValue>);
    impl AffinitySlot for Slot {
        fn get(&self) -> Option<AffinityValue> {
            self.0
        }
        fn put(&mut self, v: &AffinityValue) {
            self.0 = Some(*v);
        }
    }
    struct Admits(u32);
    impl BackendTable for Admits {
        fn admits_known(&self, b: u32) -> bool {
            self.0 & (1 << b) != 0
        }
    }
    struct Cycle(u32);
    impl Ring for Cycle {
        fn size(&self) -> u32 {
            7
        }
        fn get(&self, slot: u32) -> Option<u32> {
            Some(slot % self.0)
        }
    }
    const P: Policy = Policy {
        seed: 1,
        affinity_timeout_ns: 100,
    };

    #[test]
    fn rules_in_order_with_home() {
        let mut slot = Slot(None);
        let all = Admits(0b111);
        let first = select(&P, None, 9, 0, &mut slot, &all, &Cycle(3), |_| false, 1).unwrap();
        assert_eq!(first.reason, Reason::Ring);
        assert_eq!(
            select(&P, Some(2), 9, 1, &mut slot, &all, &Cycle(3), |_| false, 1)
                .unwrap()
                .reason,
            Reason::Conntrack
        );
        let again = select(&P, None, 9, 50, &mut slot, &all, &Cycle(3), |_| false, 1).unwrap();
        assert_eq!((again.backend, again.reason), (first.backend, Reason::Affinity));
        // Its backend stops admitting known clients: ring walk past it, home remembered.
        let without = Admits(0b111 & !(1 << first.backend));
        let moved = select(
            &P,
            None,
            9,
            60,
            &mut slot,
            &without,
            &Cycle(3),
            |b| b == first.backend,
            7,
        )
        .unwrap();
        assert_ne!(moved.backend, first.backend);
        assert_eq!(slot.0.unwrap().home, first.backend);
        assert!(failed_over_from(&slot.0.unwrap(), first.backend));
        // Expired entry: ring again, no home.
        let later = select(&P, None, 9, 1000, &mut slot, &all, &Cycle(3), |_| false, 1).unwrap();
        assert_eq!(later.reason, Reason::Ring);
        assert_eq!(slot.0.unwrap().home, NO_BACKEND);
    }

    #[test]
    fn empty_ring_and_exhausted_walk_choose_nothing() {
        struct Empty;
        impl Ring for Empty {
            fn size(&self) -> u32 {
                0
            }
            fn get(&self, _: u32) -> Option<u32> {
                None
            }
        }
        let mut slot = Slot(None);
        assert!(select(&P, None, 1, 0, &mut slot, &Admits(1), &Empty, |_| false, 1).is_none());
        assert!(select(&P, None, 1, 0, &mut slot, &Admits(7), &Cycle(3), |_| true, 7).is_none());
        assert!(slot.0.is_none());
    }
}
