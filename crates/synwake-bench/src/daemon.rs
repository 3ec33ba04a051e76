//! The synwake daemon under test: its generated config, its process inside the server
//! namespace, and the management API calls the harness makes (scale to zero, wait cold).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{self, ClientError};
use crate::netns::{self, NetnsError};
use crate::RuntimeKind;

/// Port of the shared gateway listener inside the server namespace.
pub const GATEWAY_PORT: u16 = 8080;
/// Management API address inside the server namespace (loopback, not delayed).
pub const API_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081);
/// Each function gets its own port, `FUNCTION_PORT_BASE + index`.
pub const FUNCTION_PORT_BASE: u16 = 9100;
/// The shared HTTPS port (`--tls`, the `sni` mode).
pub const TLS_GATEWAY_PORT: u16 = 8443;

/// Errors around the daemon process and its API.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not serialise the daemon config")]
    Toml(#[from] toml::ser::Error),
    #[error("could not start {bin}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("synwake exited before it was healthy ({status}); last log lines:\n{log}")]
    Exited { status: String, log: String },
    #[error("synwake not healthy after {secs} s; last log lines:\n{log}")]
    NotHealthy { secs: u64, log: String },
    #[error("API call {what} failed")]
    Api {
        what: String,
        #[source]
        source: ClientError,
    },
    #[error("API call {what} answered {status}: {body}")]
    ApiStatus {
        what: String,
        status: u16,
        body: String,
    },
    #[error("function {name} still not cold after {secs} s (availableReplicas {replicas}, instance processes {procs})")]
    NotCold {
        name: String,
        secs: u64,
        replicas: i64,
        procs: usize,
    },
    #[error("cannot read the daemon's API password {path}")]
    Password {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// How the daemon detects that a cold function is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeSetup {
    /// eBPF probe on the server's veth (`syn` mode).
    pub probe: bool,
    /// Wake when the function's own port accepts a connection (`accept` mode).
    pub wake_on_accept: bool,
    /// `[probe] affinity_window` (`affinity` mode).
    pub affinity: bool,
}

/// The daemon's affinity window in the `affinity` mode. The harness waits this long
/// before a cell, so the function of the previous cell is no longer in the window.
pub const AFFINITY_WINDOW: Duration = Duration::from_secs(3);

/// One function in the generated config.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub port: u16,
    pub init_ms: u64,
    /// More keys of its `[[function]]` table (the trace replay's idle policy per copy).
    pub settings: toml::Table,
}

