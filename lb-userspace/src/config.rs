//! The TOML configuration file: types, parsing and validation.
//!
//! Every error names the file, line and key and says what is allowed.
//!
//! - this file: the public types the rest of `lb` codes against, defaults and small helpers
//!   ([`parse_duration`], [`is_valid_name`]).
//! - `config/parse.rs`: TOML → `Raw*` structs (serde + `serde_path_to_error`, spans kept) →
//!   validation → [`Config`]. The file format is documented in `examples/lb.toml`.
//! - `config/dsr.rs`: the backend setup a `forwarding = "dsr"` service needs (`lb check-config`).
//! - `config/tests.rs`: good and bad files, and every `examples/*.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod dsr;
mod parse;
pub(crate) use parse::{dsr_port_mismatch, xdp_backend_refusal};
#[cfg(test)]
mod tests;

/// Default Maglev table size M (prime, > 100 × 655 backends).
pub const DEFAULT_RING_SIZE: u32 = lb_common::hash::DEFAULT_RING_SIZE;
/// Smallest allowed `ring_size`.
pub const MIN_RING_SIZE: u32 = 101;
/// Largest allowed `ring_size` (the largest prime below 2^24: 64 MiB of ring per service).
pub const MAX_RING_SIZE: u32 = 16_777_213;
/// Largest backend weight (as in HAProxy).
pub const MAX_WEIGHT: u32 = 256;
/// Longest duration accepted anywhere in the file (30 days).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// Parses a duration as written in the config file: an integer followed by `ms`, `s`, `m` or `h`
/// (`"500ms"`, `"2s"`, `"30m"`, `"1h"`). No sign, no fraction, no spaces; `None` otherwise.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = text.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let ms_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms_per_unit)?))
}

/// Whether `name` is allowed as a service or backend name: `[A-Za-z0-9_.-]{1,32}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Wire protocol of a service: decides the default health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Ajp,
}

/// Which datapath forwards a service's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    /// tokio full proxy in user space.
    Proxy,
    /// eBPF XDP full NAT in the kernel.
    Xdp,
    /// AJP 1.3 request router in user space (`protocol = "ajp"` only).
    Ajp,
}

/// How an `xdp` service's packets reach the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Full NAT: the LB's address and a SNAT port as source; replies come back through the LB.
    #[default]
    Nat,
    /// Direct server return: the client's packet, untouched, IPIP-encapsulated toward the backend,
    /// which answers the client directly (the VIP on a local interface, an ipip tunnel device).
    Dsr,
}

/// How a `proxy` service moves bytes between client and backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpliceMode {
    /// read(2)/write(2) through a user-space buffer per direction.
    #[default]
    Off,
    /// splice(2) socket → pipe → socket: the bytes stay in the kernel.
    Pipe,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn splice_is_default(mode: &SpliceMode) -> bool {
    *mode == SpliceMode::default()
}

/// How long a relayed `proxy` connection may move no byte either way before lb closes it.
pub const DEFAULT_PROXY_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn default_proxy_idle_timeout() -> Duration {
    DEFAULT_PROXY_IDLE_TIMEOUT
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn proxy_idle_timeout_is_default(d: &Duration) -> bool {
    *d == DEFAULT_PROXY_IDLE_TIMEOUT
}

/// Operator-set state of a backend (orthogonal to health).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new clients and clients with affinity.
    Active,
    /// Takes only clients with affinity; existing connections finish.
    Drain,
    /// Takes no clients; existing connections finish.
    Maintenance,
}

/// Kind of active health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// No checks: backends are considered up.
    None,
    /// TCP connect succeeds within the timeout.
    Tcp,
    /// AJP 1.3 CPing answered by CPong within the timeout.
    Ajp,
}

