//! Client subcommands (`list`, `deploy`, `remove`, `scale`, `invoke`, `logs`): talk to the
//! management API like faas-cli talks to an OpenFaaS gateway.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::api::auth;
use crate::api::deploy::FunctionStatusJson;

/// The API password the client commands use, and where it came from (for the 401 hint).
#[derive(Debug, Default)]
pub struct FoundPassword {
    pub password: Option<String>,
    /// The password file read or tried; `None` when the password was given directly.
    pub file: Option<PathBuf>,
    /// Why the file could not be used.
    pub problem: Option<String>,
}

impl FoundPassword {
    pub fn none() -> Self {
        FoundPassword::default()
    }
}

/// Finds the API password: `--password`/`$SYNWAKE_PASSWORD`; else the password file of
/// `--state-dir`/`$SYNWAKE_STATE_DIR`; else the config's `api_password_file` or its
/// state dir's (`--config`, else ./synwake.toml if present); else
/// /var/lib/synwake/api-password. Only users who may read the file (root) get it.
pub fn find_password(
    given: Option<String>,
    state_dir: Option<&Path>,
    config: Option<&Path>,
) -> FoundPassword {
    if let Some(p) = given {
        return FoundPassword {
            password: Some(p),
            ..Default::default()
        };
    }
    let file = match (state_dir, config) {
        (Some(dir), _) => Ok(dir.join(auth::GENERATED_FILE)),
        (None, Some(c)) => config_password_file(c),
        (None, None) if Path::new(DEFAULT_CONFIG).exists() => {
            config_password_file(Path::new(DEFAULT_CONFIG))
        }
        (None, None) => Ok(Path::new(DEFAULT_STATE_DIR).join(auth::GENERATED_FILE)),
    };
    let file = match file {
        Ok(f) => f,
        Err(problem) => {
            return FoundPassword {
                problem: Some(problem),
                ..Default::default()
            }
        }
    };
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => FoundPassword {
            password: Some(text.trim().to_string()),
            file: Some(file),
            problem: None,
        },
        Ok(_) => FoundPassword {
            problem: Some(format!("{} is empty", file.display())),
            file: Some(file),
            password: None,
        },
        Err(e) => FoundPassword {
            problem: Some(format!("cannot read {}: {e}", file.display())),
            file: Some(file),
            password: None,
        },
    }
}

/// `synwake up`'s default config file, relative to the working directory.
const DEFAULT_CONFIG: &str = "synwake.toml";
/// `gateway.state_dir`'s default.
const DEFAULT_STATE_DIR: &str = "/var/lib/synwake";

fn config_password_file(config: &Path) -> Result<PathBuf, String> {
    let c = crate::config::Config::load(config).map_err(|e| e.to_string())?;
    Ok(auth::password_path(
        c.gateway.api_password_file.as_deref(),
        &c.gateway.state_dir,
    ))
}

