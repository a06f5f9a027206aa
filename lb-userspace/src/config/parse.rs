//! TOML text → [`Config`]: serde into `Raw*` structs that keep every value's span, then validation.
//!
//! Two passes: serde (wrapped in `serde_path_to_error`) catches syntax, unknown keys, wrong types
//! and missing keys; [`Validator`] then checks values, ranges, cross-field rules and duplicates.
//! Both report through [`Ctx`], so every error carries the file, the 1-based line and the dotted
//! key path (`service[1].backend[0].weight`).
//!
//! The service and backend structs and their validation are generic over a [`Form`]: [`File`]
//! (spans kept) for the file, [`Bare`] for the control socket's `add-service` and `add-backend`
//! requests (JSON), whose errors name the field alone (`weight: 300 is out of range; …`). So a
//! setting is declared once (its `Raw*` field and its check here, its type in `config.rs`) and is
//! read and checked the same way from both.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use lb_common::maps::{
    DEFAULT_AFFINITY_ENTRIES, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
};
use serde::Deserialize;
use serde_path_to_error::Segment;
use toml::Spanned;

use super::{
    AdminState, AjpConfig, AnnounceConfig, BackendConfig, Config, ConfigError, ControlConfig, DatapathKind,
    Forwarding, HealthConfig, HealthKind, MAX_DURATION, MAX_RING_SIZE, MAX_WEIGHT, MIN_RING_SIZE,
    MetricsConfig, Observe, OnDown, Protocol, Secret, ServiceConfig, SpliceMode, SynCookies, XdpConfig,
    XdpMode, enum_text, format_duration, is_valid_name, listen_is_backend, listens_overlap, loop_message,
    loops_back, parse_duration,
};

type S<T> = Spanned<T>;

// ---------------------------------------------------------------------------------------------
// Raw structs: the file as written. Field names are the TOML keys (they appear in error paths).

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawConfig {
    log_level: Option<S<String>>,
    seed: Option<S<i64>>,
    ring_size: Option<S<i64>>,
    shutdown_timeout: Option<S<RawDuration>>,
    control: Option<RawControl>,
    xdp: Option<S<RawXdp>>,
    metrics: Option<RawMetrics>,
    state_file: Option<S<String>>,
    announce: Option<S<RawAnnounce>>,
    #[serde(default)]
    service: Vec<S<RawService<File>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawMetrics {
    listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawAnnounce {
    table: Option<S<i64>>,
    protocol: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawXdp {
    interfaces: S<Vec<S<String>>>,
    mode: Option<S<String>>,
    pin_path: Option<S<String>>,
    snat_ports: Option<S<RawPortRange>>,
    idle_timeout: Option<S<RawDuration>>,
    closed_timeout: Option<S<RawDuration>>,
    syn_timeout: Option<S<RawDuration>>,
    syn_cookies: Option<S<String>>,
    redirect_peer: Option<S<bool>>,
    max_services: Option<S<i64>>,
    max_backends: Option<S<i64>>,
    conntrack_entries: Option<S<i64>>,
    affinity_entries: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawControl {
    socket: Option<S<String>>,
    mode: Option<S<RawMode>>,
    group: Option<S<String>>,
    #[serde(default)]
    allowed_uids: Vec<S<i64>>,
}

/// The keys of a `[[service]]` table, also the fields of an `add-service` request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
#[serde(
    bound(deserialize = "F::V<String>: Deserialize<'de>, F::V<i64>: Deserialize<'de>, \
    F::V<RawDuration>: Deserialize<'de>, F::V<RawBackend<F>>: Deserialize<'de>, \
    F::V<RawAjp<F>>: Deserialize<'de>, F::V<Vec<F::V<String>>>: Deserialize<'de>")
)]
pub(super) struct RawService<F: Form> {
    name: F::V<String>,
    listen: F::V<String>,
    protocol: Option<F::V<String>>,
    datapath: Option<F::V<String>>,
    forwarding: Option<F::V<String>>,
    affinity_timeout: Option<F::V<RawDuration>>,
    max_connections: Option<F::V<i64>>,
    splice: Option<F::V<String>>,
    connect_timeout: Option<F::V<RawDuration>>,
    idle_timeout: Option<F::V<RawDuration>>,
    failback: Option<bool>,
    on_down: Option<F::V<String>>,
    health: Option<RawHealth<F>>,
    ajp: Option<F::V<RawAjp<F>>>,
    #[serde(default)]
    backend: Vec<F::V<RawBackend<F>>>,
}

/// The keys of a `[service.ajp]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
#[serde(bound(
    deserialize = "F::V<String>: Deserialize<'de>, F::V<i64>: Deserialize<'de>, F::V<RawDuration>: Deserialize<'de>, F::V<Vec<F::V<String>>>: Deserialize<'de>"
))]
pub(super) struct RawAjp<F: Form> {
    secret: Option<F::V<String>>,
    backend_secret: Option<F::V<String>>,
    max_packet_size: Option<F::V<i64>>,
    pool_size: Option<F::V<i64>>,
    pool_idle_timeout: Option<F::V<RawDuration>>,
    ping_after_idle: Option<F::V<RawDuration>>,
    reply_timeout: Option<F::V<RawDuration>>,
    request_timeout: Option<F::V<RawDuration>>,
    idle_timeout: Option<F::V<RawDuration>>,
    retries: Option<F::V<i64>>,
    retry_buffer: Option<F::V<i64>>,
    session_cookies: Option<F::V<Vec<F::V<String>>>>,
    session_path_params: Option<F::V<Vec<F::V<String>>>>,
    allowed_attributes: Option<F::V<Vec<F::V<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
#[serde(bound(
    deserialize = "F::V<String>: Deserialize<'de>, F::V<i64>: Deserialize<'de>, F::V<RawDuration>: Deserialize<'de>"
))]
pub(super) struct RawHealth<F: Form> {
    kind: Option<F::V<String>>,
    interval: Option<F::V<RawDuration>>,
    fast_interval: Option<F::V<RawDuration>>,
    timeout: Option<F::V<RawDuration>>,
    rise: Option<F::V<i64>>,
    fall: Option<F::V<i64>>,
    port: Option<F::V<i64>>,
    observe: Option<F::V<String>>,
    error_limit: Option<F::V<i64>>,
}

/// The keys of a `[[service.backend]]` table, also the fields of an `add-backend` request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
#[serde(bound(deserialize = "F::V<String>: Deserialize<'de>, F::V<i64>: Deserialize<'de>"))]
pub(super) struct RawBackend<F: Form> {
    address: F::V<String>,
    name: Option<F::V<String>>,
    weight: Option<F::V<i64>>,
    backup: Option<bool>,
    state: Option<F::V<String>>,
    route: Option<F::V<String>>,
}

/// How the raw structs hold a value: with its span in the file ([`File`]) or bare, as a control
/// request carries it ([`Bare`]). Service and backend validation is written once over both.
pub(super) trait Form {
    type V<T>: Held<T>;
}

/// A value as read, and where it was written (`0..0` for a request).
pub(super) trait Held<T> {
    fn value(&self) -> &T;
    fn at(&self) -> Range<usize>;
    fn take(self) -> T;
}

impl<T> Held<T> for Spanned<T> {
    fn value(&self) -> &T {
        self.get_ref()
    }
    fn at(&self) -> Range<usize> {
        self.span()
    }
    fn take(self) -> T {
        self.into_inner()
    }
}

impl<T> Held<T> for T {
    fn value(&self) -> &T {
        self
    }
    fn at(&self) -> Range<usize> {
        0..0
    }
    fn take(self) -> T {
        self
    }
}

/// A TOML file: every value keeps its span, for the line in errors.
pub(super) struct File;

impl Form for File {
    type V<T> = Spanned<T>;
}

/// A control request (JSON): values without spans; errors name the field.
pub(super) struct Bare;

impl Form for Bare {
    type V<T> = T;
}

