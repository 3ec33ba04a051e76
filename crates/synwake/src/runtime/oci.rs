//! The `oci` runtime: functions as runc containers (crates/synwake-oci), each in its own
//! network namespace. With `pool = N`, N containers per function are kept created but not
//! started, so a cold start is only `runc start` plus readiness.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use synwake_oci::{BindMount, Container, ContainerSpec, Image, OciConfig, OciRuntime, Pool};

use super::image_gc::{Deployed, ImageGc};
use super::{image_path, watchdog, ExitInfo, Instance, Runtime, StartError};
use crate::config::Config;
use crate::logs::{LogStore, OutputSink};
use crate::spec::{FunctionSpec, RuntimeKind, Watchdog};
use crate::state::StateDir;

/// Sets up the OCI runtime (and removes what a crashed earlier run left). `Ok(None)` when
/// this process is not root and no configured function needs containers.
pub async fn setup(
    config: &Config,
    state: &StateDir,
    logs: Arc<LogStore>,
) -> anyhow::Result<Option<Arc<dyn Runtime>>> {
    let needed = config
        .functions
        .iter()
        .any(|f| f.runtime == RuntimeKind::Oci);
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if needed {
            anyhow::bail!("the oci runtime needs root (runc, network namespaces, cgroups)");
        }
        return Ok(None);
    }
    let rt = OciRuntime::new(OciConfig {
        runtime_binary: config.oci.runtime_binary.clone(),
        subnet: config.oci.subnet.clone(),
        outbound_nat: config.oci.outbound_nat,
        state_dir: state.oci_dir(),
        image_store: config.oci.image_store.clone(),
        registry: synwake_oci::RegistryConfig {
            insecure_registries: config.oci.insecure_registries.clone(),
            auth_file: config.oci.registry_auth_file.clone(),
            ca_file: config.oci.registry_ca_file.clone(),
            ..synwake_oci::RegistryConfig::default()
        },
        ..OciConfig::default()
    })
    .await
    .with_context(|| format!("setting up the oci runtime ({})", config.oci.runtime_binary))?;
    let watchdog = watchdog::install(&state.oci_dir()).with_context(|| {
        format!(
            "installing the stdio watchdog in {}",
            state.oci_dir().display()
        )
    })?;
    let image_dirs = match &config.oci.image_dirs {
        Some(dirs) => dirs.clone(),
        None => {
            // The default exists from the first start, so there is somewhere to put archives.
            let dir = state.root().join("images");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the image directory {}", dir.display()))?;
            vec![dir]
        }
    };
    let images: Deployed = Arc::new(Mutex::new(HashMap::new()));
    let staged: Deployed = Arc::new(Mutex::new(HashMap::new()));
    Ok(Some(Arc::new(OciFunctions {
        image_dirs,
        watchdog,
        secrets: state.secrets(),
        secrets_dir: state.oci_dir().join("secrets"),
        pool: Pool::new(rt.clone()),
        gc: ImageGc::new(rt.clone(), images.clone(), staged.clone()),
        rt,
        images,
        staged,
        logs,
    })))
}

/// The daemon's view of the OCI runtime: images per function and the container pool.
pub struct OciFunctions {
    rt: OciRuntime,
    /// `[oci] image_dirs`: the only places local archives and rootfs paths are read from.
    image_dirs: Vec<PathBuf>,
    pool: Pool,
    /// Imported image per function name, with what it was imported from; reused while
    /// the source is unchanged (reading and hashing an archive on every scale to zero
    /// would be work done again for nothing).
    images: Deployed,
    /// Pulled by `fetch` (outside the API's write lock) for the deploy that follows.
    staged: Deployed,
    /// Removes from the image store what no function uses.
    gc: Arc<ImageGc>,
    /// Pull progress goes into the function's log (`instance` "pull").
    logs: Arc<LogStore>,
    /// Host path of the stdio watchdog, bind-mounted into `watchdog = "stdio"` containers.
    watchdog: std::path::PathBuf,
    /// Where functions' `secrets` are read from.
    secrets: crate::secrets::SecretStore,
    /// `<oci state>/secrets`: per-function copies, bind-mounted read-only.
    secrets_dir: std::path::PathBuf,
}

