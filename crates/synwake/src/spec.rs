//! What a function is: the resolved, validated description every part works from.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How an instance of a function runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A local command listening on `$PORT` (no dependencies).
    #[default]
    Process,
    /// An OCI container run with runc in its own network namespace.
    Oci,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Oci => "oci",
        }
    }
}

/// Where a function was declared; config-file functions are read-only through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

/// What the gateway speaks to a function's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, connections kept alive and reused.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (no TLS), as gRPC needs end to end.
    H2c,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http1" => Ok(Protocol::Http1),
            "h2c" => Ok(Protocol::H2c),
            other => Err(format!(
                "invalid protocol {other:?}: expected \"http1\" or \"h2c\""
            )),
        }
    }
}

/// Timing and admission settings; `[defaults]` in the config, overridable per function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(with = "crate::spec::duration_str")]
    pub idle_timeout: Duration,
    #[serde(with = "crate::spec::duration_str")]
    pub start_timeout: Duration,
    #[serde(with = "crate::spec::duration_str")]
    pub stop_grace: Duration,
    pub max_pending: usize,
    #[serde(with = "crate::spec::duration_str")]
    pub prewarm_ttl: Duration,
    pub max_wakes_per_second: u32,
    /// Upstream response: from forwarding the request to the response head (504 after).
    #[serde(with = "crate::spec::duration_str", default = "default_timeout")]
    pub timeout: Duration,
    /// Upstream TCP connect to an instance.
    #[serde(
        with = "crate::spec::duration_str",
        default = "default_connect_timeout"
    )]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub protocol: Protocol,
    /// `fixed` (stop after `idle_timeout`) or `adaptive` (learned windows, crate::policy).
    #[serde(default)]
    pub idle_policy: crate::policy::IdlePolicyKind,
    /// The adaptive policy's knobs.
    #[serde(default)]
    pub adaptive: crate::policy::AdaptiveConfig,
    /// Process runtime: the account instances run as (name, uid or uid:gid); `None` is
    /// `nobody`. Root only when named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Async calls queued for this function before 429; `None`: `[async] max_queued`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u64>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            idle_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            max_pending: 1000,
            prewarm_ttl: Duration::from_secs(10),
            max_wakes_per_second: 5,
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            protocol: Protocol::Http1,
            idle_policy: crate::policy::IdlePolicyKind::Fixed,
            adaptive: crate::policy::AdaptiveConfig::default(),
            user: None,
            max_queued: None,
        }
    }
}

/// Container settings, used when `runtime = "oci"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OciSpec {
    /// OCI archive or docker-archive path (readable by the daemon).
    pub image: Option<String>,
    /// Alternative to `image`: an unpacked root filesystem.
    pub rootfs: Option<String>,
    pub container_port: u16,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Created-but-not-started containers kept ready.
    pub pool: u32,
    /// `memory` / `limits.memory` as written ("128Mi"), shown back by the API.
    #[serde(default)]
    pub memory_text: Option<String>,
    /// `limits.cpu` as written ("500m"), shown back by the API.
    #[serde(default)]
    pub cpu_text: Option<String>,
}

/// A deployed function. Immutable once built; an update replaces the whole spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    pub name: String,
    /// A port of its own: every path on it goes to this function.
    pub port: Option<u16>,
    pub runtime: RuntimeKind,
    /// Process runtime: the command; OCI runtime: overrides Entrypoint + Cmd when non-empty.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `None`: ready when a TCP connect succeeds.
    pub readiness_path: Option<String>,
    pub max_instances: u32,
    /// In-flight requests per instance before scaling out; 0 = unlimited.
    pub max_concurrency: u32,
    pub policy: Policy,
    pub oci: OciSpec,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub source: Source,
    /// Host names it claims on the shared ports (SNI on TLS, Host on plain HTTP): exact
    /// names or `*.` wildcards of one label, lowercase, without a trailing dot.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// An own HTTPS port: every path on it goes to this function (the probe watches it).
    #[serde(default)]
    pub tls_port: Option<u16>,
    /// How requests reach the command: as an HTTP server, or one process per request.
    #[serde(default)]
    pub watchdog: Watchdog,
    /// Names of secrets (`/system/secrets`) the function gets as files.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// `watchdog` / `com.synwake.watchdog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Watchdog {
    /// The command is an HTTP server on `$PORT` (OpenFaaS of-watchdog / faas-cli images).
    #[default]
    Http,
    /// OpenFaaS classic: one process per request, body on stdin, stdout the response,
    /// headers as `Http_*` environment variables, non-zero exit -> 500 with stderr.
    Stdio,
}