/// A duration string, checked later; its own type so a wrong TOML type says what is expected.
pub(super) struct RawDuration(String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(DURATION_HELP)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A socket mode: must be a quoted octal string.
struct RawMode(String);

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(MODE_HELP)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawMode, E> {
                Ok(RawMode(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A port range string (`"20000-29999"`), checked later.
struct RawPortRange(String);

impl<'de> Deserialize<'de> for RawPortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawPortRange;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(PORT_RANGE_HELP)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawPortRange, E> {
                Ok(RawPortRange(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

const DURATION_HELP: &str =
    "a duration string: an integer followed by ms, s, m or h, such as \"500ms\", \"2s\", \"30m\" or \"1h\"";
const MODE_HELP: &str = "a quoted octal mode string such as \"0600\" or \"0660\" (at most \"0777\")";
const ADDRESS_HELP: &str = "use ip:port with an IPv4 or IPv6 address, such as \"10.0.0.1:80\" or \"[2001:db8::1]:80\" (host names are not resolved)";
const NAME_HELP: &str = "use 1 to 32 characters from A-Z a-z 0-9 _ . -";
const PORT_RANGE_HELP: &str = "a port range string \"LO-HI\" (inclusive, 1024 <= LO <= HI <= 65535, at least 64 ports) such as \"20000-29999\"";
const INTERFACE_HELP: &str = "use a Linux interface name such as \"eth0\": 1 to 15 bytes, no '/', ':', whitespace or control characters, not \".\" or \"..\"";

/// The bpffs mount point; `pin_path` must be below it.
const BPFFS: &str = "/sys/fs/bpf";
/// Fewest SNAT ports (the range is split between CPUs).
const MIN_SNAT_PORTS: u32 = 64;
/// Longest control socket path: `sun_path` holds 108 bytes with the closing NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Shortest health check `interval` and `fast_interval`: faster checks only load the backends.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Most interfaces in `xdp.interfaces`.
const MAX_INTERFACES: usize = 16;
/// Most Maglev ring entries over all XDP service slots: `ring_size * max_services` (u32 each: 1 GiB).
const MAX_XDP_RING_ENTRIES: u64 = 268_435_456;

// ---------------------------------------------------------------------------------------------
// Error context.

/// Where errors point: the file name and the text (to turn byte offsets into lines), or a control
/// request (errors name the field alone).
struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
    request: bool,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        if self.request {
            // "weight 300 is out of range" → "weight: 300 is out of range".
            let message = message
                .strip_prefix(leaf(key))
                .and_then(|rest| rest.strip_prefix(' '))
                .map_or(message.clone(), str::to_owned);
            return ConfigError::Field {
                key: key.to_owned(),
                message,
            };
        }
        ConfigError::Invalid {
            path: self.origin.to_owned(),
            line: self.line(span.start),
            key: key.to_owned(),
            message,
        }
    }

    /// A TOML syntax error (before any key is known).
    fn syntax(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let msg: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        self.err(span, SYNTAX_KEY, format!("TOML syntax error: {}", msg.join("; ")))
    }

    /// A serde error (unknown key, wrong type, missing key), rewritten to say what is allowed.
    fn serde(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let mut path = String::new();
        for seg in e.path() {
            match seg {
                Segment::Seq { index } => {
                    let _ = write!(path, "[{index}]");
                }
                // `Spanned<T>` is a struct of private fields underneath; hide them.
                Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
                Segment::Map { key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let inner = e.inner();
        let span = inner.span().unwrap_or(0..0);
        let msg = inner.message().trim();
        let join = |parent: &str, k: &str| {
            if parent.is_empty() {
                k.to_owned()
            } else {
                format!("{parent}.{k}")
            }
        };
        let quoted = backticked(msg);

        if msg.starts_with("unknown field") && !quoted.is_empty() {
            let field = quoted[0];
            let allowed = if quoted.len() > 1 {
                quoted[1..].join(", ")
            } else {
                "none".to_owned()
            };
            // The path already ends with the unknown key when serde_path_to_error captured it.
            let captured = path
                .strip_suffix(field)
                .is_some_and(|parent| parent.is_empty() || parent.ends_with('.'));
            let key = if captured {
                path.clone()
            } else {
                join(&path, field)
            };
            return self.err(
                span,
                &key,
                format!("unknown key `{field}`; allowed keys: {allowed}"),
            );
        }
        if msg.starts_with("missing field") && !quoted.is_empty() {
            let field = quoted[0];
            let key = join(&path, field);
            let hint = match field {
                "listen" if path == "metrics" => {
                    "; the [metrics] table needs listen = \"ip:port\", such as \"127.0.0.1:9100\""
                }
                "listen" => "; every [[service]] needs listen = \"ip:port\"",
                "name" => {
                    "; every [[service]] needs name = \"...\" (1 to 32 characters from A-Z a-z 0-9 _ . -)"
                }
                "address" => "; every [[service.backend]] needs address = \"ip:port\"",
                "interfaces" => {
                    "; the [xdp] table needs interfaces = [\"eth0\", ...] (1 to 16 interfaces carrying client and backend traffic)"
                }
                _ => "",
            };
            return self.err(span, &key, format!("missing required key `{field}`{hint}"));
        }
        if let Some(rest) = msg.strip_prefix("invalid type: ") {
            let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
            let found = found
                .replacen("map", "a table", 1)
                .replacen("sequence", "an array", 1);
            let mut expected = match expected {
                "i64" | "u64" | "i32" | "u32" | "u16" => "an integer".to_owned(),
                "a sequence" => "an array".to_owned(),
                other => other.to_owned(),
            };
            let last = path.rsplit('.').next().unwrap_or("");
            if expected == "an array" && (last == "service" || last == "backend") {
                let header = if last == "service" {
                    "[[service]]"
                } else {
                    "[[service.backend]]"
                };
                let _ = write!(
                    expected,
                    " of tables; write each one under its own {header} header"
                );
            }
            let key = if path.is_empty() { TOP_KEY.to_owned() } else { path };
            return self.err(
                span,
                &key,
                format!("wrong type: found {found}, expected {expected}"),
            );
        }
        let key = if path.is_empty() { TOP_KEY.to_owned() } else { path };
        self.err(span, &key, msg.to_owned())
    }
}

/// Key reported for TOML syntax errors, where no key path is known.
pub(super) const SYNTAX_KEY: &str = "(syntax)";
/// Key reported for errors about the document as a whole.
pub(super) const TOP_KEY: &str = "(top level)";

/// The `…` quoted words of a serde message, in order.
fn backticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

// ---------------------------------------------------------------------------------------------
// Validation.

pub(super) fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx {
        text,
        origin,
        request: false,
    };
    // Parse once on its own so syntax errors are reported as such (not as a key's error).
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(ctx.syntax(&e));
    }
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| ctx.serde(e))?;
    Validator::<File>::new(&ctx).config(raw)
}

/// A service from the fields of an `add-service` request, with the file's defaults and checks.
pub(super) fn service_request(fields: serde_json::Value) -> Result<ServiceConfig, ConfigError> {
    let ctx = Ctx::request();
    let raw: RawService<Bare> = serde_path_to_error::deserialize(fields).map_err(request_serde)?;
    Validator::<Bare>::new(&ctx).service("", raw)
}

/// A backend from the fields of an `add-backend` request, with the file's defaults and checks.
/// The rules that depend on the service (IPv4 for `xdp`) are checked where it is known.
pub(super) fn backend_request(fields: serde_json::Value) -> Result<BackendConfig, ConfigError> {
    let ctx = Ctx::request();
    let raw: RawBackend<Bare> = serde_path_to_error::deserialize(fields).map_err(request_serde)?;
    Validator::<Bare>::new(&ctx).backend("", None, raw)
}

/// Backend weights: `weight` of a backend, `set-weight`.
const WEIGHTS: RangeInclusive<i64> = 0..=(MAX_WEIGHT as i64);
/// Backend states: `state` of a backend, `set-state`.
const STATES: &[(&str, AdminState)] = &[
    ("active", AdminState::Active),
    ("drain", AdminState::Drain),
    ("maintenance", AdminState::Maintenance),
];

/// The `weight` field of a request, checked as a backend's `weight`.
pub(super) fn weight_field(n: i64) -> Result<u32, ConfigError> {
    let ctx = Ctx::request();
    Ok(Validator::<Bare>::new(&ctx).int(&n, "weight", WEIGHTS)? as u32)
}

/// The `state` field of a request, checked as a backend's `state`.
pub(super) fn state_field(text: &str) -> Result<AdminState, ConfigError> {
    let ctx = Ctx::request();
    Validator::<Bare>::new(&ctx).choice(&Some(text.to_owned()), "state", AdminState::Active, STATES)
}

/// A serde error in request fields: the dotted path of the field, then serde's message.
fn request_serde(e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = e.path().to_string();
    ConfigError::Field {
        key: if path == "." { "request".to_owned() } else { path },
        message: e.into_inner().to_string(),
    }
}

impl Ctx<'static> {
    fn request() -> Self {
        Ctx {
            text: "",
            origin: "request",
            request: true,
        }
    }
}

struct Validator<'a, 'b, F> {
    ctx: &'a Ctx<'b>,
    form: std::marker::PhantomData<F>,
}

impl<'a, 'b, F: Form> Validator<'a, 'b, F> {
    fn new(ctx: &'a Ctx<'b>) -> Self {
        Validator {
            ctx,
            form: std::marker::PhantomData,
        }
    }

    /// `prefix.field`, or `field` alone at the top of a request.
    fn key(prefix: &str, field: &str) -> String {
        if prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{prefix}.{field}")
        }
    }

    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        self.ctx.err(span, key, message)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.ctx.line(span.start)
    }

    fn int(&self, v: &F::V<i64>, key: &str, range: RangeInclusive<i64>) -> Result<i64, ConfigError> {
        let n = *v.value();
        if range.contains(&n) {
            Ok(n)
        } else {
            Err(self.err(
                v.at(),
                key,
                format!(
                    "{} {n} is out of range; allowed {}..={}",
                    leaf(key),
                    range.start(),
                    range.end()
                ),
            ))
        }
    }

    fn duration(
        &self,
        v: &Option<F::V<RawDuration>>,
        key: &str,
        default: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let text = &v.value().0;
        let name = leaf(key);
        let d = parse_duration(text).ok_or_else(|| {
            self.err(
                v.at(),
                key,
                format!(
                    "{name} \"{text}\" is not a valid duration; use an integer followed by ms, s, m or h, such as \"500ms\", \"2s\", \"30m\" or \"1h\""
                ),
            )
        })?;
        if d.is_zero() && !allow_zero {
            return Err(self.err(
                v.at(),
                key,
                format!("{name} must be greater than 0; use a duration such as \"1s\""),
            ));
        }
        if d > MAX_DURATION {
            return Err(self.err(
                v.at(),
                key,
                format!("{name} \"{text}\" is too long; allowed up to \"720h\" (30 days)"),
            ));
        }
        Ok(d)
    }

    /// Refuses a written duration `d` shorter than `min`.
    fn at_least(
        &self,
        v: &Option<F::V<RawDuration>>,
        key: &str,
        d: Duration,
        min: Duration,
    ) -> Result<(), ConfigError> {
        match v {
            Some(v) if d < min => Err(self.err(
                v.at(),
                key,
                format!(
                    "{} \"{}\" is too short; allowed from \"{}\"",
                    leaf(key),
                    v.value().0,
                    format_duration(min)
                ),
            )),
            _ => Ok(()),
        }
    }

    fn choice<T: Copy>(
        &self,
        v: &Option<F::V<String>>,
        key: &str,
        default: T,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let text = v.value();
        if let Some((_, t)) = options.iter().find(|(name, _)| name == text) {
            return Ok(*t);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let list = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        Err(self.err(
            v.at(),
            key,
            format!("{} \"{text}\" is not allowed; use {list}", leaf(key)),
        ))
    }

    fn name(&self, v: &F::V<String>, key: &str) -> Result<String, ConfigError> {
        let text = v.value();
        if is_valid_name(text) {
            Ok(text.clone())
        } else {
            Err(self.err(
                v.at(),
                key,
                format!("name \"{text}\" is not allowed; {NAME_HELP}"),
            ))
        }
    }

    fn address(&self, v: &F::V<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        let text = v.value();
        let name = leaf(key);
        let addr: SocketAddr = text.trim().parse().map_err(|_| {
            self.err(
                v.at(),
                key,
                format!("{name} \"{text}\" is not a valid address; {ADDRESS_HELP}"),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(
                v.at(),
                key,
                format!("{name} \"{text}\" has port 0; use a port in 1..=65535"),
            ));
        }
        if addr.ip().is_multicast() || addr.ip() == std::net::Ipv4Addr::BROADCAST {
            return Err(self.err(
                v.at(),
                key,
                format!("{name} \"{text}\" is a multicast or broadcast address; use a unicast ip:port"),
            ));
        }
        Ok(addr)
    }
}

impl Validator<'_, '_, File> {
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let log_level = match &raw.log_level {
            None => "info".to_owned(),
            Some(v) => {
                let text = v.get_ref().trim();
                if text.is_empty() || tracing_subscriber::EnvFilter::builder().parse(text).is_err() {
                    return Err(self.err(
                        v.span(),
                        "log_level",
                        format!(
                            "log_level \"{text}\" is not a valid tracing filter; use a level (error, warn, info, debug, trace) or directives such as \"lb=debug,info\""
                        ),
                    ));
                }
                text.to_owned()
            }
        };
        let seed = match &raw.seed {
            None => 0,
            Some(v) => self.int(v, "seed", 0..=i64::from(u32::MAX))? as u32,
        };
        let ring_size = match &raw.ring_size {
            None => super::DEFAULT_RING_SIZE,
            Some(v) => {
                let n = *v.get_ref();
                if !(i64::from(MIN_RING_SIZE)..=i64::from(MAX_RING_SIZE)).contains(&n)
                    || !crate::maglev::is_prime(n as u32)
                {
                    return Err(self.err(
                        v.span(),
                        "ring_size",
                        format!(
                            "ring_size {n} is not allowed; use a prime in {MIN_RING_SIZE}..={MAX_RING_SIZE} (such as {}), larger than 100 x the backends of any service",
                            if n < i64::from(MIN_RING_SIZE) || n > i64::from(MAX_RING_SIZE) {
                                super::DEFAULT_RING_SIZE
                            } else {
                                next_prime(n as u32)
                            }
                        ),
                    ));
                }
                n as u32
            }
        };
        let shutdown_timeout = self.duration(
            &raw.shutdown_timeout,
            "shutdown_timeout",
            Duration::from_secs(30),
            true,
        )?;
        let control = self.control(raw.control)?;
        let state_file = match &raw.state_file {
            None => None,
            Some(v) => {
                let text = v.get_ref().trim();
                let path = Path::new(text);
                if !path.is_absolute() || text.ends_with('/') || path.file_name().is_none() {
                    return Err(self.err(
                        v.span(),
                        "state_file",
                        format!(
                            "state_file \"{text}\" is not an absolute file path; use a path such as \"/var/lib/lb/state.json\""
                        ),
                    ));
                }
                Some(path.to_path_buf())
            }
        };
        let xdp = match &raw.xdp {
            None => None,
            Some(rx) => Some(self.xdp(rx, ring_size, raw.ring_size.as_ref())?),
        };
        let metrics = match &raw.metrics {
            None => None,
            Some(rm) => Some(MetricsConfig {
                listen: self.address(&rm.listen, "metrics.listen")?,
            }),
        };
        let announce = raw
            .announce
            .as_ref()
            .map(|ra| self.announce(ra.get_ref()))
            .transpose()?;

        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.service.len());
        // (name span, listen span) of each accepted service, for duplicate messages.
        let mut seen: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        // Services and backends of the xdp datapath so far, against max_services / max_backends.
        let mut xdp_services: u64 = 0;
        let mut xdp_backends: u64 = 0;
        for (i, rs) in raw.service.into_iter().enumerate() {
            let header = rs.span();
            let rs = rs.into_inner();
            let key = format!("service[{i}]");
            let spans = (rs.name.span(), rs.listen.span());
            let datapath_span = rs.datapath.as_ref().map_or(header.clone(), toml::Spanned::span);
            let svc = self.service(&key, rs)?;

            if let (Some(m), Some(rm)) = (&metrics, &raw.metrics)
                && listens_overlap(m.listen, svc.listen)
            {
                return Err(self.err(
                    rm.listen.span(),
                    "metrics.listen",
                    format!(
                        "listen {} overlaps service \"{}\" (listen {}, line {}); give the metrics endpoint its own ip:port, such as \"127.0.0.1:9100\"",
                        m.listen,
                        svc.name,
                        svc.listen,
                        self.line(&spans.1)
                    ),
                ));
            }

            // A backend that is another service's listen address (this one's was checked with
            // its backends): in either order in the file.
            for other in &services {
                let looping = svc
                    .backends
                    .iter()
                    .enumerate()
                    .find_map(|(b, be)| {
                        loops_back(other.listen, be.address).then(|| {
                            (
                                format!("{key}.backend[{b}].address"),
                                loop_message(be.address, &other.name, other.listen),
                            )
                        })
                    })
                    .or_else(|| {
                        other
                            .backends
                            .iter()
                            .find(|be| loops_back(svc.listen, be.address))
                            .map(|be| {
                                (
                                    format!("{key}.listen"),
                                    listen_is_backend(svc.listen, be.address, &other.name),
                                )
                            })
                    });
                if let Some((at, message)) = looping {
                    return Err(self.err(header.clone(), &at, message));
                }
            }
            for (j, other) in services.iter().enumerate() {
                if other.name == svc.name {
                    return Err(self.err(
                        spans.0.clone(),
                        &format!("{key}.name"),
                        format!(
                            "service name \"{}\" is already used by service[{j}] (line {}); service names must be unique",
                            svc.name,
                            self.line(&seen[j].0)
                        ),
                    ));
                }
                if listens_overlap(other.listen, svc.listen) {
                    let what = if other.listen == svc.listen {
                        "is already used by"
                    } else {
                        "overlaps"
                    };
                    return Err(self.err(
                        spans.1.clone(),
                        &format!("{key}.listen"),
                        format!(
                            "listen {} {what} service \"{}\" (listen {}, line {}); each service needs its own ip:port",
                            svc.listen,
                            other.name,
                            other.listen,
                            self.line(&seen[j].1)
                        ),
                    ));
                }
            }

            let need = 100 * svc.backends.len() as u64;
            if u64::from(ring_size) <= need {
                let span = raw.ring_size.as_ref().map_or(header, toml::Spanned::span);
                return Err(self.err(
                    span,
                    "ring_size",
                    format!(
                        "ring_size {ring_size} is too small for service \"{}\" with {} backends; use a prime larger than 100 x {} = {need}, such as {}",
                        svc.name,
                        svc.backends.len(),
                        svc.backends.len(),
                        next_prime((need.min(u64::from(MAX_RING_SIZE)) as u32).max(MIN_RING_SIZE))
                    ),
                ));
            }
            if svc.datapath == DatapathKind::Xdp {
                let (Some(x), Some(rx)) = (&xdp, &raw.xdp) else {
                    return Err(self.err(
                        datapath_span,
                        &format!("{key}.datapath"),
                        "datapath \"xdp\" needs an [xdp] table with at least interfaces = [...] (the interfaces carrying client and backend traffic, such as [\"eth0\"]); add one or use datapath = \"proxy\"",
                    ));
                };
                let rx = rx.get_ref();
                let (lo, hi) = x.snat_ports;
                let port = svc.listen.port();
                if (lo..=hi).contains(&port) {
                    let origin = match &rx.snat_ports {
                        Some(v) => format!("line {}", self.line(&v.span())),
                        None => "the default".to_owned(),
                    };
                    return Err(self.err(
                        spans.1,
                        &format!("{key}.listen"),
                        format!(
                            "listen {}: port {port} is inside xdp.snat_ports {lo}-{hi} ({origin}), which is reserved for the source ports the xdp datapath uses toward backends; use a listen port outside {lo}-{hi} or move snat_ports",
                            svc.listen
                        ),
                    ));
                }
                xdp_services += 1;
                if xdp_services > u64::from(x.max_services) {
                    let (span, origin) = written_or(&rx.max_services, &datapath_span);
                    return Err(self.err(
                        span,
                        "xdp.max_services",
                        format!(
                            "max_services {}{origin} is too small: service \"{}\" is xdp service number {xdp_services}; raise max_services (allowed 1..=1024, with ring_size x max_services <= {MAX_XDP_RING_ENTRIES}) or use datapath = \"proxy\" for some services",
                            x.max_services, svc.name
                        ),
                    ));
                }
                xdp_backends += svc.backends.len() as u64;
                if xdp_backends > u64::from(x.max_backends) {
                    let (span, origin) = written_or(&rx.max_backends, &datapath_span);
                    return Err(self.err(
                        span,
                        "xdp.max_backends",
                        format!(
                            "max_backends {}{origin} is too small: the xdp services up to \"{}\" have {xdp_backends} backends in total; raise max_backends (allowed 1..=65536) or use datapath = \"proxy\" for some services",
                            x.max_backends, svc.name
                        ),
                    ));
                }
            }
            seen.push(spans);
            services.push(svc);
        }

        Ok(Config {
            path: None,
            log_level,
            seed,
            ring_size,
            shutdown_timeout,
            control,
            xdp,
            metrics,
            announce,
            state_file,
            services,
        })
    }

    fn announce(&self, raw: &RawAnnounce) -> Result<AnnounceConfig, ConfigError> {
        let mut config = AnnounceConfig::default();
        if let Some(v) = &raw.table {
            let n = self.int(v, "announce.table", 1..=i64::from(u32::MAX))?;
            if (253..=255).contains(&n) {
                return Err(self.err(
                    v.span(),
                    "announce.table",
                    format!(
                        "table {n} is one of the kernel's own (253 default, 254 main, 255 local); give lb a table of its own, such as {}, and name it in BIRD's kernel protocol",
                        super::DEFAULT_ANNOUNCE_TABLE
                    ),
                ));
            }
            config.table = n as u32;
        }
        if let Some(v) = &raw.protocol {
            let n = self.int(v, "announce.protocol", 1..=255)?;
            // 1-4: redirect, kernel, boot, static; 12: bird (BIRD never learns its own routes).
            if n <= 4 || n == 12 {
                return Err(self.err(
                    v.span(),
                    "announce.protocol",
                    format!(
                        "protocol {n} is reserved (1-4 are the kernel's own, 12 is BIRD's, whose routes BIRD does not learn); use a number of lb's own such as {}",
                        super::DEFAULT_ANNOUNCE_PROTOCOL
                    ),
                ));
            }
            config.protocol = n as u8;
        }
        Ok(config)
    }

    fn xdp(
        &self,
        raw: &S<RawXdp>,
        ring_size: u32,
        raw_ring_size: Option<&S<i64>>,
    ) -> Result<XdpConfig, ConfigError> {
        let header = raw.span();
        let raw = raw.get_ref();

        let list = &raw.interfaces;
        let count = list.get_ref().len();
        if count == 0 || count > MAX_INTERFACES {
            return Err(self.err(
                list.span(),
                "xdp.interfaces",
                format!(
                    "interfaces lists {count} interfaces; allowed 1..={MAX_INTERFACES} names such as [\"eth0\", \"eth1\"] (the interfaces carrying client and backend traffic)"
                ),
            ));
        }
        let mut interfaces: Vec<String> = Vec::with_capacity(count);
        for (i, v) in list.get_ref().iter().enumerate() {
            let key = format!("xdp.interfaces[{i}]");
            let name = v.get_ref();
            if !is_valid_interface_name(name) {
                return Err(self.err(
                    v.span(),
                    &key,
                    format!(
                        "interface name \"{}\" is not allowed; {INTERFACE_HELP}",
                        name.escape_debug()
                    ),
                ));
            }
            if let Some(o) = interfaces.iter().position(|n| n == name) {
                return Err(self.err(
                    v.span(),
                    &key,
                    format!(
                        "interface \"{name}\" is already listed as xdp.interfaces[{o}] (line {}); list each interface once",
                        self.line(&list.get_ref()[o].span())
                    ),
                ));
            }
            interfaces.push(name.clone());
        }

        let mode = self.choice(
            &raw.mode,
            "xdp.mode",
            XdpMode::Auto,
            &[
                ("auto", XdpMode::Auto),
                ("driver", XdpMode::Driver),
                ("skb", XdpMode::Skb),
                ("tc", XdpMode::Tc),
            ],
        )?;

        let pin_path = match &raw.pin_path {
            None => XdpConfig::default().pin_path,
            Some(v) => self.pin_path(v)?,
        };

        let snat_ports = match &raw.snat_ports {
            None => XdpConfig::default().snat_ports,
            Some(v) => {
                let text = &v.get_ref().0;
                parse_port_range(text).map_err(|why| {
                    self.err(
                        v.span(),
                        "xdp.snat_ports",
                        format!("snat_ports \"{text}\" {why}; use {PORT_RANGE_HELP}"),
                    )
                })?
            }
        };

        let idle_timeout = self.duration(
            &raw.idle_timeout,
            "xdp.idle_timeout",
            XdpConfig::default().idle_timeout,
            false,
        )?;
        let closed_timeout = self.duration(
            &raw.closed_timeout,
            "xdp.closed_timeout",
            XdpConfig::default().closed_timeout,
            false,
        )?;
        if closed_timeout > idle_timeout {
            // Point at whichever of the two the operator wrote (closed_timeout first).
            let (span, at) = match (&raw.closed_timeout, &raw.idle_timeout) {
                (Some(c), _) => (c.span(), "xdp.closed_timeout"),
                (None, Some(i)) => (i.span(), "xdp.idle_timeout"),
                (None, None) => unreachable!("defaults satisfy closed_timeout <= idle_timeout"),
            };
            return Err(self.err(
                span,
                at,
                format!(
                    "closed_timeout {} is longer than idle_timeout {}; closed_timeout must be <= idle_timeout",
                    format_duration(closed_timeout),
                    format_duration(idle_timeout)
                ),
            ));
        }
        // Unwritten, it is the default or idle_timeout, whichever is shorter.
        let syn_timeout = self.duration(
            &raw.syn_timeout,
            "xdp.syn_timeout",
            XdpConfig::default().syn_timeout.min(idle_timeout),
            false,
        )?;
        if let Some(written) = raw.syn_timeout.as_ref()
            && syn_timeout > idle_timeout
        {
            return Err(self.err(
                written.span(),
                "xdp.syn_timeout",
                format!(
                    "syn_timeout {} is longer than idle_timeout {}; syn_timeout must be <= idle_timeout",
                    format_duration(syn_timeout),
                    format_duration(idle_timeout)
                ),
            ));
        }

        let syn_cookies = self.choice(
            &raw.syn_cookies,
            "xdp.syn_cookies",
            SynCookies::Auto,
            &[
                ("auto", SynCookies::Auto),
                ("on", SynCookies::On),
                ("off", SynCookies::Off),
            ],
        )?;

        let int = |v: &Option<S<i64>>, key: &str, default: u32, range: RangeInclusive<i64>| match v {
            None => Ok(default),
            Some(v) => self.int(v, key, range).map(|n| n as u32),
        };
        let max_services = int(
            &raw.max_services,
            "xdp.max_services",
            DEFAULT_MAX_SERVICES,
            1..=1024,
        )?;
        let max_backends = int(
            &raw.max_backends,
            "xdp.max_backends",
            DEFAULT_MAX_BACKENDS,
            1..=65536,
        )?;
        let conntrack_entries = int(
            &raw.conntrack_entries,
            "xdp.conntrack_entries",
            DEFAULT_CONNTRACK_ENTRIES,
            1024..=16_777_216,
        )?;
        let affinity_entries = int(
            &raw.affinity_entries,
            "xdp.affinity_entries",
            DEFAULT_AFFINITY_ENTRIES,
            1024..=16_777_216,
        )?;

        let entries = u64::from(ring_size) * u64::from(max_services);
        if entries > MAX_XDP_RING_ENTRIES {
            let span = raw.max_services.as_ref().map_or(header, toml::Spanned::span);
            let ring_origin = match raw_ring_size {
                Some(v) => format!("line {}", self.line(&v.span())),
                None => "the default".to_owned(),
            };
            return Err(self.err(
                span,
                "xdp.max_services",
                format!(
                    "max_services {max_services} x ring_size {ring_size} ({ring_origin}) = {entries} ring entries is too many; ring_size x max_services must be <= {MAX_XDP_RING_ENTRIES} (1 GiB of rings), so use max_services <= {} or a smaller ring_size",
                    MAX_XDP_RING_ENTRIES / u64::from(ring_size)
                ),
            ));
        }

        Ok(XdpConfig {
            interfaces,
            mode,
            pin_path,
            snat_ports,
            idle_timeout,
            closed_timeout,
            syn_timeout,
            syn_cookies,
            redirect_peer: raw.redirect_peer.as_ref().is_none_or(|v| *v.value()),
            max_services,
            max_backends,
            conntrack_entries,
            affinity_entries,
        })
    }

    /// `xdp.pin_path`: an absolute path strictly below /sys/fs/bpf, without `..`; returned
    /// normalised (no `.`, repeated or trailing slashes).
    fn pin_path(&self, v: &S<String>) -> Result<PathBuf, ConfigError> {
        let text = v.get_ref();
        let path = Path::new(text);
        let fail = |why: &str| {
            self.err(
                v.span(),
                "xdp.pin_path",
                format!(
                    "pin_path \"{text}\" {why}; use an absolute path below {BPFFS}/ (the bpffs mount), such as \"{}\"",
                    XdpConfig::default().pin_path.display()
                ),
            )
        };
        if !path.is_absolute() {
            return Err(fail("is not an absolute path"));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(fail("must not contain \"..\""));
        }
        let normal: PathBuf = path.components().collect();
        match normal.strip_prefix(BPFFS) {
            Ok(rest) if rest.as_os_str().is_empty() => Err(fail(
                "is the bpffs mount itself; lb needs a directory of its own below it",
            )),
            Ok(_) => Ok(normal),
            Err(_) => Err(fail("is not below /sys/fs/bpf/")),
        }
    }

    fn control(&self, raw: Option<RawControl>) -> Result<ControlConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(ControlConfig::default());
        };
        let socket = match raw.socket {
            None => PathBuf::from(super::DEFAULT_SOCKET),
            Some(v) => {
                if v.get_ref().trim().is_empty() {
                    return Err(self.err(
                        v.span(),
                        "control.socket",
                        format!(
                            "socket must not be empty; use a path such as \"{}\"",
                            super::DEFAULT_SOCKET
                        ),
                    ));
                }
                let len = v.get_ref().len();
                if len > MAX_SOCKET_PATH {
                    return Err(self.err(
                        v.span(),
                        "control.socket",
                        format!(
                            "socket path is {len} bytes; a Unix socket path may be at most \
                             {MAX_SOCKET_PATH} bytes, so choose a shorter one"
                        ),
                    ));
                }
                PathBuf::from(v.into_inner())
            }
        };
        let mode = match raw.mode {
            None => 0o600,
            Some(v) => {
                let text = v.get_ref().0.trim();
                let digits = text.strip_prefix("0o").unwrap_or(text);
                let ok = !digits.is_empty()
                    && digits.len() <= 6
                    && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
                if !ok {
                    return Err(self.err(
                        v.span(),
                        "control.mode",
                        format!("mode \"{text}\" is not an octal mode; use {MODE_HELP}"),
                    ));
                }
                let mode = u32::from_str_radix(digits, 8).unwrap_or(u32::MAX);
                if mode > 0o777 {
                    return Err(self.err(
                        v.span(),
                        "control.mode",
                        format!(
                            "mode \"{text}\" is out of range; allowed \"0000\"..=\"0777\" (no setuid, setgid or sticky bits)"
                        ),
                    ));
                }
                mode
            }
        };
        let group = match raw.group {
            None => None,
            Some(v) => {
                let g = v.get_ref().trim();
                if g.is_empty() || g.contains(char::is_whitespace) || g.contains(':') {
                    return Err(self.err(
                        v.span(),
                        "control.group",
                        format!(
                            "group \"{g}\" is not a valid group name; use an existing group such as \"lbadmin\", or leave group out"
                        ),
                    ));
                }
                Some(g.to_owned())
            }
        };
        let mut allowed_uids = Vec::with_capacity(raw.allowed_uids.len());
        for (i, v) in raw.allowed_uids.iter().enumerate() {
            let key = format!("control.allowed_uids[{i}]");
            let n = *v.get_ref();
            if !(0..=i64::from(u32::MAX)).contains(&n) {
                return Err(self.err(
                    v.span(),
                    &key,
                    format!("uid {n} is out of range; allowed 0..={}", u32::MAX),
                ));
            }
            allowed_uids.push(n as u32);
        }
        Ok(ControlConfig {
            socket,
            mode,
            group,
            allowed_uids,
        })
    }
}

