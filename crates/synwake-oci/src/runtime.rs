//! Containers with runc: bundle (overlay rootfs + config.json) in its own netns, `runc
//! create` ahead of time, start, exit watching (pidfd, OOM events), stop and crash cleanup.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::process::Command;
use tokio::sync::watch;

use crate::image::{Image, ImageError, ImageStore};
use crate::net::{self, Lease, NetError, Network};
use crate::spec::{self, SpecError};
use crate::sys::{self, WaitStatus};

/// Receives each line a container writes, once set with [`Container::set_output_hook`].
pub type OutputHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Lines of container output kept in memory per container for [`Container::output_tail`].
pub const OUTPUT_LINES: usize = 200;

/// Parent of every container's memory cgroup (`linux.cgroupsPath` is `/synwake/<id>`).
pub const MEMORY_CGROUP_ROOT: &str = "/sys/fs/cgroup/memory/synwake";

/// Runtime settings (the `[oci]` config section plus where state lives).
#[derive(Debug, Clone)]
pub struct OciConfig {
    /// The OCI runtime to invoke, `runc` (default) or a path to it.
    pub runtime_binary: String,
    /// Instance subnet on bridge `synwake0`; the bridge takes the first address.
    pub subnet: String,
    /// Masquerade instance traffic leaving the host.
    pub outbound_nat: bool,
    /// State directory: `images/` (rootfs cache), `bundles/`, `logs/`, `runc/` (runc's
    /// state root). Everything but `images/` is wiped at startup.
    pub state_dir: PathBuf,
    /// Network namespaces (netns + veth + address) kept ready ahead of any container, so
    /// `create` skips the ~30 ms the kernel takes to make one. 0 disables.
    pub spare_netns: usize,
    /// Image store (unpacked images and pulled blobs); `None`: `<state_dir>/images`.
    pub image_store: Option<PathBuf>,
    /// How registries are reached when an image is pulled.
    pub registry: crate::image::RegistryConfig,
}

impl OciConfig {
    /// Six hex digits derived from the state directory. Every container id and netns of a
    /// runtime starts with `swk-<tag>-`, every veth with `swkv<tag>`: crash cleanup
    /// removes exactly those, so synwakes with different state dirs leave each other alone.
    pub fn name_tag(&self) -> String {
        let abs = std::path::absolute(&self.state_dir).unwrap_or_else(|_| self.state_dir.clone());
        let digest = <sha2::Sha256 as sha2::Digest>::digest(abs.as_os_str().as_encoded_bytes());
        hex::encode(&digest[..3])
    }
}

impl Default for OciConfig {
    fn default() -> Self {
        OciConfig {
            runtime_binary: "runc".into(),
            subnet: "10.72.0.0/16".into(),
            outbound_nat: false,
            state_dir: PathBuf::from("/var/lib/synwake/oci"),
            spare_netns: 2,
            image_store: None,
            registry: crate::image::RegistryConfig::default(),
        }
    }
}

/// Why a runtime operation failed.
// Fields are named for what they hold; the variant docs and messages say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Preparing the state directory failed.
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bridge setup or a container's netns failed.
    #[error("network for {container}: {source}")]
    Network {
        container: String,
        #[source]
        source: NetError,
    },
    /// The runtime spec could not be built (no command, unknown user).
    #[error("container {container}: {source}")]
    Spec {
        container: String,
        #[source]
        source: SpecError,
    },
    /// Preparing the bundle (dirs, overlay mount, config.json) failed.
    #[error("container {container}: bundle {path}: {source}")]
    Bundle {
        container: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime binary could not be run.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A runtime command failed; `output` holds its error and the container's last lines.
    #[error("container {container}: {action} failed: {output}")]
    Runtime {
        container: String,
        action: String,
        output: String,
    },
    /// The container exited before it could be started.
    #[error("container {container} exited before start ({exit}): {output}")]
    Exited {
        container: String,
        exit: ExitInfo,
        output: String,
    },
    /// Importing an image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What to run: one instance of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// Function name (logs, container id, hostname).
    pub function: String,
    /// The daemon's instance number (logs only; ids are made unique by the runtime).
    pub instance: u64,
    /// The image to run.
    pub image: Image,
    /// Overrides the image's Entrypoint + Cmd.
    pub command: Option<Vec<String>>,
    /// Added to (and overriding) the image's Env.
    pub env: BTreeMap<String, String>,
    /// Port the function listens on inside the container.
    pub container_port: u16,
    /// Memory limit (no swap on top); exceeding it kills the container.
    pub memory_bytes: Option<u64>,
    /// CPU quota in cores.
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids: Option<u64>,
    /// Host files or directories bind-mounted read-only (a watchdog binary, secrets).
    pub mounts: Vec<BindMount>,
}

