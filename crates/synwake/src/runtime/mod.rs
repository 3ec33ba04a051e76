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
    /// Called on deploy/update (`restore`: at daemon start, from the config or saved
    /// state) instead of `prepare`: may fetch again what can have changed (a moved tag).
    async fn deploy(&self, spec: &FunctionSpec, restore: bool) -> Result<(), StartError> {
        let _ = restore;
        self.prepare(spec).await
    }
    /// Fetches what a deploy of `spec` needs (a registry pull) before the deploy, outside
    /// the API's write lock; the `deploy` that follows uses it.
    async fn fetch(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        let _ = spec;
        Ok(())
    }
    /// Drops what `fetch` kept for function `name` when its deploy did not use it.
    fn unstage(&self, name: &str) {
        let _ = name;
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

/// Step of the readiness probe around the expected ready time.
const FINE_STEP: Duration = Duration::from_micros(200);
/// How far either side of the expected ready time the fine steps go, at least: starts
/// vary by a few ms here (the cgroup join alone took 1-16 ms under load), so the window
/// is 1/8 of the expected time when that is more.
const FINE_WINDOW: Duration = Duration::from_millis(2);

/// Polls the instance until it accepts a TCP connection (or answers `readiness_path`, else
/// the instance's own [`Instance::readiness_path`], with 2xx). While connects are refused
/// it probes every 200 us for the first 2 ms and within 2 ms or 1/8 of `expected` (how
/// long the function's last start took from spawn to ready), elsewhere every 1 ms for the first 500 ms, then backs off by 1.25x to at most 20 ms.
/// A refused loopback connect costs ~20 us. tokio's timers round up to whole
/// milliseconds (a 1 ms sleep took 2 ms), so the fine steps sleep on a timerfd.
pub async fn wait_ready(
    spec: &FunctionSpec,
    instance: &dyn Instance,
    output: &OutputSink,
    deadline: Instant,
    expected: Option<Duration>,
) -> Result<(), StartError> {
    let addr = instance.addr();
    let readiness_path = spec.readiness_path.as_deref().or(instance.readiness_path());
    let started = Instant::now();
    let probe = async {
        let mut interval = Duration::from_millis(1);
        let mut fine: Option<FineTimer> = None;
        let mut probes = 0u32;
        let mut last_refused: Option<Instant> = None;
        loop {
            let at = Instant::now();
            probes += 1;
            let state = probe_once(addr, readiness_path).await;
            if state == Probe::Ready {
                tracing::debug!(
                    "{} at {addr}: ready on probe {probes} after {:.2} ms; the last refused probe was {:.0} us before this one",
                    spec.name,
                    started.elapsed().as_secs_f64() * 1e3,
                    last_refused.map_or(0.0, |r| (at - r).as_secs_f64() * 1e6)
                );
                return;
            }
            let elapsed = started.elapsed();
            if elapsed > Duration::from_millis(500) {
                interval = (interval * 5 / 4).min(Duration::from_millis(20));
            }
            // Fine steps only while nothing listens: an app that answers HTTP is not
            // probed faster than before.
            if state == Probe::Refused {
                last_refused = Some(at);
                if in_fine_window(elapsed, expected) {
                    if fine.is_none() {
                        fine = FineTimer::new().ok();
                    }
                    if let Some(timer) = &fine {
                        if timer.sleep(FINE_STEP).await.is_ok() {
                            continue;
                        }
                    }
                }
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

/// Whether a probe `elapsed` after the spawn is close enough to the expected ready time
/// (or to the spawn: many functions listen within a few ms) for a fine step.
fn in_fine_window(elapsed: Duration, expected: Option<Duration>) -> bool {
    elapsed < FINE_WINDOW
        || expected.is_some_and(|e| {
            let window = FINE_WINDOW.max(e / 8);
            elapsed + window >= e && elapsed <= e.saturating_add(window)
        })
}

/// A one-shot timer with microsecond resolution on the runtime's reactor.
struct FineTimer(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl FineTimer {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create returns a new fd (or -1), owned from here on.
        let fd = unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::os::fd::OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: the AsyncFd owns the timerfd, which stays open as long as it lives.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(FineTimer(fd))
    }

    async fn sleep(&self, d: Duration) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos().max(1) as libc::c_long,
            },
        };
        let raw = self.0.get_ref().as_raw_fd();
        // SAFETY: arms the timerfd this struct owns with a valid itimerspec.
        if unsafe { libc::timerfd_settime(raw, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into a local buffer from the owned timerfd.
            let read = guard.try_io(|fd| {
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), expirations.as_mut_ptr().cast(), 8)
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// What one readiness probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Nothing listens yet.
    Refused,
    /// It accepts connections but did not answer `readiness_path` with 2xx.
    NotReady,
    Ready,
}

async fn probe_once(addr: SocketAddr, path: Option<&str>) -> Probe {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Probe::Refused;
    };
    let Some(path) = path else {
        return Probe::Ready;
    };
    let _ = stream.set_nodelay(true);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: synwake-readiness\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return Probe::NotReady;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Probe::NotReady,
            Ok(Ok(k)) => n += k,
        }
    }
    // "HTTP/1.1 2xx"
    if buf.starts_with(b"HTTP/1.") && buf[9] == b'2' {
        Probe::Ready
    } else {
        Probe::NotReady
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_steps_near_the_spawn_and_the_expected_ready_time_only() {
        let ms = Duration::from_millis;
        assert!(in_fine_window(ms(1), None));
        assert!(!in_fine_window(ms(10), None));
        let expected = Some(ms(16));
        for (at, fine) in [
            (ms(1), true),
            (ms(10), false),
            (ms(14), true),
            (ms(17), true),
        ] {
            assert_eq!(in_fine_window(at, expected), fine, "{at:?}");
        }
        assert!(!in_fine_window(ms(19), expected));
        // Longer starts vary more: 1/8 of the expected time either side.
        let expected = Some(ms(80));
        assert!(!in_fine_window(ms(69), expected));
        assert!(in_fine_window(ms(71), expected) && in_fine_window(ms(89), expected));
        assert!(!in_fine_window(ms(91), expected));
    }

    /// The cause of up to 2 ms of readiness lag: tokio's timers round up to the next whole
    /// millisecond, so a 200 us sleep takes at least 1 ms; the timerfd steps do not.
    #[tokio::test(flavor = "current_thread")]
    async fn fine_steps_are_shorter_than_tokio_timer_ticks() {
        const STEPS: u32 = 20;
        // A machine busy enough to delay 20 wake-ups can hide the difference once: the
        // claim must hold in one of three tries (each is ~25 ms).
        let mut tries = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..STEPS {
                tokio::time::sleep(FINE_STEP).await;
            }
            let tokio_took = t.elapsed();
            let timer = FineTimer::new().unwrap();
            let t = Instant::now();
            for _ in 0..STEPS {
                timer.sleep(FINE_STEP).await.unwrap();
            }
            let fine_took = t.elapsed();
            // Both can only be late, never early.
            assert!(
                tokio_took >= Duration::from_millis(STEPS as u64 - 1),
                "tokio slept {tokio_took:?} for {STEPS} x {FINE_STEP:?}"
            );
            assert!(fine_took >= FINE_STEP * STEPS, "{fine_took:?}");
            if fine_took * 2 < tokio_took {
                return;
            }
            tries.push((fine_took, tokio_took));
        }
        panic!("{STEPS} fine steps vs tokio's timer, 3 tries (fine, tokio): {tries:?}");
    }
}
