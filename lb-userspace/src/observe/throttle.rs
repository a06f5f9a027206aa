//! At most one log line per second for an event a client can cause at will (a wrong AJP secret,
//! lb short of descriptors): the line says how many were not logged since the last one, so a
//! flood neither fills the journal nor goes unnoticed.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One kind of event, logged at most once per wall-clock second.
pub struct Throttle {
    last_second: AtomicU64,
    since: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            last_second: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one event; `Some(n)` when it is to be logged, `n` events (this one included) since
    /// the last logged.
    pub fn due(&self) -> Option<u64> {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.due_at(second)
    }

    fn due_at(&self, second: u64) -> Option<u64> {
        self.since.fetch_add(1, Relaxed);
        if self.last_second.swap(second, Relaxed) == second {
            return None;
        }
        // Everything counted since the last line (two threads due at once share the count).
        Some(self.since.swap(0, Relaxed).max(1))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_counting_the_events_it_stands_for() {
        let t = Throttle::new();
        assert_eq!(t.due_at(100), Some(1));
        assert_eq!(t.due_at(100), None);
        assert_eq!(t.due_at(100), None);
        assert_eq!(t.due_at(101), Some(3), "two not logged, and this one");
        assert_eq!(t.due_at(105), Some(1));
    }
}
