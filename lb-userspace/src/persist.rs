//! The `state_file`: runtime changes that survive a restart (operator state, weights, backends and
//! services added or removed on the control socket, and the transition history).
//!
//! The file is JSON ([`StateFile`]). It holds the services as the daemon last ran them and, as
//! `base`, the services of the config it started from (or last reloaded): the runtime changes are
//! [`crate::state::diff`] of the two, so on start they are applied on top of whatever the config
//! file now says. It is written after every change, off the change's path ([`Writer`]: a change
//! does not wait for the disk; changes in quick succession make one write; the last one is written
//! before the daemon exits), atomically: a temporary file in the same
//! directory, `fsync`, `rename`, `fsync` of the directory. A file that cannot be read, is not a
//! regular file (a FIFO, a device, a directory: refused without a read, which could block or never
//! end), is larger than [`MAX_FILE_SIZE`], is not JSON of this shape, or carries another
//! [`FORMAT_VERSION`] is renamed to `<file>.corrupt-<unix time>` and the daemon starts from the
//! config alone. A change of the file that no longer fits is skipped and logged; a service the file
//! moved (new listen address or datapath) whose new form cannot come up stays as the config has it.
//!
//! The file keeps the AJP secrets in clear (it is mode 0600, like the config file that holds them):
//! its services are written with [`crate::config::services_in_clear`], not the `Serialize` form
//! operators see, which shows `(hidden)`. A service whose secret in the file is that literal
//! `(hidden)` (what an older `lb` wrote) is not restored: the change is logged and skipped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use tracing::{error, info, warn};

use crate::config::{Config, ServiceConfig};
use crate::engine::{Engine, Origin};
use crate::runtime::{Snapshot, TransitionLog};
use crate::state::{Command, Transition};

/// Version of the file layout; a file with another one is set aside.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field: tells an `lb` state file from any other JSON.
pub const FORMAT_NAME: &str = "lb-state";
/// The largest state file read (64 MiB, some 300,000 backends); a bigger one is set aside.
pub const MAX_FILE_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not an lb state file: {message}")]
    Corrupt { path: String, message: String },
    #[error(
        "{path} is {what}, not a regular file; the state file must be a regular file (or a symlink to one)"
    )]
    NotRegular { path: String, what: &'static str },
    #[error("{path} is {size} bytes, more than the {MAX_FILE_SIZE} bytes a state file may have")]
    TooLarge { path: String, size: u64 },
    #[error("{path} has format version {found}, this lb reads version {FORMAT_VERSION}")]
    Version { path: String, found: u64 },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(
        "service {service}: its AJP {field} was saved as \"(hidden)\" by an older lb, which did not keep \
         secrets in the state file; add the service again with its secrets"
    )]
    HiddenSecret { service: String, field: &'static str },
}

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The `lb` version that wrote it (for people; not checked).
    pub lb_version: String,
    /// Unix time (ms) of the write.
    pub written_unix_ms: u64,
    /// The services of the config file the daemon started from or last reloaded.
    #[serde(serialize_with = "crate::config::services_in_clear")]
    pub base: Vec<ServiceConfig>,
    /// The services as they ran.
    #[serde(serialize_with = "crate::config::services_in_clear")]
    pub services: Vec<ServiceConfig>,
    /// Transition history: service name → backend name → log.
    pub transitions: BTreeMap<String, BTreeMap<String, SavedLog>>,
}

/// One backend's transition counts and recent transitions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLog {
    pub health: u64,
    pub state: u64,
    pub recent: Vec<Transition>,
}

impl SavedLog {
    fn of(log: &TransitionLog) -> SavedLog {
        SavedLog {
            health: log.health,
            state: log.state,
            recent: log.recent().cloned().collect(),
        }
    }

    /// The saved log followed by what `current` recorded since the start.
    pub fn then(&self, current: &TransitionLog) -> TransitionLog {
        let mut log = TransitionLog::restored(self.health, self.state, self.recent.iter().cloned());
        for t in current.recent() {
            log.record(t.clone());
        }
        log
    }
}