/// Passive health: what the datapaths' own traffic says about a backend, besides the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observe {
    /// Only the active checks decide.
    None,
    /// Connect failures (refused, timed out) of real client connections count: `error_limit` in a
    /// row mark the backend down at once (HAProxy `observe layer4`, `on-error mark-down`).
    Layer4,
}

/// Consecutive connect failures that mark a backend down when `observe = "layer4"`.
pub const DEFAULT_ERROR_LIMIT: u32 = 3;

fn default_observe() -> Observe {
    Observe::Layer4
}

fn default_error_limit() -> u32 {
    DEFAULT_ERROR_LIMIT
}

/// What happens to established connections of a backend marked down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    Keep,
    Reset,
}

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// File the config was read from (None for configs built in code).
    pub path: Option<PathBuf>,
    /// tracing filter, e.g. "info" or "lb=debug".
    pub log_level: String,
    /// Seed of the client hash: nodes with the same config and seed choose the same backends.
    pub seed: u32,
    /// Maglev table size M (prime).
    pub ring_size: u32,
    /// How long SIGTERM waits for open connections before exiting.
    pub shutdown_timeout: Duration,
    pub control: ControlConfig,
    /// Settings of the XDP datapath; required when any service has `datapath = "xdp"`.
    pub xdp: Option<XdpConfig>,
    /// The Prometheus endpoint; off when the file has no `[metrics]` table.
    pub metrics: Option<MetricsConfig>,
    /// VIP routes for a routing daemon (BIRD); off when the file has no `[announce]` table.
    pub announce: Option<AnnounceConfig>,
    /// Where runtime changes (operator state, weights, added and removed backends and services,
    /// transitions) are kept across restarts; none when unset. See [`crate::persist`].
    pub state_file: Option<PathBuf>,
    pub services: Vec<ServiceConfig>,
}

/// The `[metrics]` table: where `GET /metrics` is served (Prometheus text exposition format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// Default `[announce] table`.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;
/// Default `[announce] protocol`: the route protocol number that marks lb's routes.
pub const DEFAULT_ANNOUNCE_PROTOCOL: u8 = 201;

/// The `[announce]` table: while the daemon runs, a blackhole host route per VIP whose service
/// takes new clients, in kernel routing table `table`, marked with route protocol `protocol`
/// (see [`crate::announce`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AnnounceConfig {
    pub table: u32,
    pub protocol: u8,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            table: DEFAULT_ANNOUNCE_TABLE,
            protocol: DEFAULT_ANNOUNCE_PROTOCOL,
        }
    }
}

/// How the XDP program attaches to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// TC ingress (as [`XdpMode::Tc`]) when any of the interfaces is a veth end and the kernel
    /// has TCX links (Linux 6.6), else driver (native) mode, falling back to skb (generic) mode
    /// with a warning. On veth, native XDP copies every frame a local socket sent into a page of
    /// its own before the program runs, turns off GSO on the peer, and cannot forward a frame
    /// whose checksum is left to offload (veth's default); at TC the same program sees the
    /// GRO-merged skb and redirects it without a copy.
    Auto,
    Driver,
    Skb,
    /// The same datapath at the TC (clsact) ingress hook (`lb_tc`, a TCX link): it sees the
    /// kernel's skb (GRO-merged, checksum offload intact) and redirects it without a copy.
    Tc,
}

impl XdpMode {
    /// The hook the program runs at in this mode, `on_veth`: whether any of its interfaces is a
    /// veth end.
    pub fn hook(self, on_veth: bool) -> Hook {
        match self {
            XdpMode::Tc => Hook::Tc,
            XdpMode::Auto if on_veth => Hook::Tc,
            XdpMode::Auto | XdpMode::Driver | XdpMode::Skb => Hook::Xdp,
        }
    }
}

/// Where the datapath's program runs: the XDP hook (`lb_xdp`) or TC ingress (`lb_tc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// Both hooks, XDP first (tests that run the same fixture at each).
    pub const ALL: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// `[xdp] syn_cookies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynCookies {
    /// On while SYN pressure is seen (half-open flows giving their ports up, SNAT ports
    /// exhausted, or cookies answered but not returned), off after a quiet spell.
    Auto,
    On,
    /// Never: the SYN proxy program is not even installed.
    Off,
}