/// Everything needed to render a daemon config.
#[derive(Debug, Clone)]
pub struct DaemonSetup {
    pub wake: WakeSetup,
    pub runtime: RuntimeKind,
    pub function_bin: PathBuf,
    pub image: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub probe_iface: String,
    pub functions: Vec<FunctionSpec>,
    /// Prefix of the instance marker; instances get `INSTANCE_MARKER_ENV=<prefix>/<name>`.
    pub marker_prefix: String,
    /// `--tls`: certificate chain and key; functions then listen on `tls_port` (the same
    /// number) and claim `<name>.bench.test` on the shared HTTPS port.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Serialize)]
struct ConfigFile {
    gateway: GatewaySection,
    defaults: DefaultsSection,
    probe: ProbeSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    oci: Option<OciSection>,
    function: Vec<FunctionSection>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    certificate: Vec<CertificateSection>,
}

#[derive(Serialize)]
struct CertificateSection {
    cert: String,
    key: String,
}

#[derive(Serialize)]
struct GatewaySection {
    listen: String,
    api_listen: String,
    state_dir: String,
    wake_on_accept: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_listen: Option<String>,
}

#[derive(Serialize)]
struct DefaultsSection {
    idle_timeout: String,
    prewarm_ttl: String,
    stop_grace: String,
    max_wakes_per_second: u32,
}

/// `[oci]`: the image archive's directory is the one the daemon may read images from.
#[derive(Serialize)]
struct OciSection {
    image_dirs: Vec<String>,
}

#[derive(Serialize)]
struct ProbeSection {
    mode: String,
    interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    affinity_window: Option<String>,
}

#[derive(Serialize)]
struct FunctionSection {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<String>,
    runtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<u32>,
    env: BTreeMap<String, String>,
    #[serde(flatten)]
    settings: toml::Table,
}

impl DaemonSetup {
    /// Renders the TOML config. Idle timeout is long so nothing scales down mid-cell; the
    /// harness scales to zero explicitly.
    pub fn render(&self) -> Result<String, DaemonError> {
        let function = self
            .functions
            .iter()
            .map(|f| {
                let env = BTreeMap::from([
                    ("INIT_MS".to_string(), f.init_ms.to_string()),
                    (
                        INSTANCE_MARKER_ENV.to_string(),
                        format!("{}/{}", self.marker_prefix, f.name),
                    ),
                ]);
                let oci = self.runtime != RuntimeKind::Process;
                let tls = self.tls.is_some();
                FunctionSection {
                    name: f.name.clone(),
                    port: (!tls).then_some(f.port),
                    tls_port: tls.then_some(f.port),
                    hosts: if tls {
                        vec![crate::tls::host_of(&f.name)]
                    } else {
                        Vec::new()
                    },
                    runtime: if oci { "oci" } else { "process" }.to_string(),
                    command: (!oci).then(|| vec![self.function_bin.display().to_string()]),
                    image: oci
                        .then(|| self.image.as_ref().map(|p| p.display().to_string()))
                        .flatten(),
                    container_port: oci.then_some(8080),
                    pool: match self.runtime {
                        RuntimeKind::OciPool => Some(1),
                        RuntimeKind::Oci | RuntimeKind::Process => None,
                    },
                    env,
                    settings: f.settings.clone(),
                }
            })
            .collect();
        let cfg = ConfigFile {
            gateway: GatewaySection {
                listen: format!("0.0.0.0:{GATEWAY_PORT}"),
                api_listen: API_ADDR.to_string(),
                state_dir: self.state_dir.display().to_string(),
                wake_on_accept: self.wake.wake_on_accept,
                tls_listen: self
                    .tls
                    .as_ref()
                    .map(|_| format!("0.0.0.0:{TLS_GATEWAY_PORT}")),
            },
            defaults: DefaultsSection {
                idle_timeout: "3600s".into(),
                prewarm_ttl: "10s".into(),
                stop_grace: "2s".into(),
                // One SYN per cold run, back to back: the per-function wake limiter must not
                // be what the benchmark measures.
                max_wakes_per_second: 1000,
            },
            probe: ProbeSection {
                mode: if self.wake.probe { "auto" } else { "off" }.into(),
                interfaces: vec![self.probe_iface.clone()],
                affinity_window: self
                    .wake
                    .affinity
                    .then(|| format!("{}ms", AFFINITY_WINDOW.as_millis())),
            },
            oci: self.image.as_ref().map(|image| {
                let abs = std::fs::canonicalize(image)
                    .unwrap_or_else(|_| std::env::current_dir().unwrap_or_default().join(image));
                OciSection {
                    image_dirs: vec![abs.parent().unwrap_or(Path::new("/")).display().to_string()],
                }
            }),
            function,
            certificate: self
                .tls
                .iter()
                .map(|(cert, key)| CertificateSection {
                    cert: cert.display().to_string(),
                    key: key.display().to_string(),
                })
                .collect(),
        };
        Ok(toml::to_string(&cfg)?)
    }
}

/// A running `synwake up` inside the server namespace. Dropping it stops it (SIGTERM, then
/// SIGKILL to its whole process group).
pub struct Daemon {
    child: Child,
    server_ns: String,
    log_path: PathBuf,
}

impl Daemon {
    /// Writes the config to `config_path`, starts the daemon in the server's netns and waits
    /// until `/healthz` answers 200.
    pub fn start(
        bin: &Path,
        setup: &DaemonSetup,
        config_path: &Path,
        log_path: &Path,
        server_ns: &str,
    ) -> Result<Self, DaemonError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DaemonError::Write { path, source }
        };
        std::fs::create_dir_all(&setup.state_dir).map_err(write_err(&setup.state_dir))?;
        std::fs::write(config_path, setup.render()?).map_err(write_err(config_path))?;
        let log = File::create(log_path).map_err(write_err(log_path))?;
        let log2 = log.try_clone().map_err(write_err(log_path))?;
        // Enter only the network namespace (setns between fork and exec), not the fresh
        // mount namespace `ip netns exec` would make: that one remounts /sys and hides the
        // cgroup mounts runc needs for the oci runtimes.
        let ns_path = Path::new("/run/netns").join(server_ns);
        let ns_file = File::open(&ns_path).map_err(|source| DaemonError::Spawn {
            bin: ns_path.clone(),
            source,
        })?;
        let ns_fd = ns_file.as_raw_fd();
        let mut cmd = Command::new(bin);
        // SAFETY: setns is async-signal-safe; ns_file outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("up")
            .arg("--config")
            .arg(config_path)
            // The daemon reads its filter from SYNWAKE_LOG (RUST_LOG was ignored).
            .env(
                "SYNWAKE_LOG",
                std::env::var("SYNWAKE_BENCH_DAEMON_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: Ctrl-C in the terminal does not race our orderly stop, and
            // the group kill reaches instances the daemon spawned.
            .process_group(0)
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        let mut daemon = Daemon {
            child,
            server_ns: server_ns.to_string(),
            log_path: log_path.to_path_buf(),
        };
        daemon.wait_healthy(Duration::from_secs(20))?;
        Ok(daemon)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<(), DaemonError> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DaemonError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(20),
                });
            }
            let ok = netns::in_netns(&self.server_ns, || {
                client::request(
                    SocketAddr::V4(API_ADDR),
                    "GET",
                    "/healthz",
                    None,
                    Duration::from_secs(1),
                )
            })?
            .is_ok_and(|r| r.status == 200);
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(DaemonError::NotHealthy {
                    secs: limit.as_secs(),
                    log: self.log_tail(20),
                });
            }
            crate::interrupt::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the daemon process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the daemon: SIGTERM, up to 5 s grace, then SIGKILL to the process group.
    pub fn stop(&mut self) {
        let pid = self.child.id() as i32;
        if self.is_running() {
            // SAFETY: signalling the child we spawned.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while self.is_running() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // SAFETY: the group was created by our spawn (pgid == child pid).
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Client for the daemon's management API, called from inside the server namespace.
#[derive(Debug, Clone)]
pub struct Api {
    server_ns: String,
    /// The password file the daemon generated in its state dir (basic auth, user admin).
    password_file: PathBuf,
}

impl Api {
    pub fn new(server_ns: &str, state_dir: &Path) -> Self {
        Api {
            server_ns: server_ns.to_string(),
            password_file: state_dir.join("api-password"),
        }
    }

    /// `Basic ...` for the daemon's generated password, read per call: a restarted daemon
    /// on the same state dir keeps it, a fresh state dir gets a new one.
    fn authorization(&self) -> Result<String, DaemonError> {
        use base64::Engine;
        let password = std::fs::read_to_string(&self.password_file).map_err(|source| {
            DaemonError::Password {
                path: self.password_file.clone(),
                source,
            }
        })?;
        let cred = format!("admin:{}", password.trim());
        Ok(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(cred)
        ))
    }

    fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<String>,
    ) -> Result<(u16, String), DaemonError> {
        let what = format!("{method} {path}");
        let authorization = self.authorization()?;
        let resp = netns::in_netns(&self.server_ns, move || {
            client::request_authorized(
                SocketAddr::V4(API_ADDR),
                method,
                &path,
                body.as_deref().map(str::as_bytes),
                Duration::from_secs(10),
                Some(&authorization),
            )
        })?
        .map_err(|source| DaemonError::Api {
            what: what.clone(),
            source,
        })?;
        Ok((
            resp.status,
            String::from_utf8_lossy(&resp.body).into_owned(),
        ))
    }

    /// `POST /system/scale-function/<name>` with `replicas`.
    pub fn scale(&self, name: &str, replicas: u32) -> Result<(), DaemonError> {
        let body = serde_json::json!({"serviceName": name, "replicas": replicas}).to_string();
        let path = format!("/system/scale-function/{name}");
        let (status, text) = self.call("POST", path.clone(), Some(body))?;
        if !(200..300).contains(&status) {
            return Err(DaemonError::ApiStatus {
                what: format!("POST {path}"),
                status,
                body: text,
            });
        }
        Ok(())
    }

    /// Value of an unlabelled metric from `GET /metrics`; `None` if it is not exported.
    pub fn metric(&self, name: &str) -> Result<Option<f64>, DaemonError> {
        Ok(parse_metric(&self.metrics_text()?, name))
    }

    /// `GET /metrics` as text.
    pub fn metrics_text(&self) -> Result<String, DaemonError> {
        let (status, text) = self.call("GET", "/metrics".to_string(), None)?;
        if status != 200 {
            return Err(DaemonError::ApiStatus {
                what: "GET /metrics".into(),
                status,
                body: text,
            });
        }
        Ok(text)
    }

    /// `availableReplicas` from `GET /system/function/<name>`.
    pub fn available_replicas(&self, name: &str) -> Result<i64, DaemonError> {
        let path = format!("/system/function/{name}");
        let (status, text) = self.call("GET", path.clone(), None)?;
        let parsed: Option<i64> = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("availableReplicas").and_then(|r| r.as_i64()));
        match (status, parsed) {
            (200, Some(n)) => Ok(n),
            _ => Err(DaemonError::ApiStatus {
                what: format!("GET {path}"),
                status,
                body: text,
            }),
        }
    }

    /// Scales `name` to zero and waits until the API reports no replica and no process
    /// carrying `marker` (see [`INSTANCE_MARKER_ENV`]) is left.
    pub fn scale_to_zero_and_wait(
        &self,
        name: &str,
        marker: &str,
        limit: Duration,
    ) -> Result<(), DaemonError> {
        self.scale(name, 0)?;
        let start = Instant::now();
        loop {
            let replicas = self.available_replicas(name)?;
            let procs = instances_running(marker);
            if replicas == 0 && procs == 0 {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(DaemonError::NotCold {
                    name: name.to_string(),
                    secs: limit.as_secs(),
                    replicas,
                    procs,
                });
            }
            crate::interrupt::sleep(Duration::from_millis(3));
        }
    }
}

