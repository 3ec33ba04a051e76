//! How an instance runs. The lifecycle asks a [`Runtime`] to start an instance and gets an
//! [`Instance`] back; nothing here knows why it was started.

pub mod cgroup;
pub mod image_gc;
pub mod image_path;
pub mod oci;
pub mod process;
pub mod user;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::logs::OutputSink;
use crate::spec::{FunctionSpec, RuntimeKind};

/// Why an instance could not be started; waiting requests get this as 502 (504 for timeout).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("function {function}: cannot start instance: {message}")]
    Spawn { function: String, message: String },
    #[error("function {function}: instance exited before it was ready ({status}){}", fmt_output(.output))]
    ExitedBeforeReady {
        function: String,
        status: String,
        output: Vec<String>,
    },
    #[error("function {function}: instance not ready after {after:?} (start_timeout)")]
    Timeout { function: String, after: Duration },
    #[error("function {function}: runtime {runtime} is not available: {message}")]
    Unavailable {
        function: String,
        runtime: &'static str,
        message: String,
    },
    #[error("function {function} was removed or updated while it was starting")]
    Cancelled { function: String },
    #[error("function {function}: {message}")]
    Invalid { function: String, message: String },
}

fn fmt_output(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output:\n{}", lines.join("\n"))
    }
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// e.g. "exit status 1", "killed by signal 9", "killed: out of memory".
    pub status: String,
}

/// A running (or starting) instance of a function.
#[async_trait]
pub trait Instance: Send + Sync + 'static {
    /// Where the gateway proxies to.
    fn addr(&self) -> SocketAddr;
    /// Short identity for logs and the API ("pid 1234", "container swk-...").
    fn describe(&self) -> String;
    /// Resolves once the instance has exited; any number of callers, cancel-safe.
    async fn wait_exit(&self) -> ExitInfo;
    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone and its resources freed.
    async fn stop(&self, grace: Duration);
    /// The HTTP path readiness probes when the function sets none (`None`: a TCP
    /// connect is enough).
    fn readiness_path(&self) -> Option<&str> {
        None
    }
    /// True when this start was served from pre-created state (an OCI pool).
    fn pooled(&self) -> bool {
        false
    }
}

/// Starts instances of one kind.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Called on deploy/update (and after a scale to zero): validate, import images, fill pools.
    async fn prepare(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        let _ = spec;
        Ok(())
    }
    /// Starts one instance. Returns once it is spawned; readiness is checked by the caller.
    async fn start(
        &self,
        spec: &FunctionSpec,
        instance: u64,
        output: OutputSink,
    ) -> Result<Arc<dyn Instance>, StartError>;
    /// The function is gone (removed or replaced): free pools and caches held for it.
    async fn forget(&self, spec: &FunctionSpec) {
        let _ = spec;
    }
    /// Daemon shutdown: release everything.
    async fn shutdown(&self) {}
    /// The image store this runtime keeps, if any.
    fn images(&self) -> Option<&dyn ImageStoreView> {
        None
    }
}

/// What the API shows of, and does to, a runtime's image store.
#[async_trait]
pub trait ImageStoreView: Send + Sync {
    /// Disk use as of the last import, pull or prune.
    fn usage(&self) -> synwake_oci::StoreUsage;
    /// Stored images, each with the functions whose deployed version uses it.
    fn list(&self) -> Vec<(synwake_oci::Image, Vec<String>)>;
    /// Removes what no deployed function and no container uses.
    async fn prune(&self) -> Result<synwake_oci::PruneReport, String>;
}

/// Polls the instance until it accepts a TCP connection (or answers `readiness_path`, else
/// the instance's own [`Instance::readiness_path`], with 2xx). Probes every 1 ms for the first 500 ms (a refused loopback connect costs ~20 us),
/// then backs off by 1.25x to at most 20 ms.
pub async fn wait_ready(
    spec: &FunctionSpec,
    instance: &dyn Instance,
    output: &OutputSink,
    deadline: Instant,
) -> Result<(), StartError> {
    let addr = instance.addr();
    let readiness_path = spec.readiness_path.as_deref().or(instance.readiness_path());
    let started = Instant::now();
    let probe = async {
        let mut interval = Duration::from_millis(1);
        let mut refused: (u32, Option<Instant>) = (0, None);
        loop {
            let at = Instant::now();
            if probe_once(addr, readiness_path).await {
                tracing::debug!(
                    "{} at {addr}: ready on probe {} after {:.2} ms; the last refused probe was {:.0} us before this one",
                    spec.name,
                    refused.0 + 1,
                    started.elapsed().as_secs_f64() * 1e3,
                    refused.1.map_or(0.0, |r| (at - r).as_secs_f64() * 1e6)
                );
                return;
            }
            refused = (refused.0 + 1, Some(at));
            if started.elapsed() > Duration::from_millis(500) {
                interval = (interval * 5 / 4).min(Duration::from_millis(20));
            }
            tokio::time::sleep(interval).await;
        }
    };
    tokio::select! {
        _ = probe => Ok(()),
        exit = instance.wait_exit() => {
            // Give the output readers a moment to drain the last lines.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(StartError::ExitedBeforeReady {
                function: spec.name.clone(),
                status: exit.status,
                output: output.tail(20),
            })
        }
        _ = tokio::time::sleep_until(deadline) => Err(StartError::Timeout {
            function: spec.name.clone(),
            after: spec.policy.start_timeout,
        }),
    }
}

async fn probe_once(addr: SocketAddr, path: Option<&str>) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let Some(path) = path else {
        return true;
    };
    let _ = stream.set_nodelay(true);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: synwake-readiness\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(k)) => n += k,
        }
    }
    // "HTTP/1.1 2xx"
    buf.starts_with(b"HTTP/1.") && buf[9] == b'2'
}