impl Default for XdpConfig {
    /// The defaults of every key of the `[xdp]` table (with no interfaces).
    fn default() -> Self {
        use lb_common::maps::{
            DEFAULT_AFFINITY_ENTRIES, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
        };
        XdpConfig {
            interfaces: Vec::new(),
            mode: XdpMode::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/lb"),
            snat_ports: (10000, 29999),
            idle_timeout: Duration::from_secs(15 * 60),
            closed_timeout: Duration::from_secs(1),
            syn_timeout: Duration::from_secs(5),
            syn_cookies: SynCookies::Auto,
            redirect_peer: true,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            affinity_entries: DEFAULT_AFFINITY_ENTRIES,
        }
    }
}

/// The `[xdp]` table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct XdpConfig {
    /// Interfaces carrying client and backend traffic (the program is attached to each).
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    /// bpffs directory holding the pinned maps and links (kept across restarts of `lb`).
    pub pin_path: PathBuf,
    /// SNAT source ports toward backends, inclusive; reserved from the host's ephemeral ports.
    pub snat_ports: (u16, u16),
    /// Idle time after which an open connection is forgotten.
    pub idle_timeout: Duration,
    /// Idle time after which a closed (FIN both ways, or RST) connection is forgotten.
    pub closed_timeout: Duration,
    /// Idle time after which a half-open connection (SYN forwarded, the client's handshake not
    /// completed) is forgotten; half-open flows also give their SNAT port up first.
    pub syn_timeout: Duration,
    /// SYN cookies for NAT services (the XDP SYN proxy): always, never, or while a SYN flood
    /// lasts.
    pub syn_cookies: SynCookies,
    /// At the TC hook, NAT flows' packets for a veth end whose other end lives in another network
    /// namespace go straight into that namespace (`bpf_redirect_peer`).
    pub redirect_peer: bool,
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_entries: u32,
    pub affinity_entries: u32,
}

/// The control socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// File mode of the socket (default 0o600).
    pub mode: u32,
    /// Group that owns the socket; its members (by primary gid) may use it.
    pub group: Option<String>,
    /// Further uids allowed besides root and the daemon's own uid.
    pub allowed_uids: Vec<u32>,
}

impl Default for ControlConfig {
    /// `/run/lb/lb.sock`, mode 0600, no group, no extra uids.
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            mode: 0o600,
            group: None,
            allowed_uids: Vec::new(),
        }
    }
}

/// One virtual service: a listen address and its backends. Serialized as the file writes a
/// `[[service]]` table (durations as `"30m"`), which is also the `add-service` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub datapath: DatapathKind,
    /// `forwarding = "nat" | "dsr"` (`xdp` services only; `nat` elsewhere).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// How long a client's affinity entry lives after its last new connection.
    #[serde(with = "duration_text")]
    pub affinity_timeout: Duration,
    /// Most concurrent client connections (proxy datapath).
    pub max_connections: u32,
    /// How the proxy datapath relays bytes (`proxy` services only). Written out only when not the
    /// default, so a serialized `xdp` or `ajp` service parses again.
    #[serde(default, skip_serializing_if = "splice_is_default")]
    pub splice: SpliceMode,
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    /// A relayed connection that moves no byte either way for this long is closed (`proxy`
    /// services only; zero: never). Written out only when not the default, as `splice`.
    #[serde(
        with = "duration_text",
        default = "default_proxy_idle_timeout",
        skip_serializing_if = "proxy_idle_timeout_is_default"
    )]
    pub idle_timeout: Duration,
    /// Move clients back to their original backend when it recovers.
    pub failback: bool,
    pub on_down: OnDown,
    pub health: HealthConfig,
    /// Settings of the AJP datapath (`[service.ajp]`); `None` keeps every default.
    #[serde(default)]
    pub ajp: Option<AjpConfig>,
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// What `Debug`, `Serialize` and the logs show in place of a secret.
pub const HIDDEN: &str = "(hidden)";