impl<F: Form> Validator<'_, '_, F> {
    fn service(&self, key: &str, rs: RawService<F>) -> Result<ServiceConfig, ConfigError> {
        let k = |field: &str| Self::key(key, field);
        let name = self.name(&rs.name, &k("name"))?;
        let listen = self.address(&rs.listen, &k("listen"))?;
        let protocol = self.choice(
            &rs.protocol,
            &k("protocol"),
            Protocol::Tcp,
            &[("tcp", Protocol::Tcp), ("ajp", Protocol::Ajp)],
        )?;
        let datapath = self.choice(
            &rs.datapath,
            &k("datapath"),
            DatapathKind::Proxy,
            &[
                ("proxy", DatapathKind::Proxy),
                ("xdp", DatapathKind::Xdp),
                ("ajp", DatapathKind::Ajp),
            ],
        )?;
        if datapath == DatapathKind::Ajp && protocol != Protocol::Ajp {
            let span = rs.datapath.as_ref().map_or(0..0, Held::at);
            return Err(self.err(
                span,
                &k("datapath"),
                "datapath \"ajp\" routes AJP 1.3 requests and needs protocol = \"ajp\"; add protocol = \"ajp\" or use datapath = \"proxy\" or \"xdp\"",
            ));
        }
        let ajp = match &rs.ajp {
            None => None,
            Some(v) if datapath != DatapathKind::Ajp => {
                return Err(self.err(
                    v.at(),
                    &k("ajp"),
                    "the [service.ajp] table applies only to datapath = \"ajp\"; set datapath = \"ajp\" (with protocol = \"ajp\") or remove the table",
                ));
            }
            Some(v) => Some(self.ajp(&k("ajp"), v.value())?),
        };
        let forwarding = self.choice(
            &rs.forwarding,
            &k("forwarding"),
            Forwarding::Nat,
            &[("nat", Forwarding::Nat), ("dsr", Forwarding::Dsr)],
        )?;
        if let Some(v) = &rs.forwarding
            && forwarding == Forwarding::Dsr
            && datapath != DatapathKind::Xdp
        {
            return Err(self.err(
                v.at(),
                &k("forwarding"),
                format!(
                    "forwarding \"dsr\" needs datapath = \"xdp\" (the {} datapath opens its own connections to the backends, so replies always come back through lb); set datapath = \"xdp\" or remove forwarding",
                    enum_text(&datapath)
                ),
            ));
        }
        if datapath == DatapathKind::Xdp && (!listen.is_ipv4() || listen.ip().is_unspecified()) {
            return Err(self.err(
                rs.listen.at(),
                &k("listen"),
                format!(
                    "listen {listen}: the xdp datapath needs a specific IPv4 address (a VIP such as \"10.0.0.1:80\"); use datapath = \"proxy\" for IPv6 or wildcard listeners"
                ),
            ));
        }
        let affinity_timeout = self.duration(
            &rs.affinity_timeout,
            &k("affinity_timeout"),
            Duration::from_secs(30 * 60),
            true,
        )?;
        let max_connections = match &rs.max_connections {
            None => 10_000,
            Some(v) => self.int(v, &k("max_connections"), 1..=1_000_000)? as u32,
        };
        let splice = self.choice(
            &rs.splice,
            &k("splice"),
            SpliceMode::default(),
            &[("off", SpliceMode::Off), ("pipe", SpliceMode::Pipe)],
        )?;
        self.proxy_only(
            rs.splice.as_ref().map(Held::at),
            &k("splice"),
            datapath,
            [
                "the xdp datapath forwards packets in the kernel and relays no byte stream",
                "the ajp datapath reads every AJP packet it routes",
            ],
            "remove splice or use datapath = \"proxy\"",
        )?;
        let connect_timeout = self.duration(
            &rs.connect_timeout,
            &k("connect_timeout"),
            Duration::from_secs(3),
            false,
        )?;
        let idle_timeout = self.duration(
            &rs.idle_timeout,
            &k("idle_timeout"),
            crate::config::DEFAULT_PROXY_IDLE_TIMEOUT,
            true,
        )?;
        self.proxy_only(
            rs.idle_timeout.as_ref().map(Held::at),
            &k("idle_timeout"),
            datapath,
            [
                "xdp connections are forgotten after [xdp] idle_timeout",
                "an ajp service's web-tier connections close after [service.ajp] idle_timeout",
            ],
            "remove it here",
        )?;
        let on_down = self.choice(
            &rs.on_down,
            &k("on_down"),
            OnDown::Keep,
            &[("keep", OnDown::Keep), ("reset", OnDown::Reset)],
        )?;
        let health = self.health(&k("health"), protocol, rs.health)?;

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(rs.backend.len());
        // (name span or address span, address span) of each accepted backend.
        let mut seen: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        // The accepted backend (its index) that has each address, name and route: a service of n
        // backends is checked with n lookups, not n × n compares.
        let mut by_address: HashMap<SocketAddr, usize> = HashMap::with_capacity(rs.backend.len());
        let mut by_name: HashMap<String, usize> = HashMap::with_capacity(rs.backend.len());
        let mut by_route: HashMap<String, usize> = HashMap::new();
        for (j, rb) in rs.backend.into_iter().enumerate() {
            let bkey = k(&format!("backend[{j}]"));
            let rb = rb.take();
            let addr_span = rb.address.at();
            let name_span = rb.name.as_ref().map_or(addr_span.clone(), Held::at);
            let route_span = rb.route.as_ref().map_or(name_span.clone(), Held::at);
            let b = self.backend(&bkey, Some(datapath), rb)?;
            if loops_back(listen, b.address) {
                return Err(self.err(
                    addr_span,
                    &format!("{bkey}.address"),
                    loop_message(b.address, &name, listen),
                ));
            }
            if forwarding == Forwarding::Dsr
                && let Some(message) = dsr_port_mismatch(listen, b.address)
            {
                return Err(self.err(addr_span, &format!("{bkey}.address"), message));
            }
            // The earliest backend this one clashes with; with that one, a shared route is told
            // first, then the address, then the name (routes are kept for AJP services only).
            let ajp = datapath == DatapathKind::Ajp;
            let clash = [
                by_route.get(&b.route).map(|&o| (o, Clash::Route)),
                by_address.get(&b.address).map(|&o| (o, Clash::Address)),
                by_name.get(&b.name).map(|&o| (o, Clash::Name)),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some((o, clash)) = clash {
                let earlier = k(&format!("backend[{o}]"));
                return Err(match clash {
                    Clash::Route => self.err(
                        route_span,
                        &format!("{bkey}.route"),
                        format!(
                            "route \"{}\" is already the route of {earlier} (line {}); each backend needs its own route (Tomcat jvmRoute), set route = \"...\" on one of them",
                            b.route,
                            self.line(&seen[o].0)
                        ),
                    ),
                    Clash::Address => self.err(
                        addr_span,
                        &format!("{bkey}.address"),
                        format!(
                            "backend address {} is already used by {earlier} (line {}); each backend of a service needs its own ip:port",
                            b.address,
                            self.line(&seen[o].1)
                        ),
                    ),
                    Clash::Name => self.err(
                        name_span,
                        &format!("{bkey}.name"),
                        format!(
                            "backend name \"{}\" is already used by {earlier} (line {}); backend names must be unique within a service",
                            b.name,
                            self.line(&seen[o].0)
                        ),
                    ),
                });
            }
            let index = backends.len();
            by_address.insert(b.address, index);
            by_name.insert(b.name.clone(), index);
            if ajp {
                by_route.insert(b.route.clone(), index);
            }
            seen.push((name_span, addr_span));
            backends.push(b);
        }

        Ok(ServiceConfig {
            name,
            listen,
            protocol,
            datapath,
            forwarding,
            affinity_timeout,
            max_connections,
            splice,
            connect_timeout,
            idle_timeout,
            failback: rs.failback.unwrap_or(false),
            on_down,
            health,
            ajp,
            backends,
        })
    }

    /// Refuses `key`, set at `at`, on a service whose datapath is not `proxy`: `why` says what
    /// stands in its place for `xdp` and for `ajp`, `fix` what to do.
    fn proxy_only(
        &self,
        at: Option<Range<usize>>,
        key: &str,
        datapath: DatapathKind,
        why: [&str; 2],
        fix: &str,
    ) -> Result<(), ConfigError> {
        let (Some(at), false) = (at, datapath == DatapathKind::Proxy) else {
            return Ok(());
        };
        let why = if datapath == DatapathKind::Xdp {
            why[0]
        } else {
            why[1]
        };
        Err(self.err(
            at,
            key,
            format!(
                "{} applies only to datapath = \"proxy\" ({why}); {fix}",
                leaf(key)
            ),
        ))
    }

    fn ajp(&self, key: &str, raw: &RawAjp<F>) -> Result<AjpConfig, ConfigError> {
        let k = |field: &str| Self::key(key, field);
        let d = AjpConfig::default();
        let secret = |v: &Option<F::V<String>>, field: &str| -> Result<Option<Secret>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let text = v.value();
            if text.is_empty() || text.len() > 1024 || text.chars().any(char::is_control) {
                // The value itself is never repeated in the message.
                return Err(self.err(
                    v.at(),
                    &k(field),
                    format!("{field} must be 1 to 1024 characters without control characters"),
                ));
            }
            Ok(Some(Secret(text.clone())))
        };
        let int = |v: &Option<F::V<i64>>, field: &str, default: u32, range: RangeInclusive<i64>| match v {
            None => Ok(default),
            Some(v) => self.int(v, &k(field), range).map(|n| n as u32),
        };
        let names = |v: &Option<F::V<Vec<F::V<String>>>>,
                     field: &str,
                     default: &[String],
                     pattern: bool|
         -> Result<Vec<String>, ConfigError> {
            let Some(list) = v else {
                return Ok(default.to_vec());
            };
            let mut out = Vec::new();
            for (i, item) in list.value().iter().enumerate() {
                let text = item.value();
                let body = if pattern {
                    text.strip_suffix('*').unwrap_or(text)
                } else {
                    text
                };
                let bad = |b: u8| !b.is_ascii_graphic() || matches!(b, b'=' | b';' | b',' | b'"' | b'*');
                if text.is_empty() || text.len() > 128 || body.bytes().any(bad) {
                    let what = if pattern {
                        "use an attribute name such as \"AJP_REMOTE_PORT\", or a prefix ending in * such as \"SSL_*\" (printable ASCII without spaces, = ; , \" or other *)"
                    } else {
                        "use a name such as \"JSESSIONID\" (1 to 128 printable ASCII characters without spaces, = ; , \" or *)"
                    };
                    return Err(self.err(
                        item.at(),
                        &format!("{key}.{field}[{i}]"),
                        format!("\"{}\" is not allowed; {what}", text.escape_debug()),
                    ));
                }
                if out.contains(text) {
                    return Err(self.err(
                        item.at(),
                        &format!("{key}.{field}[{i}]"),
                        format!("\"{text}\" is listed twice; list each name once"),
                    ));
                }
                out.push(text.clone());
            }
            Ok(out)
        };
        Ok(AjpConfig {
            secret: secret(&raw.secret, "secret")?,
            backend_secret: secret(&raw.backend_secret, "backend_secret")?,
            max_packet_size: int(
                &raw.max_packet_size,
                "max_packet_size",
                d.max_packet_size,
                1024..=65536,
            )?,
            pool_size: int(&raw.pool_size, "pool_size", d.pool_size, 1..=65536)?,
            pool_idle_timeout: self.duration(
                &raw.pool_idle_timeout,
                &k("pool_idle_timeout"),
                d.pool_idle_timeout,
                false,
            )?,
            ping_after_idle: self.duration(
                &raw.ping_after_idle,
                &k("ping_after_idle"),
                d.ping_after_idle,
                true,
            )?,
            reply_timeout: self.duration(&raw.reply_timeout, &k("reply_timeout"), d.reply_timeout, true)?,
            request_timeout: self.duration(
                &raw.request_timeout,
                &k("request_timeout"),
                d.request_timeout,
                true,
            )?,
            idle_timeout: self.duration(&raw.idle_timeout, &k("idle_timeout"), d.idle_timeout, true)?,
            retries: int(&raw.retries, "retries", d.retries, 0..=16)?,
            retry_buffer: int(&raw.retry_buffer, "retry_buffer", d.retry_buffer, 0..=16_777_216)?,
            session_cookies: names(&raw.session_cookies, "session_cookies", &d.session_cookies, false)?,
            session_path_params: names(
                &raw.session_path_params,
                "session_path_params",
                &d.session_path_params,
                false,
            )?,
            allowed_attributes: names(
                &raw.allowed_attributes,
                "allowed_attributes",
                &d.allowed_attributes,
                true,
            )?,
        })
    }