impl StateFile {
    /// The file for a published snapshot, against the config services `base`.
    pub fn of(snapshot: &Snapshot, base: &[ServiceConfig]) -> StateFile {
        let mut services: Vec<_> = snapshot.state.services.values().collect();
        services.sort_by_key(|s| s.id);
        let mut transitions = BTreeMap::new();
        for svc in &services {
            let logs: BTreeMap<String, SavedLog> = svc
                .backends
                .iter()
                .map(|b| {
                    let log = snapshot.runtime(svc, b).transitions.lock().unwrap().clone();
                    (b.config.name.clone(), SavedLog::of(&log))
                })
                .filter(|(_, l)| !l.recent.is_empty() || l.health > 0 || l.state > 0)
                .collect();
            if !logs.is_empty() {
                transitions.insert(svc.settings.name.clone(), logs);
            }
        }
        StateFile {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            lb_version: env!("CARGO_PKG_VERSION").to_string(),
            written_unix_ms: unix_ms(),
            base: base.to_vec(),
            services: services.iter().map(|s| s.config()).collect(),
            transitions,
        }
    }

    /// The runtime changes it holds, as commands to apply on top of the config.
    pub fn commands(&self) -> Vec<Command> {
        let config = |services: &[ServiceConfig]| Config {
            services: services.to_vec(),
            ..Config::parse("", "(state file)").expect("an empty config is valid")
        };
        crate::state::diff(&config(&self.base), &config(&self.services))
    }