/// A secret from the config file: compared, written on the wire, never shown (`Debug` and
/// `Serialize` print [`HIDDEN`]). Only the state file keeps it, through
/// [`ServiceConfig::to_fields_in_clear`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(HIDDEN)
    }
}

impl ServiceConfig {
    /// The [`Serialize`] form (the keys of an `add-service` request) with the AJP secrets in clear
    /// instead of [`HIDDEN`]. For the state file only (mode 0600): never for logs or operators.
    pub fn to_fields_in_clear(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut fields = serde_json::to_value(self)?;
        if let Some(ajp) = &self.ajp {
            for (key, secret) in ajp.secrets() {
                if let Some(Secret(text)) = secret {
                    fields["ajp"][key] = serde_json::Value::from(text.as_str());
                }
            }
        }
        Ok(fields)
    }

    /// The AJP secret field (`secret`, `backend_secret`) whose value is the literal [`HIDDEN`],
    /// as an older `lb` wrote them into the state file in place of the secret.
    pub fn hidden_secret(&self) -> Option<&'static str> {
        let ajp = self.ajp.as_ref()?;
        ajp.secrets()
            .into_iter()
            .find(|(_, s)| s.is_some_and(|s| s.0 == HIDDEN))
            .map(|(key, _)| key)
    }
}

/// `serialize_with` for lists of services kept with their secrets (the state file only).
pub fn services_in_clear<S: serde::Serializer>(services: &[ServiceConfig], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = Vec::with_capacity(services.len());
    for service in services {
        seq.push(service.to_fields_in_clear().map_err(serde::ser::Error::custom)?);
    }
    seq.serialize(s)
}

/// The `[service.ajp]` table: settings of `datapath = "ajp"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AjpConfig {
    /// Secret the web tier must send (mod_jk `secret`, mod_proxy_ajp `secret=`); 403 otherwise.
    pub secret: Option<Secret>,
    /// Secret written into every request toward the backends (Tomcat's connector `secret`),
    /// replacing what came in; without it the incoming secret attribute is passed on unchanged.
    pub backend_secret: Option<Secret>,
    /// Largest AJP packet, header included, both sides (Tomcat `packetSize`).
    pub max_packet_size: u32,
    /// Most connections open to one backend (idle and busy).
    pub pool_size: u32,
    /// Idle pooled connections are closed after this long.
    #[serde(with = "duration_text")]
    pub pool_idle_timeout: Duration,
    /// A pooled connection idle longer than this gets a CPing before it is reused.
    #[serde(with = "duration_text")]
    pub ping_after_idle: Duration,
    /// A backend that sends nothing for this long while a request waits for its reply is given
    /// up (mod_jk `reply_timeout`); zero: wait forever.
    #[serde(with = "duration_text", default = "default_reply_timeout")]
    pub reply_timeout: Duration,
    /// A web-tier packet that has started must be complete within this long, and a request body
    /// packet lb asked for must arrive within it; zero: wait forever.
    #[serde(with = "duration_text", default = "default_request_timeout")]
    pub request_timeout: Duration,
    /// A web-tier connection with no request under way and nothing sent is closed after this
    /// long; zero: kept open however long it is idle.
    #[serde(with = "duration_text", default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// Further backends tried when one fails before answering.
    pub retries: u32,
    /// Request body bytes held so the request can be retried on another backend.
    pub retry_buffer: u32,
    /// Cookie names carrying the session id (its route after the last `.`).
    pub session_cookies: Vec<String>,
    /// URI path parameter names carrying the session id (`;jsessionid=...`).
    pub session_path_params: Vec<String>,
    /// Names of `req_attribute`s passed on (a trailing `*` matches any suffix); others get a 403.
    /// `javax.servlet.include.*` and `jakarta.servlet.include.*` are always refused.
    pub allowed_attributes: Vec<String>,
}