    fn health(
        &self,
        key: &str,
        protocol: Protocol,
        raw: Option<RawHealth<F>>,
    ) -> Result<HealthConfig, ConfigError> {
        let k = |field: &str| Self::key(key, field);
        let defaults = HealthConfig::default_for(protocol);
        let Some(raw) = raw else {
            return Ok(defaults);
        };
        let kind = self.choice(
            &raw.kind,
            &k("kind"),
            defaults.kind,
            &[
                ("none", HealthKind::None),
                ("tcp", HealthKind::Tcp),
                ("ajp", HealthKind::Ajp),
            ],
        )?;
        let interval = self.duration(&raw.interval, &k("interval"), defaults.interval, false)?;
        self.at_least(&raw.interval, &k("interval"), interval, MIN_CHECK_INTERVAL)?;
        let fast_interval = self.duration(&raw.fast_interval, &k("fast_interval"), interval, false)?;
        self.at_least(
            &raw.fast_interval,
            &k("fast_interval"),
            fast_interval,
            MIN_CHECK_INTERVAL,
        )?;
        let timeout = self.duration(&raw.timeout, &k("timeout"), defaults.timeout, false)?;
        if timeout > interval {
            // Point at whichever of the two the operator wrote (timeout first).
            let (span, at) = match (&raw.timeout, &raw.interval) {
                (Some(t), _) => (t.at(), k("timeout")),
                (None, Some(i)) => (i.at(), k("interval")),
                (None, None) => unreachable!("defaults satisfy timeout <= interval"),
            };
            return Err(self.err(
                span,
                &at,
                format!(
                    "timeout {} is longer than interval {}; timeout must be <= interval",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            ));
        }
        let rise = match &raw.rise {
            None => defaults.rise,
            Some(v) => self.int(v, &k("rise"), 1..=100)? as u32,
        };
        let fall = match &raw.fall {
            None => defaults.fall,
            Some(v) => self.int(v, &k("fall"), 1..=100)? as u32,
        };
        let port = match &raw.port {
            None => None,
            Some(v) => Some(self.int(v, &k("port"), 1..=65535)? as u16),
        };
        // Passive health is on by default, except where no checks run (nothing would bring the
        // backend back): there it must be asked for, and then needs checks too.
        let observe = self.choice(
            &raw.observe,
            &k("observe"),
            if kind == HealthKind::None {
                Observe::None
            } else {
                Observe::Layer4
            },
            &[("none", Observe::None), ("layer4", Observe::Layer4)],
        )?;
        if let (Observe::Layer4, HealthKind::None, Some(v)) = (observe, kind, &raw.observe) {
            return Err(self.err(
                v.at(),
                &k("observe"),
                "observe = \"layer4\" marks backends down, and with kind = \"none\" no check would \
                 bring them back; set kind = \"tcp\" or \"ajp\", or observe = \"none\""
                    .to_string(),
            ));
        }
        let error_limit = match &raw.error_limit {
            None => defaults.error_limit,
            Some(v) => self.int(v, &k("error_limit"), 1..=100)? as u32,
        };
        Ok(HealthConfig {
            kind,
            interval,
            fast_interval,
            timeout,
            rise,
            fall,
            port,
            observe,
            error_limit,
        })
    }

    fn backend(
        &self,
        key: &str,
        datapath: Option<DatapathKind>,
        rb: RawBackend<F>,
    ) -> Result<BackendConfig, ConfigError> {
        let k = |field: &str| Self::key(key, field);
        // `[::ffff:10.0.1.2]:8080` is 10.0.1.2:8080: one endpoint, one spelling.
        let address = self.address(&rb.address, &k("address"))?;
        let address = SocketAddr::new(address.ip().to_canonical(), address.port());
        if address.ip().is_unspecified() {
            return Err(self.err(
                rb.address.at(),
                &k("address"),
                format!(
                    "address {address} is unspecified; use the backend's own ip:port, such as \"10.0.1.2:8080\""
                ),
            ));
        }
        if datapath == Some(DatapathKind::Xdp)
            && let Some(why) = xdp_backend_refusal(address)
        {
            return Err(self.err(
                rb.address.at(),
                &k("address"),
                format!("address {address}: {why}"),
            ));
        }
        let name = match &rb.name {
            None => address.to_string(),
            // The default written out (as a request built from a config carries it).
            Some(v) if *v.value() == address.to_string() => address.to_string(),
            Some(v) => self.name(v, &k("name"))?,
        };
        let weight = match &rb.weight {
            None => 1,
            Some(v) => self.int(v, &k("weight"), WEIGHTS)? as u32,
        };
        let state = self.choice(&rb.state, &k("state"), AdminState::Active, STATES)?;
        let route = match &rb.route {
            None => name.clone(),
            // The default written out (as a request built from a config carries it).
            Some(v) if *v.value() == name => name.clone(),
            Some(v) => {
                let text = v.value();
                if !is_valid_name(text) {
                    return Err(self.err(
                        v.at(),
                        &k("route"),
                        format!(
                            "route \"{text}\" is not allowed; {NAME_HELP} (the backend's Tomcat jvmRoute)"
                        ),
                    ));
                }
                text.clone()
            }
        };
        Ok(BackendConfig {
            route,
            name,
            address,
            weight,
            backup: rb.backup.unwrap_or(false),
            state,
        })
    }
}

/// What a backend shares with an earlier one of its service, in the order the errors tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Clash {
    Route,
    Address,
    Name,
}