/// A host path mounted read-only (nosuid, nodev) into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code, when it exited on its own.
    pub code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// The cgroup's memory limit was hit and the container was killed for it.
    pub oom_killed: bool,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom_killed {
            write!(f, "killed: out of memory")?;
        } else if let Some(s) = self.signal {
            write!(f, "killed by signal {s}")?;
        } else if let Some(c) = self.code {
            write!(f, "exited with code {c}")?;
        } else {
            write!(f, "exited (status unknown)")?;
        }
        Ok(())
    }
}

/// A created (and maybe started) container. Cheap to clone; all clones are the same
/// container. Hand one clone to [`OciRuntime::stop`] to remove it.
#[derive(Clone)]
pub struct Container {
    inner: Arc<ContainerInner>,
}

struct ContainerInner {
    id: String,
    function: String,
    instance: u64,
    addr: SocketAddr,
    lease: Lease,
    bundle: PathBuf,
    rootfs: PathBuf,
    pid: i32,
    pidfd: OwnedFd,
    exit: watch::Receiver<Option<ExitInfo>>,
    output: Arc<Mutex<VecDeque<String>>>,
    output_done: watch::Receiver<bool>,
    hook: Arc<Mutex<Option<OutputHook>>>,
    started: AtomicBool,
    /// Set by the first `stop`: resources are released exactly once.
    removed: AtomicBool,
    /// Keeps the image out of a prune while the overlay mounts it; released by `stop`.
    image_use: Mutex<Option<ImageUse>>,
}

/// Images mounted by containers, by rootfs, with a count.
type ImagesInUse = Arc<Mutex<HashMap<PathBuf, (Image, usize)>>>;

/// One container's hold on its image (see [`OciRuntime::images_in_use`]).
struct ImageUse {
    map: ImagesInUse,
    rootfs: PathBuf,
}

impl ImageUse {
    fn new(map: &ImagesInUse, image: &Image) -> Self {
        let mut m = map.lock().expect("images lock");
        m.entry(image.rootfs.clone())
            .or_insert_with(|| (image.clone(), 0))
            .1 += 1;
        ImageUse {
            map: map.clone(),
            rootfs: image.rootfs.clone(),
        }
    }
}

impl Drop for ImageUse {
    fn drop(&mut self) {
        let mut m = self.map.lock().expect("images lock");
        if let Some(e) = m.get_mut(&self.rootfs) {
            e.1 -= 1;
            if e.1 == 0 {
                m.remove(&self.rootfs);
            }
        }
    }
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.inner.id)
            .field("function", &self.inner.function)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl Container {
    /// The runc container id (`swk-<tag>-<function>-<n>`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Name of the container's network namespace (`swk-<tag>-n<hex>`, under `/run/netns`).
    pub fn netns(&self) -> &str {
        &self.inner.lease.netns
    }

    /// The function this container runs.
    pub fn function(&self) -> &str {
        &self.inner.function
    }

    /// The instance number from the spec.
    pub fn instance(&self) -> u64 {
        self.inner.instance
    }

    /// Where the function listens: instance address and container port, reachable from
    /// the host.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Host pid of the container's init (runc init until started, then the function's
    /// process). Only meaningful until [`Container::exited`] is set.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// The container's memory cgroup (cgroup v1), e.g. for usage metrics.
    pub fn memory_cgroup(&self) -> PathBuf {
        PathBuf::from(MEMORY_CGROUP_ROOT).join(&self.inner.id)
    }

    /// Whether [`OciRuntime::start`] ran for it.
    pub fn is_started(&self) -> bool {
        self.inner.started.load(Ordering::Acquire)
    }

    /// The exit, if the container's process has already ended.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.inner.exit.borrow()
    }

    /// Resolves when the container's process has ended. Cancel-safe; any number of
    /// callers may wait at once and all get the same answer.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.inner.exit.clone();
        let r = rx.wait_for(|e| e.is_some()).await;
        match r {
            Ok(v) => v.expect("waited for Some"),
            // The monitor is gone without a verdict: only if the runtime is shutting down.
            Err(_) => self.exited().unwrap_or_default(),
        }
    }

    /// Sends every line the container writes from now on to `hook` too (the daemon's
    /// per-function log buffer). Set it when the container is taken for an instance.
    pub fn set_output_hook(&self, hook: OutputHook) {
        *self.inner.hook.lock().expect("hook lock") = Some(hook);
    }

    /// The last `n` lines the container wrote to stdout/stderr (oldest first).
    pub fn output_tail(&self, n: usize) -> Vec<String> {
        let out = self.inner.output.lock().expect("output lock");
        out.iter()
            .skip(out.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Waits (bounded) until all output of an exited container has been read.
    async fn output_settled(&self, timeout: Duration) {
        let mut rx = self.inner.output_done.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|d| *d)).await;
    }
}