/// Request attributes the web tier may send unless `allowed_attributes` says otherwise: what
/// mod_jk and mod_proxy_ajp send themselves (`AJP_REMOTE_PORT`, `AJP_LOCAL_ADDR`,
/// `AJP_SSL_PROTOCOL`, `JK_LB_ACTIVATION`) and the SSL/client-certificate variables IIS and
/// `JkEnvVar` pass.
pub const DEFAULT_ALLOWED_ATTRIBUTES: &[&str] = &["AJP_*", "JK_*", "SSL_*", "CERT_*", "HTTPS_*"];

/// Attribute prefixes refused whatever `allowed_attributes` says (CVE-2020-1938, Ghostcat).
pub const FORBIDDEN_ATTRIBUTES: &[&str] = &["javax.servlet.include.", "jakarta.servlet.include."];

impl AjpConfig {
    /// Every secret field with its key.
    fn secrets(&self) -> [(&'static str, Option<&Secret>); 2] {
        [
            ("secret", self.secret.as_ref()),
            ("backend_secret", self.backend_secret.as_ref()),
        ]
    }
}

impl Default for AjpConfig {
    fn default() -> Self {
        AjpConfig {
            secret: None,
            backend_secret: None,
            max_packet_size: 8192,
            pool_size: 64,
            pool_idle_timeout: Duration::from_secs(60),
            ping_after_idle: Duration::from_secs(10),
            reply_timeout: default_reply_timeout(),
            request_timeout: default_request_timeout(),
            idle_timeout: default_idle_timeout(),
            retries: 1,
            retry_buffer: 65536,
            session_cookies: vec!["JSESSIONID".into()],
            session_path_params: vec!["jsessionid".into()],
            allowed_attributes: DEFAULT_ALLOWED_ATTRIBUTES
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
    }
}

fn default_reply_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}

impl AjpConfig {
    /// Whether a `req_attribute` named `name` may pass.
    pub fn attribute_allowed(&self, name: &[u8]) -> bool {
        if FORBIDDEN_ATTRIBUTES
            .iter()
            .any(|p| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
        {
            return false;
        }
        self.allowed_attributes
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix.as_bytes()),
                None => name == pattern.as_bytes(),
            })
    }
}

/// Health-check settings of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub kind: HealthKind,
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// Interval while a backend is failing (defaults to `interval`).
    #[serde(with = "duration_text")]
    pub fast_interval: Duration,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Check this port instead of the backend's traffic port.
    pub port: Option<u16>,
    /// Passive health: on by default, off for `kind = "none"` unless asked.
    #[serde(default = "default_observe")]
    pub observe: Observe,
    /// Consecutive connect failures that mark a backend down with `observe = "layer4"`.
    #[serde(default = "default_error_limit")]
    pub error_limit: u32,
}

impl HealthConfig {
    /// The checks a service gets without a `[service.health]` table: AJP CPing for `ajp`
    /// services, TCP connect otherwise; every 2s, 1s timeout, rise 2, fall 3.
    pub fn default_for(protocol: Protocol) -> HealthConfig {
        let interval = Duration::from_secs(2);
        HealthConfig {
            kind: match protocol {
                Protocol::Ajp => HealthKind::Ajp,
                Protocol::Tcp => HealthKind::Tcp,
            },
            interval,
            fast_interval: interval,
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            observe: Observe::Layer4,
            error_limit: DEFAULT_ERROR_LIMIT,
        }
    }

