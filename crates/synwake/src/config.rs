//! The TOML config file: raw serde structs (strict keys) resolved into [`Config`].
//!
//! Every default lives here and is documented in the README's config reference.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::spec::{self, FunctionSpec, OciSpec, Policy, RuntimeKind, Source};

/// A config error: names the file, and where possible the line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// Deserializes a TOML file's text; a syntax or type error names the file and line.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: format_toml_error(&e, text),
    })
}

/// A checked value that is wrong: the file, the line of `span` and the key.
pub(crate) fn invalid_at(
    text: &str,
    path: &Path,
    span: std::ops::Range<usize>,
    key: &str,
    message: String,
) -> ConfigError {
    let offset = (span.start + 1).min(text.len());
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line: text[..offset].lines().count().max(1),
        key: key.to_string(),
        message,
    }
}

/// The resolved config the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub defaults: Policy,
    pub probe: ProbeSection,
    pub oci: OciSection,
    pub async_calls: AsyncSection,
    pub functions: Vec<FunctionSpec>,
    /// `[[certificate]]` tables, in file order.
    pub certificates: Vec<CertificateConfig>,
}

/// One `[[certificate]]`: a PEM chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Served to clients that send no SNI (the first certificate when none is marked).
    pub default: bool,
}

/// `[async]`: the durable queue of `POST /async-function/` calls.
#[derive(Debug, Clone)]
pub struct AsyncSection {
    /// Calls queued (accepted, not finished) per function; beyond it 429.
    pub max_queued: usize,
    /// Bytes of all queued calls together; beyond it 429.
    pub max_queued_bytes: u64,
    /// Retries after 502/503/504 or a connection failure.
    pub max_retries: u32,
    /// First retry delay; doubles per retry up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Calls sent at once, over all functions.
    pub workers: usize,
}

