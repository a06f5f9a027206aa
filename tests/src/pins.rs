//! [`Pins`]: a test's XDP pin directory, removed on drop with the sysctl record lb keeps for it.
//! [`PinDir`]: the same clean-up without the lock, for a second daemon of a test holding [`Pins`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Held by every live [`Pins`]: the XDP tests of one binary run one at a time, because they
/// share the host-wide sysctls `lb run` sets and `lb cleanup` restores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// An XDP pin directory of one test, removed (with lb's sysctl record for it) on drop.
pub struct Pins(
    pub PathBuf,
    #[allow(dead_code, reason = "held, not read")] MutexGuard<'static, ()>,
);

impl Pins {
    /// Waits for the binary's other XDP tests, then owns `dir`.
    pub fn new(dir: PathBuf) -> Pins {
        let guard = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pins(dir, guard)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

/// A pin directory removed on drop like a [`Pins`], but without its lock: for a second `lb` in a
/// test that already holds the binary's [`Pins`] (two-node tests).
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

/// Removes the pins in `dir`, `dir` itself and lb's sysctl record for it.
fn remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
    // The sysctl record lb keeps for `lb cleanup` beside the pins, named as
    // lb::datapath::xdp::host::record_path names it (lb-tests cannot depend on lb).
    let record = format!(
        "/run/lb/sysctl/{}.json",
        dir.display().to_string().replace('%', "%25").replace('/', "%2F")
    );
    let _ = std::fs::remove_file(record);
}
