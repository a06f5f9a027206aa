//! The host around the program: sysctls `lb run` sets for XDP forwarding, and `lb cleanup`.

use std::path::{Path, PathBuf};

use tracing::info;

use crate::config::XdpConfig;

use super::XdpError;

/// Host settings the datapath relies on, each logged: forwarding and accept_local on the attached
/// interfaces (fib lookups need forwarding; a packet passed for neighbour resolution carries a local
/// source address), and the SNAT ports reserved from the host's own ephemeral ports.
pub(super) fn prepare_host(config: &XdpConfig) -> Result<(), XdpError> {
    let write = |key: &str, value: &str| {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| XdpError::System(format!("setting {key}={value}: {e}")))
    };
    for interface in &config.interfaces {
        write(&format!("net.ipv4.conf.{interface}.forwarding"), "1")?;
        write(&format!("net.ipv4.conf.{interface}.accept_local"), "1")?;
    }
    info!(interfaces = ?config.interfaces, "enabled IPv4 forwarding and accept_local on the XDP interfaces");
    let (lo, hi) = config.snat_ports;
    let key = "net.ipv4.ip_local_reserved_ports";
    let current = std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).unwrap_or_default();
    let range = format!("{lo}-{hi}");
    if !current.split(',').any(|r| r.trim() == range) {
        let merged = if current.trim().is_empty() {
            range.clone()
        } else {
            format!("{},{range}", current.trim())
        };
        write(key, &merged)?;
    }
    info!(ports = %range, "SNAT ports reserved from the host's ephemeral ports (net.ipv4.ip_local_reserved_ports)");
    Ok(())
}

/// `lb cleanup`: detaches the program (removes the pinned links) and removes the pinned maps.
pub fn cleanup(pin_path: &Path) -> Result<Vec<PathBuf>, XdpError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| XdpError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })?;
        removed.push(path);
    }
    std::fs::remove_dir(pin_path).map_err(|e| XdpError::Pin {
        path: pin_path.into(),
        message: e.to_string(),
    })?;
    Ok(removed)
}
