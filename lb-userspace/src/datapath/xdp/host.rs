//! The host around the program: the sysctls the XDP datapath changes, recorded and restored by
//! `lb cleanup`, and `lb cleanup` itself.
//!
//! Before lb changes a sysctl it records the old value in a small JSON file kept for its pin
//! directory under [`RECORD_DIR`] (bpffs holds only BPF objects, so the record cannot live among the
//! pins; /run, like bpffs, is emptied at boot, so record and pins share a lifetime). A start that
//! adopts pinned maps keeps the values recorded by the first start: those are the host's own.
//! `lb cleanup` writes every recorded value back and removes the record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::XdpError;

use tracing::{info, warn};

/// Where the records live, one file per pin directory.
pub const RECORD_DIR: &str = "/run/lb/sysctl";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("setting {key}={value}: {source}")]
    Write {
        key: String,
        value: String,
        source: std::io::Error,
    },
    #[error("reading {key}: {source}")]
    Read { key: String, source: std::io::Error },
    #[error("the sysctl record {path}: {message}")]
    Record { path: PathBuf, message: String },
}

/// Old values by sysctl key (`net.ipv4.conf.eth0.forwarding`).
type Record = BTreeMap<String, String>;

fn proc_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// The current value of `key`, trimmed.
pub fn read(key: &str) -> Result<String, HostError> {
    std::fs::read_to_string(proc_path(key))
        .map(|v| v.trim().to_string())
        .map_err(|source| HostError::Read {
            key: key.into(),
            source,
        })
}

fn write(key: &str, value: &str) -> Result<(), HostError> {
    std::fs::write(proc_path(key), value).map_err(|source| HostError::Write {
        key: key.into(),
        value: value.into(),
        source,
    })
}

/// The record file of the instance pinned at `pin_path`.
pub fn record_path(pin_path: &Path) -> PathBuf {
    let name = pin_path.to_string_lossy().replace('%', "%25").replace('/', "%2F");
    Path::new(RECORD_DIR).join(format!("{name}.json"))
}

fn load(path: &Path) -> Result<Record, HostError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| HostError::Record {
            path: path.into(),
            message: format!("{e}; remove the file if the values in it are no longer wanted"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::new()),
        Err(e) => Err(HostError::Record {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

fn save(path: &Path, record: &Record) -> Result<(), HostError> {
    let err = |e: std::io::Error| HostError::Record {
        path: path.into(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(record).expect("a map of strings serializes");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Sets the sysctls the XDP datapath needs, recording each old value that differs from what is
/// set: forwarding and accept_local on the attached interfaces (fib lookups need forwarding; a
/// packet passed for neighbour resolution carries a local source address), and the SNAT ports
/// reserved from the host's own ephemeral ports. `adopting`: pinned maps were found, so a record
/// left by the start that created them is kept (its values are the host's, not lb's).
pub fn prepare(
    pin_path: &Path,
    interfaces: &[String],
    snat_ports: (u16, u16),
    adopting: bool,
) -> Result<(), HostError> {
    let path = record_path(pin_path);
    let mut record = if adopting { load(&path)? } else { Record::new() };
    let mut set = |key: String, value: String| -> Result<(), HostError> {
        let old = read(&key)?;
        if old != value {
            record.entry(key.clone()).or_insert(old);
            write(&key, &value)?;
        }
        Ok(())
    };
    for interface in interfaces {
        set(format!("net.ipv4.conf.{interface}.forwarding"), "1".into())?;
        set(format!("net.ipv4.conf.{interface}.accept_local"), "1".into())?;
    }
    info!(interfaces = ?interfaces, "enabled IPv4 forwarding and accept_local on the XDP interfaces");
    let key = "net.ipv4.ip_local_reserved_ports";
    let current = read(key)?;
    let range = format!("{}-{}", snat_ports.0, snat_ports.1);
    if !current.split(',').any(|r| r.trim() == range) {
        let merged = if current.is_empty() {
            range.clone()
        } else {
            format!("{current},{range}")
        };
        set(key.into(), merged)?;
    }
    info!(ports = %range, "SNAT ports reserved from the host's ephemeral ports (net.ipv4.ip_local_reserved_ports)");
    if record.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    save(&path, &record)?;
    info!(record = %path.display(), changed = record.len(), "old sysctl values recorded for `lb cleanup`");
    Ok(())
}

/// `lb cleanup`: writes back every value recorded for `pin_path` and removes the record. Returns
/// the (key, value) pairs written. A sysctl that no longer exists (its interface is gone) is
/// skipped.
pub fn restore(pin_path: &Path) -> Result<Vec<(String, String)>, HostError> {
    let path = record_path(pin_path);
    let record = load(&path)?;
    let mut restored = Vec::new();
    for (key, value) in record {
        if !Path::new(&proc_path(&key)).exists() {
            info!(key, "not restored: the sysctl no longer exists");
            continue;
        }
        write(&key, &value)?;
        info!(key, value, "sysctl restored");
        restored.push((key, value));
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(HostError::Record {
                path,
                message: e.to_string(),
            });
        }
        _ => {}
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_distinct_per_pin_path() {
        assert_eq!(
            record_path(Path::new("/sys/fs/bpf/lb")),
            Path::new("/run/lb/sysctl/%2Fsys%2Ffs%2Fbpf%2Flb.json")
        );
        assert_ne!(
            record_path(Path::new("/sys/fs/bpf/a_b")),
            record_path(Path::new("/sys/fs/bpf/a/b"))
        );
        assert_ne!(
            record_path(Path::new("/x/a%2Fb")),
            record_path(Path::new("/x/a/b"))
        );
    }
}

/// What `lb cleanup` did.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Sysctls written back to the values recorded before lb changed them.
    pub restored: Vec<(String, String)>,
    /// Pinned links and maps removed.
    pub removed: Vec<PathBuf>,
}

/// `lb cleanup`: restores the sysctls lb changed ([`restore`]), detaches the program
/// (removes the pinned links) and removes the pinned maps. Refused while a daemon runs on
/// `pin_path`.
pub fn cleanup(pin_path: &Path) -> Result<Cleanup, XdpError> {
    super::pins::ensure_unused(pin_path)?;
    let mut report = Cleanup {
        restored: restore(pin_path)?,
        removed: Vec::new(),
    };
    let removed = &mut report.removed;
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return Ok(report);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| XdpError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Some(interface) = path.file_name().and_then(|n| n.to_str()?.strip_prefix("tclink_")) {
            wait_tc_detached(interface);
        }
        removed.push(path);
    }
    std::fs::remove_dir(pin_path).map_err(|e| XdpError::Pin {
        path: pin_path.into(),
        message: e.to_string(),
    })?;
    Ok(report)
}

/// The kernel releases a TCX link in deferred work after its last pin is removed, not at the
/// unlink itself: waits (up to 2 s) until `lb_tc` is off `interface`'s ingress, so that nothing
/// is left attached when `lb cleanup` returns.
fn wait_tc_detached(interface: &str) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let attached =
            SchedClassifier::query_tcx(interface, TcAttachType::Ingress).is_ok_and(|(_, programs)| {
                programs
                    .iter()
                    .any(|p| p.name_as_str() == Some(crate::ebpf::TC_PROGRAM))
            });
        if !attached {
            return;
        }
        if std::time::Instant::now() >= deadline {
            return warn!(
                interface,
                "lb cleanup: the TC program is still attached 2 s after its link was removed"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
