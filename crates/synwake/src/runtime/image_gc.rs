//! Garbage collection of the oci runtime's image store: images, layer chains and blobs no
//! deployed function and no container uses.
//!
//! The bound: a collection runs right after every remove and every update that changes a
//! function's image. What is still mounted by a container (the old version's instances
//! during their stop grace) is kept and collected by a retry every [`RETRY`] seconds, so
//! it is gone at most [`RETRY`] after its last container stopped (retries give up after
//! [`MAX_ROUNDS`]; `synwake images prune` collects at any time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use synwake_oci::{Image, OciRuntime, PruneReport, StoreUsage};

use super::oci::ImageSource;
use super::ImageStoreView;

/// How long after a collection that had to keep a still-mounted image it runs again.
pub const RETRY: Duration = Duration::from_secs(10);
/// Retries after one remove/update (an hour at [`RETRY`]).
pub const MAX_ROUNDS: u32 = 360;

/// Deployed image per function, with what it was made from.
pub(super) type Deployed = Arc<Mutex<HashMap<String, (ImageSource, Image)>>>;

/// The collector, shared by the runtime (which triggers it) and the API.
pub struct ImageGc {
    rt: OciRuntime,
    deployed: Deployed,
    /// Pulled for a deploy that has not landed yet (kept like deployed ones).
    staged: Deployed,
    /// Shared by an import or pull until its image is recorded in `deployed`; exclusive
    /// for a prune, so a prune never removes an image between its pull and its deploy.
    pub(super) lock: tokio::sync::RwLock<()>,
    usage: Mutex<StoreUsage>,
}

impl ImageGc {
    pub(super) fn new(rt: OciRuntime, deployed: Deployed, staged: Deployed) -> Arc<Self> {
        let usage = rt.image_store().usage();
        Arc::new(ImageGc {
            rt,
            deployed,
            staged,
            lock: tokio::sync::RwLock::new(()),
            usage: Mutex::new(usage),
        })
    }

    /// Re-measures the store's disk use (after an import or pull).
    pub(super) async fn refresh_usage(&self) {
        // Not while a prune runs, so the last measurement is always the newest state.
        let _shared = self.lock.read().await;
        let store = self.rt.image_store().clone();
        if let Ok(u) = tokio::task::spawn_blocking(move || store.usage()).await {
            *self.usage.lock().unwrap() = u;
        }
    }

    /// One collection. Also says whether an image was kept only because a container
    /// still mounts it (then another collection is worth running later).
    async fn collect(&self) -> Result<(PruneReport, bool), String> {
        let _exclusive = self.lock.write().await;
        let mut keep: Vec<Image> = self
            .deployed
            .lock()
            .unwrap()
            .values()
            .map(|(_, img)| img.clone())
            .collect();
        keep.extend(
            self.staged
                .lock()
                .unwrap()
                .values()
                .map(|(_, img)| img.clone()),
        );
        let mounted = self.rt.images_in_use();
        let waiting = mounted
            .iter()
            .any(|m| m.digest.is_some() && !keep.contains(m));
        keep.extend(mounted);
        let store = self.rt.image_store().clone();
        let (report, usage) =
            tokio::task::spawn_blocking(move || (store.prune(&keep), store.usage()))
                .await
                .map_err(|e| format!("image prune task: {e}"))?;
        *self.usage.lock().unwrap() = usage;
        let report = report.map_err(|e| crate::error_chain(&e))?;
        if !report.images.is_empty() || report.layers > 0 || report.blobs > 0 {
            tracing::info!(
                "image store: removed {} images, {} layer chains, {} blobs ({} bytes); {} bytes in use",
                report.images.len(),
                report.layers,
                report.blobs,
                report.freed_bytes,
                usage.bytes
            );
        }
        Ok((report, waiting))
    }

    /// Collects now in the background, and again every [`RETRY`] while an unused image is
    /// still mounted.
    pub(super) fn collect_soon(self: &Arc<Self>) {
        let gc = self.clone();
        tokio::spawn(async move {
            for _ in 0..MAX_ROUNDS {
                match gc.collect().await {
                    Ok((_, false)) => return,
                    Ok((_, true)) => {}
                    Err(e) => {
                        tracing::warn!("image store garbage collection: {e}");
                        return;
                    }
                }
                tokio::time::sleep(RETRY).await;
            }
        });
    }
}

#[async_trait]
impl ImageStoreView for ImageGc {
    fn usage(&self) -> StoreUsage {
        *self.usage.lock().unwrap()
    }

    fn list(&self) -> Vec<(Image, Vec<String>)> {
        let deployed = self.deployed.lock().unwrap();
        self.rt
            .image_store()
            .images()
            .into_iter()
            .map(|img| {
                let mut users: Vec<String> = deployed
                    .iter()
                    .filter(|(_, (_, d))| d.digest == img.digest)
                    .map(|(name, _)| name.clone())
                    .collect();
                users.sort();
                (img, users)
            })
            .collect()
    }

    async fn prune(&self) -> Result<PruneReport, String> {
        self.collect().await.map(|(r, _)| r)
    }
}
