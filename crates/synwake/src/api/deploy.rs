//! OpenFaaS FunctionDeployment <-> synwake FunctionSpec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lifecycle::FunctionStatus;
use crate::spec::{self, limits, FunctionSpec, OciSpec, Policy, RuntimeKind, Source, Watchdog};

/// The single namespace synwake serves; OpenFaaS clients default to it.
pub const NAMESPACE: &str = "openfaas-fn";

/// OpenFaaS resource limits/requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// The body of POST/PUT /system/functions. Every field may be missing or null.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    pub service: Option<String>,
    pub image: Option<String>,
    pub env_process: Option<String>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub constraints: Option<Vec<String>>,
    pub secrets: Option<Vec<String>>,
    pub limits: Option<Resources>,
    pub requests: Option<Resources>,
    pub read_only_root_filesystem: Option<bool>,
    pub namespace: Option<String>,
    /// Anything else a client sends; accepted and noted in the log.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A request field that is wrong, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid field `{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl FunctionDeployment {
    /// Fields synwake accepts but does not act on (for the one-time log note).
    pub fn unused_fields(&self) -> Vec<String> {
        let mut v: Vec<String> = self.other.keys().cloned().collect();
        if self.constraints.as_ref().is_some_and(|c| !c.is_empty()) {
            v.push("constraints".into());
        }
        if self.requests.is_some() {
            v.push("requests".into());
        }
        if self.read_only_root_filesystem == Some(true) {
            v.push("readOnlyRootFilesystem".into());
        }
        v
    }

    /// Builds a spec; synwake settings come from `com.synwake.*` annotations.
    pub fn into_spec(self, defaults: &Policy) -> Result<FunctionSpec, FieldError> {
        let name = self
            .service
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| field_err("service", "the function name is required"))?;
        spec::validate_name(&name).map_err(|m| field_err("service", m))?;
        if let Some(ns) = &self.namespace {
            if !ns.is_empty() && ns != NAMESPACE {
                return Err(field_err(
                    "namespace",
                    format!("synwake has one namespace, {NAMESPACE:?}; got {ns:?}"),
                ));
            }
        }
        let annotations = self.annotations.clone().unwrap_or_default();
        let ann = |k: &str| {
            annotations
                .get(&format!("com.synwake.{k}"))
                .map(String::as_str)
        };
        let parse_num = |k: &str| -> Result<Option<u64>, FieldError> {
            ann(k)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        field_err(
                            &format!("annotations.com.synwake.{k}"),
                            format!("{v:?} is not a whole number from 0 to {}", u64::MAX),
                        )
                    })
                })
                .transpose()
        };
        // Range-checked before narrowing, so 99999999999 is refused, never truncated.
        let count = |k: &str,
                     default: u64,
                     range: &std::ops::RangeInclusive<u64>|
         -> Result<u64, FieldError> {
            let n = parse_num(k)?.unwrap_or(default);
            spec::check_count(k, n, range)
                .map_err(|e| field_err(&format!("annotations.com.synwake.{k}"), e.message))?;
            Ok(n)
        };
        let parse_dur = |k: &str, d| -> Result<std::time::Duration, FieldError> {
            match ann(k) {
                None => Ok(d),
                Some(v) => spec::duration_str::parse(v)
                    .map_err(|m| field_err(&format!("annotations.com.synwake.{k}"), m)),
            }
        };
        let runtime = match ann("runtime") {
            Some("process") => RuntimeKind::Process,
            Some("oci") => RuntimeKind::Oci,
            Some(other) => {
                return Err(field_err(
                    "annotations.com.synwake.runtime",
                    format!("{other:?} is not a runtime (process or oci)"),
                ))
            }
            None if self
                .env_process
                .as_deref()
                .is_some_and(|s| !s.trim().is_empty()) =>
            {
                RuntimeKind::Process
            }
            None if self.image.is_some() => RuntimeKind::Oci,
            None => RuntimeKind::Process,
        };
        // A container's command: the com.synwake.command annotation, else envProcess.
        let command_line = match (runtime, ann("command")) {
            (RuntimeKind::Oci, Some(c)) => Some(("annotations.com.synwake.command", c)),
            _ => self.env_process.as_deref().map(|p| ("envProcess", p)),
        };
        let command = match command_line {
            Some((field, line)) => split_command(line).map_err(|m| field_err(field, m))?,
            None => Vec::new(),
        };
        if runtime == RuntimeKind::Process && command.is_empty() {
            return Err(field_err(
                "envProcess",
                "the process runtime needs the command line in envProcess",
            ));
        }
        if runtime == RuntimeKind::Oci && self.image.as_deref().unwrap_or("").is_empty() {
            return Err(field_err("image", "the oci runtime needs image: a path to an image archive readable by the gateway host"));
        }
        let port = match ann("port") {
            None => None,
            Some(_) => Some(count("port", 0, &limits::PORT)? as u16),
        };
        let tls_port = match ann("tls-port") {
            None => None,
            Some(_) => Some(count("tls-port", 0, &limits::PORT)? as u16),
        };
        let mut hosts: Vec<String> = Vec::new();
        for h in ann("hosts")
            .unwrap_or("")
            .split(',')
            .filter(|h| !h.trim().is_empty())
        {
            let h = spec::validate_host(h)
                .map_err(|m| field_err("annotations.com.synwake.hosts", m))?;
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        let limits = self.limits.clone().unwrap_or_default();
        let memory_bytes = limits
            .memory
            .as_deref()
            .map(spec::parse_bytes)
            .transpose()
            .map_err(|m| field_err("limits.memory", m))?;
        let cpus = limits
            .cpu
            .as_deref()
            .map(parse_cpu)
            .transpose()
            .map_err(|m| field_err("limits.cpu", m))?;
        let max_instances = count("max-instances", 1, &limits::MAX_INSTANCES)? as u32;
        let watchdog = match ann("watchdog") {
            None => Watchdog::Http,
            Some(w) => Watchdog::parse(w).ok_or_else(|| {
                field_err(
                    "annotations.com.synwake.watchdog",
                    format!("{w:?} is not \"http\" or \"stdio\""),
                )
            })?,
        };
        let policy = Policy {
            idle_timeout: parse_dur("idle-timeout", defaults.idle_timeout)?,
            start_timeout: parse_dur("start-timeout", defaults.start_timeout)?,
            stop_grace: parse_dur("stop-grace", defaults.stop_grace)?,
            prewarm_ttl: parse_dur("prewarm-ttl", defaults.prewarm_ttl)?,
            timeout: parse_dur("timeout", defaults.timeout)?,
            connect_timeout: parse_dur("connect-timeout", defaults.connect_timeout)?,
            protocol: match ann("protocol") {
                None => defaults.protocol,
                Some(p) => p
                    .parse()
                    .map_err(|m| field_err("annotations.com.synwake.protocol", m))?,
            },
            idle_policy: match ann("idle-policy") {
                None => defaults.idle_policy,
                Some(v) => crate::policy::IdlePolicyKind::parse(v.trim())
                    .map_err(|m| field_err("annotations.com.synwake.idle-policy", m))?,
            },
            user: ann("user")
                .map(str::to_string)
                .or_else(|| defaults.user.clone()),
            max_queued: parse_num("max-queued")?,
            ..defaults.clone()
        };
        let spec = FunctionSpec {
            name,
            port,
            runtime,
            command,
            env: self.env_vars.clone().unwrap_or_default(),
            readiness_path: ann("readiness-path").map(str::to_string),
            max_instances,
            max_concurrency: count("max-concurrency", 0, &limits::MAX_CONCURRENCY)? as u32,
            policy,
            oci: OciSpec {
                image: self.image.clone().filter(|_| runtime == RuntimeKind::Oci),
                rootfs: None,
                container_port: count("container-port", 8080, &limits::PORT)? as u16,
                memory_bytes,
                cpus,
                pids: parse_num("pids")?,
                pool: count("pool", 0, &limits::POOL)? as u32,
                memory_text: limits.memory.clone().filter(|_| memory_bytes.is_some()),
                cpu_text: limits.cpu.clone().filter(|_| cpus.is_some()),
            },
            labels: self.labels.clone().unwrap_or_default(),
            annotations,
            source: Source::Api,
            hosts,
            tls_port,
            watchdog,
            secrets: self.secrets.clone().unwrap_or_default(),
        };
        spec.validate()
            .map_err(|e| field_err(&spec::api_field(&e.key), e.message))?;
        Ok(spec)
    }
}