/// What getting a function's image may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// The cold path: never a pull.
    Never,
    /// After a scale to zero: pull only what is not there.
    IfMissing,
    /// A deploy or update: a tag is pulled again (it may have moved).
    Deploy,
    /// At daemon start: as `Deploy`, but an unreachable registry falls back on the store.
    Restore,
}

/// Where an image came from: the path and, for an archive, its size and mtime, so a
/// redeploy of a rebuilt archive at the same path imports it again.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct ImageSource {
    path: String,
    stamp: Option<(u64, std::time::SystemTime)>,
}

impl ImageSource {
    fn of(spec: &FunctionSpec) -> Option<Self> {
        let path = spec.oci.image.clone().or_else(|| spec.oci.rootfs.clone())?;
        let stamp = spec
            .oci
            .image
            .as_ref()
            .filter(|p| !synwake_oci::is_registry_reference(p))
            .and_then(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.len(), m.modified().ok()?))
            });
        Some(ImageSource { path, stamp })
    }
}

impl OciFunctions {
    fn err(spec: &FunctionSpec, message: impl std::fmt::Display) -> StartError {
        StartError::Spawn {
            function: spec.name.clone(),
            message: message.to_string(),
        }
    }

    /// The function's image: cached, or imported from its archive, or pulled (never on
    /// the cold path, `Fetch::Never`). A deploy pulls a tag again (it may have moved); a
    /// reference pinned by digest that is in the store is not pulled again.
    async fn image(&self, spec: &FunctionSpec, fetch: Fetch) -> Result<Image, StartError> {
        let source = ImageSource::of(spec);
        let reference = spec
            .oci
            .image
            .as_deref()
            .filter(|r| synwake_oci::is_registry_reference(r));
        let pinned = reference.is_some_and(|r| r.contains("@sha256:"));
        let tag_moves = reference.is_some() && !pinned;
        if !(tag_moves && matches!(fetch, Fetch::Deploy | Fetch::Restore)) {
            if let Some((from, img)) = self.images.lock().unwrap().get(&spec.name) {
                if Some(from) == source.as_ref() {
                    return Ok(img.clone());
                }
            }
        }
        // Until the image is recorded below, a prune must not run.
        let _no_prune = self.gc.lock.read().await;
        // What `fetch` pulled for this deploy, outside the API's write lock.
        let fetched = matches!(fetch, Fetch::Deploy | Fetch::Restore)
            .then(|| self.staged.lock().unwrap().remove(&spec.name))
            .flatten();
        if let Some((from, img)) = fetched.filter(|(from, _)| Some(from) == source.as_ref()) {
            self.images
                .lock()
                .unwrap()
                .insert(spec.name.clone(), (from, img.clone()));
            return Ok(img);
        }
        let img = match (&spec.oci.image, &spec.oci.rootfs) {
            (Some(reference), _) if synwake_oci::is_registry_reference(reference) => {
                let stored = || self.rt.image_store().stored(reference);
                match (pinned.then(stored).flatten(), fetch) {
                    // Content named by digest cannot change: no registry needed.
                    (Some(img), _) => img,
                    (None, Fetch::Never) => {
                        return Err(Self::err(
                            spec,
                            format!("image {reference} is not pulled (pulls happen at deploy)"),
                        ))
                    }
                    (None, _) => match self.pull(spec, reference).await {
                        Ok(img) => img,
                        // After a restart the function keeps the image it had, offline.
                        Err(e) if fetch == Fetch::Restore => match stored() {
                            Some(img) => {
                                tracing::warn!(
                                    "{}: {e}; starting from the stored image {} (offline fallback)",
                                    spec.name,
                                    img.digest.as_deref().unwrap_or("?")
                                );
                                img
                            }
                            None => return Err(e),
                        },
                        Err(e) => return Err(e),
                    },
                }
            }
            (Some(archive), _) => {
                let path = image_path::check(archive, &self.image_dirs, image_path::Kind::Archive)
                    .map_err(|e| Self::err(spec, format!("image {e}")))?;
                self.rt.import_image(&path).await.map_err(|e| {
                    Self::err(spec, format!("image {archive}: {}", crate::error_chain(&e)))
                })?
            }
            (None, Some(dir)) => {
                let path = image_path::check(dir, &self.image_dirs, image_path::Kind::Rootfs)
                    .map_err(|e| Self::err(spec, format!("rootfs {e}")))?;
                self.rt.image_from_rootfs(&path).map_err(|e| {
                    Self::err(spec, format!("rootfs {dir}: {}", crate::error_chain(&e)))
                })?
            }
            (None, None) => return Err(Self::err(spec, "neither image nor rootfs is set")),
        };
        if let Some(source) = source {
            self.images
                .lock()
                .unwrap()
                .insert(spec.name.clone(), (source, img.clone()));
        }
        drop(_no_prune);
        if img.digest.is_some() {
            let gc = self.gc.clone();
            tokio::spawn(async move { gc.refresh_usage().await });
        }
        Ok(img)
    }