/// The OCI runtime. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct OciRuntime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    cfg: OciConfig,
    runc_root: PathBuf,
    bundles: PathBuf,
    logs: PathBuf,
    images: ImageStore,
    net: Arc<Network>,
    /// Start by opening runc's exec fifo ourselves instead of spawning `runc start`.
    fifo_start: bool,
    /// See [`OciConfig::name_tag`].
    tag: String,
    /// `swk-<tag>-`: start of every container id and netns name.
    name_prefix: String,
    live: Mutex<HashMap<String, Container>>,
    seq: AtomicU64,
    in_use: ImagesInUse,
}

/// What a startup cleanup removed (a crashed earlier run's leftovers).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Containers deleted from our runc state root.
    pub containers: usize,
    /// Network namespaces named `swk-*` removed.
    pub netns: usize,
    /// Host veths named `swkv*` removed.
    pub veths: usize,
}

fn sanitize(function: &str) -> String {
    let s: String = function
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() {
        "fn".into()
    } else {
        s
    }
}

impl OciRuntime {
    /// Prepares the state directory, removes whatever a crashed earlier run left
    /// (containers in our runc root, overlay mounts, `swk-*` netns, `swkv*` veths, partial
    /// image imports; nothing else), sets up bridge `synwake0`, and makes this process the
    /// child subreaper so container exits can be reaped with their status.
    pub async fn new(cfg: OciConfig) -> Result<Self, OciError> {
        let runc_root = cfg.state_dir.join("runc");
        let bundles = cfg.state_dir.join("bundles");
        let logs = cfg.state_dir.join("logs");
        let images = ImageStore::new(
            cfg.image_store
                .clone()
                .unwrap_or_else(|| cfg.state_dir.join("images")),
        );
        let tag = cfg.name_tag();
        let recovered = recover(&cfg.runtime_binary, &runc_root, &bundles, &logs, &tag).await;
        images.remove_partial_imports();
        if recovered != Recovered::default() {
            tracing::warn!(
                containers = recovered.containers,
                netns = recovered.netns,
                veths = recovered.veths,
                "removed leftovers of an earlier run"
            );
        }
        for d in [&runc_root, &bundles, &logs, &images.dir().to_path_buf()] {
            std::fs::create_dir_all(d).map_err(|source| OciError::StateDir {
                path: d.clone(),
                source,
            })?;
        }
        sys::set_child_subreaper().map_err(|source| OciError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let net = Network::setup(&cfg.subnet, cfg.outbound_nat, cfg.spare_netns, &tag)
            .await
            .map(Arc::new)
            .map_err(|source| OciError::Network {
                container: net::BRIDGE.into(),
                source,
            })?;
        net.replenish();
        let fifo_start = Path::new(&cfg.runtime_binary)
            .file_name()
            .is_some_and(|n| n == "runc");
        Ok(OciRuntime {
            inner: Arc::new(RuntimeInner {
                cfg,
                runc_root,
                bundles,
                logs,
                images,
                net,
                fifo_start,
                name_prefix: format!("{}{tag}-", net::NETNS_PREFIX),
                tag,
                live: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(1),
                in_use: Default::default(),
            }),
        })
    }

    /// The configuration this runtime runs with.
    pub fn config(&self) -> &OciConfig {
        &self.inner.cfg
    }

    /// `swk-<tag>-`: every container id and network namespace of this runtime starts
    /// with it (see [`OciConfig::name_tag`]).
    pub fn name_prefix(&self) -> &str {
        &self.inner.name_prefix
    }

    /// The bridge address (where instances see the host).
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.inner.net.gateway()
    }

