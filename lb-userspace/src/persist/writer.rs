//! [`Writer`]: writes the state file off the change path. A change hands over its snapshot and
//! returns; a thread writes the latest one (several changes in a row make one write), at most one
//! write per [`MIN_GAP`]. The last snapshot is written before the daemon exits
//! ([`Writer::flush`], and on drop).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Persist;
use crate::runtime::Snapshot;

/// How often a flush looks whether the writing thread is still there.
const FLUSH_LOOK: Duration = Duration::from_millis(100);

/// The shortest time between the starts of two writes. A write of a service with 1,000 backends
/// (copy, JSON, `fsync` twice) takes a few ms of CPU: during a burst of changes, writing after
/// each would take a core from the changes and the traffic. A crash loses at most the changes
/// of the last gap; a clean exit loses none.
pub const MIN_GAP: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Slot {
    /// The snapshot to write next; replaced by a newer one until the thread takes it.
    latest: Option<Arc<Snapshot>>,
    writing: bool,
    closed: bool,
    /// Callers of [`Writer::flush`] waiting: the next write does not wait out the gap.
    flushing: usize,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    changed: Condvar,
}

pub struct Writer {
    persist: Arc<Persist>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("path", &self.persist.path())
            .finish()
    }
}

impl Writer {
    /// Starts the writing thread for `persist`.
    pub fn start(persist: Persist) -> Writer {
        let persist = Arc::new(persist);
        let shared = Arc::new(Shared::default());
        let thread = {
            let (persist, shared) = (persist.clone(), shared.clone());
            std::thread::Builder::new()
                .name("lb-state-file".into())
                .spawn(move || write_loop(&persist, &shared))
                .map_err(|e| warn!(error = %e, "no state-file thread; the file is written on each change"))
                .ok()
        };
        Writer {
            persist,
            shared,
            thread,
        }
    }

    /// The file's writer (to rebase it after a reload).
    pub fn persist(&self) -> &Persist {
        &self.persist
    }

    /// Queues `snapshot` to be written (replacing one not yet written).
    pub fn save(&self, snapshot: Arc<Snapshot>) {
        if self.thread.is_none() {
            if let Err(e) = self.persist.save(&snapshot) {
                warn!(error = %e, "state file not written; the change is applied but will not survive a restart");
            }
            return;
        }
        self.shared.slot.lock().unwrap().latest = Some(snapshot);
        self.shared.changed.notify_all();
    }

    /// Waits until every queued snapshot is written (at once, without waiting out the gap), or
    /// the writing thread is gone (it would never say so).
    pub fn flush(&self) {
        let mut slot = self.shared.slot.lock().unwrap();
        slot.flushing += 1;
        self.shared.changed.notify_all();
        while self.thread.as_ref().is_some_and(|t| !t.is_finished())
            && (slot.latest.is_some() || slot.writing)
        {
            slot = self.shared.changed.wait_timeout(slot, FLUSH_LOOK).unwrap().0;
        }
        slot.flushing -= 1;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.slot.lock().unwrap().closed = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(persist: &Persist, shared: &Shared) {
    let mut last: Option<Instant> = None;
    loop {
        let snapshot = {
            let mut slot = shared.slot.lock().unwrap();
            loop {
                if slot.latest.is_none() && !slot.closed {
                    slot = shared.changed.wait(slot).unwrap();
                    continue;
                }
                // Something to write: wait out the gap since the last write, unless the daemon
                // exits or someone waits for the file.
                let due = last.map(|t| t + MIN_GAP);
                match due {
                    Some(due) if !slot.closed && slot.flushing == 0 => {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        slot = shared.changed.wait_timeout(slot, due - now).unwrap().0;
                    }
                    _ => break,
                }
            }
            match slot.latest.take() {
                Some(s) => {
                    slot.writing = true;
                    s
                }
                None => return,
            }
        };
        last = Some(Instant::now());
        if let Err(e) = persist.save(&snapshot) {
            warn!(error = %e, "state file not written; the change is applied but will not survive a restart");
        }
        shared.slot.lock().unwrap().writing = false;
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, State};

    /// A snapshot of the three-backend `web` with `weight` on b1.
    fn with_b1_weight(weight: u32) -> Arc<Snapshot> {
        let mut state: State = crate::state::tests::three();
        state
            .apply(Command::SetWeight {
                service: "web".into(),
                backend: "b1".into(),
                weight,
            })
            .unwrap();
        Arc::new(Snapshot::new(state))
    }

    fn written_b1_weight(path: &std::path::Path) -> u32 {
        let file = super::super::StateFile::load(path)
            .unwrap()
            .expect("a state file");
        file.services[0]
            .backends
            .iter()
            .find(|b| b.name == "b1")
            .unwrap()
            .weight
    }

    #[test]
    fn the_last_snapshot_is_written_on_flush_and_on_drop() {
        let dir = std::env::temp_dir().join(format!("lb-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let writer = Writer::start(Persist::new(path.clone(), Vec::new()));
        for weight in 2..=9 {
            writer.save(with_b1_weight(weight));
        }
        writer.flush();
        assert_eq!(written_b1_weight(&path), 9);
        writer.save(with_b1_weight(7));
        drop(writer);
        assert_eq!(written_b1_weight(&path), 7, "the drop writes what was queued");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A change saved within the gap after a write is written once the gap is over, with
    /// nobody flushing.
    #[test]
    fn a_change_within_the_gap_is_written_after_it() {
        let dir = std::env::temp_dir().join(format!("lb-writer-gap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let writer = Writer::start(Persist::new(path.clone(), Vec::new()));
        writer.save(with_b1_weight(3));
        writer.flush();
        writer.save(with_b1_weight(4));
        writer.save(with_b1_weight(5));
        let deadline = Instant::now() + Duration::from_secs(30);
        while written_b1_weight(&path) != 5 {
            assert!(Instant::now() < deadline, "the last change was never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