    /// Pulls `reference` (progress into the function's log), logging what it resolved to.
    async fn pull(&self, spec: &FunctionSpec, reference: &str) -> Result<Image, StartError> {
        let (logs, name) = (self.logs.clone(), spec.name.clone());
        // The log store also writes each line to synwake's log.
        let progress: synwake_oci::Progress =
            Arc::new(move |line: String| logs.push(&name, "pull", "pull", line));
        let (img, report) = self
            .rt
            .pull_image(reference, progress)
            .await
            .map_err(|e| Self::err(spec, crate::error_chain(&e)))?;
        tracing::info!(
            "{}: image {reference} is {} ({} layers; {} blobs fetched, {} already stored)",
            spec.name,
            report.digest,
            report.layers,
            report.fetched_blobs,
            report.reused_blobs
        );
        Ok(img)
    }

    /// Imports the image (refusing a bad one before the deploy lands) and fills the pool;
    /// containers pooled for an earlier image of the function are removed.
    async fn prepare_with(&self, spec: &FunctionSpec, fetch: Fetch) -> Result<(), StartError> {
        let before = self
            .images
            .lock()
            .unwrap()
            .get(&spec.name)
            .map(|(_, img)| img.clone());
        let image = self.image(spec, fetch).await?;
        if !spec.secrets.is_empty() {
            // Copied at deploy (and after each scale to zero), so containers created for
            // the pool see the values as of then.
            self.secrets
                .materialize(&spec.secrets, &self.secrets_dir.join(&spec.name), 0o444)
                .map_err(|e| Self::err(spec, e.to_string()))?;
        }
        if before.is_some_and(|b| b != image) {
            // An update to another image: containers pooled from the old one must not
            // serve the new version's cold starts.
            self.pool.drain(&spec.name).await;
            self.gc.collect_soon();
        }
        if spec.oci.pool > 0 {
            self.pool
                .refill(self.container_spec(spec, image, 0), spec.oci.pool as usize);
        } else {
            self.pool.drain(&spec.name).await;
        }
        Ok(())
    }

    fn container_spec(&self, spec: &FunctionSpec, image: Image, instance: u64) -> ContainerSpec {
        let mut env = spec.env.clone();
        env.insert("SYNWAKE_FUNCTION".into(), spec.name.clone());
        env.insert("PORT".into(), spec.oci.container_port.to_string());
        let mut command = (!spec.command.is_empty()).then(|| spec.command.clone());
        let mut mounts = Vec::new();
        if spec.watchdog == Watchdog::Stdio {
            // The watchdog serves HTTP on the container port and runs the function's own
            // command (explicit, else the image's) once per request.
            let inner = command.unwrap_or_else(|| {
                image
                    .config
                    .entrypoint
                    .iter()
                    .chain(&image.config.cmd)
                    .cloned()
                    .collect()
            });
            command = Some(watchdog::wrap(
                watchdog::CONTAINER_PATH,
                &format!("0.0.0.0:{}", spec.oci.container_port),
                &inner,
            ));
            mounts.push(BindMount {
                source: self.watchdog.clone(),
                destination: watchdog::CONTAINER_PATH.into(),
            });
        }
        for name in &spec.secrets {
            mounts.push(BindMount {
                source: self.secrets_dir.join(&spec.name).join(name),
                destination: format!("{}/{name}", crate::secrets::CONTAINER_DIR),
            });
        }
        ContainerSpec {
            function: spec.name.clone(),
            instance,
            image,
            command,
            mounts,
            env,
            container_port: spec.oci.container_port,
            memory_bytes: spec.oci.memory_bytes,
            cpus: spec.oci.cpus,
            pids: spec.oci.pids,
        }
    }
}

