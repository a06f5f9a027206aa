//! The control protocol: one JSON object per line each way.
//!
//! Request: `{"cmd":"set-state","service":"web","backend":"b1","state":"drain"}`.
//! Response: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.

use serde::{Deserialize, Serialize};

use crate::config::{AdminState, DatapathKind, Protocol};
use crate::state::{Health, Transition};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Everything: services, backends, counters.
    Status {},
    /// Counters of every service and backend, for `lb stats`, `lb top` and monitoring.
    Stats {},
    /// Backends of one service, or of all.
    Backends {
        #[serde(default)]
        service: Option<String>,
    },
    AddBackend {
        service: String,
        address: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        weight: Option<u32>,
        #[serde(default)]
        backup: Option<bool>,
        #[serde(default)]
        state: Option<AdminState>,
    },
    RemoveBackend {
        service: String,
        backend: String,
    },
    SetState {
        service: String,
        backend: String,
        state: AdminState,
    },
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
    },
    AddService {
        name: String,
        listen: String,
        #[serde(default)]
        protocol: Option<Protocol>,
        #[serde(default)]
        datapath: Option<DatapathKind>,
        /// Duration text as in the config file ("30m").
        #[serde(default)]
        affinity_timeout: Option<String>,
        #[serde(default)]
        max_connections: Option<u32>,
    },
    RemoveService {
        service: String,
    },
    /// Re-read the config file and apply the difference.
    Reload {},
    /// Which backend would `client` reach, and why.
    Which {
        service: String,
        client: String,
    },
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Self {
        Response {
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or_default()),
            error: None,
        }
    }

    pub fn error(message: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(message.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub uptime_secs: u64,
    pub config: Option<String>,
    /// XDP program counters by name (packets), when the XDP datapath runs.
    #[serde(default)]
    pub xdp: Option<std::collections::BTreeMap<String, u64>>,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub listen: String,
    pub protocol: Protocol,
    pub datapath: DatapathKind,
    pub affinity_timeout_secs: u64,
    pub affinity_entries: u64,
    /// The ring holds backups because no primary takes new clients.
    pub on_backups: bool,
    /// Clients closed because no backend could be reached.
    pub failed_connections: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    pub state: AdminState,
    pub health: Health,
    /// Share of the Maglev ring, in slots.
    pub ring_slots: u64,
    pub active_connections: u64,
    pub total_connections: u64,
    pub connect_failures: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Health-check details; None when the service has no checks.
    #[serde(default)]
    pub check: Option<crate::health::CheckStatus>,
}

/// The answer to `stats`: counters with the same names for both datapaths where they mean the
/// same; `null` where a counter means nothing for a datapath (packets in the proxy, connect
/// failures in XDP).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub version: String,
    pub uptime_secs: u64,
    /// Unix time (seconds) the daemon started.
    pub start_time_unix: u64,
    /// Unix time (milliseconds) the snapshot was taken.
    pub taken_unix_ms: u64,
    /// XDP program counters summed over CPUs, when the XDP datapath runs: `packets` (all seen), the
    /// verdicts `passed`, `forwarded`, `dropped` (they sum to `packets`), `new_flows`, and the
    /// reasons (`no_backend`, `no_conntrack`, `fragment`, …) that come on top of the verdicts.
    #[serde(default)]
    pub xdp: Option<std::collections::BTreeMap<String, u64>>,
    pub services: Vec<ServiceStatsView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatsView {
    pub name: String,
    pub listen: String,
    pub protocol: Protocol,
    pub datapath: DatapathKind,
    /// Clients with a live affinity entry.
    pub affinity_entries: u64,
    /// The ring holds backups because no primary takes new clients.
    pub on_backups: bool,
    /// Proxy: clients closed because no backend could be reached.
    #[serde(default)]
    pub failed_connections: Option<u64>,
    /// AJP datapath: request counters of the service and of each backend (by backend id);
    /// `null` for the other datapaths.
    #[serde(default)]
    pub ajp: Option<crate::ajp_datapath::AjpServiceCounters>,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    pub state: AdminState,
    pub health: Health,
    pub ring_slots: u64,
    /// Open connections (XDP: conntrack entries neither closed nor expired).
    pub connections_active: u64,
    /// Connections set up to this backend (XDP: new flows).
    pub connections_total: u64,
    /// Client → backend: payload bytes relayed (proxy) or frame bytes forwarded (XDP).
    pub bytes_in: u64,
    /// Backend → client, likewise.
    pub bytes_out: u64,
    /// XDP: packets forwarded client → backend; `null` for the proxy.
    #[serde(default)]
    pub packets_in: Option<u64>,
    /// XDP: packets forwarded backend → client; `null` for the proxy.
    #[serde(default)]
    pub packets_out: Option<u64>,
    /// Proxy: connects to this backend that failed or timed out; `null` for XDP.
    #[serde(default)]
    pub connect_failures: Option<u64>,
    /// Health checks (counts, last result and latency); `null` when the service has none.
    #[serde(default)]
    pub check: Option<crate::health::CheckStatus>,
    /// Health transitions (up ↔ down) since the backend was added.
    pub health_transitions: u64,
    /// Operator state transitions (active / drain / maintenance) since the backend was added.
    pub state_transitions: u64,
    /// The most recent transitions, oldest first (at most [`crate::state::RECENT_TRANSITIONS`]).
    pub transitions: Vec<Transition>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhichView {
    pub service: String,
    pub client: String,
    /// None when no backend takes the client.
    pub backend: Option<String>,
    pub address: Option<String>,
    /// "affinity", "ring" or "none".
    pub reason: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadView {
    /// What changed, one line per applied command.
    pub applied: Vec<String>,
    /// Commands that failed or settings that need a restart.
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"set-state","service":"web","backend":"b1","state":"drain"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::SetState {
                service: "web".into(),
                backend: "b1".into(),
                state: AdminState::Drain
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status {});
        let r: Request = serde_json::from_str(r#"{"cmd":"stats"}"#).unwrap();
        assert_eq!(r, Request::Stats {});
        let r: Request =
            serde_json::from_str(r#"{"cmd":"add-backend","service":"web","address":"1.2.3.4:80"}"#).unwrap();
        assert!(matches!(r, Request::AddBackend { weight: None, .. }));
    }

    #[test]
    fn bad_requests_are_errors() {
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"set-state","service":"web","backend":"b1","state":"sideways"}"#,
            r#"{"cmd":"set-weight","service":"web","backend":"b1"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"stats","service":"web"}"#,
            r#"{"service":"web"}"#,
            r#"[1,2,3]"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(ReloadView {
            applied: vec!["x".into()],
            problems: vec![],
        });
        let text = serde_json::to_string(&ok).unwrap();
        assert!(text.starts_with(r#"{"ok":true,"result":"#));
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), ok);
        let err = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"no"}"#);
    }
}
