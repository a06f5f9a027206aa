//! A limit that can be lowered while it is in use: `max_connections` of a listener, `pool_size`
//! of an AJP backend pool.
//!
//! A tokio [`Semaphore`] can only forget permits that are free. Lowered below what is in use, the
//! limit keeps the shortfall as a debt, and each slot given back pays it before it frees a permit,
//! so the limit reaches its new size as soon as enough slots are given back (not only at the next
//! change).

use std::sync::atomic::{AtomicU32, Ordering::Relaxed, Ordering::SeqCst, fence};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// The limit: `size` slots, of which at most `size` are held once the debt is paid. Taking and
/// giving back a slot takes no lock of its own (only a resize does).
pub struct Limit {
    permits: Semaphore,
    /// Slots to forget as they are given back: held above the size.
    debt: AtomicU32,
    /// The size asked for.
    size: Mutex<u32>,
}

/// One slot of a [`Limit`], given back when dropped.
pub struct Slot(Arc<Limit>);

impl Limit {
    pub fn new(size: u32) -> Arc<Limit> {
        Arc::new(Limit {
            permits: Semaphore::new(size as usize),
            debt: AtomicU32::new(0),
            size: Mutex::new(size),
        })
    }

    /// The size asked for (slots may still be held above it until they are given back).
    pub fn size(&self) -> u32 {
        *self.size.lock().unwrap()
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
        let mut size = self.size.lock().unwrap();
        if want > *size {
            let grow = want - *size;
            let paid = self.take_debt(grow);
            self.permits.add_permits((grow - paid) as usize);
        } else if want < *size {
            self.debt.fetch_add(*size - want, Relaxed);
            self.settle();
        }
        *size = want;
    }

    /// Slots still held above the size (given back without freeing a permit).
    pub fn debt(&self) -> u32 {
        self.debt.load(Relaxed)
    }

    /// Takes up to `n` off the debt; returns how many.
    fn take_debt(&self, n: u32) -> u32 {
        let mut taken = 0;
        let _ = self.debt.fetch_update(Relaxed, Relaxed, |d| {
            taken = d.min(n);
            Some(d - taken)
        });
        taken
    }

    /// Pays the debt with free permits, after anything that added one or raised the debt. The
    /// fence orders that change before the look at the other: of a slot given back and a resize
    /// racing, one sees the other's, so no permit stays free while a debt is owed.
    fn settle(&self) {
        loop {
            fence(SeqCst);
            let owed = self.debt.load(Relaxed);
            if owed == 0 {
                return;
            }
            let forgotten = self.permits.forget_permits(owed as usize) as u32;
            let paid = self.take_debt(forgotten);
            if paid == forgotten {
                return;
            }
            // Paid meanwhile by a slot given back: the permits beyond the debt are free again.
            self.permits.add_permits((forgotten - paid) as usize);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let limit = &self.0;
        if limit.debt.load(Relaxed) > 0 && limit.take_debt(1) == 1 {
            return;
        }
        limit.permits.add_permits(1);
        limit.settle();
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

    /// Slots taken and given back on four threads while the size goes up and down: once all are
    /// back, exactly the last size is free and nothing is owed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_slots_and_resizes_end_at_the_last_size() {
        let limit = Limit::new(8);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20_000 {
                    let slot = limit.acquire().await;
                    tokio::task::yield_now().await;
                    drop(slot);
                }
            }));
        }
        let sizes = [2, 12, 1, 8, 3, 16, 5];
        for i in 0..5_000 {
            limit.resize(sizes[i % sizes.len()]);
            tokio::task::yield_now().await;
        }
        limit.resize(6);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!((limit.debt(), free(&limit)), (0, 6));
    }

    async fn held_slots(limit: &Arc<Limit>, n: usize) -> Vec<Slot> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(limit.acquire().await);
        }
        v
    }
}