/// "0.5", "500m" -> cores.
fn parse_cpu(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let v = match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a CPU amount like 0.5 or 500m"))?;
    if v <= 0.0 {
        return Err(format!("{s:?} must be more than 0"));
    }
    Ok(v)
}

/// Splits a command line on whitespace, honouring single and double quotes.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {s:?}"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// GET /system/function/<name> and the list: the OpenFaaS FunctionStatus shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatusJson {
    pub name: String,
    pub image: String,
    pub namespace: String,
    pub env_process: String,
    pub env_vars: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Resources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Resources>,
    pub replicas: u64,
    pub available_replicas: u64,
    pub invocation_count: u64,
    /// First deploy (RFC 3339, UTC); an update keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// synwake's idle policy decision: current pre-warm and keep-alive windows and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<crate::lifecycle::IdleView>,
}

impl From<&FunctionStatus> for FunctionStatusJson {
    fn from(s: &FunctionStatus) -> Self {
        let spec = &s.spec;
        let mut annotations = spec.annotations.clone();
        annotations.insert("com.synwake.runtime".into(), spec.runtime.as_str().into());
        if let Some(p) = spec.port {
            annotations.insert("com.synwake.port".into(), p.to_string());
        }
        if let Some(p) = spec.tls_port {
            annotations.insert("com.synwake.tls-port".into(), p.to_string());
        }
        if !spec.hosts.is_empty() {
            annotations.insert("com.synwake.hosts".into(), spec.hosts.join(","));
        }
        annotations.insert("com.synwake.id".into(), format!("{:08x}", spec.id()));
        annotations.insert(
            "com.synwake.source".into(),
            match spec.source {
                Source::Config => "config".into(),
                Source::Api => "api".into(),
            },
        );
        // In the units they were given ("128Mi", "500m"), as faas-cli shows them.
        let limits =
            (spec.oci.memory_bytes.is_some() || spec.oci.cpus.is_some()).then(|| Resources {
                memory: spec
                    .oci
                    .memory_text
                    .clone()
                    .or_else(|| spec.oci.memory_bytes.map(|b| b.to_string())),
                cpu: spec
                    .oci
                    .cpu_text
                    .clone()
                    .or_else(|| spec.oci.cpus.map(|c| c.to_string())),
            });
        FunctionStatusJson {
            name: spec.name.clone(),
            // faas-cli shows `image`: a process function's is its command line.
            image: match spec.runtime {
                RuntimeKind::Process => spec.command.join(" "),
                RuntimeKind::Oci => spec
                    .oci
                    .image
                    .clone()
                    .or_else(|| spec.oci.rootfs.clone())
                    .unwrap_or_default(),
            },
            namespace: NAMESPACE.into(),
            env_process: spec.command.join(" "),
            env_vars: spec.env.clone(),
            labels: spec.labels.clone(),
            annotations,
            limits,
            requests: None,
            replicas: s.replicas as u64,
            available_replicas: s.available as u64,
            invocation_count: s.invocations,
            created_at: Some(humantime::format_rfc3339_seconds(s.created_at).to_string()),
            idle_policy: Some(s.idle.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_honours_quotes() {
        assert_eq!(
            split_command("python3 'my app.py' -x").unwrap(),
            ["python3", "my app.py", "-x"]
        );
        assert_eq!(split_command("  a   \"\" b ").unwrap(), ["a", "", "b"]);
        assert!(split_command("a 'b").is_err());
    }

    #[test]
    fn null_maps_and_unused_fields_accepted() {
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","image":"img","envProcess":"python3 x.py","envVars":null,"labels":null,
                "annotations":null,"constraints":null,"secrets":["s"],"limits":null,"requests":null,
                "readOnlyRootFilesystem":false,"namespace":"","network":"func_functions"}"#,
        )
        .unwrap();
        assert_eq!(d.unused_fields(), ["network"]);
        let s = d.into_spec(&Policy::default()).unwrap();
        assert_eq!(s.runtime, RuntimeKind::Process);
        assert_eq!(s.command, ["python3", "x.py"]);
    }

    #[test]
    fn errors_name_the_field() {
        let d: FunctionDeployment = serde_json::from_str(r#"{"image":"x"}"#).unwrap();
        assert_eq!(
            d.into_spec(&Policy::default()).unwrap_err().field,
            "service"
        );
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","envProcess":"x","annotations":{"com.synwake.port":"http"}}"#,
        )
        .unwrap();
        assert_eq!(
            d.into_spec(&Policy::default()).unwrap_err().field,
            "annotations.com.synwake.port"
        );
        let d: FunctionDeployment =
            serde_json::from_str(r#"{"service":"f","envProcess":"x","limits":{"memory":"lots"}}"#)
                .unwrap();
        assert_eq!(
            d.into_spec(&Policy::default()).unwrap_err().field,
            "limits.memory"
        );
        let d: FunctionDeployment =
            serde_json::from_str(r#"{"service":"f","envProcess":"x","namespace":"other"}"#)
                .unwrap();
        assert_eq!(
            d.into_spec(&Policy::default()).unwrap_err().field,
            "namespace"
        );
    }

    #[test]
    fn out_of_range_numbers_are_refused_not_truncated() {
        let field = |ann: &str, v: &str| {
            let d: FunctionDeployment = serde_json::from_value(serde_json::json!({
                "service": "f", "envProcess": "x", "annotations": { ann: v }
            }))
            .unwrap();
            d.into_spec(&Policy::default()).map(|s| s.max_instances)
        };
        for v in ["99999999999", "4294967296", "0", "99999999999999999999999"] {
            let e = field("com.synwake.max-instances", v).unwrap_err();
            assert_eq!(e.field, "annotations.com.synwake.max-instances", "{v}");
            assert!(!e.message.contains("at least 1") || v == "0", "{v}: {e}");
        }
        assert_eq!(field("com.synwake.max-instances", "3").unwrap(), 3);
        let e = field("com.synwake.start-timeout", "18446744073709551615s").unwrap_err();
        assert_eq!(e.field, "annotations.com.synwake.start-timeout");
        let e = field("com.synwake.pool", "4294967297").unwrap_err();
        assert_eq!(e.field, "annotations.com.synwake.pool");
        let e = field("com.synwake.container-port", "65536").unwrap_err();
        assert_eq!(e.field, "annotations.com.synwake.container-port");
        let e = field("com.synwake.readiness-path", "/r\r\n").unwrap_err();
        assert_eq!(e.field, "annotations.com.synwake.readiness-path");
        let d: FunctionDeployment = serde_json::from_value(serde_json::json!({
            "service": "f", "envProcess": "x", "envVars": { "A": "x\u{0}" }
        }))
        .unwrap();
        assert_eq!(
            d.into_spec(&Policy::default()).unwrap_err().field,
            "envVars"
        );
    }

    #[test]
    fn oci_from_image_with_limits() {
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","image":"/x.tar","limits":{"memory":"64Mi","cpu":"500m"},
               "annotations":{"com.synwake.pool":"1"}}"#,
        )
        .unwrap();
        let s = d.into_spec(&Policy::default()).unwrap();
        assert_eq!(s.runtime, RuntimeKind::Oci);
        assert_eq!(s.oci.memory_bytes, Some(64 << 20));
        assert_eq!(s.oci.cpus, Some(0.5));
        assert_eq!(s.oci.pool, 1);
        assert!(s.command.is_empty(), "the image's own command");
    }

    #[test]
    fn oci_command_from_annotation_or_env_process() {
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","image":"/x.tar","annotations":{"com.synwake.runtime":"oci",
               "com.synwake.command":"/bin/httpd -f -p 8080"},"envProcess":"ignored"}"#,
        )
        .unwrap();
        let s = d.into_spec(&Policy::default()).unwrap();
        assert_eq!(s.command, ["/bin/httpd", "-f", "-p", "8080"]);
        let d: FunctionDeployment = serde_json::from_str(
            r#"{"service":"f","image":"/x.tar","annotations":{"com.synwake.runtime":"oci"},
               "envProcess":"/bin/httpd -f"}"#,
        )
        .unwrap();
        let s = d.into_spec(&Policy::default()).unwrap();
        assert_eq!(s.command, ["/bin/httpd", "-f"]);
    }

    #[test]
    fn idle_policy_annotation() {
        let spec = |v: &str| {
            let d: FunctionDeployment = serde_json::from_value(serde_json::json!({
                "service": "f", "envProcess": "x",
                "annotations": { "com.synwake.idle-policy": v }
            }))
            .unwrap();
            d.into_spec(&Policy::default())
        };
        assert_eq!(
            spec("adaptive").unwrap().policy.idle_policy,
            crate::policy::IdlePolicyKind::Adaptive
        );
        assert_eq!(
            spec("fixed").unwrap().policy.idle_policy,
            crate::policy::IdlePolicyKind::Fixed
        );
        let e = spec("sometimes").unwrap_err();
        assert_eq!(e.field, "annotations.com.synwake.idle-policy");
        assert!(!e.message.contains("sometimes"), "the value is not echoed");
    }
}