    /// Imports an oci-archive or docker-archive into the rootfs cache (keyed by digest; a
    /// second import of the same image reuses it). Runs on the blocking pool.
    pub async fn import_image(&self, archive: &Path) -> Result<Image, ImageError> {
        let store = self.inner.images.clone();
        let archive = archive.to_path_buf();
        let a2 = archive.clone();
        tokio::task::spawn_blocking(move || store.import(&archive))
            .await
            .unwrap_or_else(|e| {
                Err(ImageError::Read {
                    archive: a2,
                    entry: String::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    /// Pulls a registry reference into the image store (see [`ImageStore::pull`]) with
    /// this runtime's registry settings.
    pub async fn pull_image(
        &self,
        reference: &str,
        progress: crate::image::Progress,
    ) -> Result<(Image, crate::image::PullReport), crate::image::PullError> {
        self.inner
            .images
            .pull(reference, &self.inner.cfg.registry, progress)
            .await
    }

    /// Images some container of this runtime mounts (pooled, running or stopping): a
    /// prune must keep them.
    pub fn images_in_use(&self) -> Vec<Image> {
        let m = self.inner.in_use.lock().expect("images lock");
        m.values().map(|(img, _)| img.clone()).collect()
    }

    /// The image store.
    pub fn image_store(&self) -> &ImageStore {
        &self.inner.images
    }

    /// An image from an unpacked root filesystem directory (used in place, read-only).
    pub fn image_from_rootfs(&self, dir: &Path) -> Result<Image, ImageError> {
        ImageStore::from_rootfs(dir)
    }

    /// Ids of the containers this runtime currently holds.
    pub fn container_ids(&self) -> Vec<String> {
        self.inner
            .live
            .lock()
            .expect("live lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Prepares a container without starting it: netns + veth + address, overlay rootfs,
    /// config.json, `runc create`. The process exists (as runc's init) but the function's
    /// command has not run yet.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<Container, OciError> {
        let rt = &self.inner;
        let seq = rt.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}-{seq}", rt.name_prefix, sanitize(&spec.function));
        let cfg_err = |source| OciError::Spec {
            container: id.clone(),
            source,
        };
        let args = spec::command(
            spec.command.as_deref(),
            &spec.image.config.entrypoint,
            &spec.image.config.cmd,
        )
        .map_err(cfg_err)?;
        let t0 = std::time::Instant::now();
        // Held from before the overlay mount, so a prune never removes a mounted lowerdir.
        let image_use = ImageUse::new(&rt.in_use, &spec.image);
        let lease = rt.net.attach().await.map_err(|source| OciError::Network {
            container: id.clone(),
            source,
        })?;
        let bundle = rt.bundles.join(&id);
        let rootfs = bundle.join("rootfs");
        let t_net = t0.elapsed();
        let prepared = self.prepare_bundle(spec, &id, args, &bundle, &rootfs, &lease);
        let t_bundle = t0.elapsed();
        if let Err(e) = prepared {
            self.discard(&bundle, &rootfs, lease).await;
            return Err(e);
        }
        let created = self
            .runc_create(spec, &id, &bundle, &rootfs, lease.clone())
            .await;
        rt.net.replenish();
        match created {
            Ok(c) => {
                tracing::debug!(
                    container = %id,
                    net_us = t_net.as_micros() as u64,
                    bundle_us = (t_bundle - t_net).as_micros() as u64,
                    runc_create_us = (t0.elapsed() - t_bundle).as_micros() as u64,
                    "created"
                );
                *c.inner.image_use.lock().expect("image use lock") = Some(image_use);
                rt.live.lock().expect("live lock").insert(id, c.clone());
                Ok(c)
            }
            Err(e) => {
                let _ = self.runc(&["delete", "-f", &id]).await;
                self.discard(&bundle, &rootfs, lease).await;
                Err(e)
            }
        }
    }

    fn prepare_bundle(
        &self,
        spec: &ContainerSpec,
        id: &str,
        args: Vec<String>,
        bundle: &Path,
        rootfs: &Path,
        lease: &Lease,
    ) -> Result<(), OciError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            let container = id.to_string();
            move |source| OciError::Bundle {
                container,
                path,
                source,
            }
        };
        let upper = bundle.join("upper");
        let work = bundle.join("work");
        for d in [&upper, &work, &rootfs.to_path_buf()] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        sys::mount_overlay(&spec.image.rootfs, &upper, &work, rootfs).map_err(io_err(rootfs))?;
        let mut env = spec.env.clone();
        env.entry("PORT".into())
            .or_insert_with(|| spec.container_port.to_string());
        let netns_path = lease.netns_path();
        let cgroups_path = format!("/synwake/{id}");
        let doc = spec::build(&spec::SpecInput {
            args,
            env: spec::environment(&spec.image.config.env, &env),
            cwd: spec
                .image
                .config
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".into()),
            user: spec.image.config.user.as_deref(),
            image_rootfs: &spec.image.rootfs,
            rootfs,
            hostname: &sanitize(&spec.function),
            netns_path: &netns_path,
            cgroups_path: &cgroups_path,
            memory_bytes: spec.memory_bytes,
            cpus: spec.cpus,
            pids: spec.pids,
            // Only instances that may reach the outside need a resolver.
            resolv_conf: (self.inner.cfg.outbound_nat && Path::new("/etc/resolv.conf").is_file())
                .then_some(Path::new("/etc/resolv.conf")),
            mounts: &spec.mounts,
        })
        .map_err(|source| OciError::Spec {
            container: id.to_string(),
            source,
        })?;
        let config = bundle.join("config.json");
        std::fs::write(&config, serde_json::to_vec(&doc).expect("spec serializes"))
            .map_err(io_err(&config))?;
        Ok(())
    }

    async fn runc_create(
        &self,
        spec: &ContainerSpec,
        id: &str,
        bundle: &Path,
        rootfs: &Path,
        lease: Lease,
    ) -> Result<Container, OciError> {
        let rt = &self.inner;
        let spawn_err = |source| OciError::Spawn {
            program: rt.cfg.runtime_binary.clone(),
            source,
        };
        // The container inherits runc's stdio: give it a pipe we read line by line, and
        // never wait for EOF on it while runc runs.
        let (read_end, write_end) = sys::pipe().map_err(spawn_err)?;
        let output = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_LINES)));
        let (done_tx, done_rx) = watch::channel(false);
        let hook: Arc<Mutex<Option<OutputHook>>> = Arc::new(Mutex::new(None));
        spawn_output_forwarder(
            read_end,
            rt.logs.join(format!("{id}.log")),
            spec.function.clone(),
            id.to_string(),
            output.clone(),
            hook.clone(),
            done_tx,
        )
        .map_err(spawn_err)?;
        let pid_file = bundle.join("init.pid");
        let status = Command::new(&rt.cfg.runtime_binary)
            .arg("--root")
            .arg(&rt.runc_root)
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end.try_clone().map_err(spawn_err)?))
            .stderr(Stdio::from(write_end))
            .status()
            .await
            .map_err(spawn_err)?;
        let tail = |output: &Arc<Mutex<VecDeque<String>>>| {
            let o = output.lock().expect("output lock");
            o.iter()
                .rev()
                .take(20)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        };
        if !status.success() {
            let mut rx = done_rx.clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|d| *d)).await;
            return Err(OciError::Runtime {
                container: id.to_string(),
                action: "create".into(),
                output: format!("{status}: {}", tail(&output)),
            });
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| OciError::Runtime {
                container: id.to_string(),
                action: "create (pid file)".into(),
                output: tail(&output),
            })?;
        let pidfd = sys::pidfd_open(pid).map_err(|_| OciError::Runtime {
            container: id.to_string(),
            action: "create (init already gone)".into(),
            output: tail(&output),
        })?;
        let monitor_fd = pidfd.try_clone().map_err(spawn_err)?;
        let cgroup = PathBuf::from(MEMORY_CGROUP_ROOT).join(id);
        let oom_fd = if spec.memory_bytes.is_some() {
            sys::oom_eventfd(&cgroup)
                .inspect_err(|e| tracing::warn!(container = id, "no OOM notifications: {e}"))
                .ok()
        } else {
            None
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(monitor(monitor_fd, oom_fd, cgroup, exit_tx, id.to_string()));
        Ok(Container {
            inner: Arc::new(ContainerInner {
                id: id.to_string(),
                function: spec.function.clone(),
                instance: spec.instance,
                addr: SocketAddr::new(lease.ip.into(), spec.container_port),
                lease,
                bundle: bundle.to_path_buf(),
                rootfs: rootfs.to_path_buf(),
                pid,
                pidfd,
                exit: exit_rx,
                output,
                output_done: done_rx,
                hook,
                started: AtomicBool::new(false),
                removed: AtomicBool::new(false),
                image_use: Mutex::new(None),
            }),
        })
    }

    /// Starts a created container: the function's command begins to run. On runc this
    /// opens runc's exec fifo directly (what `runc start` does, without spawning runc);
    /// other runtimes get `<runtime> start`.
    pub async fn start(&self, c: &Container) -> Result<(), OciError> {
        if c.inner.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let result = if self.inner.fifo_start {
            self.start_via_fifo(c).await
        } else {
            self.runc(&["start", c.id()]).await.map(|_| ())
        };
        if let Err(e) = &result {
            tracing::warn!(
                container = c.id(),
                function = c.function(),
                "start failed: {e}"
            );
        }
        result
    }

    async fn start_via_fifo(&self, c: &Container) -> Result<(), OciError> {
        let fifo = self.inner.runc_root.join(c.id()).join("exec.fifo");
        let id = c.id().to_string();
        let opener = {
            let fifo = fifo.clone();
            // Opening for read blocks until runc init opens it for write (it already waits).
            tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::io::Read;
                let mut f = std::fs::File::open(&fifo)?;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                std::fs::remove_file(&fifo)?;
                Ok(buf)
            })
        };
        tokio::pin!(opener);
        let res = tokio::select! {
            r = &mut opener => r,
            exit = c.wait_exit() => {
                // Either the process started and already finished (a short command), or
                // init died before the start. Only the fifo's content tells: unblock the
                // opener (a writer makes its open() return) and look at what it read.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                let read = loop {
                    let _ = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags_nonblock()
                        .open(&fifo);
                    match tokio::time::timeout(Duration::from_millis(10), &mut opener).await {
                        Ok(r) => break Some(r),
                        Err(_) if tokio::time::Instant::now() >= deadline => break None,
                        Err(_) => {}
                    }
                };
                if matches!(&read, Some(Ok(Ok(buf))) if !buf.is_empty()) {
                    return Ok(());
                }
                c.output_settled(Duration::from_millis(500)).await;
                return Err(OciError::Exited {
                    container: id,
                    exit,
                    output: c.output_tail(20).join("\n"),
                });
            }
        };
        match res {
            Ok(Ok(buf)) if !buf.is_empty() => Ok(()),
            Ok(Ok(_)) => Err(OciError::Runtime {
                container: id,
                action: "start".into(),
                output: "container was already started".into(),
            }),
            Ok(Err(e)) => Err(OciError::Runtime {
                container: id,
                action: "start".into(),
                output: format!("exec fifo {}: {e}", fifo.display()),
            }),
            Err(e) => Err(OciError::Runtime {
                container: id,
                action: "start".into(),
                output: e.to_string(),
            }),
        }
    }

    /// Stops and removes a container: SIGTERM, SIGKILL after `grace` (a created but not
    /// started container is killed at once), `runc delete`, overlay unmounted, bundle and
    /// log removed, netns and address released. Everything is released even when an
    /// error is returned (a failed `runc delete`). Stopping a clone of a container that is
    /// already being stopped returns at once.
    pub async fn stop(&self, c: Container, grace: Duration) -> Result<(), OciError> {
        if c.inner.removed.swap(true, Ordering::AcqRel) {
            // Another stop of a clone owns the teardown (the address may be reused after).
            return Ok(());
        }
        let id = c.id().to_string();
        if c.exited().is_none() {
            let polite = c.is_started() && !grace.is_zero();
            if polite {
                let _ = sys::pidfd_send_signal(&c.inner.pidfd, libc::SIGTERM);
            }
            if !polite || tokio::time::timeout(grace, c.wait_exit()).await.is_err() {
                // Init is PID 1 of its pid namespace: SIGKILL from here takes all of it.
                let _ = sys::pidfd_send_signal(&c.inner.pidfd, libc::SIGKILL);
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait_exit())
                .await
                .is_err()
            {
                tracing::warn!(container = %id, "did not exit after SIGKILL");
            }
        }
        let deleted = self.runc(&["delete", "-f", &id]).await.map(|_| ());
        if let Err(e) = &deleted {
            tracing::warn!(container = %id, "runc delete: {e}");
        }
        self.inner.live.lock().expect("live lock").remove(&id);
        let _ = std::fs::remove_file(self.inner.logs.join(format!("{id}.log")));
        self.discard(&c.inner.bundle, &c.inner.rootfs, c.inner.lease.clone())
            .await;
        c.inner.image_use.lock().expect("image use lock").take();
        deleted
    }

    async fn discard(&self, bundle: &Path, rootfs: &Path, lease: Lease) {
        sys::unmount(rootfs);
        let _ = std::fs::remove_dir_all(bundle);
        self.inner.net.release(lease).await;
    }

    /// Stops every container this runtime holds (no grace) and removes any leftovers with
    /// our prefixes. For daemon shutdown.
    pub async fn cleanup_all(&self) {
        let all: Vec<Container> = self
            .inner
            .live
            .lock()
            .expect("live lock")
            .values()
            .cloned()
            .collect();
        let stops = all.into_iter().map(|c| self.stop(c, Duration::ZERO));
        for s in stops {
            let _ = s.await;
        }
        let rt = &self.inner;
        rt.net.drop_spares().await;
        rt.net.release_gateway().await;
        recover(
            &rt.cfg.runtime_binary,
            &rt.runc_root,
            &rt.bundles,
            &rt.logs,
            &rt.tag,
        )
        .await;
    }

    async fn runc(&self, args: &[&str]) -> Result<String, OciError> {
        runc(&self.inner.cfg.runtime_binary, &self.inner.runc_root, args).await
    }
}

