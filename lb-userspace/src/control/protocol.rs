//! The control protocol: one JSON object per line each way.
//!
//! Request: `{"cmd":"set-state","service":"web","backend":"b1","state":"drain"}` (with
//! `"state":"maintenance","reset":true`, the backend's open connections are reset too).
//! Response: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
//!
//! A request is a [`Request`]: a change in the state's own [`Command`] vocabulary, a [`Query`], a
//! reload, or an [`AffinityChange`] (forget or pin affinity entries; the state is untouched). [`Request::parse`] decodes a line with the config file's validators (the fields of
//! `add-service` and `add-backend` are the keys of a `[[service]]` and `[[service.backend]]`
//! table), so every error names the field; the CLI builds the same values and sends them with
//! their `Serialize` form.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use lb_common::counters::XdpCounters;

use crate::config::{AdminState, BackendConfig, ConfigError, DatapathKind, Protocol, ServiceConfig};
use crate::state::{Command, Health, Transition};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// One control request.
#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "one request per control-socket line; boxing the command buys nothing"
)]
pub enum Request {
    /// A change to the state: `add-service`, `remove-service`, `add-backend`, `add-backends` (a
    /// list, all or none), `remove-backend`,
    /// `set-state`, `set-weight`.
    Change(Command),
    /// A question that changes nothing.
    Query(Query),
    /// Re-read the config file and apply the difference.
    Reload,
    /// `set-state` to `maintenance` with `"reset": true` (`lb backend disable --reset`): the
    /// backend goes to maintenance, then its open connections are reset (both ends see an RST).
    DisableReset { service: String, backend: String },
    /// Forget or pin affinity entries: `affinity-flush`, `affinity-set`.
    Affinity(AffinityChange),
}

/// Entries `affinity-list` returns when the request gives no `limit`.
pub const AFFINITY_LIST_DEFAULT: u32 = 100;
/// Most entries one `affinity-list` returns.
pub const AFFINITY_LIST_MAX: u32 = 100_000;

/// Changes to the affinity table of a service (the state is untouched).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AffinityChange {
    /// Forget the entries of `service` (those on `backend` only, when given): the ring decides again.
    AffinityFlush {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Pin `client` to `backend` (its entry is replaced).
    AffinitySet {
        service: String,
        client: std::net::IpAddr,
        backend: String,
    },
}

/// The requests that only read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Query {
    /// Everything: services, backends, counters.
    Status {},
    /// Counters of every service and backend, for `lb stats`, `lb top` and monitoring.
    Stats {},
    /// Backends of one service, or of all.
    Backends {
        #[serde(default)]
        service: Option<String>,
    },
    /// Which backend would `client` reach, and why.
    Which { service: String, client: String },
    /// Whether `service` has a backend taking new clients (`lb check`, keepalived's track_script).
    Check { service: String },
    /// Live affinity entries of a service (of one backend), most recent first.
    AffinityList {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        /// At most this many entries (1..=[`AFFINITY_LIST_MAX`], default [`AFFINITY_LIST_DEFAULT`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
}

impl Query {
    /// Checks the fields serde cannot (ranges); the CLI runs it before sending.
    pub fn check(&self) -> Result<(), RequestError> {
        if let Query::AffinityList { limit: Some(n), .. } = self
            && !(1..=AFFINITY_LIST_MAX).contains(n)
        {
            return Err(limit_error(i64::from(*n)));
        }
        Ok(())
    }
}

