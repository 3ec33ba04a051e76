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
}

impl FunctionSpec {
    /// The function id carried in the synwake TCP option: FNV-1a 32-bit of the name.
    pub fn id(&self) -> u32 {
        function_id(&self.name)
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

    #[test]
    fn names() {
        assert!(validate_name("hello-1").is_ok());
        assert!(validate_name("Hello").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("").is_err());
    }
}