/// Why an xdp service cannot forward to `address`, if it cannot (config file, `add-service` and
/// `add-backend(s)` alike). An address of this host is refused by the datapath, which asks the
/// routing table (see `datapath::xdp::sync`).
pub(crate) fn xdp_backend_refusal(address: SocketAddr) -> Option<&'static str> {
    if !address.is_ipv4() {
        Some("the xdp datapath forwards to IPv4 backends only; use datapath = \"proxy\" for IPv6 backends")
    } else if address.ip().is_loopback() {
        Some(
            "a loopback address: the xdp datapath sends the client's packets out toward the backend, and no interface leads to a loopback address (its clients would hang although a local health check passes); use an address the backend has on an interface, or datapath = \"proxy\" for a backend on this host",
        )
    } else {
        None
    }
}

/// Why backend `address` cannot serve a `forwarding = "dsr"` service listening on `listen`: the
/// backend gets the client's packet unchanged, addressed to the VIP and its port.
pub(crate) fn dsr_port_mismatch(listen: SocketAddr, address: SocketAddr) -> Option<String> {
    (address.port() != listen.port()).then(|| {
        format!(
            "backend {address}: with forwarding = \"dsr\" the backend receives the client's packet unchanged, addressed to {listen}, so it must listen on port {}; use {}:{}",
            listen.port(),
            address.ip(),
            listen.port()
        )
    })
}

