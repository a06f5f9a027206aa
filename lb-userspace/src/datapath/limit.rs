//! A limit that can be lowered while it is in use: `max_connections` of a listener, `pool_size`
//! of an AJP backend pool.
//!
//! A tokio [`Semaphore`] can only forget permits that are free. Lowered below what is in use, the
//! limit keeps the shortfall as a debt, and each slot given back pays it before it frees a permit,
//! so the limit reaches its new size as soon as enough slots are given back (not only at the next
//! change).

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// The limit: `size` slots, of which at most `size` are held once the debt is paid.
pub struct Limit {
    permits: Semaphore,
    state: Mutex<Sizes>,
}

struct Sizes {
    /// The size asked for.
    size: u32,
    /// Slots to forget as they are given back: held above `size`.
    debt: u32,
}

/// One slot of a [`Limit`], given back when dropped.
pub struct Slot(Arc<Limit>);

impl Limit {
    pub fn new(size: u32) -> Arc<Limit> {
        Arc::new(Limit {
            permits: Semaphore::new(size as usize),
            state: Mutex::new(Sizes { size, debt: 0 }),
        })
    }

    /// The size asked for (slots may still be held above it until they are given back).
    pub fn size(&self) -> u32 {
        self.state.lock().unwrap().size
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        self.permits
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
        Slot(self.clone())
    }

    /// Changes the size: at once upward and as far as free slots allow downward, the rest as slots
    /// are given back.
    pub fn resize(&self, want: u32) {
        let mut s = self.state.lock().unwrap();
        if want > s.size {
            let grow = want - s.size;
            let paid = grow.min(s.debt);
            s.debt -= paid;
            self.permits.add_permits((grow - paid) as usize);
        } else {
            let shrink = s.size - want;
            let forgotten = self.permits.forget_permits(shrink as usize) as u32;
            s.debt += shrink - forgotten;
        }
        s.size = want;
    }

    /// Slots still held above the size (given back without freeing a permit).
    pub fn debt(&self) -> u32 {
        self.state.lock().unwrap().debt
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        if s.debt > 0 {
            s.debt -= 1;
        } else {
            self.0.permits.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(limit: &Limit) -> usize {
        limit.permits.available_permits()
    }

    #[tokio::test]
    async fn a_limit_lowered_while_in_use_reaches_its_size_as_slots_come_back() {
        let limit = Limit::new(4);
        let mut held = held_slots(&limit, 4).await;
        limit.resize(1);
        assert_eq!((limit.size(), limit.debt(), free(&limit)), (1, 3, 0));
        held.truncate(2); // two given back: both pay the debt
        assert_eq!((limit.debt(), free(&limit)), (1, 0));
        held.truncate(1);
        assert_eq!(
            (limit.debt(), free(&limit)),
            (0, 0),
            "one held, the size is one: none free"
        );
        held.clear();
        assert_eq!(free(&limit), 1);
        let one = limit.acquire().await;
        assert!(
            limit.permits.try_acquire().is_err(),
            "a second slot is not given out"
        );
        drop(one);
    }

    #[tokio::test]
    async fn raising_a_lowered_limit_cancels_its_debt_first() {
        let limit = Limit::new(3);
        let held = held_slots(&limit, 3).await;
        limit.resize(1);
        assert_eq!(limit.debt(), 2);
        limit.resize(5);
        assert_eq!((limit.size(), limit.debt(), free(&limit)), (5, 0, 2));
        drop(held);
        assert_eq!(free(&limit), 5);
    }

    async fn held_slots(limit: &Arc<Limit>, n: usize) -> Vec<Slot> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(limit.acquire().await);
        }
        v
    }
}