#[async_trait]
impl Runtime for OciFunctions {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Oci
    }

    /// Pulls a registry image for the deploy of `spec` that follows (the API calls this
    /// before it takes its write lock, so a long pull holds up no other change).
    async fn fetch(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        let Some(reference) = spec
            .oci
            .image
            .as_deref()
            .filter(|r| synwake_oci::is_registry_reference(r))
        else {
            return Ok(());
        };
        if reference.contains("@sha256:") && self.rt.image_store().stored(reference).is_some() {
            return Ok(());
        }
        let Some(source) = ImageSource::of(spec) else {
            return Ok(());
        };
        // Shared until the image is staged: a prune keeps staged images.
        let _no_prune = self.gc.lock.read().await;
        let img = self.pull(spec, reference).await?;
        self.staged
            .lock()
            .unwrap()
            .insert(spec.name.clone(), (source, img));
        drop(_no_prune);
        let gc = self.gc.clone();
        tokio::spawn(async move { gc.refresh_usage().await });
        Ok(())
    }

    fn unstage(&self, name: &str) {
        // Pulled for a deploy that was refused: nothing may use it any more.
        if self.staged.lock().unwrap().remove(name).is_some() {
            self.gc.collect_soon();
        }
    }

    /// After a scale to zero: the image as imported at deploy, the pool refilled.
    async fn prepare(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        self.prepare_with(spec, Fetch::IfMissing).await
    }

    /// A deploy pulls a tag again; a restore may fall back on the stored image.
    async fn deploy(&self, spec: &FunctionSpec, restore: bool) -> Result<(), StartError> {
        let fetch = if restore {
            Fetch::Restore
        } else {
            Fetch::Deploy
        };
        self.prepare_with(spec, fetch).await
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        instance: u64,
        output: OutputSink,
    ) -> Result<Arc<dyn Instance>, StartError> {
        let image = self.image(spec, Fetch::Never).await?;
        let readiness_path = openfaas_readiness(spec, &image);
        let cspec = self.container_spec(spec, image, instance);
        let (container, pooled) = match self.pool.take(&cspec) {
            Some(c) => (c, true),
            None => (
                self.rt
                    .create(&cspec)
                    .await
                    .map_err(|e| Self::err(spec, crate::error_chain(&e)))?,
                false,
            ),
        };
        if spec.oci.pool > 0 {
            // Keep the next cold start (or scale-out) cheap.
            self.pool.refill(cspec, spec.oci.pool as usize);
        }
        container.set_output_hook(Arc::new(move |line: &str| {
            output.line("output", line.to_string())
        }));
        if let Err(e) = self.rt.start(&container).await {
            let _ = self.rt.stop(container, Duration::ZERO).await;
            return Err(Self::err(spec, crate::error_chain(&e)));
        }
        // The lifecycle only forgets an instance that dies on its own (crash, OOM kill):
        // remove its container, netns and address here. No-op after an intended stop.
        let (rt, exited) = (self.rt.clone(), container.clone());
        tokio::spawn(async move {
            exited.wait_exit().await;
            let _ = rt.stop(exited, Duration::ZERO).await;
        });
        let inst = Arc::new(OciInstance {
            rt: self.rt.clone(),
            container,
            pooled,
            readiness_path,
        });
        Ok(inst)
    }

    async fn forget(&self, spec: &FunctionSpec) {
        let _ = std::fs::remove_dir_all(self.secrets_dir.join(&spec.name));
        self.pool.drain(&spec.name).await;
        self.images.lock().unwrap().remove(&spec.name);
        self.gc.collect_soon();
    }

    async fn shutdown(&self) {
        let names: Vec<String> = self.images.lock().unwrap().keys().cloned().collect();
        for n in names {
            self.pool.drain(&n).await;
        }
        self.rt.cleanup_all().await;
    }

    fn images(&self) -> Option<&dyn super::ImageStoreView> {
        Some(&*self.gc)
    }
}