fn limit_error(n: i64) -> RequestError {
    RequestError::Field(ConfigError::Field {
        key: "limit".into(),
        message: format!("{n} is out of range; allowed 1..={AFFINITY_LIST_MAX}"),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityListFields {
    service: String,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityFlushFields {
    service: String,
    #[serde(default)]
    backend: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinitySetFields {
    service: String,
    client: std::net::IpAddr,
    backend: String,
}

/// Why a request line was refused before reaching the engine.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: {0}")]
    Bad(String),
    #[error("unknown command `{0}`; allowed: {COMMANDS}")]
    Unknown(String),
    /// A field is missing, of the wrong type or out of range; the error names it.
    #[error(transparent)]
    Field(#[from] ConfigError),
    #[error("{0} is not a control request (only the daemon makes it)")]
    Internal(&'static str),
}

/// Every `cmd`, for error messages.
const COMMANDS: &str = "status, stats, backends, which, check, affinity-list, affinity-flush, affinity-set, reload, add-service, remove-service, add-backend, add-backends, remove-backend, set-state, set-weight";

/// `remove-backend`, `set-state` and `set-weight` name a backend of a service.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendRef {
    service: String,
    backend: String,
    /// `set-state` only.
    #[serde(default)]
    state: Option<String>,
    /// `set-weight` only.
    #[serde(default)]
    weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceRef {
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// A JSON value read with duplicate keys refused: serde_json would keep the last one silently, so
/// `{"cmd":"set-state",…,"state":"drain","state":"maintenance"}` would mean whichever came last.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
            }
            let Strict(v) = map.next_value()?;
            fields.insert(key, v);
        }
        Ok(Value::Object(fields))
    }
}

impl Request {
    /// Decodes and validates one request line.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let Strict(value) = serde_json::from_str(line).map_err(|e| RequestError::Bad(e.to_string()))?;
        let Value::Object(mut fields) = value else {
            return Err(RequestError::Bad(
                "expected a JSON object such as {\"cmd\":\"status\"}".into(),
            ));
        };
        let cmd = match fields.get("cmd") {
            Some(Value::String(cmd)) => cmd.clone(),
            Some(other) => {
                return Err(RequestError::Bad(format!(
                    "cmd must be a string, not {other}; allowed: {COMMANDS}"
                )));
            }
            None => {
                return Err(RequestError::Bad(format!(
                    "missing field `cmd`; allowed: {COMMANDS}"
                )));
            }
        };
        if matches!(cmd.as_str(), "status" | "stats" | "backends" | "which" | "check") {
            return Ok(Request::Query(decode(Value::Object(fields))?));
        }
        fields.remove("cmd");
        // Decoded without the tag, so an error names its field.
        match cmd.as_str() {
            "affinity-list" => {
                let f: AffinityListFields = decode(Value::Object(fields))?;
                let limit = f
                    .limit
                    .map(|n| {
                        u32::try_from(n)
                            .ok()
                            .filter(|n| (1..=AFFINITY_LIST_MAX).contains(n))
                            .ok_or_else(|| limit_error(n))
                    })
                    .transpose()?;
                return Ok(Request::Query(Query::AffinityList {
                    service: f.service,
                    backend: f.backend,
                    limit,
                }));
            }
            "affinity-flush" => {
                let f: AffinityFlushFields = decode(Value::Object(fields))?;
                return Ok(Request::Affinity(AffinityChange::AffinityFlush {
                    service: f.service,
                    backend: f.backend,
                }));
            }
            "affinity-set" => {
                let f: AffinitySetFields = decode(Value::Object(fields))?;
                return Ok(Request::Affinity(AffinityChange::AffinitySet {
                    service: f.service,
                    client: f.client,
                    backend: f.backend,
                }));
            }
            _ => {}
        }
        let change = match cmd.as_str() {
            "reload" => {
                decode::<NoFields>(Value::Object(fields))?;
                return Ok(Request::Reload);
            }
            "add-service" => Command::AddService {
                service: ServiceConfig::from_fields(Value::Object(fields))?,
            },
            "remove-service" => {
                let r: ServiceRef = decode(Value::Object(fields))?;
                Command::RemoveService { service: r.service }
            }
            "add-backend" => {
                let service = take_string(&mut fields, "service")?;
                Command::AddBackend {
                    service,
                    backend: BackendConfig::from_fields(Value::Object(fields))?,
                }
            }
            "set-state" if fields.contains_key("reset") => return state_with_reset(fields),
            "add-backends" => {
                let service = take_string(&mut fields, "service")?;
                let backends = take_backends(&mut fields)?;
                if let Some(key) = fields.keys().next() {
                    return Err(RequestError::Bad(format!(
                        "unknown field `{key}` for `add-backends` (its fields are `service` and `backends`)"
                    )));
                }
                Command::AddBackends { service, backends }
            }
            "remove-backend" | "set-state" | "set-weight" => backend_change(&cmd, fields)?,
            _ => return Err(RequestError::Unknown(cmd)),
        };
        Ok(Request::Change(change))
    }

    /// The request as a JSON object (what [`Serialize`] writes).
    pub fn to_value(&self) -> Result<Value, RequestError> {
        let (cmd, fields) = match self {
            Request::Query(q) => return Ok(serde_json::to_value(q).unwrap_or_default()),
            Request::Affinity(a) => return Ok(serde_json::to_value(a).unwrap_or_default()),
            Request::Reload => ("reload", Value::Object(Map::new())),
            Request::DisableReset { service, backend } => (
                "set-state",
                serde_json::json!({
                    "service": service,
                    "backend": backend,
                    "state": AdminState::Maintenance,
                    "reset": true,
                }),
            ),
            Request::Change(c) => match c {
                Command::AddService { service } => ("add-service", json(service)),
                Command::RemoveService { service } => {
                    ("remove-service", serde_json::json!({ "service": service }))
                }
                Command::AddBackend { service, backend } => {
                    let mut fields = json(backend);
                    fields["service"] = Value::from(service.as_str());
                    ("add-backend", fields)
                }
                Command::AddBackends { service, backends } => (
                    "add-backends",
                    serde_json::json!({
                        "service": service,
                        "backends": backends.iter().map(compact).collect::<Vec<_>>(),
                    }),
                ),
                Command::RemoveBackend { service, backend } => (
                    "remove-backend",
                    serde_json::json!({ "service": service, "backend": backend }),
                ),
                Command::SetState {
                    service,
                    backend,
                    state,
                } => (
                    "set-state",
                    serde_json::json!({ "service": service, "backend": backend, "state": state }),
                ),
                Command::SetWeight {
                    service,
                    backend,
                    weight,
                } => (
                    "set-weight",
                    serde_json::json!({ "service": service, "backend": backend, "weight": weight }),
                ),
                Command::UpdateService { .. } => return Err(RequestError::Internal("update-service")),
                Command::UpdateBackends { .. } => return Err(RequestError::Internal("update-backends")),
                Command::SetHealth { .. } => return Err(RequestError::Internal("set-health")),
            },
        };
        let mut object = Map::new();
        object.insert("cmd".into(), Value::from(cmd));
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        Ok(Value::Object(object))
    }

    /// Whether the request changes anything (logged with the caller's uid).
    pub fn changes(&self) -> bool {
        !matches!(self, Request::Query(_))
    }
}

impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

impl std::str::FromStr for Request {
    type Err = RequestError;
    fn from_str(line: &str) -> Result<Request, RequestError> {
        Request::parse(line)
    }
}

fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// A backend of `add-backends` without the keys that hold their defaults (name = address, route =
/// name, weight 1, not a backup, active), so a long list fits [`MAX_REQUEST`]; decoding fills them
/// in again.
fn compact(backend: &BackendConfig) -> Value {
    let mut v = json(backend);
    if let Value::Object(fields) = &mut v {
        let defaults = [
            ("name", backend.name == backend.address.to_string()),
            ("route", backend.route == backend.name),
            ("weight", backend.weight == 1),
            ("backup", !backend.backup),
            ("state", backend.state == AdminState::Active),
        ];
        for (key, default) in defaults {
            if default {
                fields.remove(key);
            }
        }
    }
    v
}

/// Fields into `T`; an error names the field (`weight: invalid type: …`), or is a bad request
/// when it is about the object as a whole (an unknown field).
fn decode<T: serde::de::DeserializeOwned>(fields: Value) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(fields).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            RequestError::Bad(message)
        } else {
            RequestError::Field(ConfigError::Field { key: path, message })
        }
    })
}