    /// Parses the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<StateFile, PersistError> {
        let corrupt = |message: String| PersistError::Corrupt {
            path: path.display().to_string(),
            message,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        if value.get("format").and_then(serde_json::Value::as_str) != Some(FORMAT_NAME) {
            return Err(corrupt(format!("no \"format\": \"{FORMAT_NAME}\"")));
        }
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(PersistError::Version {
                    path: path.display().to_string(),
                    found,
                });
            }
            None => return Err(corrupt("no \"version\" number".into())),
        }
        let mut file: StateFile = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        // Every service passes the checks of an `add-service` request, names are unique.
        for (list, key) in [(&mut file.base, "base"), (&mut file.services, "services")] {
            let mut names = std::collections::BTreeSet::new();
            for (i, service) in list.iter_mut().enumerate() {
                let fields = service.to_fields_in_clear().map_err(|e| corrupt(e.to_string()))?;
                *service = ServiceConfig::from_fields(fields)
                    .map_err(|e| corrupt(format!("{key}[{i}] ({}): {e}", service.name)))?;
                if !names.insert(service.name.clone()) {
                    return Err(corrupt(format!(
                        "{key}[{i}]: service {} is listed twice",
                        service.name
                    )));
                }
            }
        }
        Ok(file)
    }

    /// Reads the file: `Ok(None)` when it does not exist. Only a regular file (or a symlink to one)
    /// of at most [`MAX_FILE_SIZE`] bytes is read: a FIFO, a device, a directory or a bigger file
    /// is refused without reading it (never blocking, never reading it whole into memory).
    pub fn load(path: &Path) -> Result<Option<StateFile>, PersistError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let read = |source| PersistError::Read {
            path: path.display().to_string(),
            source,
        };
        // Looked at before it is opened (opening a device can have effects of its own), and
        // opened without waiting (a FIFO with no writer would block the start forever), then
        // checked again on what was opened, in case the path changed in between.
        match std::fs::metadata(path) {
            Ok(meta) => Self::regular(&meta, path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(read(source)),
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(path)
            .map_err(read)?;
        Self::regular(&file.metadata().map_err(read)?, path)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            return Err(PersistError::TooLarge {
                path: path.display().to_string(),
                size: bytes.len() as u64,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| PersistError::Corrupt {
            path: path.display().to_string(),
            message: format!("not UTF-8 text: {e}"),
        })?;
        Self::parse(&text, path).map(Some)
    }

    /// `Ok` when `meta` is that of a regular file the size a state file may have.
    fn regular(meta: &std::fs::Metadata, path: &Path) -> Result<(), PersistError> {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        let what = if kind.is_file() {
            None
        } else if kind.is_dir() {
            Some("a directory")
        } else if kind.is_fifo() {
            Some("a FIFO")
        } else if kind.is_socket() {
            Some("a socket")
        } else if kind.is_char_device() {
            Some("a character device")
        } else if kind.is_block_device() {
            Some("a block device")
        } else {
            Some("an unknown kind of file")
        };
        if let Some(what) = what {
            return Err(PersistError::NotRegular {
                path: path.display().to_string(),
                what,
            });
        }
        if meta.len() > MAX_FILE_SIZE {
            return Err(PersistError::TooLarge {
                path: path.display().to_string(),
                size: meta.len(),
            });
        }
        Ok(())
    }
}

/// Renames a bad state file out of the way, to `<path>.corrupt-<unix seconds>`; returns the new name.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{}", unix_ms() / 1000));
    let aside = PathBuf::from(name);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a part:
/// a temporary file beside it, `fsync`, `rename`, then `fsync` of the directory. Mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // 0600 even over a leftover temporary file of another mode: the file holds the AJP secrets.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The daemon's writer of the state file.
#[derive(Debug)]
pub struct Persist {
    path: PathBuf,
    /// The config services runtime changes are measured against.
    base: Mutex<Vec<ServiceConfig>>,
}

impl Persist {
    pub fn new(path: PathBuf, base: Vec<ServiceConfig>) -> Persist {
        Persist {
            path,
            base: Mutex::new(base),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A reload applied the config services `base`.
    pub fn rebase(&self, base: Vec<ServiceConfig>) {
        *self.base.lock().unwrap() = base;
    }

    /// Writes the file for `snapshot`.
    pub fn save(&self, snapshot: &Snapshot) -> Result<(), PersistError> {
        let file = StateFile::of(snapshot, &self.base.lock().unwrap());
        let text = serde_json::to_vec_pretty(&file).expect("the state file serializes");
        write_atomic(&self.path, &text).map_err(|source| PersistError::Write {
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// Reads the state file at start and applies what it holds on top of the config (whose services
/// are `base`), logging what was restored; sets a bad file aside. Returns the writer, having
/// written the file once for the state the daemon starts with.
pub fn restore(engine: &Engine, path: &Path, base: &[ServiceConfig]) -> Persist {
    let shown = path.display().to_string();
    let persist = Persist::new(path.to_path_buf(), base.to_vec());
    match StateFile::load(path) {
        Ok(None) => info!(state_file = %shown, "no state file yet; it is written on the first change"),
        Ok(Some(file)) => apply(engine, &file, &shown),
        Err(e) => match set_aside(path) {
            Ok(aside) => warn!(
                state_file = %shown,
                set_aside_as = %aside.display(),
                error = %e,
                "state file not used: {e}; set aside as {}; starting from the config file alone",
                aside.display()
            ),
            Err(again) => error!(
                state_file = %shown,
                error = %e,
                "state file not used: {e}; it could not be set aside ({again}) and will be overwritten on the next change; starting from the config file alone"
            ),
        },
    }
    if let Err(e) = persist.save(&engine.balancer().snapshot()) {
        warn!(error = %e, "state file not written; runtime changes will not survive a restart");
    }
    persist
}

/// Backend changes of the file made only in the fields the runtime changed (where the saved
/// backend differs from the file's base): a field the config file changed while lb was stopped,
/// and the runtime did not, keeps the config file's value. `None` when nothing is left to change.
/// Other commands pass as they are.
fn runtime_fields_only(file: &StateFile, running: &crate::state::State, command: Command) -> Option<Command> {
    let Command::UpdateBackends { service, backends } = &command else {
        return Some(command);
    };
    let base = file.base.iter().find(|s| &s.name == service);
    let running = running.service(service).ok();
    let merged: Vec<_> = backends
        .iter()
        .filter_map(|saved| {
            let same = |b: &&crate::config::BackendConfig| b.identity() == saved.identity();
            let base = base.and_then(|s| s.backends.iter().find(same));
            let now = running.and_then(|s| s.backends.iter().map(|b| &b.config).find(same));
            let (Some(base), Some(now)) = (base, now) else {
                return Some(saved.clone());
            };
            let mut merged = now.clone();
            if saved.weight != base.weight {
                merged.weight = saved.weight;
            }
            if saved.backup != base.backup {
                merged.backup = saved.backup;
            }
            if saved.state != base.state {
                merged.state = saved.state;
            }
            if saved.route != base.route {
                merged.route.clone_from(&saved.route);
            }
            (merged != *now).then_some(merged)
        })
        .collect();
    (!merged.is_empty()).then(|| Command::UpdateBackends {
        service: service.clone(),
        backends: merged,
    })
}

/// Applies the runtime changes of `file`, then puts back the transition history.
///
/// A service the file moved (a new listen address or datapath: removed, then added anew) whose
/// new form does not come up is put back as it ran before the restore ([`Engine::put_back`]), so
/// the refused move leaves no trace: the service keeps its traffic, and the file written next
/// holds it as the config has it.
fn apply(engine: &Engine, file: &StateFile, shown: &str) {
    let before = engine.balancer().snapshot();
    let mut restored = Vec::new();
    let mut skipped = 0usize;
    for mut command in file.commands() {
        // A backend the config file no longer has (or has under another name) is not restored;
        // the others of its change are.
        for gone in command.take_gone_backends(&engine.balancer().snapshot().state) {
            skipped += 1;
            warn!(state_file = %shown, service = %command.service(), backend = %gone.name, address = %gone.address,
                "state file: backend change not restored: the backend is not in the config file");
        }
        let Some(command) = runtime_fields_only(file, &before.state, command) else {
            continue;
        };
        let description = crate::engine::describe(&command);
        let outcome = match hidden_secret(&command) {
            Some(e) => Err(e.to_string()),
            None => engine
                .execute_restored(command.clone())
                .map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(_) => restored.push(description),
            Err(e) => {
                skipped += 1;
                warn!(state_file = %shown, change = %description, error = %e, "state file: change not restored");
                // A move whose removal went through: the service is put back as it ran.
                if let Command::AddService { service } = &command
                    && let Some(was) = before.state.services.get(&service.name)
                    && engine.balancer().snapshot().state.service(&service.name).is_err()
                {
                    undo_move(engine, was, shown, &mut restored);
                }
            }
        }
    }
    let snapshot = engine.balancer().snapshot();
    let mut histories = 0usize;
    for (service, logs) in &file.transitions {
        let Ok(svc) = snapshot.state.service(service) else {
            continue;
        };
        for (name, saved) in logs {
            let Some(be) = svc.backends.iter().find(|b| &b.config.name == name) else {
                continue;
            };
            let runtime = snapshot.runtime(svc, be);
            let mut log = runtime.transitions.lock().unwrap();
            *log = saved.then(&log);
            histories += 1;
        }
    }
    info!(
        state_file = %shown,
        changes = restored.len(),
        not_restored = skipped,
        transition_histories = histories,
        written_unix_ms = file.written_unix_ms,
        "restored from the state file: {}",
        if restored.is_empty() {
            "no runtime changes".to_string()
        } else {
            restored.join("; ")
        }
    );
}

/// The file's move of `was` did not come up: `was` goes back as it ran before the restore, and its
/// removal, undone, is no longer counted as restored.
fn undo_move(engine: &Engine, was: &crate::state::Service, shown: &str, restored: &mut Vec<String>) {
    let name = &was.settings.name;
    match engine.put_back(was, &Origin::Restore) {
        Ok(_) => {
            let removal = crate::engine::describe(&Command::RemoveService {
                service: name.clone(),
            });
            restored.retain(|d| *d != removal);
            warn!(
                state_file = %shown,
                service = %name,
                listen = %was.settings.listen,
                "state file: service {name} kept as the config file has it, on {}",
                was.settings.listen
            );
        }
        Err(e) => error!(
            state_file = %shown,
            service = %name,
            error = %e,
            "state file: service {name} could not be put back as the config file has it either: {e}"
        ),
    }
}

/// Why `command` must not be restored: it would give a service the literal secret `(hidden)`.
fn hidden_secret(command: &Command) -> Option<PersistError> {
    let (Command::AddService { service } | Command::UpdateService { service }) = command else {
        return None;
    };
    let field = service.hidden_secret()?;
    Some(PersistError::HiddenSecret {
        service: service.name.clone(),
        field,
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

mod writer;
pub use writer::Writer;

#[cfg(test)]
mod tests;