impl Default for AsyncSection {
    fn default() -> Self {
        AsyncSection {
            max_queued: 10_000,
            max_queued_bytes: 256 << 20,
            max_retries: 3,
            retry_backoff: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
            workers: 64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub state_dir: PathBuf,
    pub api_password_file: Option<PathBuf>,
    pub wake_on_accept: bool,
    pub drain_timeout: Duration,
    /// The shared HTTPS port; off when absent.
    pub tls_listen: Option<SocketAddr>,
    /// A TLS handshake not finished by then is closed.
    pub tls_handshake_timeout: Duration,
    /// Client connection limits and timeouts, upstream pool idle bound.
    pub limits: crate::gateway::conn::Limits,
    /// Hosts and ranges async callbacks may reach although they are internal.
    pub callback_allow: Vec<crate::api::callback::AllowRule>,
    /// Single-threaded runtimes serving client connections (0: the daemon's multi-threaded
    /// one); `None`: one per CPU. `SYNWAKE_SERVING_THREADS` overrides it.
    pub serving_threads: Option<usize>,
}

/// Most `serving_threads` (config key and `SYNWAKE_SERVING_THREADS`).
pub const MAX_SERVING_THREADS: usize = 256;

impl GatewayConfig {
    /// The ports of synwake's own shared listeners: gateway, API and, when on, TLS.
    pub fn listener_ports(&self) -> Vec<u16> {
        [
            Some(self.listen.port()),
            Some(self.api_listen.port()),
            self.tls_listen.map(|a| a.port()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    Auto,
    Xdp,
    Tc,
    Off,
}

#[derive(Debug, Clone)]
pub struct ProbeSection {
    pub mode: ProbeMode,
    /// `None`: every interface that is up, lo included.
    pub interfaces: Option<Vec<String>>,
    /// Affinity wakes on the shared ports (trigger `affinity`): a SYN from a client that
    /// called exactly one function within this window wakes it. `None`: off.
    pub affinity_window: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct OciSection {
    pub runtime_binary: String,
    pub subnet: String,
    pub outbound_nat: bool,
    /// `host:port` of registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` with registry credentials.
    pub registry_auth_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for registries.
    pub registry_ca_file: Option<PathBuf>,
    /// Unpacked images and pulled blobs; `None`: `<state_dir>/oci/images`.
    pub image_store: Option<PathBuf>,
    /// The only directories local image archives and rootfs paths are read from;
    /// `None`: `<state_dir>/images`.
    pub image_dirs: Option<Vec<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    defaults: RawPolicy,
    #[serde(default)]
    probe: RawProbe,
    #[serde(default)]
    oci: RawOci,
    #[serde(default, rename = "async")]
    async_calls: RawAsync,
    #[serde(default)]
    function: Vec<RawFunction>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    default: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAsync {
    max_queued: Option<u64>,
    max_queued_bytes: Option<String>,
    max_retries: Option<u64>,
    #[serde(default, with = "opt_duration")]
    retry_backoff: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    retry_backoff_max: Option<Duration>,
    workers: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    api_listen: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    api_password_file: Option<PathBuf>,
    wake_on_accept: Option<bool>,
    #[serde(default, with = "opt_duration")]
    drain_timeout: Option<Duration>,
    tls_listen: Option<Spanned<String>>,
    #[serde(default, with = "opt_duration")]
    tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    client_idle_timeout: Option<Duration>,
    max_connections: Option<Spanned<usize>>,
    max_header_bytes: Option<Spanned<usize>>,
    max_headers: Option<Spanned<usize>>,
    #[serde(default, with = "opt_duration")]
    upstream_idle_timeout: Option<Duration>,
    callback_allow: Option<Spanned<Vec<String>>>,
    serving_threads: Option<Spanned<usize>>,
}

/// Policy keys, allowed in `[defaults]` and in each `[[function]]`.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default, with = "opt_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    start_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    stop_grace: Option<Duration>,
    max_pending: Option<usize>,
    #[serde(default, with = "opt_duration")]
    prewarm_ttl: Option<Duration>,
    max_wakes_per_second: Option<u32>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    connect_timeout: Option<Duration>,
    protocol: Option<spec::Protocol>,
    idle_policy: Option<crate::policy::IdlePolicyKind>,
    adaptive: Option<crate::policy::AdaptiveConfig>,
    user: Option<String>,
}

impl RawPolicy {
    fn apply(&self, base: &Policy) -> Policy {
        Policy {
            idle_timeout: self.idle_timeout.unwrap_or(base.idle_timeout),
            start_timeout: self.start_timeout.unwrap_or(base.start_timeout),
            stop_grace: self.stop_grace.unwrap_or(base.stop_grace),
            max_pending: self.max_pending.unwrap_or(base.max_pending),
            prewarm_ttl: self.prewarm_ttl.unwrap_or(base.prewarm_ttl),
            max_wakes_per_second: self
                .max_wakes_per_second
                .unwrap_or(base.max_wakes_per_second),
            timeout: self.timeout.unwrap_or(base.timeout),
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            protocol: self.protocol.unwrap_or(base.protocol),
            idle_policy: self.idle_policy.unwrap_or(base.idle_policy),
            adaptive: self
                .adaptive
                .clone()
                .unwrap_or_else(|| base.adaptive.clone()),
            user: self.user.clone().or_else(|| base.user.clone()),
            max_queued: base.max_queued,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(default = "default_probe_mode")]
    mode: ProbeMode,
    interfaces: Option<Vec<String>>,
    #[serde(default, with = "opt_duration")]
    affinity_window: Option<Duration>,
}

impl Default for RawProbe {
    fn default() -> Self {
        RawProbe {
            mode: default_probe_mode(),
            interfaces: None,
            affinity_window: None,
        }
    }
}

fn default_probe_mode() -> ProbeMode {
    ProbeMode::Auto
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOci {
    runtime_binary: Option<String>,
    subnet: Option<String>,
    outbound_nat: Option<bool>,
    insecure_registries: Option<Spanned<Vec<String>>>,
    registry_auth_file: Option<Spanned<PathBuf>>,
    registry_ca_file: Option<Spanned<PathBuf>>,
    image_store: Option<Spanned<PathBuf>>,
    image_dirs: Option<Spanned<Vec<PathBuf>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: Spanned<String>,
    port: Option<Spanned<u16>>,
    #[serde(default)]
    runtime: RuntimeKind,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    readiness_path: Option<String>,
    #[serde(default)]
    watchdog: crate::spec::Watchdog,
    max_instances: Option<u32>,
    max_concurrency: Option<u32>,
    user: Option<String>,
    #[serde(default, with = "opt_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    start_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    stop_grace: Option<Duration>,
    max_pending: Option<usize>,
    #[serde(default, with = "opt_duration")]
    prewarm_ttl: Option<Duration>,
    max_wakes_per_second: Option<u32>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    connect_timeout: Option<Duration>,
    protocol: Option<spec::Protocol>,
    idle_policy: Option<crate::policy::IdlePolicyKind>,
    adaptive: Option<crate::policy::AdaptiveConfig>,
    image: Option<String>,
    rootfs: Option<String>,
    container_port: Option<u16>,
    memory: Option<Spanned<String>>,
    cpus: Option<f64>,
    pids: Option<u64>,
    pool: Option<u32>,
    /// Async calls queued for this function before 429 (`[async] max_queued` otherwise).
    max_queued: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    tls_port: Option<Spanned<u16>>,
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        crate::spec::duration_str::parse(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = parse_toml(text, path)?;
        let line_of = |offset: usize| text[..offset.min(text.len())].lines().count().max(1);
        let invalid = |span: std::ops::Range<usize>, key: &str, message: String| {
            invalid_at(text, path, span, key, message)
        };

        let parse_addr = |v: &Option<Spanned<String>>, key: &str, default: &str| match v {
            None => Ok(default.parse().expect("default address")),
            Some(s) => s.get_ref().parse::<SocketAddr>().map_err(|e| {
                invalid(
                    s.span(),
                    key,
                    format!(
                        "{:?} is not an address like 127.0.0.1:8081: {e}",
                        s.get_ref()
                    ),
                )
            }),
        };
        let listen = parse_addr(&raw.gateway.listen, "gateway.listen", "0.0.0.0:8080")?;
        let api_listen = parse_addr(
            &raw.gateway.api_listen,
            "gateway.api_listen",
            "127.0.0.1:8081",
        )?;
        let mut insecure_registries = Vec::new();
        if let Some(list) = &raw.oci.insecure_registries {
            for r in list.get_ref() {
                let host_ok = !r.is_empty()
                    && r.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
                if !host_ok {
                    return Err(invalid(
                        list.span(),
                        "oci.insecure_registries",
                        format!("{r:?} is not a registry host[:port] (no scheme, no path)"),
                    ));
                }
                insecure_registries.push(r.to_ascii_lowercase());
            }
        }
        let readable_file = |v: &Option<Spanned<PathBuf>>, key: &str| match v {
            None => Ok(None),
            Some(p) => match std::fs::metadata(p.get_ref()) {
                Ok(m) if m.is_file() => Ok(Some(p.get_ref().clone())),
                Ok(_) => Err(invalid(
                    p.span(),
                    key,
                    format!("{} is not a file", p.get_ref().display()),
                )),
                Err(e) => Err(invalid(
                    p.span(),
                    key,
                    format!("{}: {e}", p.get_ref().display()),
                )),
            },
        };
        let registry_auth_file =
            readable_file(&raw.oci.registry_auth_file, "oci.registry_auth_file")?;
        let registry_ca_file = readable_file(&raw.oci.registry_ca_file, "oci.registry_ca_file")?;
        let image_store = match &raw.oci.image_store {
            Some(p) if !p.get_ref().is_absolute() => {
                return Err(invalid(
                    p.span(),
                    "oci.image_store",
                    format!("{} must be an absolute path", p.get_ref().display()),
                ))
            }
            Some(p) => Some(p.get_ref().clone()),
            None => None,
        };
        let image_dirs = match &raw.oci.image_dirs {
            None => None,
            Some(dirs) => {
                if let Some(rel) = dirs.get_ref().iter().find(|d| !d.is_absolute()) {
                    return Err(invalid(
                        dirs.span(),
                        "oci.image_dirs",
                        format!("{} must be an absolute path", rel.display()),
                    ));
                }
                Some(dirs.get_ref().clone())
            }
        };
        let mut callback_allow = Vec::new();
        if let Some(list) = &raw.gateway.callback_allow {
            for entry in list.get_ref() {
                let rule = crate::api::callback::AllowRule::parse(entry)
                    .map_err(|why| invalid(list.span(), "gateway.callback_allow", why))?;
                callback_allow.push(rule);
            }
        }
        let tls_listen = match &raw.gateway.tls_listen {
            None => None,
            Some(_) => Some(parse_addr(
                &raw.gateway.tls_listen,
                "gateway.tls_listen",
                "0.0.0.0:8443",
            )?),
        };
        let tls_handshake_timeout = raw
            .gateway
            .tls_handshake_timeout
            .unwrap_or(Duration::from_secs(10));
        spec::check_duration(
            "tls_handshake_timeout",
            tls_handshake_timeout,
            &spec::limits::TLS_HANDSHAKE_TIMEOUT,
        )
        .map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(
                key_offset(
                    text,
                    text.find("[gateway]").unwrap_or(0),
                    "tls_handshake_timeout",
                ) + 1,
            ),
            key: "gateway.tls_handshake_timeout".into(),
            message: e.message,
        })?;
        if let Some(w) = raw.probe.affinity_window {
            spec::check_duration("affinity_window", w, &spec::limits::AFFINITY_WINDOW).map_err(
                |e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: line_of(
                        key_offset(text, text.find("[probe]").unwrap_or(0), "affinity_window") + 1,
                    ),
                    key: "probe.affinity_window".into(),
                    message: e.message,
                },
            )?;
        }
        let mut certificates = Vec::new();
        let mut default_line: Option<usize> = None;
        for c in &raw.certificate {
            let default = c.default.as_ref().is_some_and(|d| *d.get_ref());
            if let Some(d) = c.default.as_ref().filter(|d| *d.get_ref()) {
                if let Some(first) = default_line {
                    return Err(invalid(
                        d.span(),
                        "certificate.default",
                        format!("only one certificate may be the default (the first is on line {first})"),
                    ));
                }
                default_line = Some(line_of(d.span().start + 1));
            }
            for (p, key) in [(&c.cert, "certificate.cert"), (&c.key, "certificate.key")] {
                if p.get_ref().as_os_str().is_empty() {
                    return Err(invalid(p.span(), key, "the path is empty".into()));
                }
            }
            certificates.push(CertificateConfig {
                cert: c.cert.get_ref().clone(),
                key: c.key.get_ref().clone(),
                default,
            });
        }
        if let (Some(addr), true) = (&raw.gateway.tls_listen, certificates.is_empty()) {
            return Err(invalid(
                addr.span(),
                "gateway.tls_listen",
                "TLS needs at least one [[certificate]] with cert and key".into(),
            ));
        }
        let base = crate::gateway::conn::Limits::default();
        let at_least = |v: &Option<Spanned<usize>>, key: &str, min: usize, default: usize| match v {
            None => Ok(default),
            Some(n) if *n.get_ref() >= min => Ok(*n.get_ref()),
            Some(n) => Err(invalid(
                n.span(),
                key,
                format!("{} is below the minimum {min}", n.get_ref()),
            )),
        };
        let g = &raw.gateway;
        let limits = crate::gateway::conn::Limits {
            header_read_timeout: g.header_read_timeout.unwrap_or(base.header_read_timeout),
            client_idle_timeout: g.client_idle_timeout.unwrap_or(base.client_idle_timeout),
            max_connections: at_least(
                &g.max_connections,
                "gateway.max_connections",
                1,
                base.max_connections,
            )?,
            max_header_bytes: at_least(
                &g.max_header_bytes,
                "gateway.max_header_bytes",
                crate::gateway::conn::MIN_HEADER_BYTES,
                base.max_header_bytes,
            )?,
            max_headers: at_least(&g.max_headers, "gateway.max_headers", 1, base.max_headers)?,
            upstream_idle_timeout: g
                .upstream_idle_timeout
                .unwrap_or(base.upstream_idle_timeout),
        };
        let serving_threads = match &g.serving_threads {
            Some(n) if *n.get_ref() > MAX_SERVING_THREADS => {
                return Err(invalid(
                    n.span(),
                    "gateway.serving_threads",
                    format!(
                        "{} is above the maximum {MAX_SERVING_THREADS} (0: the daemon's multi-threaded runtime)",
                        n.get_ref()
                    ),
                ))
            }
            n => n.as_ref().map(|n| *n.get_ref()),
        };
        let gateway = GatewayConfig {
            listen,
            api_listen,
            state_dir: raw
                .gateway
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/synwake")),
            api_password_file: raw.gateway.api_password_file,
            wake_on_accept: raw.gateway.wake_on_accept.unwrap_or(true),
            drain_timeout: raw.gateway.drain_timeout.unwrap_or(Duration::from_secs(10)),
            tls_listen,
            tls_handshake_timeout,
            limits,
            callback_allow,
            serving_threads,
        };
        let defaults = raw.defaults.apply(&Policy::default());
        let defaults_at = text.find("[defaults]").unwrap_or(0);
        defaults.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(key_offset(text, defaults_at, &e.key) + 1),
            key: format!("defaults.{}", e.key),
            message: e.message,
        })?;
        let gateway_durations = [
            (
                "drain_timeout",
                raw.gateway.drain_timeout,
                &spec::limits::DRAIN_TIMEOUT,
            ),
            (
                "header_read_timeout",
                raw.gateway.header_read_timeout,
                &spec::limits::CONNECTION_TIMEOUT,
            ),
            (
                "client_idle_timeout",
                raw.gateway.client_idle_timeout,
                &spec::limits::CONNECTION_TIMEOUT,
            ),
            (
                "upstream_idle_timeout",
                raw.gateway.upstream_idle_timeout,
                &spec::limits::CONNECTION_TIMEOUT,
            ),
        ];
        for (key, d, range) in gateway_durations {
            let Some(d) = d else { continue };
            spec::check_duration(key, d, range).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(key_offset(text, text.find("[gateway]").unwrap_or(0), key) + 1),
                key: format!("gateway.{key}"),
                message: e.message,
            })?;
        }

        let mut names: HashMap<String, usize> = HashMap::new();
        let mut ports: HashMap<u16, String> = HashMap::new();
        ports.insert(listen.port(), "gateway.listen".into());
        ports.insert(api_listen.port(), "gateway.api_listen".into());
        if let Some(t) = tls_listen {
            if let Some(owner) = ports.insert(t.port(), "gateway.tls_listen".into()) {
                let span = raw
                    .gateway
                    .tls_listen
                    .as_ref()
                    .map(|s| s.span())
                    .unwrap_or(0..0);
                return Err(invalid(
                    span,
                    "gateway.tls_listen",
                    format!("port {} is already used by {owner}", t.port()),
                ));
            }
        }
        // host claim -> (function, line), for duplicate claims across functions.
        let mut host_claims: HashMap<String, (String, usize)> = HashMap::new();
        let mut ids: HashMap<u32, String> = HashMap::new();
        let mut functions = Vec::new();
        for f in raw.function {
            let name = f.name.get_ref().clone();
            spec::validate_name(&name).map_err(|m| invalid(f.name.span(), "function.name", m))?;
            if let Some(first) = names.insert(name.clone(), line_of(f.name.span().start + 1)) {
                return Err(invalid(
                    f.name.span(),
                    "function.name",
                    format!("duplicate function name {name:?} (first declared on line {first})"),
                ));
            }
            if let Some(other) = ids.insert(spec::function_id(&name), name.clone()) {
                return Err(invalid(
                    f.name.span(),
                    "function.name",
                    format!("function id of {name:?} collides with {other:?}; rename one"),
                ));
            }
            let mut own_port = |p: &Option<Spanned<u16>>, key: &str| match p {
                None => Ok(None),
                Some(p) => {
                    let port = *p.get_ref();
                    if port == 0 {
                        return Err(invalid(
                            p.span(),
                            key,
                            "0 is out of range (1 to 65535)".into(),
                        ));
                    }
                    if let Some(owner) = ports.insert(port, format!("function {name:?}")) {
                        return Err(invalid(
                            p.span(),
                            key,
                            format!("port {port} of function {name:?} is already used by {owner}"),
                        ));
                    }
                    Ok(Some(port))
                }
            };
            let port = own_port(&f.port, "function.port")?;
            let tls_port = own_port(&f.tls_port, "function.tls_port")?;
            if let (Some(p), true) = (&f.tls_port, certificates.is_empty()) {
                return Err(invalid(
                    p.span(),
                    "function.tls_port",
                    format!("function {name:?}: a TLS port needs at least one [[certificate]]"),
                ));
            }
            let mut hosts: Vec<String> = Vec::new();
            for h in &f.hosts {
                let host = spec::validate_host(h.get_ref())
                    .map_err(|m| invalid(h.span(), "function.hosts", m))?;
                let line = line_of(h.span().start + 1);
                if let Some((other, first)) = host_claims.get(&host) {
                    if *other != name {
                        return Err(invalid(
                            h.span(),
                            "function.hosts",
                            format!("host {host:?} of function {name:?} is already claimed by function {other:?} (line {first})"),
                        ));
                    }
                    continue;
                }
                host_claims.insert(host.clone(), (name.clone(), line));
                hosts.push(host);
            }
            let name_at = f.name.span().start;
            let memory_bytes = match &f.memory {
                None => None,
                Some(m) => Some(
                    spec::parse_bytes(m.get_ref())
                        .map_err(|e| invalid(m.span(), "function.memory", e))?,
                ),
            };
            let max_instances = f.max_instances.unwrap_or(1);
            let mut policy = RawPolicy {
                idle_timeout: f.idle_timeout,
                start_timeout: f.start_timeout,
                stop_grace: f.stop_grace,
                max_pending: f.max_pending,
                prewarm_ttl: f.prewarm_ttl,
                max_wakes_per_second: f.max_wakes_per_second,
                timeout: f.timeout,
                connect_timeout: f.connect_timeout,
                protocol: f.protocol,
                idle_policy: f.idle_policy,
                adaptive: f.adaptive.clone(),
                user: f.user,
            }
            .apply(&defaults);
            policy.max_queued = f.max_queued;
            let spec = FunctionSpec {
                name: name.clone(),
                port,
                runtime: f.runtime,
                command: f.command,
                env: f.env,
                readiness_path: f.readiness_path,
                max_instances,
                max_concurrency: f.max_concurrency.unwrap_or(0),
                policy,
                oci: OciSpec {
                    image: f.image,
                    rootfs: f.rootfs,
                    container_port: f.container_port.unwrap_or(8080),
                    memory_bytes,
                    cpus: f.cpus,
                    pids: f.pids,
                    pool: f.pool.unwrap_or(0),
                    memory_text: f.memory.as_ref().map(|m| m.get_ref().clone()),
                    cpu_text: None,
                },
                labels: f.labels,
                annotations: BTreeMap::new(),
                source: Source::Config,
                hosts,
                tls_port,
                watchdog: f.watchdog,
                secrets: Vec::new(),
            };
            spec.validate().map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(key_offset(text, name_at, &e.key) + 1),
                key: format!("function.{}", e.key),
                message: format!("function {name:?}: {}", e.message),
            })?;
            functions.push(spec);
        }
        let async_calls = {
            let a = &raw.async_calls;
            let at = text.find("[async]").unwrap_or(0);
            let bad = |e: spec::SpecError| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(key_offset(text, at, &e.key) + 1),
                key: format!("async.{}", e.key),
                message: e.message,
            };
            let d = AsyncSection::default();
            let max_queued_bytes = match &a.max_queued_bytes {
                None => d.max_queued_bytes,
                Some(b) => spec::parse_bytes(b)
                    .map_err(|m| bad(spec::SpecError::new("max_queued_bytes", m)))?,
            };
            spec::check_count(
                "max_queued_bytes",
                max_queued_bytes,
                &spec::limits::ASYNC_QUEUED_BYTES,
            )
            .map_err(bad)?;
            let retry_backoff = a.retry_backoff.unwrap_or(d.retry_backoff);
            let retry_backoff_max = a.retry_backoff_max.unwrap_or(d.retry_backoff_max);
            spec::check_duration("retry_backoff", retry_backoff, &spec::limits::ASYNC_BACKOFF)
                .map_err(bad)?;
            spec::check_duration(
                "retry_backoff_max",
                retry_backoff_max,
                &spec::limits::ASYNC_BACKOFF,
            )
            .map_err(bad)?;
            AsyncSection {
                max_queued: spec::count_in(
                    "max_queued",
                    a.max_queued.unwrap_or(d.max_queued as u64),
                    &spec::limits::ASYNC_MAX_QUEUED,
                )
                .map_err(bad)?,
                max_queued_bytes,
                max_retries: spec::count_in(
                    "max_retries",
                    a.max_retries.unwrap_or(d.max_retries as u64),
                    &spec::limits::ASYNC_MAX_RETRIES,
                )
                .map_err(bad)?,
                retry_backoff,
                retry_backoff_max: retry_backoff_max.max(retry_backoff),
                workers: spec::count_in(
                    "workers",
                    a.workers.unwrap_or(d.workers as u64),
                    &spec::limits::ASYNC_WORKERS,
                )
                .map_err(bad)?,
            }
        };
        Ok(Config {
            async_calls,
            gateway,
            defaults,
            probe: ProbeSection {
                mode: raw.probe.mode,
                interfaces: raw.probe.interfaces,
                affinity_window: raw.probe.affinity_window,
            },
            oci: OciSection {
                runtime_binary: raw.oci.runtime_binary.unwrap_or_else(|| "runc".into()),
                subnet: raw.oci.subnet.unwrap_or_else(|| "10.72.0.0/16".into()),
                outbound_nat: raw.oci.outbound_nat.unwrap_or(false),
                insecure_registries,
                registry_auth_file,
                registry_ca_file,
                image_store,
                image_dirs,
            },
            functions,
            certificates,
        })
    }
}