/// Value of the unlabelled sample `name` in Prometheus text format.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Sum of every sample of `name` whose `function` label is `function` (all other labels
/// summed over), 0 when there is none.
pub fn function_metric(text: &str, name: &str, function: &str) -> f64 {
    let label = format!("function=\"{function}\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?.strip_prefix('{')?;
            let labels = labels.strip_suffix('}')?;
            labels
                .split(',')
                .any(|kv| kv == label)
                .then(|| v.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Environment variable set on every instance so the harness can tell, from /proc, whether
/// an instance of a given function still exists (`<topology prefix>/<function name>`).
pub const INSTANCE_MARKER_ENV: &str = "SYNWAKE_BENCH_FUNCTION";

/// Counts live (non-zombie) processes whose environment holds `INSTANCE_MARKER_ENV=marker`.
pub fn instances_running(marker: &str) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let want = format!("{INSTANCE_MARKER_ENV}={marker}");
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            if !env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
                return false;
            }
            // Fields after the ")" closing the command name start with the state.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(runtime: RuntimeKind, probe: bool) -> DaemonSetup {
        DaemonSetup {
            wake: WakeSetup {
                probe,
                wake_on_accept: !probe,
                affinity: false,
            },
            runtime,
            function_bin: "/bin/fn".into(),
            image: Some("/img/busybox.tar".into()),
            state_dir: "/tmp/st".into(),
            probe_iface: "swb0".into(),
            marker_prefix: "swb-1-0".into(),
            tls: None,
            functions: vec![FunctionSpec {
                name: "init-50".into(),
                port: 9101,
                init_ms: 50,
                settings: toml::Table::new(),
            }],
        }
    }

    #[test]
    fn renders_process_config_in_the_daemon_schema() {
        let text = setup(RuntimeKind::Process, true).render().unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["gateway"]["listen"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(v["gateway"]["api_listen"].as_str(), Some("127.0.0.1:8081"));
        assert_eq!(v["gateway"]["wake_on_accept"].as_bool(), Some(false));
        assert_eq!(v["probe"]["mode"].as_str(), Some("auto"));
        assert_eq!(v["probe"]["interfaces"][0].as_str(), Some("swb0"));
        assert!(
            v["probe"].get("affinity_window").is_none(),
            "affinity off by default"
        );
        let mut st = setup(RuntimeKind::Process, true);
        st.wake.affinity = true;
        let v: toml::Value = toml::from_str(&st.render().unwrap()).unwrap();
        assert_eq!(v["probe"]["affinity_window"].as_str(), Some("3000ms"));
        let f = &v["function"][0];
        assert_eq!(f["name"].as_str(), Some("init-50"));
        assert_eq!(f["port"].as_integer(), Some(9101));
        assert_eq!(f["runtime"].as_str(), Some("process"));
        assert_eq!(f["command"][0].as_str(), Some("/bin/fn"));
        assert_eq!(f["env"]["INIT_MS"].as_str(), Some("50"));
        assert_eq!(
            f["env"][INSTANCE_MARKER_ENV].as_str(),
            Some("swb-1-0/init-50")
        );
        assert!(f.get("image").is_none());
    }

    #[test]
    fn renders_tls_config_with_tls_ports_hosts_and_certificate() {
        let mut st = setup(RuntimeKind::Process, false);
        st.tls = Some(("/pki/c.pem".into(), "/pki/k.pem".into()));
        let text = st.render().unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["gateway"]["tls_listen"].as_str(), Some("0.0.0.0:8443"));
        assert_eq!(v["certificate"][0]["cert"].as_str(), Some("/pki/c.pem"));
        let f = &v["function"][0];
        assert_eq!(f["tls_port"].as_integer(), Some(9101));
        assert!(f.get("port").is_none(), "{text}");
        assert_eq!(f["hosts"][0].as_str(), Some("init-50.bench.test"));
        // The daemon's own parser accepts it (certificate files are read at start only).
        assert!(!setup(RuntimeKind::Process, false)
            .render()
            .unwrap()
            .contains("tls"));
    }

    #[test]
    fn renders_oci_pool_config() {
        let text = setup(RuntimeKind::OciPool, false).render().unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["probe"]["mode"].as_str(), Some("off"));
        let f = &v["function"][0];
        assert_eq!(f["runtime"].as_str(), Some("oci"));
        assert_eq!(f["image"].as_str(), Some("/img/busybox.tar"));
        assert_eq!(f["container_port"].as_integer(), Some(8080));
        assert_eq!(f["pool"].as_integer(), Some(1));
        assert!(f.get("command").is_none());
    }

    #[test]
    fn parses_unlabelled_prometheus_samples() {
        let text = "# HELP synwake_probe_events_total x\n# TYPE synwake_probe_events_total counter\nsynwake_probe_events_total 42\nsynwake_wakes_total{function=\"f\"} 3\n";
        assert_eq!(parse_metric(text, "synwake_probe_events_total"), Some(42.0));
        assert_eq!(parse_metric(text, "synwake_wakes_total"), None);
        assert_eq!(parse_metric(text, "synwake_probe"), None);
    }

    #[test]
    fn sums_one_functions_labelled_samples() {
        let text = "# TYPE x counter\nsynwake_cold_starts_total{function=\"f\",trigger=\"request\"} 2\nsynwake_cold_starts_total{function=\"f\",trigger=\"predicted\"} 3\nsynwake_cold_starts_total{function=\"f2\",trigger=\"request\"} 7\nsynwake_cold_start_wait_seconds_count{function=\"f\"} 4\n";
        assert_eq!(function_metric(text, "synwake_cold_starts_total", "f"), 5.0);
        assert_eq!(
            function_metric(text, "synwake_cold_starts_total", "f2"),
            7.0
        );
        assert_eq!(
            function_metric(text, "synwake_cold_start_wait_seconds_count", "f"),
            4.0
        );
        assert_eq!(
            function_metric(text, "synwake_cold_start_wait_seconds", "f"),
            0.0
        );
        assert_eq!(function_metric(text, "synwake_cold_starts_total", "g"), 0.0);
    }

    #[test]
    fn finds_instances_by_marker() {
        let marker = format!("test-{}", std::process::id());
        assert_eq!(instances_running(&marker), 0);
        let mut child = Command::new("sleep")
            .arg("5")
            .env(INSTANCE_MARKER_ENV, &marker)
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc/<pid>/environ is still the parent's.
        let deadline = Instant::now() + Duration::from_secs(2);
        while instances_running(&marker) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(instances_running(&marker), 1);
        assert_eq!(instances_running(&format!("{marker}x")), 0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(instances_running(&marker), 0);
    }
}