impl Watchdog {
    pub fn parse(s: &str) -> Option<Watchdog> {
        match s {
            "http" => Some(Watchdog::Http),
            "stdio" => Some(Watchdog::Stdio),
            _ => None,
        }
    }
}

impl FunctionSpec {
    /// The function id carried in the synwake TCP option: FNV-1a 32-bit of the name.
    pub fn id(&self) -> u32 {
        function_id(&self.name)
    }
}

/// A spec value outside its documented range; `key` is the `[[function]]` config key
/// (`api_field` gives the API's name for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SpecError {
    pub key: String,
    pub message: String,
}

impl SpecError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The documented range of every duration and count (README, "Configuration reference").
/// Upper bounds keep every `Instant + duration` and every product far from overflow.
pub mod limits {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    const fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    const DAY: u64 = 24 * 3600;

    pub const IDLE_TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(365 * DAY);
    pub const START_TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(3600);
    pub const STOP_GRACE: RangeInclusive<Duration> = ms(0)..=secs(3600);
    pub const PREWARM_TTL: RangeInclusive<Duration> = ms(0)..=secs(DAY);
    pub const AFFINITY_WINDOW: RangeInclusive<Duration> = ms(1)..=secs(DAY);
    pub const DRAIN_TIMEOUT: RangeInclusive<Duration> = ms(0)..=secs(3600);
    pub const TLS_HANDSHAKE_TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(600);
    /// Host names one function may claim.
    pub const HOSTS: usize = 256;
    pub const TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(DAY);
    pub const CONNECT_TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(3600);
    /// `header_read_timeout`, `client_idle_timeout`, `upstream_idle_timeout`.
    pub const CONNECTION_TIMEOUT: RangeInclusive<Duration> = ms(1)..=secs(DAY);
    pub const MAX_PENDING: RangeInclusive<u64> = 0..=1_000_000;
    pub const MAX_WAKES_PER_SECOND: RangeInclusive<u64> = 0..=100_000;
    pub const MAX_INSTANCES: RangeInclusive<u64> = 1..=1024;
    pub const MAX_CONCURRENCY: RangeInclusive<u64> = 0..=1_000_000;
    pub const POOL: RangeInclusive<u64> = 0..=64;
    pub const PORT: RangeInclusive<u64> = 1..=65535;
    pub const MEMORY: RangeInclusive<u64> = (1 << 20)..=(1 << 50);
    pub const CPUS: RangeInclusive<f64> = 0.001..=1024.0;
    pub const PIDS: RangeInclusive<u64> = 1..=4_194_304;
    /// Bytes of all `env` names and values together.
    pub const ENV_BYTES: u64 = 1 << 20;
    pub const READINESS_PATH_LEN: usize = 1024;
    /// `[async]`.
    pub const ASYNC_MAX_QUEUED: RangeInclusive<u64> = 1..=1_000_000;
    pub const ASYNC_QUEUED_BYTES: RangeInclusive<u64> = (1 << 20)..=(64 << 30);
    pub const ASYNC_MAX_RETRIES: RangeInclusive<u64> = 0..=100;
    pub const ASYNC_BACKOFF: RangeInclusive<Duration> = ms(1)..=secs(3600);
    pub const ASYNC_WORKERS: RangeInclusive<u64> = 1..=4096;
}

/// Checks a duration against its documented range.
pub fn check_duration(
    key: &str,
    d: Duration,
    range: &std::ops::RangeInclusive<Duration>,
) -> Result<(), SpecError> {
    if range.contains(&d) {
        return Ok(());
    }
    Err(SpecError::new(
        key,
        format!(
            "{} is out of range ({} to {})",
            humantime::format_duration(d),
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        ),
    ))
}

/// Checks a count against its documented range; `u64` so that nothing is truncated first.
pub fn check_count(
    key: &str,
    n: u64,
    range: &std::ops::RangeInclusive<u64>,
) -> Result<(), SpecError> {
    if range.contains(&n) {
        return Ok(());
    }
    Err(SpecError::new(
        key,
        format!("{n} is out of range ({} to {})", range.start(), range.end()),
    ))
}

/// A count narrowed to its field's type after its range check (so never truncated).
pub fn count_in<T: TryFrom<u64>>(
    key: &str,
    n: u64,
    range: &std::ops::RangeInclusive<u64>,
) -> Result<T, SpecError> {
    check_count(key, n, range)?;
    T::try_from(n).map_err(|_| SpecError::new(key, format!("{n} is out of range")))
}