/// Removes the string field `key` (required).
fn take_string(fields: &mut Map<String, Value>, key: &str) -> Result<String, RequestError> {
    let field = |message: String| {
        RequestError::Field(ConfigError::Field {
            key: key.to_owned(),
            message,
        })
    };
    match fields.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(field(format!("invalid type: {other}, expected a string"))),
        None => Err(field(format!("missing field `{key}`"))),
    }
}

/// Removes the `backends` list of `add-backends`: each element the keys of a
/// `[[service.backend]]` table, errors naming the element (`backends[2].weight: …`).
fn take_backends(fields: &mut Map<String, Value>) -> Result<Vec<BackendConfig>, RequestError> {
    backends_from_list(fields.remove("backends"))
}

/// The `backends` list of an `add-backends` request (the CLI builds its list with it too).
pub fn backends_from_list(list: Option<Value>) -> Result<Vec<BackendConfig>, RequestError> {
    let field = |key: String, message: String| RequestError::Field(ConfigError::Field { key, message });
    let list = match list {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(field(
                "backends".into(),
                format!("invalid type: {other}, expected a list of backends"),
            ));
        }
        None => return Err(field("backends".into(), "missing field `backends`".into())),
    };
    if list.is_empty() {
        return Err(field(
            "backends".into(),
            "the list is empty; give at least one backend".into(),
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(list.len());
    for (i, b) in list.into_iter().enumerate() {
        let b = BackendConfig::from_fields(b).map_err(|e| match e {
            ConfigError::Field { key, message } => field(format!("backends[{i}].{key}"), message),
            other => field(format!("backends[{i}]"), other.to_string()),
        })?;
        if let Some(j) = backends.iter().position(|o| o.address == b.address) {
            return Err(field(
                format!("backends[{i}].address"),
                format!("{} is already used by backends[{j}]", b.address),
            ));
        }
        if let Some(j) = backends.iter().position(|o| o.name == b.name) {
            return Err(field(
                format!("backends[{i}].name"),
                format!("\"{}\" is already used by backends[{j}]", b.name),
            ));
        }
        backends.push(b);
    }
    Ok(backends)
}

/// `remove-backend`, `set-state`, `set-weight`: each needs exactly its own fields.
fn backend_change(cmd: &str, fields: Map<String, Value>) -> Result<Command, RequestError> {
    let wants = |key: &str| match cmd {
        "set-state" => key == "state",
        "set-weight" => key == "weight",
        _ => false,
    };
    for key in ["state", "weight"] {
        if fields.contains_key(key) && !wants(key) {
            return Err(RequestError::Bad(format!("unknown field `{key}` for `{cmd}`")));
        }
    }
    let r: BackendRef = decode(Value::Object(fields))?;
    let (service, backend) = (r.service, r.backend);
    let missing = |key: &str| {
        RequestError::Field(ConfigError::Field {
            key: key.to_owned(),
            message: format!("missing field `{key}`"),
        })
    };
    Ok(match cmd {
        "set-state" => Command::SetState {
            service,
            backend,
            state: crate::config::admin_state(&r.state.ok_or_else(|| missing("state"))?)?,
        },
        "set-weight" => Command::SetWeight {
            service,
            backend,
            weight: crate::config::weight(r.weight.ok_or_else(|| missing("weight"))?)?,
        },
        _ => Command::RemoveBackend { service, backend },
    })
}

/// `set-state` with a `reset` field: `true` only with `"state":"maintenance"` (drain keeps open
/// connections by definition), `false` is a plain `set-state`.
fn state_with_reset(mut fields: Map<String, Value>) -> Result<Request, RequestError> {
    let reset = match fields.remove("reset") {
        Some(Value::Bool(b)) => b,
        other => {
            return Err(RequestError::Field(ConfigError::Field {
                key: "reset".into(),
                message: format!(
                    "invalid type: {}, expected true or false",
                    other.unwrap_or(Value::Null)
                ),
            }));
        }
    };
    let Command::SetState {
        service,
        backend,
        state,
    } = backend_change("set-state", fields)?
    else {
        unreachable!("backend_change(\"set-state\") gives a SetState");
    };
    if !reset {
        return Ok(Request::Change(Command::SetState {
            service,
            backend,
            state,
        }));
    }
    if state != AdminState::Maintenance {
        return Err(RequestError::Field(ConfigError::Field {
            key: "reset".into(),
            message: format!(
                "only with state \"maintenance\", not {:?}: a drained or active backend keeps its open connections",
                crate::config::enum_text(&state)
            ),
        }));
    }
    Ok(Request::DisableReset { service, backend })
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

    /// An error; a message longer than [`MAX_ERROR`] bytes (one echoing a huge refused value) is
    /// cut there, saying how much was left out.
    pub fn error(message: impl std::fmt::Display) -> Self {
        let mut message = message.to_string();
        if message.len() > MAX_ERROR {
            let cut = message.floor_char_boundary(MAX_ERROR);
            let left = message.len() - cut;
            message.truncate(cut);
            message.push_str(&format!("… ({left} more bytes)"));
        }
        Response {
            ok: false,
            result: None,
            error: Some(message),
        }
    }
}

/// Longest error message sent back, in bytes.
pub const MAX_ERROR: usize = 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub uptime_secs: u64,
    pub config: Option<String>,
    /// XDP program counters (packets), when the XDP datapath runs; an object by counter name.
    #[serde(default, with = "xdp_by_name")]
    pub xdp: Option<XdpCounters>,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub listen: String,
    pub protocol: Protocol,
    pub datapath: DatapathKind,
    /// `nat` or `dsr` (xdp services; `nat` for the others).
    #[serde(default)]
    pub forwarding: crate::config::Forwarding,
    pub affinity_timeout_secs: u64,
    pub affinity_entries: u64,
    /// The ring holds backups because no primary takes new clients.
    pub on_backups: bool,
    /// Clients closed because no backend could be reached.
    pub failed_connections: u64,
    /// AJP request counters (`datapath = "ajp"`).
    #[serde(default)]
    pub ajp: Option<crate::datapath::ajp::AjpServiceCounters>,
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
    /// Clients with a live affinity entry to this backend.
    #[serde(default)]
    pub affinity_clients: u64,
    /// Draining, and nothing left on it: no open connection, no client with affinity.
    #[serde(default)]
    pub drained: bool,
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
    #[serde(default, with = "xdp_by_name")]
    pub xdp: Option<XdpCounters>,
    /// The connections each proxy worker thread serves (one worker per CPU), by worker; empty
    /// until the first `proxy` service starts them.
    #[serde(default)]
    pub proxy_workers: Vec<u64>,
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
    pub ajp: Option<crate::datapath::ajp::AjpServiceCounters>,
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
    /// Clients with a live affinity entry to this backend.
    #[serde(default)]
    pub affinity_clients: u64,
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
pub struct AffinityListView {
    pub service: String,
    /// Live entries matching the request (before `limit`).
    pub total: u64,
    /// At most `limit` entries, most recent first.
    pub entries: Vec<AffinityEntryView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AffinityEntryView {
    pub client: String,
    pub backend: String,
    pub address: String,
    /// The backend the client failed over from (it returns there with `failback = true`).
    #[serde(default)]
    pub home: Option<String>,
    /// Seconds since the client's last new connection.
    pub idle_secs: u64,
}

/// The answer to `affinity-flush` and `affinity-set`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AffinityChangeView {
    /// What was done, in one line.
    pub summary: String,
    /// Entries forgotten (flush) or written (set).
    pub entries: u64,
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

/// The answer to `check` (`lb check SERVICE`): never an error, so the caller tells an unknown
/// service from a daemon that is down.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckView {
    pub service: String,
    /// "ok" (a backend takes new clients), "no-backend" or "unknown-service".
    pub status: String,
    /// One line saying why.
    pub detail: String,
    /// Whether the service's VIP is announced (`[announce]`); absent without `[announce]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<bool>,
}

impl CheckView {
    pub const OK: &'static str = "ok";
    pub const NO_BACKEND: &'static str = "no-backend";
    pub const UNKNOWN_SERVICE: &'static str = "unknown-service";
}

/// The answer to `lb backend disable --reset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResetView {
    pub service: String,
    /// The backend's name.
    pub backend: String,
    /// Open connections reset (XDP: marked, each end gets an RST on its next packet).
    pub connections: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadView {
    /// What changed, one line per applied command.
    pub applied: Vec<String>,
    /// Changes that were not made (the next reload tries them again).
    pub problems: Vec<String>,
    /// Settings changed in the file that take effect only after a restart.
    #[serde(default)]
    pub restart: Vec<String>,
}

/// [`XdpCounters`] on the wire: an object from counter name to value (`{"packets":100,…}`). Names
/// of no counter known here (a newer daemon's) are skipped; a missing counter reads as 0.
mod xdp_by_name {
    use std::collections::BTreeMap;

    use lb_common::counters::XdpCounters;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<XdpCounters>, s: S) -> Result<S::Ok, S::Error> {
        c.map(|c| c.iter().map(|(k, v)| (k.name(), v)).collect::<BTreeMap<_, _>>())
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<XdpCounters>, D::Error> {
        let named = Option::<BTreeMap<String, u64>>::deserialize(d)?;
        Ok(named.map(|m| XdpCounters::from_named(m.iter().map(|(k, v)| (k.as_str(), *v)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, HealthConfig, OnDown};
    use std::time::Duration;

    fn parse(line: &str) -> Request {
        Request::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// The service a config file with this `[[service]]` table gives: requests get its defaults.
    fn file_service(table: &str) -> ServiceConfig {
        Config::parse(
            &format!("[xdp]\ninterfaces = [\"lo\"]\n[[service]]\n{table}"),
            "t.toml",
        )
        .unwrap()
        .services
        .remove(0)
    }

    #[test]
    fn an_error_echoing_a_huge_value_is_cut() {
        let name = "é".repeat(30_000);
        let line = format!(r#"{{"cmd":"add-service","name":"{name}","listen":"10.0.0.1:80"}}"#);
        let error = match Request::parse(&line) {
            Err(e) => Response::error(e).error.unwrap(),
            Ok(r) => panic!("accepted: {r:?}"),
        };
        assert!(error.len() < MAX_ERROR + 40, "{} bytes", error.len());
        assert!(error.ends_with(" more bytes)"), "{error}");
        let short = Response::error("no service `web`").error.unwrap();
        assert_eq!(short, "no service `web`");
    }

    #[test]
    fn good_requests() {
        let backend = |name: &str, address: &str, weight, backup, state| BackendConfig {
            route: name.into(),
            name: name.into(),
            address: address.parse().unwrap(),
            weight,
            backup,
            state,
        };
        let cases: Vec<(&str, Request)> = vec![
            (r#"{"cmd":"status"}"#, Request::Query(Query::Status {})),
            (r#"{"cmd":"stats"}"#, Request::Query(Query::Stats {})),
            (
                r#"{"cmd":"check","service":"web"}"#,
                Request::Query(Query::Check {
                    service: "web".into(),
                }),
            ),
            (
                r#"{"cmd":"backends"}"#,
                Request::Query(Query::Backends { service: None }),
            ),
            (
                r#"{"cmd":"backends","service":"web"}"#,
                Request::Query(Query::Backends {
                    service: Some("web".into()),
                }),
            ),
            (
                r#"{"cmd":"which","service":"web","client":"192.0.2.7"}"#,
                Request::Query(Query::Which {
                    service: "web".into(),
                    client: "192.0.2.7".into(),
                }),
            ),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (
                r#"{"cmd":"affinity-list","service":"web"}"#,
                Request::Query(Query::AffinityList {
                    service: "web".into(),
                    backend: None,
                    limit: None,
                }),
            ),
            (
                r#"{"cmd":"affinity-list","service":"web","backend":"b1","limit":5}"#,
                Request::Query(Query::AffinityList {
                    service: "web".into(),
                    backend: Some("b1".into()),
                    limit: Some(5),
                }),
            ),
            (
                r#"{"cmd":"affinity-flush","service":"web"}"#,
                Request::Affinity(AffinityChange::AffinityFlush {
                    service: "web".into(),
                    backend: None,
                }),
            ),
            (
                r#"{"cmd":"affinity-flush","service":"web","backend":"b2"}"#,
                Request::Affinity(AffinityChange::AffinityFlush {
                    service: "web".into(),
                    backend: Some("b2".into()),
                }),
            ),
            (
                r#"{"cmd":"affinity-set","service":"web","client":"2001:db8::7","backend":"b2"}"#,
                Request::Affinity(AffinityChange::AffinitySet {
                    service: "web".into(),
                    client: "2001:db8::7".parse().unwrap(),
                    backend: "b2".into(),
                }),
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"drain"}"#,
                Request::Change(Command::SetState {
                    service: "web".into(),
                    backend: "b1".into(),
                    state: AdminState::Drain,
                }),
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"maintenance","reset":true}"#,
                Request::DisableReset {
                    service: "web".into(),
                    backend: "b1".into(),
                },
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"maintenance","reset":false}"#,
                Request::Change(Command::SetState {
                    service: "web".into(),
                    backend: "b1".into(),
                    state: AdminState::Maintenance,
                }),
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":256}"#,
                Request::Change(Command::SetWeight {
                    service: "web".into(),
                    backend: "b1".into(),
                    weight: 256,
                }),
            ),
            (
                r#"{"cmd":"remove-backend","service":"web","backend":"10.0.1.1:80"}"#,
                Request::Change(Command::RemoveBackend {
                    service: "web".into(),
                    backend: "10.0.1.1:80".into(),
                }),
            ),
            (
                r#"{"cmd":"remove-service","service":"web"}"#,
                Request::Change(Command::RemoveService {
                    service: "web".into(),
                }),
            ),
            // The file's defaults: name = address, weight 1, active, not a backup.
            (
                r#"{"cmd":"add-backend","service":"web","address":"1.2.3.4:80"}"#,
                Request::Change(Command::AddBackend {
                    service: "web".into(),
                    backend: backend("1.2.3.4:80", "1.2.3.4:80", 1, false, AdminState::Active),
                }),
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"[2001:db8::1]:8080","name":"b6","weight":0,"backup":true,"state":"maintenance"}"#,
                Request::Change(Command::AddBackend {
                    service: "web".into(),
                    backend: backend("b6", "[2001:db8::1]:8080", 0, true, AdminState::Maintenance),
                }),
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"1.2.3.4:80"},{"address":"1.2.3.5:80","name":"b6","weight":0,"backup":true,"state":"maintenance"}]}"#,
                Request::Change(Command::AddBackends {
                    service: "web".into(),
                    backends: vec![
                        backend("1.2.3.4:80", "1.2.3.4:80", 1, false, AdminState::Active),
                        backend("b6", "1.2.3.5:80", 0, true, AdminState::Maintenance),
                    ],
                }),
            ),
            (
                r#"{"cmd":"add-service","name":"api","listen":"10.0.0.2:8080"}"#,
                Request::Change(Command::AddService {
                    service: file_service("name = \"api\"\nlisten = \"10.0.0.2:8080\""),
                }),
            ),
            (
                r#"{"cmd":"add-service","name":"api","listen":"10.0.0.2:8009","protocol":"ajp","datapath":"xdp","affinity_timeout":"10m","max_connections":5}"#,
                Request::Change(Command::AddService {
                    service: file_service(
                        "name = \"api\"\nlisten = \"10.0.0.2:8009\"\nprotocol = \"ajp\"\ndatapath = \"xdp\"\naffinity_timeout = \"10m\"\nmax_connections = 5",
                    ),
                }),
            ),
        ];
        for (line, want) in cases {
            let got = parse(line);
            assert_eq!(got, want, "{line}");
            // What the CLI sends for the same value decodes to it again.
            let sent = serde_json::to_string(&got).unwrap();
            assert_eq!(parse(&sent), want, "{line} sent as {sent}");
        }
    }

    #[test]
    fn add_service_gets_the_file_defaults_and_every_key() {
        let Request::Change(Command::AddService { service }) =
            parse(r#"{"cmd":"add-service","name":"a","listen":"127.0.0.1:9000","protocol":"ajp"}"#)
        else {
            panic!("not an add-service");
        };
        assert_eq!(service.affinity_timeout, Duration::from_secs(30 * 60));
        assert_eq!(service.max_connections, 10_000);
        assert_eq!(service.health, HealthConfig::default_for(Protocol::Ajp));
        assert_eq!(service.datapath, DatapathKind::Proxy);
        // Every key of a [[service]] table is a field of the request, nested tables included.
        let line = r#"{"cmd":"add-service","name":"a","listen":"127.0.0.1:9000","on_down":"reset","failback":true,
            "connect_timeout":"500ms","health":{"kind":"tcp","interval":"5s","rise":4,"port":9001,"error_limit":5},
            "backend":[{"address":"127.0.0.1:9100","name":"x"},{"address":"127.0.0.1:9101","weight":3}]}"#;
        let Request::Change(Command::AddService { service }) = parse(line) else {
            panic!("not an add-service");
        };
        assert_eq!(service.on_down, OnDown::Reset);
        assert!(service.failback);
        assert_eq!(service.connect_timeout, Duration::from_millis(500));
        assert_eq!(
            (service.health.interval, service.health.rise, service.health.port),
            (Duration::from_secs(5), 4, Some(9001))
        );
        assert_eq!(
            (service.health.observe, service.health.error_limit),
            (crate::config::Observe::Layer4, 5)
        );
        assert_eq!(service.backends.len(), 2);
        assert_eq!(service.backends[1].weight, 3);
        let sent = serde_json::to_string(&Request::Change(Command::AddService {
            service: service.clone(),
        }))
        .unwrap();
        assert_eq!(parse(&sent), Request::Change(Command::AddService { service }));
    }

    #[test]
    fn a_batch_of_1000_backends_fits_one_request_and_decodes_to_itself() {
        let backends: Vec<BackendConfig> = (0..1000)
            .map(|i| {
                let address = format!("10.1.{}.{}:8080", i / 250, i % 250 + 1);
                let mut fields = Map::new();
                fields.insert("address".into(), Value::from(address));
                if i % 7 == 0 {
                    fields.insert("weight".into(), Value::from(3));
                }
                if i % 11 == 0 {
                    fields.insert("name".into(), Value::from(format!("app{i}")));
                }
                BackendConfig::from_fields(Value::Object(fields)).unwrap()
            })
            .collect();
        let request = Request::Change(Command::AddBackends {
            service: "web".into(),
            backends,
        });
        let line = serde_json::to_string(&request).unwrap();
        assert!(line.len() < MAX_REQUEST, "{} bytes", line.len());
        assert_eq!(parse(&line), request);
    }

    #[test]
    fn deep_nesting_is_refused_not_followed() {
        let line = format!(r#"{{"cmd":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
        let e = Request::parse(&line).unwrap_err().to_string();
        assert!(e.contains("recursion limit"), "{e}");
    }

    #[test]
    fn bad_requests_name_the_field() {
        // (request, the error starts with, and contains)
        let cases = [
            ("not json", "bad request: ", "expected"),
            ("[1,2,3]", "bad request: ", "JSON object"),
            (r#"{"service":"web"}"#, "bad request: ", "missing field `cmd`"),
            (r#"{"cmd":7}"#, "bad request: ", "cmd must be a string"),
            (r#"{"cmd":"explode"}"#, "unknown command `explode`", "set-weight"),
            (
                r#"{"cmd":"set-health","service":"web","backend":"b1","health":"down"}"#,
                "unknown command",
                "",
            ),
            (r#"{"cmd":"status","extra":1}"#, "", "unknown field `extra`"),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"drain","state":"maintenance"}"#,
                "bad request: duplicate field `state`",
                "",
            ),
            (
                r#"{"cmd":"add-service","name":"a","listen":"127.0.0.1:9000","health":{"kind":"tcp","kind":"none"}}"#,
                "bad request: duplicate field `kind`",
                "",
            ),
            (
                r#"{"cmd":"stats","service":"web"}"#,
                "",
                "unknown field `service`",
            ),
            (r#"{"cmd":"reload","now":true}"#, "", "unknown field `now`"),
            (
                r#"{"cmd":"affinity-list","service":"web","limit":0}"#,
                "limit: 0 is out of range; allowed 1..=100000",
                "",
            ),
            (
                r#"{"cmd":"affinity-list","service":"web","limit":-3}"#,
                "limit: -3 is out of range",
                "",
            ),
            (
                r#"{"cmd":"affinity-list","service":"web","limit":"all"}"#,
                "limit: ",
                "invalid type",
            ),
            (r#"{"cmd":"affinity-list"}"#, "", "missing field `service`"),
            (
                r#"{"cmd":"affinity-set","service":"web","client":"10.0.0.300","backend":"b1"}"#,
                "client: ",
                "invalid IP address",
            ),
            (
                r#"{"cmd":"affinity-set","service":"web","client":"10.0.0.3"}"#,
                "",
                "missing field `backend`",
            ),
            (
                r#"{"cmd":"affinity-flush","service":"web","client":"10.0.0.3"}"#,
                "",
                "unknown field `client`",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":300}"#,
                "weight: 300 is out of range; allowed 0..=256",
                "",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":-1}"#,
                "weight: -1 is out of range",
                "",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1"}"#,
                "weight: ",
                "missing field",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":"heavy"}"#,
                "weight: ",
                "invalid type",
            ),
            (
                r#"{"cmd":"set-weight","service":7,"backend":"b1","weight":1}"#,
                "service: ",
                "invalid type",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":1,"state":"drain"}"#,
                "bad request: ",
                "unknown field `state`",
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"sideways"}"#,
                "state: \"sideways\" is not allowed",
                "\"active\", \"drain\" or \"maintenance\"",
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"drain","reset":true}"#,
                "reset: only with state \"maintenance\", not \"drain\"",
                "keeps its open connections",
            ),
            (
                r#"{"cmd":"set-state","service":"web","backend":"b1","state":"maintenance","reset":"yes"}"#,
                "reset: invalid type",
                "expected true or false",
            ),
            (
                r#"{"cmd":"set-weight","service":"web","backend":"b1","weight":1,"reset":true}"#,
                "reset: ",
                "unknown field `reset`",
            ),
            (
                r#"{"cmd":"set-state","service":"web","state":"drain"}"#,
                "bad request: ",
                "backend",
            ),
            (
                r#"{"cmd":"remove-backend","service":"web","backend":"b1","weight":2}"#,
                "bad request: ",
                "weight",
            ),
            (
                r#"{"cmd":"add-backend","address":"1.2.3.4:80"}"#,
                "service: ",
                "missing field",
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"10.9.9.9"}"#,
                "address: \"10.9.9.9\" is not a valid address",
                "ip:port",
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"0.0.0.0:80"}"#,
                "address: ",
                "unspecified",
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"1.2.3.4:80","weight":300}"#,
                "weight: 300 is out of range; allowed 0..=256",
                "",
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"1.2.3.4:80","name":"a b"}"#,
                "name: \"a b\" is not allowed",
                "1 to 32",
            ),
            (
                r#"{"cmd":"add-backend","service":"web","address":"1.2.3.4:80","colour":"red"}"#,
                "",
                "unknown field `colour`",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"1.2.3.4:80"},{"address":"1.2.3.5:80","weight":300}]}"#,
                "backends[1].weight: 300 is out of range; allowed 0..=256",
                "",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"1.2.3.4:80"},{"address":"1.2.3.4"}]}"#,
                "backends[1].address: ",
                "ip:port",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"1.2.3.4:80"},{"address":"1.2.3.4:80"}]}"#,
                "backends[1].address: 1.2.3.4:80 is already used by backends[0]",
                "",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[{"address":"1.2.3.4:80","name":"a"},{"address":"1.2.3.5:80","name":"a"}]}"#,
                "backends[1].name: ",
                "already used by backends[0]",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":[]}"#,
                "backends: the list is empty",
                "",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","backends":{"address":"1.2.3.4:80"}}"#,
                "backends: invalid type",
                "list",
            ),
            (
                r#"{"cmd":"add-backends","service":"web"}"#,
                "backends: missing field",
                "",
            ),
            (
                r#"{"cmd":"add-backends","service":"web","address":"1.2.3.4:80","backends":[{"address":"1.2.3.5:80"}]}"#,
                "bad request: unknown field `address`",
                "",
            ),
            (
                r#"{"cmd":"add-service","name":"web3","listen":"10.0.0.100:81","affinity_timeout":"soon"}"#,
                "affinity_timeout: \"soon\" is not a valid duration",
                "30m",
            ),
            (
                r#"{"cmd":"add-service","name":"web3"}"#,
                "",
                "missing field `listen`",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","max_connections":0}"#,
                "max_connections: 0 is out of range; allowed 1..=1000000",
                "",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","datapath":"dpdk"}"#,
                "datapath: \"dpdk\" is not allowed",
                "\"proxy\", \"xdp\" or \"ajp\"",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"[::1]:80","datapath":"xdp"}"#,
                "listen: ",
                "specific IPv4 address",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","health":{"interval":"1s","timeout":"2s"}}"#,
                "health.timeout: ",
                "must be <= interval",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","health":{"kind":"none","observe":"layer4"}}"#,
                "health.observe: ",
                "no check would bring them back",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","health":{"error_limit":0}}"#,
                "health.error_limit: ",
                "allowed 1..=100",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","datapath":"xdp","backend":[{"address":"[::1]:80"}]}"#,
                "backend[0].address: ",
                "IPv4 backends only",
            ),
            (
                r#"{"cmd":"add-service","name":"x","listen":"10.0.0.1:80","backend":[{"address":"10.0.1.1:80"},{"address":"10.0.1.1:80"}]}"#,
                "backend[1].address: ",
                "already used by backend[0]",
            ),
        ];
        for (line, starts, contains) in cases {
            let e = match Request::parse(line) {
                Ok(r) => panic!("{line} should be refused, got {r:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.starts_with(starts),
                "{line}: {e:?} should start with {starts:?}"
            );
            assert!(e.contains(contains), "{line}: {e:?} should contain {contains:?}");
        }
    }

    #[test]
    fn daemon_made_commands_are_not_requests() {
        let set_health = Request::Change(Command::SetHealth {
            service: "web".into(),
            backend: "b1".into(),
            health: Health::Down,
        });
        assert!(serde_json::to_string(&set_health).is_err());
        assert!(matches!(
            set_health.to_value(),
            Err(RequestError::Internal("set-health"))
        ));
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(ReloadView {
            applied: vec!["x".into()],
            problems: vec![],
            restart: vec!["ring_size takes effect only after a restart".into()],
        });
        let text = serde_json::to_string(&ok).unwrap();
        assert!(text.starts_with(r#"{"ok":true,"result":"#));
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), ok);
        let err = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"no"}"#);
    }

    #[test]
    fn xdp_counters_go_as_an_object_by_name() {
        use lb_common::counters::XdpCounter;
        let mut x = XdpCounters::default();
        x.set(XdpCounter::NoBackend, 4);
        x.set(XdpCounter::Dropped, 5);
        let json =
            serde_json::to_value(xdp_by_name::serialize(&Some(x), serde_json::value::Serializer).unwrap())
                .unwrap();
        assert_eq!(json["no_backend"], 4);
        assert_eq!(json["dropped"], 5);
        assert_eq!(json["passed"], 0);
        assert_eq!(json.as_object().unwrap().len(), XdpCounter::ALL.len());
        // Names this side does not know (a newer daemon's) are skipped; missing ones read as 0.
        let back = xdp_by_name::deserialize(serde_json::json!({"no_backend": 4, "someday": 1})).unwrap();
        let mut want = XdpCounters::default();
        want.set(XdpCounter::NoBackend, 4);
        assert_eq!(back, Some(want));
        assert_eq!(xdp_by_name::deserialize(serde_json::Value::Null).unwrap(), None);
    }
}
