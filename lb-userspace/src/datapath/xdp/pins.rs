//! The pin directory during a start: one daemon per directory (an exclusive lock on the directory,
//! held for the daemon's life), a directory left half-made by a killed start recognised and
//! cleared, and what a failed start pinned removed again.
//!
//! A start is committed once every service is applied ([`PinDir::commit`]); until then dropping
//! the [`PinDir`] removes every pin this start created (maps and links: the maps go with their
//! last file descriptor, the links detach the program) and the sysctls it changed, and the
//! directory if this start made it. Pins that were there before (adopted from a running setup)
//! are never touched: a failed restart leaves live connections alone.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, Map, MapData};
use lb_common::maps::{GlobalConfig, MAP_CONFIG};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "another lb is running with [xdp] pin_path {0} (it holds the directory's lock); stop it first, \
         or give each daemon its own pin_path"
    )]
    InUse(PathBuf),
    #[error(
        "an lb is running with [xdp] pin_path {0}; stop it before `lb cleanup` (removing its pins \
         would cut its forwarding)"
    )]
    Running(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PinError + '_ {
    move |e| PinError::Io {
        path: path.into(),
        message: e.to_string(),
    }
}

/// What this start created, to remove if it fails.
#[derive(Debug)]
struct Created {
    /// The directory did not exist before.
    dir: bool,
    /// Entries found in the directory before this start pinned anything.
    before: BTreeSet<PathBuf>,
    /// The sysctls were changed by this start (not adopted): restore them.
    sysctls: bool,
}

/// The locked pin directory of a running (or starting) daemon.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    _lock: Flock<File>,
    created: Mutex<Option<Created>>,
}

/// The entries of `dir` (pins are files and nothing else lives there).
fn entries(dir: &Path) -> Result<BTreeSet<PathBuf>, PinError> {
    let list = std::fs::read_dir(dir).map_err(io(dir))?;
    Ok(list.flatten().map(|e| e.path()).collect())
}

impl PinDir {
    /// Locks `path` (created if missing, `dir_created` tells whether it was) before any map is made:
    /// refused when another daemon holds it. Then clears it if a killed start left it half-made
    /// (see [`half_made`]) and records what is there.
    pub fn lock(path: &Path, dir_created: bool) -> Result<PinDir, PinError> {
        let file = File::open(path).map_err(io(path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(PinError::InUse(path.into())),
            Err((_, e)) => {
                return Err(PinError::Io {
                    path: path.into(),
                    message: format!("locking the directory: {e}"),
                });
            }
        };
        let pins = PinDir {
            path: path.into(),
            _lock: lock,
            created: Mutex::new(None),
        };
        if half_made(path) {
            let stale = entries(path)?;
            for pin in &stale {
                std::fs::remove_file(pin).map_err(io(pin))?;
            }
            warn!(
                path = %path.display(),
                removed = stale.len(),
                "the pin directory was left half-made by a start that did not finish (its maps were \
                 never configured and carried no traffic); rebuilt"
            );
        }
        *pins.created.lock().unwrap() = Some(Created {
            dir: dir_created,
            before: entries(path)?,
            sysctls: false,
        });
        Ok(pins)
    }

    /// The sysctls were set by this start (not adopted from a running setup): a failed start
    /// restores them.
    pub fn sysctls_changed(&self) {
        if let Some(c) = self.created.lock().unwrap().as_mut() {
            c.sysctls = true;
        }
    }

    /// The start succeeded: what it pinned stays.
    pub fn commit(&self) {
        self.created.lock().unwrap().take();
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let Some(created) = self.created.get_mut().unwrap().take() else {
            return;
        };
        let mut removed = 0;
        for pin in entries(&self.path).unwrap_or_default() {
            if created.before.contains(&pin) {
                continue;
            }
            if let Err(e) = std::fs::remove_file(&pin) {
                warn!(pin = %pin.display(), error = %e, "failed start: cannot remove a pin it made");
            } else {
                removed += 1;
            }
        }
        if created.sysctls
            && let Err(e) = super::host::restore(&self.path)
        {
            warn!(error = %e, "failed start: cannot restore the sysctls it changed");
        }
        if created.dir
            && let Err(e) = std::fs::remove_dir(&self.path)
        {
            warn!(path = %self.path.display(), error = %e, "failed start: cannot remove the pin directory it made");
        }
        info!(
            path = %self.path.display(),
            removed,
            "the start failed: removed the pins it had made"
        );
    }
}

/// Refuses with [`PinError::Running`] while a daemon holds `dir` (`lb cleanup` under a running daemon
/// would cut its forwarding from under it).
pub fn ensure_unused(dir: &Path) -> Result<(), PinError> {
    let Ok(file) = File::open(dir) else {
        return Ok(()); // nothing there, or nothing this user may lock: nobody runs on it
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(PinError::Running(dir.into())),
        _ => Ok(()),
    }
}

/// Whether `dir` holds pins of a start that never finished: some pins, but the config map missing
/// or never written (a start writes it right after pinning every map, before anything uses
/// them). A config that cannot be read as this version's is left to the layout check, which
/// names the way out.
fn half_made(dir: &Path) -> bool {
    let Ok(pins) = entries(dir) else {
        return false;
    };
    if pins.is_empty() {
        return false;
    }
    let config = dir.join(MAP_CONFIG);
    if !pins.contains(&config) {
        return true;
    }
    let Ok(data) = MapData::from_pin(&config) else {
        return false;
    };
    match Array::<_, GlobalConfig>::try_from(Map::Array(data)) {
        Ok(array) => array.get(&0, 0).is_ok_and(|c| c.layout_version == 0),
        Err(_) => false,
    }
}

/// Stops this process (SIGSTOP) when `LB_TEST_STOP_AT` names `point`: lets tests kill a start at a
/// known step (`maps`: every map pinned, none configured yet). Unset in real use.
pub fn test_stop_point(point: &str) {
    if std::env::var_os("LB_TEST_STOP_AT").is_some_and(|v| v == point) {
        warn!(point, "LB_TEST_STOP_AT: stopping for a test");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
