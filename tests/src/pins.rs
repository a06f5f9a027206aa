//! [`Pins`]: a test's XDP pin directory, removed on drop with the sysctl record lb keeps for it.

use std::path::PathBuf;
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
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
        // The sysctl record lb keeps for `lb cleanup` beside the pins, named as
        // lb::datapath::xdp::host::record_path names it (lb-tests cannot depend on lb).
        let record = format!(
            "/run/lb/sysctl/{}.json",
            self.0
                .display()
                .to_string()
                .replace('%', "%25")
                .replace('/', "%2F")
        );
        let _ = std::fs::remove_file(record);
    }
}