trait NonblockOpen {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonblockOpen for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

async fn runc(binary: &str, root: &Path, args: &[&str]) -> Result<String, OciError> {
    let out = Command::new(binary)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| OciError::Spawn {
            program: binary.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(OciError::Runtime {
            container: args.last().copied().unwrap_or_default().to_string(),
            action: args.first().copied().unwrap_or_default().to_string(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Removes a crashed run's containers (everything in our runc root), overlay mounts,
/// bundles, logs, cgroups and `swk*` network devices.
async fn recover(
    binary: &str,
    runc_root: &Path,
    bundles: &Path,
    logs: &Path,
    tag: &str,
) -> Recovered {
    let mut r = Recovered::default();
    if let Ok(rd) = std::fs::read_dir(runc_root) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            // A started or created container: delete -f kills and removes it.
            if let Err(err) = runc(binary, runc_root, &["delete", "-f", &id]).await {
                tracing::warn!(container = %id, "stale container: {err}");
                let _ = std::fs::remove_dir_all(e.path());
            }
            r.containers += 1;
        }
    }
    for m in sys::mounts_under(bundles) {
        sys::unmount(&m);
    }
    let _ = std::fs::remove_dir_all(bundles);
    let _ = std::fs::remove_dir_all(logs);
    // runc delete removes cgroups; kill and clear the ones whose runc state was lost
    // (the `synwake/swk-*` cgroups are only ever ours).
    r.containers += kill_stale_cgroups(tag).await;
    let (netns, veths) = net::remove_stale(tag).await;
    r.netns = netns;
    r.veths = veths;
    r
}

/// SIGKILLs every process in `synwake/swk-*` cgroups and removes those cgroups. Returns
/// how many cgroups still had processes.
async fn kill_stale_cgroups(tag: &str) -> usize {
    let prefix = format!("{}{tag}-", net::NETNS_PREFIX);
    let mut dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for ctrl in rd.flatten() {
            if let Ok(children) = std::fs::read_dir(ctrl.path().join("synwake")) {
                dirs.extend(
                    children
                        .flatten()
                        .filter(|c| c.file_name().to_string_lossy().starts_with(&prefix))
                        .map(|c| c.path()),
                );
            }
        }
    }
    let mut with_procs = std::collections::HashSet::new();
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain kill(2) on a pid listed in our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            with_procs.insert(d.file_name().map(|n| n.to_os_string()));
        }
    }
    for attempt in 0..50 {
        let mut left = 0;
        for d in &dirs {
            if d.exists() && std::fs::remove_dir(d).is_err() {
                left += 1;
            }
        }
        if left == 0 || attempt == 49 {
            break;
        }
        // Killed processes leave their cgroup only once they are fully gone.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    with_procs.len()
}

/// Watches one container: records its exit (reaped through the pidfd) and kills it when
/// its memory cgroup reports an OOM kill, so a function over its limit dies as a whole.
async fn monitor(
    pidfd: OwnedFd,
    oom_fd: Option<OwnedFd>,
    cgroup: PathBuf,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    id: String,
) {
    // SAFETY: the fd stays open and owned by the AsyncFd for its whole lifetime.
    let pid_async = match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(container = %id, "cannot watch exit: {e}");
            return;
        }
    };
    let oom_async = oom_fd.and_then(|fd| {
        // SAFETY: as above.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
    });
    let mut oom = false;
    loop {
        let oom_ready = async {
            match &oom_async {
                Some(a) => a.readable().await.map(|mut g| {
                    g.clear_ready();
                }),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = pid_async.readable() => {
                if let Ok(mut g) = r { g.retain_ready(); }
                break;
            }
            _ = oom_ready => {
                if let Some(a) = &oom_async {
                    let _ = sys::read_eventfd(a.get_ref());
                }
                // The eventfd also fires when the cgroup is removed (container already
                // gone). The kill counter may lag the notification, so do not wait for it.
                if cgroup.join("memory.oom_control").exists() && !oom {
                    oom = true;
                    tracing::warn!(container = %id, "out of memory: killing the container");
                    let _ = sys::pidfd_send_signal(pid_async.get_ref(), libc::SIGKILL);
                }
            }
        }
    }
    oom |= oom_kills(&cgroup) > 0;
    let fd = pid_async.get_ref();
    let mut status = sys::waitid_pidfd(fd).ok().flatten();
    // Not our child (another subreaper above us won the race): ask the pidfd.
    for _ in 0..20 {
        if status.is_some() {
            break;
        }
        status = sys::pidfd_exit_info(fd);
        if status.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let info = ExitInfo {
        code: match status {
            Some(WaitStatus::Exited(c)) => Some(c),
            _ => None,
        },
        signal: match status {
            Some(WaitStatus::Signaled(s)) => Some(s),
            _ => None,
        },
        oom_killed: oom,
    };
    tracing::debug!(container = %id, "exited: {info}");
    let _ = exit_tx.send(Some(info));
}

/// The cgroup's `oom_kill` counter (cgroup v1 `memory.oom_control`).
fn oom_kills(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("memory.oom_control"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Reads container output line by line: into the per-container log file, the tracing log
/// (target `function`) and the in-memory tail.
fn spawn_output_forwarder(
    read_end: OwnedFd,
    log_path: PathBuf,
    function: String,
    id: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    hook: Arc<Mutex<Option<OutputHook>>>,
    done: watch::Sender<bool>,
) -> std::io::Result<()> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .ok();
    tokio::spawn(async move {
        use std::io::Write;
        let mut reader = BufReader::new(rx);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(f) = log.as_mut() {
                let _ = f.write_all(&buf);
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            let h = hook.lock().expect("hook lock").clone();
            match h {
                // The hook logs the line itself, with the daemon's prefix.
                Some(h) => h(&line),
                None => {
                    tracing::info!(target: "function", function = %function, container = %id, "{line}")
                }
            }
            let mut t = tail.lock().expect("output lock");
            if t.len() == OUTPUT_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
        let _ = done.send(true);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe() {
        assert_eq!(sanitize("hello"), "hello");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(""), "fn");
    }

    #[test]
    fn exit_info_describes_cause() {
        let oom = ExitInfo {
            signal: Some(9),
            oom_killed: true,
            ..Default::default()
        };
        assert_eq!(oom.to_string(), "killed: out of memory");
        let code = ExitInfo {
            code: Some(3),
            ..Default::default()
        };
        assert_eq!(code.to_string(), "exited with code 3");
    }
}

/// The daemon drives these from spawned tasks behind `async_trait`: they must be Send.
#[cfg(test)]
mod send_checks {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}

    #[test]
    fn handles_are_send_sync_and_futures_are_send() {
        send_sync::<OciRuntime>();
        send_sync::<Container>();
        send_sync::<crate::Pool>();
        send_sync::<OciError>();
        send_sync::<ImageError>();
        // Never polled: only the types matter.
        let _ = |rt: OciRuntime, c: Container, s: ContainerSpec, p: crate::Pool| {
            send(&rt.create(&s));
            send(&rt.start(&c));
            send(&c.wait_exit());
            send(&rt.import_image(Path::new("x")));
            send(&p.drain("f"));
            send(&rt.cleanup_all());
            send(&rt.stop(c, Duration::ZERO));
        };
    }
}