    /// Whether connect failures of real connections count (`observe = "layer4"`).
    pub fn passive(&self) -> bool {
        self.observe == Observe::Layer4
    }
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendConfig {
    /// Defaults to the address text.
    pub name: String,
    pub address: SocketAddr,
    /// 0..=256; 0 takes no new clients but keeps affinity (as in HAProxy).
    pub weight: u32,
    /// Hot spare: used only while no primary is healthy.
    pub backup: bool,
    pub state: AdminState,
    /// AJP session route (Tomcat `jvmRoute`); defaults to the name (the mod_jk convention).
    #[serde(default)]
    pub route: String,
}

/// Durations as the config file writes them (`"30m"`), for requests that carry settings.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("\"{text}\" is not a duration such as \"30m\"")))
    }
}

/// A duration in the largest unit that writes it exactly: `"30m"`, `"1500ms"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The text a config enum is written as ("drain", "xdp", …).
pub fn enum_text<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// A config error: where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
    /// A field of a control request: `weight: 300 is out of range; allowed 0..=256`.
    #[error("{key}: {message}")]
    Field { key: String, message: String },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text; `origin` names the file in errors.
    ///
    /// Every error is [`ConfigError::Invalid`] with the 1-based line and the dotted key path
    /// (`service[1].backend[0].weight`); syntax errors use the key `(syntax)`.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        parse::parse(text, origin)
    }
}

/// A request's backend `weight`, checked as in the file (0..=[`MAX_WEIGHT`]).
pub fn weight(n: i64) -> Result<u32, ConfigError> {
    parse::weight_field(n)
}

/// A request's backend `state` text, checked as in the file.
pub fn admin_state(text: &str) -> Result<AdminState, ConfigError> {
    parse::state_field(text)
}

/// Two listen addresses that could not both be bound (equal, or same port with a wildcard).
pub fn listens_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether a backend at `backend` is lb's own `listen`, so that a connection to it would come
/// back to lb (an unspecified listen address takes in the loopback addresses).
pub fn loops_back(listen: SocketAddr, backend: SocketAddr) -> bool {
    let (l, b) = (listen.ip().to_canonical(), backend.ip().to_canonical());
    listen.port() == backend.port() && (l == b || (l.is_unspecified() && b.is_loopback()))
}

/// Why a backend at `backend` is refused: it is service `service`'s listen address.
pub fn loop_message(backend: SocketAddr, service: &str, listen: SocketAddr) -> String {
    format!(
        "backend {backend} is lb's own listen address (service \"{service}\" listens on {listen}): connections to it would come back to lb; use the backend server's own ip:port"
    )
}

/// Why a service cannot listen on `listen`: it is the address of backend `backend` of `service`.
pub fn listen_is_backend(listen: SocketAddr, backend: SocketAddr, service: &str) -> String {
    format!(
        "{listen} is the address of backend {backend} of service \"{service}\": connections to that backend would come to this service; use another ip:port"
    )
}

impl ServiceConfig {
    /// A service from the keys of a `[[service]]` table given as JSON (an `add-service` request):
    /// the file's defaults and checks, with errors naming the field ([`ConfigError::Field`]).
    /// Rules that depend on the other services or on the daemon (`[xdp]`, listen overlap,
    /// `ring_size`) are checked against the running config by the engine.
    pub fn from_fields(fields: serde_json::Value) -> Result<ServiceConfig, ConfigError> {
        parse::service_request(fields)
    }
}

impl BackendConfig {
    /// What makes a backend the same one across two configs (a reload, a state file): its
    /// address and its name.
    pub fn identity(&self) -> (SocketAddr, &str) {
        (self.address, self.name.as_str())
    }

    /// A backend from the keys of a `[[service.backend]]` table given as JSON (an `add-backend`
    /// request): the file's defaults and checks, errors naming the field. The IPv4 rule of `xdp`
    /// services is checked by the engine, which knows the service.
    pub fn from_fields(fields: serde_json::Value) -> Result<BackendConfig, ConfigError> {
        parse::backend_request(fields)
    }
}