/// The last segment of a key path, without an index: `service[0].backend[1].weight` → `weight`.
fn leaf(key: &str) -> &str {
    let last = key.rsplit('.').next().unwrap_or(key);
    last.split('[').next().unwrap_or(last)
}

/// The span of an integer key if the file sets it (with no remark), else `fallback` with
/// " (the default)" to append to the value in messages.
fn written_or(v: &Option<S<i64>>, fallback: &Range<usize>) -> (Range<usize>, &'static str) {
    match v {
        Some(v) => (v.span(), ""),
        None => (fallback.clone(), " (the default)"),
    }
}

/// Whether the kernel would accept `name` as an interface name (`dev_valid_name`): 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace; control characters are refused too.
fn is_valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// `"LO-HI"` → (LO, HI), or why not (to follow the quoted text in a message).
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let number = |s: &str| -> Option<u32> {
        let s = s.trim();
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let parsed = text
        .split_once('-')
        .and_then(|(lo, hi)| Some((number(lo)?, number(hi)?)));
    let Some((lo, hi)) = parsed else {
        return Err("is not a port range".to_owned());
    };
    if lo < 1024 {
        return Err(format!("starts at {lo}, a privileged port"));
    }
    if hi > 65535 {
        return Err(format!("ends at {hi}, above 65535"));
    }
    if lo > hi {
        return Err(format!("is reversed ({lo} > {hi})"));
    }
    if hi - lo + 1 < MIN_SNAT_PORTS {
        return Err(format!("has only {} ports", hi - lo + 1));
    }
    Ok((lo as u16, hi as u16))
}

/// The smallest prime > n.
fn next_prime(n: u32) -> u32 {
    use crate::maglev::is_prime;
    let mut c = n.saturating_add(1);
    while !is_prime(c) {
        c = c.saturating_add(1);
    }
    c
}