impl Policy {
    /// Every policy value within its documented range (`[defaults]` and each function).
    pub fn validate(&self) -> Result<(), SpecError> {
        check_duration("idle_timeout", self.idle_timeout, &limits::IDLE_TIMEOUT)?;
        self.adaptive
            .validate()
            .map_err(|(key, message)| SpecError::new(key, message))?;
        check_duration("start_timeout", self.start_timeout, &limits::START_TIMEOUT)?;
        check_duration("stop_grace", self.stop_grace, &limits::STOP_GRACE)?;
        check_duration("prewarm_ttl", self.prewarm_ttl, &limits::PREWARM_TTL)?;
        check_duration("timeout", self.timeout, &limits::TIMEOUT)?;
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            &limits::CONNECT_TIMEOUT,
        )?;
        check_count("max_pending", self.max_pending as u64, &limits::MAX_PENDING)?;
        check_count(
            "max_wakes_per_second",
            self.max_wakes_per_second as u64,
            &limits::MAX_WAKES_PER_SECOND,
        )?;
        if let Some(u) = &self.user {
            crate::runtime::user::validate(u).map_err(|e| SpecError::new("user", e.to_string()))?;
        }
        if let Some(n) = self.max_queued {
            check_count("max_queued", n, &limits::ASYNC_MAX_QUEUED)?;
        }
        Ok(())
    }
}

impl FunctionSpec {
    /// The one check of a spec, used by the config loader, the API and `Lifecycle::deploy`:
    /// every value in its documented range, nothing that would only fail at start time.
    /// Checks that need other functions (duplicate names, ports, ids) are the caller's.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name).map_err(|m| SpecError::new("name", m))?;
        if let Some(p) = self.port {
            check_count("port", p as u64, &limits::PORT)?;
        }
        if let Some(p) = self.tls_port {
            check_count("tls_port", p as u64, &limits::PORT)?;
            if self.port == Some(p) {
                return Err(SpecError::new(
                    "tls_port",
                    format!("{p} is also the function's plain port"),
                ));
            }
        }
        if self.hosts.len() > limits::HOSTS {
            return Err(SpecError::new(
                "hosts",
                format!(
                    "{} host names, more than {}",
                    self.hosts.len(),
                    limits::HOSTS
                ),
            ));
        }
        for h in &self.hosts {
            match validate_host(h) {
                Ok(n) if n == *h => {}
                Ok(n) => {
                    return Err(SpecError::new(
                        "hosts",
                        format!("host {h:?} is not in normal form (write {n:?})"),
                    ))
                }
                Err(m) => return Err(SpecError::new("hosts", m)),
            }
        }
        match self.runtime {
            RuntimeKind::Process if self.command.is_empty() => {
                return Err(SpecError::new(
                    "command",
                    "the process runtime needs a command",
                ))
            }
            RuntimeKind::Oci if self.oci.image.is_none() == self.oci.rootfs.is_none() => {
                return Err(SpecError::new(
                    "image",
                    "the oci runtime needs exactly one of image or rootfs",
                ))
            }
            _ => {}
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::new("command", "an argument holds a NUL byte"));
        }
        if self.runtime == RuntimeKind::Process
            && self.command.first().is_some_and(|c| c.is_empty())
        {
            return Err(SpecError::new("command", "the program name is empty"));
        }
        let mut env_bytes = 0u64;
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(SpecError::new(
                    "env",
                    format!("{:?} is not a variable name (non-empty, no '=' or NUL)", k),
                ));
            }
            if v.contains('\0') {
                return Err(SpecError::new(
                    "env",
                    format!("the value of {k} holds a NUL byte"),
                ));
            }
            env_bytes += (k.len() + v.len()) as u64;
        }
        if env_bytes > limits::ENV_BYTES {
            return Err(SpecError::new(
                "env",
                format!(
                    "{env_bytes} bytes of names and values, more than {}",
                    limits::ENV_BYTES
                ),
            ));
        }
        if let Some(p) = &self.readiness_path {
            check_readiness_path(p)?;
        }
        check_count(
            "max_instances",
            self.max_instances as u64,
            &limits::MAX_INSTANCES,
        )?;
        check_count(
            "max_concurrency",
            self.max_concurrency as u64,
            &limits::MAX_CONCURRENCY,
        )?;
        self.policy.validate()?;
        for n in &self.secrets {
            crate::secrets::check_name(n).map_err(|e| SpecError::new("secrets", e.to_string()))?;
        }
        for (key, v) in [("image", &self.oci.image), ("rootfs", &self.oci.rootfs)] {
            if let Some(v) = v {
                if v.is_empty() || v.contains('\0') {
                    return Err(SpecError::new(key, "must be a non-empty path without NUL"));
                }
                if key == "image" && synwake_oci::is_registry_reference(v) {
                    if let Err(e) = synwake_oci::image::parse_reference(v) {
                        return Err(SpecError::new(key, e.to_string()));
                    }
                }
            }
        }
        if self.runtime == RuntimeKind::Oci {
            check_count(
                "container_port",
                self.oci.container_port as u64,
                &limits::PORT,
            )?;
        }
        if let Some(m) = self.oci.memory_bytes {
            check_count("memory", m, &limits::MEMORY)?;
        }
        if let Some(c) = self.oci.cpus {
            if !limits::CPUS.contains(&c) {
                return Err(SpecError::new(
                    "cpus",
                    format!(
                        "{c} is out of range ({} to {})",
                        limits::CPUS.start(),
                        limits::CPUS.end()
                    ),
                ));
            }
        }
        if let Some(p) = self.oci.pids {
            check_count("pids", p, &limits::PIDS)?;
        }
        check_count("pool", self.oci.pool as u64, &limits::POOL)?;
        Ok(())
    }
}