/// OpenFaaS watchdog images (`fwatchdog` as the command, or `fprocess` in the image's
/// env when the function keeps the image's command) listen on their port at once but
/// answer `/_/health` with 200 only once the function behind them is ready.
fn openfaas_readiness(spec: &FunctionSpec, image: &Image) -> Option<&'static str> {
    if spec.watchdog != Watchdog::Http {
        return None;
    }
    let own_command = !spec.command.is_empty();
    let argv0 = if own_command {
        spec.command.first()
    } else {
        image.config.entrypoint.first().or(image.config.cmd.first())
    };
    let fwatchdog = argv0.is_some_and(|a| a.rsplit('/').next() == Some("fwatchdog"));
    let fprocess = !own_command && image.config.env.iter().any(|e| e.starts_with("fprocess="));
    (fwatchdog || fprocess).then_some(OPENFAAS_HEALTH)
}

/// The OpenFaaS watchdogs' readiness endpoint.
pub const OPENFAAS_HEALTH: &str = "/_/health";

/// One container.
pub struct OciInstance {
    rt: OciRuntime,
    container: Container,
    pooled: bool,
    /// `/_/health` for OpenFaaS watchdog images, else none (TCP readiness).
    readiness_path: Option<&'static str>,
}

#[async_trait]
impl Instance for OciInstance {
    fn addr(&self) -> SocketAddr {
        self.container.addr()
    }

    fn describe(&self) -> String {
        format!("container {}", self.container.id())
    }

    async fn wait_exit(&self) -> ExitInfo {
        ExitInfo {
            status: self.container.wait_exit().await.to_string(),
        }
    }

    async fn stop(&self, grace: Duration) {
        if let Err(e) = self.rt.stop(self.container.clone(), grace).await {
            tracing::warn!(
                "stopping container {}: {}",
                self.container.id(),
                crate::error_chain(&e)
            );
        }
    }

    fn pooled(&self) -> bool {
        self.pooled
    }

    fn readiness_path(&self) -> Option<&str> {
        self.readiness_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], env: &[&str]) -> Image {
        Image {
            digest: None,
            rootfs: PathBuf::from("/nonexistent"),
            config: synwake_oci::ImageConfig {
                entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
                env: env.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            layers: Vec::new(),
            blobs: Vec::new(),
        }
    }

    #[test]
    fn openfaas_watchdog_images_get_the_health_endpoint() {
        let mut spec = crate::api::deploy::FunctionDeployment {
            service: Some("f".into()),
            image: Some("/images/f.tar".into()),
            ..Default::default()
        }
        .into_spec(&crate::spec::Policy::default())
        .unwrap();
        assert!(spec.command.is_empty());
        let of = image(&["fwatchdog"], &[]);
        assert_eq!(openfaas_readiness(&spec, &of), Some("/_/health"));
        let classic = image(&["/bin/sh"], &["fprocess=cat"]);
        assert_eq!(openfaas_readiness(&spec, &classic), Some("/_/health"));
        let plain = image(&["/bin/busybox", "httpd"], &["PATH=/bin"]);
        assert_eq!(openfaas_readiness(&spec, &plain), None);
        // The function's own command replaces the image's: fprocess alone says nothing.
        spec.command = vec!["/bin/busybox".into(), "httpd".into()];
        assert_eq!(openfaas_readiness(&spec, &classic), None);
        spec.command = vec!["/usr/bin/fwatchdog".into()];
        assert_eq!(openfaas_readiness(&spec, &plain), Some("/_/health"));
        // Our stdio watchdog is ready on TCP.
        spec.watchdog = Watchdog::Stdio;
        assert_eq!(openfaas_readiness(&spec, &of), None);
    }
}