/// Where the API is and how to log in.
pub struct ApiClient {
    base: String,
    auth: Option<String>,
    found: FoundPassword,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    /// `base` like http://127.0.0.1:8081; the password is user admin's.
    pub fn new(base: &str, found: FoundPassword) -> Self {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            auth: found.password.as_deref().map(auth::basic_header),
            found,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// What to tell a user whose call got 401.
    fn login_hint(&self) -> String {
        match (&self.found.password, &self.found.file, &self.found.problem) {
            (Some(_), Some(f), _) => format!(
                "the password in {} was refused (is it this daemon's? set --state-dir or --config)",
                f.display()
            ),
            (Some(_), None, _) => "the password given with --password / SYNWAKE_PASSWORD was refused".into(),
            (None, _, Some(p)) => format!(
                "no API password: {p}; run as root, or pass --password / SYNWAKE_PASSWORD, or --state-dir / --config"
            ),
            (None, _, None) => "no API password: pass --password / SYNWAKE_PASSWORD".into(),
        }
    }

    /// One request; returns status, headers and the response body (streamed to `sink` if given).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        mut sink: Option<&mut dyn Write>,
    ) -> anyhow::Result<(StatusCode, http::HeaderMap, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(a) = &self.auth {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("invalid URL {url}"))?;
        let resp = self.client.request(req).await.with_context(|| {
            format!("{method} {url}: is synwake running? (set --gateway or SYNWAKE_URL)")
        })?;
        let (parts, mut body) = resp.into_parts();
        if parts.status == StatusCode::UNAUTHORIZED && path.starts_with("/system/") {
            bail!("{method} {url}: 401 Unauthorized: {}", self.login_hint());
        }
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("reading the response of {method} {url}"))?;
            if let Ok(data) = frame.into_data() {
                match sink.as_deref_mut() {
                    Some(w) if parts.status.is_success() => {
                        w.write_all(&data)?;
                        w.flush()?;
                    }
                    _ => out.extend_from_slice(&data),
                }
            }
        }
        Ok((parts.status, parts.headers, out))
    }

    async fn expect_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Vec<u8>> {
        let (status, _, out) = self.call(method.clone(), path, body, None).await?;
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&out).trim()
            );
        }
        Ok(out)
    }

    pub async fn list(&self) -> anyhow::Result<()> {
        let body = self
            .expect_ok(Method::GET, "/system/functions", None)
            .await?;
        let list: Vec<FunctionStatusJson> =
            serde_json::from_slice(&body).context("parsing the function list")?;
        println!(
            "{:<24} {:>12} {:>9} {:>10} {:<8} {:>6}",
            "NAME", "INVOCATIONS", "REPLICAS", "AVAILABLE", "RUNTIME", "PORT"
        );
        for f in list {
            println!(
                "{:<24} {:>12} {:>9} {:>10} {:<8} {:>6}",
                f.name,
                f.invocation_count,
                f.replicas,
                f.available_replicas,
                f.annotations
                    .get("com.synwake.runtime")
                    .map(String::as_str)
                    .unwrap_or("-"),
                f.annotations
                    .get("com.synwake.port")
                    .map(String::as_str)
                    .unwrap_or("-"),
            );
        }
        Ok(())
    }

    /// `synwake describe NAME`: one function's state and its idle policy's decision.
    pub async fn describe(&self, name: &str) -> anyhow::Result<()> {
        crate::spec::validate_name(name).map_err(|m| anyhow::anyhow!(m))?;
        let body = self
            .expect_ok(Method::GET, &format!("/system/function/{name}"), None)
            .await?;
        let f: FunctionStatusJson =
            serde_json::from_slice(&body).context("parsing the function status")?;
        print!("{}", describe_text(&f));
        Ok(())
    }

    /// Deploys like faas-cli: PUT (update) first, POST (create) when the function is new.
    /// Deploys like faas-cli (PUT, then POST when the function is new), printing the pull's
    /// progress lines as they happen; returns the deploy's answer.
    pub async fn deploy(&self, deployment: &serde_json::Value) -> anyhow::Result<String> {
        let body = serde_json::to_vec(deployment)?;
        let (status, message) = self.deploy_streamed(Method::PUT, body.clone()).await?;
        let (status, message) = if status == StatusCode::NOT_FOUND {
            self.deploy_streamed(Method::POST, body).await?
        } else {
            (status, message)
        };
        if !status.is_success() {
            bail!("deploy: {status}: {message}");
        }
        Ok(message)
    }

    async fn deploy_streamed(
        &self,
        method: Method,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut printer = DeployPrinter::default();
        let (status, _, out) = self
            .call(
                method.clone(),
                "/system/functions?progress=true",
                Some(body),
                Some(&mut printer),
            )
            .await?;
        if !status.is_success() {
            return Ok((status, String::from_utf8_lossy(&out).trim().to_string()));
        }
        match printer.outcome {
            Some((code, message)) => Ok((
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message,
            )),
            None => {
                bail!("{method} /system/functions: the answer ended before the deploy's outcome")
            }
        }
    }

    /// `synwake images list`: one line per stored image, then the store's disk use.
    pub async fn images_list(&self) -> anyhow::Result<()> {
        let body = self.expect_ok(Method::GET, "/system/images", None).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).context("parsing the image list")?;
        println!("{:<71} {:>6}  FUNCTIONS", "DIGEST", "LAYERS");
        for img in v["images"].as_array().into_iter().flatten() {
            let functions: Vec<&str> = img["functions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .collect();
            println!(
                "{:<71} {:>6}  {}",
                img["digest"].as_str().unwrap_or("-"),
                img["layers"],
                if functions.is_empty() {
                    "(unused)".to_string()
                } else {
                    functions.join(",")
                }
            );
        }
        print_usage(&v["usage"]);
        Ok(())
    }

    /// `synwake images prune`: what was removed and what is left.
    pub async fn images_prune(&self) -> anyhow::Result<()> {
        let body = self
            .expect_ok(Method::POST, "/system/images/prune", None)
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).context("parsing the prune report")?;
        let r = &v["removed"];
        println!(
            "removed {} images, {} layer chains, {} blobs: {} bytes freed",
            r["images"].as_array().map_or(0, |a| a.len()),
            r["layers"],
            r["blobs"],
            r["freed_bytes"]
        );
        print_usage(&v["usage"]);
        Ok(())
    }

    pub async fn remove(&self, name: &str) -> anyhow::Result<String> {
        let body = serde_json::to_vec(&serde_json::json!({ "functionName": name }))?;
        let out = self
            .expect_ok(Method::DELETE, "/system/functions", Some(body))
            .await?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    pub async fn scale(&self, name: &str, replicas: u32) -> anyhow::Result<String> {
        let body =
            serde_json::to_vec(&serde_json::json!({ "serviceName": name, "replicas": replicas }))?;
        let out = self
            .expect_ok(
                Method::POST,
                &format!("/system/scale-function/{name}"),
                Some(body),
            )
            .await?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// Calls the function; prints the body to stdout, and timing to stderr when `verbose`.
    pub async fn invoke(
        &self,
        name: &str,
        path: &str,
        data: Option<Vec<u8>>,
        verbose: bool,
    ) -> anyhow::Result<()> {
        let method = if data.is_some() {
            Method::POST
        } else {
            Method::GET
        };
        let path = format!("/function/{name}/{}", path.trim_start_matches('/'));
        let t0 = Instant::now();
        let mut stdout = std::io::stdout();
        let (status, headers, out) = self.call(method, &path, data, Some(&mut stdout)).await?;
        if verbose {
            eprintln!(
                "{status} in {:.1} ms, cold start: {}",
                t0.elapsed().as_secs_f64() * 1e3,
                headers
                    .get(crate::gateway::COLD_START_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
            );
        }
        if !status.is_success() {
            bail!("{name}: {status}: {}", String::from_utf8_lossy(&out).trim());
        }
        Ok(())
    }

    /// Prints log lines as `<timestamp> <instance> <text>`.
    pub async fn logs(&self, name: &str, follow: bool, tail: Option<usize>) -> anyhow::Result<()> {
        let mut q = format!("/system/logs?name={name}&follow={follow}");
        if let Some(t) = tail {
            q.push_str(&format!("&tail={t}"));
        }
        let mut printer = LogPrinter::default();
        let (status, _, out) = self.call(Method::GET, &q, None, Some(&mut printer)).await?;
        if !status.is_success() {
            bail!(
                "logs of {name}: {status}: {}",
                String::from_utf8_lossy(&out).trim()
            );
        }
        Ok(())
    }
}

/// Prints a streamed deploy's progress lines as they come; keeps its outcome.
#[derive(Default)]
struct DeployPrinter {
    partial: Vec<u8>,
    outcome: Option<(u16, String)>,
}

impl Write for DeployPrinter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(p) = v["progress"].as_str() {
                println!("{p}");
            } else if let Some(code) = v["status"].as_u64() {
                let message = v["message"].as_str().unwrap_or("").to_string();
                self.outcome = Some((code as u16, message));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Turns NDJSON log records into readable lines as they stream in.
#[derive(Default)]
struct LogPrinter {
    partial: Vec<u8>,
}

impl Write for LogPrinter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            match serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&line) {
                Ok(m) => {
                    let s = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                    println!("{} {} {}", s("timestamp"), s("instance"), s("text"));
                }
                Err(_) => print!("{}", String::from_utf8_lossy(&line)),
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// The text `synwake describe` prints.
pub fn describe_text(f: &FunctionStatusJson) -> String {
    let ann = |k: &str| f.annotations.get(k).map(String::as_str).unwrap_or("-");
    let mut out = format!(
        "name:         {}\nruntime:      {}\nport:         {}\nreplicas:     {} ({} available)\ninvocations:  {}\n",
        f.name,
        ann("com.synwake.runtime"),
        ann("com.synwake.port"),
        f.replicas,
        f.available_replicas,
        f.invocation_count
    );
    if let Some(p) = &f.idle_policy {
        let secs = |s: f64| {
            humantime::format_duration(std::time::Duration::from_millis((s * 1e3) as u64))
                .to_string()
        };
        out.push_str(&format!(
            "idle policy:  {} ({}, {} idle times)\npre-warm at:  {}\nkeep-alive:   {} after the last request\nwhy:          {}\n",
            p.policy,
            p.basis,
            p.samples,
            if p.prewarm_after_seconds == 0.0 {
                "- (stays up from the last request)".to_string()
            } else {
                format!("{} after the last request", secs(p.prewarm_after_seconds))
            },
            secs(p.keep_alive_seconds),
            p.reason
        ));
    }
    out
}

fn print_usage(u: &serde_json::Value) {
    println!(
        "store: {} bytes, {} images, {} layer chains, {} blobs",
        u["bytes"], u["images"], u["layers"], u["blobs"]
    );
}