/// Byte offset of the line setting `key` in the table that holds offset `within` (a
/// `key =` line, or a `[<table>.key]` sub-table); `within` itself when not found (e.g. a
/// value inherited from a default).
fn key_offset(text: &str, within: usize, key: &str) -> usize {
    let within = within.min(text.len());
    let is_header = |l: &str| l.trim_start().starts_with('[');
    // The table starts at the last header at or before `within`, ends at the next header
    // that is not one of its own sub-tables.
    let mut start = 0;
    let mut header = "";
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > within {
            break;
        }
        if is_header(line) {
            start = offset;
            header = line.trim().trim_matches(|c| c == '[' || c == ']').trim();
        }
        offset += line.len();
    }
    let own_sub = format!("[{header}.");
    let mut offset = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if i > 0 && is_header(line) {
            if t.starts_with(&own_sub) && t[own_sub.len()..].starts_with(key) {
                return offset;
            }
            if !t.starts_with(&own_sub) {
                break;
            }
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return offset;
            }
        }
        offset += line.len();
    }
    within
}

/// toml's own message already says "line N, column M"; keep it, minus the source excerpt.
pub(crate) fn format_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            let line = if text[..span.start.min(text.len())].ends_with('\n') {
                line + 1
            } else {
                line
            };
            let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {msg} (at `{snippet}`)")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn defaults_apply() {
        let c = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\n").unwrap();
        assert_eq!(c.gateway.listen.port(), 8080);
        assert_eq!(c.gateway.api_listen.port(), 8081);
        let f = &c.functions[0];
        assert_eq!(f.policy.idle_timeout, Duration::from_secs(60));
        assert_eq!(f.max_instances, 1);
        assert_eq!(f.runtime, RuntimeKind::Process);
        assert_eq!(c.probe.mode, ProbeMode::Auto);
    }

    #[test]
    fn function_overrides_defaults() {
        let c = parse(
            "[defaults]\nidle_timeout = \"5s\"\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\nidle_timeout = \"250ms\"\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.functions[0].policy.idle_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(c.functions[1].policy.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[gateway]\nlisten = \"0.0.0.0:1\"\nlisen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn unknown_function_key() {
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\ncomand = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("comand"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn wrong_type() {
        let e = parse("[defaults]\nmax_pending = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("max_pending"), "{e}");
    }

    #[test]
    fn invalid_duration() {
        let e = parse("[defaults]\nidle_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("idle_timeout"), "{e}");
        assert!(e.contains("soon"), "{e}");
    }

    #[test]
    fn duplicate_name_and_port() {
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:5: function.name: duplicate"),
            "{e}"
        );
        let e = parse("[[function]]\nname = \"a\"\nport = 9000\ncommand = [\"x\"]\n[[function]]\nname = \"b\"\nport = 9000\ncommand = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:7: function.port: port 9000"),
            "{e}"
        );
        let e = parse("[[function]]\nname = \"a\"\nport = 8081\ncommand = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.api_listen"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_line_of_their_key() {
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\nstart_timeout = \"18446744073709551615s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:4: function.start_timeout: "),
            "{e}"
        );
        let e = parse("[gateway]\n[defaults]\nidle_timeout = \"1s\"\nstop_grace = \"9999h\"\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:4: defaults.stop_grace: "), "{e}");
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\nmax_instances = 0\n[function.env]\nA = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:7: function.max_instances: "),
            "{e}"
        );
        let e = parse(
            "[[function]]\nname = \"a\"\ncommand = [\"x\"]\n[function.env]\nA = \"x\\u0000\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("test.toml:4: function.env: "), "{e}");
        let e = parse("[gateway]\ndrain_timeout = \"2h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:2: gateway.drain_timeout: "), "{e}");
    }

    #[test]
    fn tls_keys() {
        let c = parse(
            "[gateway]\ntls_listen = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"a.pem\"\nkey = \"a.key\"\n[[certificate]]\ncert = \"b.pem\"\nkey = \"b.key\"\ndefault = true\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\nhosts = [\"A.example.com\", \"*.a.example.com\"]\ntls_port = 9443\n",
        )
        .unwrap();
        assert_eq!(c.gateway.tls_listen.unwrap().port(), 8443);
        assert_eq!(c.gateway.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.certificates.len(), 2);
        assert!(!c.certificates[0].default && c.certificates[1].default);
        assert_eq!(c.functions[0].hosts, ["a.example.com", "*.a.example.com"]);
        assert_eq!(c.functions[0].tls_port, Some(9443));
    }

    #[test]
    fn tls_errors_name_line_and_key() {
        let e = parse("[gateway]\ntls_listen = \"127.0.0.1:8443\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:2: gateway.tls_listen:"), "{e}");
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\nhosts = [\"x.example.com\"]\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\nhosts = [\"y.example.com\", \"X.example.com\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:8: function.hosts:"), "{e}");
        assert!(
            e.contains("\"a\"") && e.contains("\"b\"") && e.contains("line 4"),
            "{e}"
        );
        let e =
            parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\nhosts = [\"no_such host\"]\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("test.toml:4: function.hosts:"), "{e}");
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\ntls_port = 9443\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:4: function.tls_port:"), "{e}");
        let e = parse("[[certificate]]\ncert = \"a\"\nkey = \"b\"\ndefault = true\n[[certificate]]\ncert = \"c\"\nkey = \"d\"\ndefault = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:8: certificate.default:"), "{e}");
        let e = parse("[gateway]\ntls_listen = \"127.0.0.1:8443\"\n[[certificate]]\ncert = \"a\"\nkey = \"b\"\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\ntls_port = 8443\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("function.tls_port") && e.contains("gateway.tls_listen"),
            "{e}"
        );
    }

    #[test]
    fn user_from_defaults_or_function_and_checked() {
        let c = parse("[defaults]\nuser = \"1000:1000\"\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\nuser = \"root\"\n").unwrap();
        assert_eq!(c.functions[0].policy.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.functions[1].policy.user.as_deref(), Some("root"));
        let c = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\n").unwrap();
        assert_eq!(
            c.functions[0].policy.user, None,
            "nobody, resolved at start"
        );
        let e = parse("[[function]]\nname = \"a\"\ncommand = [\"x\"]\nuser = \"root; id\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:4: function.user: "), "{e}");
        let e = parse("[defaults]\nuser = \"1:\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml:2: defaults.user: "), "{e}");
    }

    #[test]
    fn public_api_is_allowed_as_auth_is_always_on() {
        let c = parse("[gateway]\napi_listen = \"0.0.0.0:8081\"\n").unwrap();
        assert!(c.gateway.api_password_file.is_none());
    }

    #[test]
    fn gateway_limits_and_upstream_policy() {
        let c = parse("[gateway]\nheader_read_timeout = \"2s\"\nmax_connections = 10\n[defaults]\ntimeout = \"5s\"\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\nprotocol = \"h2c\"\nconnect_timeout = \"1s\"\n").unwrap();
        assert_eq!(c.gateway.limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.gateway.limits.max_connections, 10);
        assert_eq!(
            c.gateway.limits.client_idle_timeout,
            Duration::from_secs(60)
        );
        let p = &c.functions[0].policy;
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!(p.connect_timeout, Duration::from_secs(1));
        assert_eq!(p.protocol, spec::Protocol::H2c);
        let e = parse("[gateway]\nmax_header_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("test.toml:2: gateway.max_header_bytes"),
            "{e}"
        );
        let e = parse("[defaults]\nprotocol = \"spdy\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("spdy"), "{e}");
    }

    #[test]
    fn oci_needs_image() {
        let e = parse("[[function]]\nname = \"a\"\nruntime = \"oci\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("image"), "{e}");
        let c = parse("[[function]]\nname = \"a\"\nruntime = \"oci\"\nimage = \"x.tar\"\nmemory = \"64Mi\"\npool = 2\n").unwrap();
        assert_eq!(c.functions[0].oci.memory_bytes, Some(64 << 20));
        assert_eq!(c.functions[0].oci.pool, 2);
    }

    #[test]
    fn affinity_window_is_off_by_default_and_checked() {
        assert_eq!(parse("").unwrap().probe.affinity_window, None);
        let c = parse("[probe]\naffinity_window = \"30s\"\n").unwrap();
        assert_eq!(c.probe.affinity_window, Some(Duration::from_secs(30)));
        let e = parse("[gateway]\n\n[probe]\nmode = \"auto\"\naffinity_window = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":5: probe.affinity_window"), "{e}");
        let e = parse("[probe]\naffinity_window = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("affinity_window"), "{e}");
    }

    #[test]
    fn idle_policy_and_adaptive_knobs() {
        let c = parse(
            "[defaults]\nidle_policy = \"adaptive\"\n[defaults.adaptive]\nbins = 60\nkeepalive_percentile = 95.0\n[[function]]\nname = \"a\"\ncommand = [\"x\"]\n[[function]]\nname = \"b\"\ncommand = [\"x\"]\nidle_policy = \"fixed\"\n",
        )
        .unwrap();
        let a = &c.functions[0].policy;
        assert_eq!(a.idle_policy, crate::policy::IdlePolicyKind::Adaptive);
        assert_eq!(a.adaptive.bins, 60);
        assert_eq!(a.adaptive.keepalive_percentile, 95.0);
        assert_eq!(
            a.adaptive.prewarm_percentile, 5.0,
            "unset knobs keep their default"
        );
        assert_eq!(
            c.functions[1].policy.idle_policy,
            crate::policy::IdlePolicyKind::Fixed
        );
        let e = parse("[defaults]\nidle_policy = \"lru\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("idle_policy"), "{e}");
        let e = parse("[defaults.adaptive]\nbinz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("binz"), "{e}");
        let e = parse("[defaults.adaptive]\nbins = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adaptive.bins"), "{e}");
    }
}