/// A readiness path goes into a request line as is: an origin-form path of visible ASCII.
fn check_readiness_path(p: &str) -> Result<(), SpecError> {
    if !p.starts_with('/') || p.len() > limits::READINESS_PATH_LEN {
        return Err(SpecError::new(
            "readiness_path",
            format!(
                "must start with '/' and be at most {} bytes",
                limits::READINESS_PATH_LEN
            ),
        ));
    }
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SpecError::new(
            "readiness_path",
            "may only hold visible ASCII (no spaces, CR, LF or control bytes; percent-encode them)",
        ));
    }
    Ok(())
}

/// The API's name of a `[[function]]` config key, for 400s naming the request field.
pub fn api_field(key: &str) -> String {
    match key {
        "name" => "service".into(),
        "command" => "envProcess".into(),
        "env" => "envVars".into(),
        "labels" => "labels".into(),
        "image" | "rootfs" => "image".into(),
        "memory" => "limits.memory".into(),
        "cpus" => "limits.cpu".into(),
        other => format!("annotations.com.synwake.{}", other.replace('_', "-")),
    }
}

/// FNV-1a 32-bit of `name`'s UTF-8 bytes (design.md, "synwake TCP option"); the probe's
/// definition, so the kernel side and the daemon can never disagree.
pub use synwake_ebpf::function_id;

/// Names are used in URLs, log prefixes and container names.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("function name {name:?} must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        || name.starts_with('-')
    {
        return Err(format!(
            "function name {name:?} may only hold lowercase letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Checks one host claim and returns it normalised (lowercase, no trailing dot).
/// `*.example.com` claims every name one label below `example.com`.
pub fn validate_host(host: &str) -> Result<String, String> {
    let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wild, rest) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if rest.is_empty() || h.len() > 253 || !rest.split('.').all(label_ok) {
        return Err(format!(
            "host {host:?} is not a DNS name like hello.example.com or *.example.com"
        ));
    }
    if wild && !rest.contains('.') {
        return Err(format!(
            "host {host:?}: a wildcard needs at least two labels after \"*.\" (like *.example.com)"
        ));
    }
    Ok(h)
}

/// The first host claim `a` and `b` share (claims are normalised, so equal strings).
pub fn shared_host<'a>(a: &'a FunctionSpec, b: &FunctionSpec) -> Option<&'a str> {
    a.hosts
        .iter()
        .find(|h| b.hosts.contains(h))
        .map(String::as_str)
}

/// Parses "128Mi", "1G", "512k", "1048576" into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional unit like 128Mi")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "b" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {s:?} (use Ki, Mi, Gi, k, M, G)"
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

/// Serde helper: durations as humantime strings ("60s", "250ms").
pub mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid duration {s:?}: {e} (examples: \"250ms\", \"30s\", \"5m\")")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(function_id(""), 0x811c_9dc5);
        assert_eq!(function_id("a"), 0xe40c_292c);
        assert_eq!(function_id("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("parsecs"));
    }

    fn process(name: &str) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            port: None,
            runtime: RuntimeKind::Process,
            command: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            readiness_path: None,
            max_instances: 1,
            max_concurrency: 0,
            policy: Policy::default(),
            oci: OciSpec {
                container_port: 8080,
                ..OciSpec::default()
            },
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            source: Source::Api,
            hosts: Vec::new(),
            tls_port: None,
            watchdog: Watchdog::Http,
            secrets: Vec::new(),
        }
    }

    #[test]
    fn validate_hosts_and_tls_port() {
        let mut s = process("a");
        s.hosts = vec!["a.example.com".into(), "*.example.com".into()];
        s.tls_port = Some(9443);
        assert_eq!(s.validate(), Ok(()));
        s.port = Some(9443);
        assert_eq!(s.validate().unwrap_err().key, "tls_port");
        s.port = None;
        s.hosts = vec!["A.example.com".into()];
        assert_eq!(s.validate().unwrap_err().key, "hosts");
        s.hosts = vec!["*".into()];
        assert_eq!(s.validate().unwrap_err().key, "hosts");
    }

    #[test]
    fn validate_ranges() {
        assert_eq!(process("a").validate(), Ok(()));
        let key = |f: &dyn Fn(&mut FunctionSpec)| {
            let mut s = process("a");
            f(&mut s);
            s.validate().map(|_| ()).map_err(|e| e.key)
        };
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(
            key(&|s| s.policy.start_timeout = huge),
            Err("start_timeout".into())
        );
        assert_eq!(
            key(&|s| s.policy.idle_timeout = huge),
            Err("idle_timeout".into())
        );
        assert_eq!(
            key(&|s| s.policy.stop_grace = huge),
            Err("stop_grace".into())
        );
        assert_eq!(
            key(&|s| s.policy.prewarm_ttl = huge),
            Err("prewarm_ttl".into())
        );
        assert_eq!(key(&|s| s.max_instances = 0), Err("max_instances".into()));
        assert_eq!(
            key(&|s| s.max_instances = 1025),
            Err("max_instances".into())
        );
        assert_eq!(
            key(&|s| s.policy.max_pending = usize::MAX),
            Err("max_pending".into())
        );
        assert_eq!(key(&|s| s.oci.cpus = Some(f64::NAN)), Err("cpus".into()));
        assert_eq!(key(&|s| s.oci.memory_bytes = Some(1)), Err("memory".into()));
        assert_eq!(
            key(&|s| {
                s.runtime = RuntimeKind::Oci;
                s.oci.image = Some("/i.tar".into());
                s.oci.container_port = 0;
            }),
            Err("container_port".into())
        );
        assert_eq!(key(&|s| s.command.clear()), Err("command".into()));
        assert_eq!(
            key(&|s| s.command.push("a\0b".into())),
            Err("command".into())
        );
        assert_eq!(
            key(&|s| {
                s.env.insert("A".into(), "x\0y".into());
            }),
            Err("env".into())
        );
        assert_eq!(
            key(&|s| {
                s.env.insert("A=B".into(), "x".into());
            }),
            Err("env".into())
        );
        for bad in ["/a b", "/a\r\nX: y", "nope", "/\u{7f}"] {
            assert_eq!(
                key(&|s| s.readiness_path = Some(bad.into())),
                Err("readiness_path".into()),
                "{bad:?}"
            );
        }
        assert_eq!(
            key(&|s| s.readiness_path = Some("/healthz?x=1".into())),
            Ok(())
        );
        assert_eq!(
            key(&|s| s.runtime = RuntimeKind::Oci),
            Err("image".into()),
            "oci needs an image"
        );
    }

    #[test]
    fn api_fields() {
        assert_eq!(
            api_field("start_timeout"),
            "annotations.com.synwake.start-timeout"
        );
        assert_eq!(api_field("env"), "envVars");
        assert_eq!(api_field("memory"), "limits.memory");
    }

    #[test]
    fn hosts() {
        assert_eq!(
            validate_host("Hello.Example.COM.").unwrap(),
            "hello.example.com"
        );
        assert_eq!(validate_host("*.example.com").unwrap(), "*.example.com");
        assert!(validate_host("*.com").is_err());
        assert!(validate_host("a.*.com").is_err());
        assert!(validate_host("bad_host.com").is_err());
        assert!(validate_host("").is_err());
        assert!(validate_host("-a.com").is_err());
        assert!(validate_host("a..com").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("hello-1").is_ok());
        assert!(validate_name("Hello").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("").is_err());
    }
}
