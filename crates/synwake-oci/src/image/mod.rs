//! Image import: oci-archive and docker-archive tars (and pulled images) unpacked into a
//! store of layer chains shared by every image and instance (see the `store` module).
//!
//! Every layer is unpacked into a temporary directory inside the store and renamed into
//! place only when it unpacked and verified; the image record is written last. So a
//! refused archive leaves no layer or image behind and nothing is ever written outside the
//! store directory.

mod archive;
mod layer;
mod registry;
mod store;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use archive::ArchiveIndex;
use layer::Compression;
pub use registry::{
    is_registry_reference, parse_reference, Progress, PullError, PullReport, RegistryConfig,
};
pub use store::{PruneReport, StoreUsage};

/// Why an image could not be imported. Every variant about an archive names the archive
/// and the entry (a path inside the archive, or inside one of its layers) at fault.
// Fields are named for what they hold; the variant docs and messages say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the archive failed (including truncation detected by the tar reader).
    #[error("{archive}: entry {entry:?}: read failed: {source}")]
    Read {
        archive: PathBuf,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The archive ends before the data an entry declares.
    #[error("{archive}: entry {entry:?}: archive is truncated")]
    Truncated { archive: PathBuf, entry: String },
    /// An entry's content is not what it must be (bad gzip/tar, wrong size, bad structure).
    #[error("{archive}: entry {entry:?}: corrupt: {reason}")]
    Corrupt {
        archive: PathBuf,
        entry: String,
        reason: String,
    },
    /// A required entry (manifest, config, blob, layer) is not in the archive.
    #[error("{archive}: entry {entry:?} is missing")]
    Missing { archive: PathBuf, entry: String },
    /// A descriptor carries a media type synwake does not understand.
    #[error("{archive}: entry {entry:?}: unknown media type {media_type:?}")]
    UnknownMediaType {
        archive: PathBuf,
        entry: String,
        media_type: String,
    },
    /// A layer is foreign / non-distributable: its content is not in the image.
    #[error("{archive}: entry {entry:?}: foreign (non-distributable) layer of type {media_type:?} is not supported: its content is not part of the image")]
    ForeignLayer {
        archive: PathBuf,
        entry: String,
        media_type: String,
    },
    /// A blob or layer does not hash to the digest the manifest or config promises.
    #[error("{archive}: entry {entry:?}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        archive: PathBuf,
        entry: String,
        expected: String,
        actual: String,
    },
    /// A JSON document (index, manifest, config) does not parse.
    #[error("{archive}: entry {entry:?}: invalid JSON: {source}")]
    Json {
        archive: PathBuf,
        entry: String,
        #[source]
        source: serde_json::Error,
    },
    /// A path in the archive or in a layer is absolute or contains `..`.
    #[error("{archive}: entry {entry:?}: unsafe path: {reason}")]
    UnsafePath {
        archive: PathBuf,
        entry: String,
        reason: &'static str,
    },
    /// A symbolic link in a layer points outside the root filesystem.
    #[error("{archive}: entry {entry:?}: symlink target {target:?} points outside the rootfs")]
    SymlinkEscape {
        archive: PathBuf,
        entry: String,
        target: String,
    },
    /// A layer contains a character or block device node.
    #[error("{archive}: entry {entry:?}: device nodes are not allowed in layers")]
    DeviceNode { archive: PathBuf, entry: String },
    /// Neither `index.json` (oci-archive) nor `manifest.json` (docker-archive) is present.
    #[error("{archive}: entry \"index.json\" or \"manifest.json\" is missing: not an oci-archive or docker-archive")]
    UnknownFormat { archive: PathBuf },
    /// Writing into the image cache failed.
    #[error("image cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory given as a rootfs is unusable.
    #[error("rootfs {dir}: {reason}")]
    Rootfs { dir: PathBuf, reason: String },
}

/// The parts of an image's config that decide how its process runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint` (empty when unset).
    pub entrypoint: Vec<String>,
    /// `Cmd` (empty when unset).
    pub cmd: Vec<String>,
    /// `Env` as `KEY=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` (`uid`, `uid:gid`, `name` or `name:group`), if set.
    pub user: Option<String>,
}

/// An image ready to run: an unpacked root filesystem plus its config.
///
/// The rootfs is shared by every instance and never written to; each container gets its
/// own overlay on top of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:<hex>` of the manifest (oci-archive) or of the config (docker-archive); `None`
    /// for an image made from a plain directory.
    pub digest: Option<String>,
    /// Absolute, symlink-free path of the root filesystem.
    pub rootfs: PathBuf,
    /// Entrypoint, Cmd, Env, WorkingDir, User.
    pub config: ImageConfig,
    /// Layer chain ids (hex) in the store, bottom first; `rootfs` is the last one's
    /// directory. Empty for a plain directory.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Digests of the stored blobs (manifest, config, layers) the image was pulled as.
    #[serde(default)]
    pub blobs: Vec<String>,
}

/// The on-disk image store: unpacked layer chains shared by all images, image records and
/// pulled blobs (layout in the `store` module docs).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    /// Blob fetches in flight, one lock per digest.
    pulls: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, PullLock>>>,
}

type PullLock = std::sync::Arc<tokio::sync::Mutex<()>>;

const TMP_PREFIX: &str = ".tmp-";

/// A layer to unpack, resolved from either archive format.
struct LayerRef {
    entry: String,
    compression: Compression,
    /// Digest of the blob as stored (oci-archive only).
    blob_digest: Option<String>,
    /// Digest of the uncompressed tar (`rootfs.diff_ids`), when the config lists it.
    diff_id: Option<String>,
}

/// Where an image's documents and layers are read from: an archive's entries, or the
/// pulled blobs in the store (`blobs/sha256/<hex>`).
trait Blobs {
    /// What error messages name as the archive (its path, or the image reference).
    fn path(&self) -> &Path;
    fn contains(&self, entry: &str) -> bool;
    fn reader(&mut self, entry: &str) -> Result<Box<dyn Read>, ImageError>;
    fn read_small(&mut self, entry: &str) -> Result<Vec<u8>, ImageError>;
}

/// What both archive formats resolve to before unpacking.
struct Resolved {
    digest: String,
    config: ImageConfig,
    layers: Vec<LayerRef>,
    /// Digests of the manifest, config and layer blobs (what a pulled image keeps).
    blobs: Vec<String>,
}

impl ImageStore {
    /// A cache rooted at `dir` (created on first import).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ImageStore {
            dir: dir.into(),
            pulls: Default::default(),
        }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes temporary directories a crashed import left behind.
    pub fn remove_partial_imports(&self) {
        self.remove_partial_pulls();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let p = e.path();
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        }
    }

    /// Imports an oci-archive or docker-archive (blocking). A second import of the same
    /// image returns the cached rootfs without unpacking again.
    pub fn import(&self, archive: &Path) -> Result<Image, ImageError> {
        let mut idx = ArchiveIndex::open(archive)?;
        let resolved = if idx.contains("index.json") {
            resolve_oci(&mut idx)?
        } else if idx.contains("manifest.json") {
            resolve_docker(&mut idx)?
        } else {
            return Err(ImageError::UnknownFormat {
                archive: archive.to_path_buf(),
            });
        };
        self.unpack_resolved(&mut idx, &resolved)
    }

    /// Unpacks a resolved image into the layer store unless it is there already: layer
    /// chains already stored are reused, the others are unpacked (each on a hard-link
    /// clone of its parent chain) and renamed into place when complete.
    fn unpack_resolved(
        &self,
        blobs: &mut dyn Blobs,
        resolved: &Resolved,
    ) -> Result<Image, ImageError> {
        let meta = self.image_meta(&resolved.digest);
        if let Some(img) = self.cached(&meta) {
            tracing::debug!(source = %blobs.path().display(), digest = %resolved.digest, "image cache hit");
            return Ok(img);
        }
        let cache_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Cache { path, source }
        };
        for d in [self.layers_dir(), self.dir.join(store::IMAGES_DIR)] {
            fs::create_dir_all(&d).map_err(cache_err(&d))?;
        }
        let mut chain: Vec<String> = Vec::new();
        for l in &resolved.layers {
            let parent = chain.last().map(String::as_str);
            // Keyed up front when the image says what the layer is (verified on unpack).
            let known = l
                .diff_id
                .as_deref()
                .or(l.blob_digest.as_deref())
                .map(|id| store::chain_id(parent, id));
            if let Some(c) = known.as_ref().filter(|c| self.layer_dir(c).is_dir()) {
                chain.push(c.clone());
                continue;
            }
            let tmp = self.tmp_dir("layer");
            let unpacked = self.unpack_layer(blobs, l, parent, &tmp);
            let diff = match unpacked {
                Ok(d) => d,
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e);
                }
            };
            let c = known.unwrap_or_else(|| store::chain_id(parent, &diff));
            let dest = self.layer_dir(&c);
            if let Err(source) = fs::rename(&tmp, &dest) {
                let _ = fs::remove_dir_all(&tmp);
                // A concurrent import of the same chain won the race: use its result.
                if !dest.is_dir() {
                    return Err(ImageError::Cache { path: dest, source });
                }
            }
            chain.push(c);
        }
        if chain.is_empty() {
            // No layers: an empty root filesystem, stored like any chain.
            let c = store::chain_id(None, &format!("sha256:{}", sha256_hex(b"")));
            let dest = self.layer_dir(&c);
            if !dest.is_dir() {
                fs::create_dir(&dest).map_err(cache_err(&dest))?;
            }
            chain.push(c);
        }
        let image = Image {
            digest: Some(resolved.digest.clone()),
            rootfs: self.layer_dir(chain.last().expect("at least one chain")),
            config: resolved.config.clone(),
            layers: chain,
            blobs: resolved.blobs.clone(),
        };
        let json = serde_json::to_vec_pretty(&image).expect("image metadata serializes");
        let tmp = self.tmp_dir("image");
        fs::write(&tmp, json).map_err(cache_err(&tmp))?;
        fs::rename(&tmp, &meta).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            ImageError::Cache {
                path: meta.clone(),
                source,
            }
        })?;
        Ok(image)
    }

    /// Applies one layer onto a clone of `parent` (or an empty tree) at `tmp`; returns the
    /// layer's diff id.
    fn unpack_layer(
        &self,
        blobs: &mut dyn Blobs,
        l: &LayerRef,
        parent: Option<&str>,
        tmp: &Path,
    ) -> Result<String, ImageError> {
        let made = match parent {
            Some(p) => store::clone_tree(&self.layer_dir(p), tmp),
            None => fs::create_dir(tmp),
        };
        made.map_err(|source| ImageError::Cache {
            path: tmp.to_path_buf(),
            source,
        })?;
        let reader = blobs.reader(&l.entry)?;
        layer::unpack(
            tmp,
            reader,
            l.compression,
            l.blob_digest.as_deref(),
            l.diff_id.as_deref(),
            blobs.path(),
            &l.entry,
        )
    }

    /// A fresh temporary path in the store (removed at startup if a crash leaves it).
    fn tmp_dir(&self, what: &str) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!(
            "{TMP_PREFIX}{what}-{}-{nanos}-{seq}",
            std::process::id()
        ))
    }

    fn cached(&self, meta: &Path) -> Option<Image> {
        let bytes = fs::read(meta).ok()?;
        let img: Image = serde_json::from_slice(&bytes).ok()?;
        // Every chain must still be there (a chain is only ever removed by a prune).
        (img.rootfs.is_dir() && !img.layers.is_empty()).then_some(img)
    }

    /// An image from an already unpacked root filesystem; nothing is copied or written.
    /// The config is empty, so the container spec must carry a command.
    pub fn from_rootfs(dir: &Path) -> Result<Image, ImageError> {
        let err = |reason: String| ImageError::Rootfs {
            dir: dir.to_path_buf(),
            reason,
        };
        // runc refuses a rootfs reached through a symlink, so hand it the resolved path.
        let rootfs = fs::canonicalize(dir).map_err(|e| err(e.to_string()))?;
        if !rootfs.is_dir() {
            return Err(err("not a directory".into()));
        }
        Ok(Image {
            digest: None,
            rootfs,
            config: ImageConfig::default(),
            layers: Vec::new(),
            blobs: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Archive formats

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Foreign (Windows base) and non-distributable layers live at URLs outside the image;
/// synwake never fetches them, so they are refused by name rather than as unknown.
fn is_foreign_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.docker.image.rootfs.foreign.")
        || media_type.starts_with("application/vnd.oci.image.layer.nondistributable.")
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootfsDiffs>,
}

#[derive(Deserialize, Default)]
struct ContainerConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootfsDiffs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(
    idx: &dyn Blobs,
    entry: &str,
    bytes: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        archive: idx.path().to_path_buf(),
        entry: entry.to_string(),
        source,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `blobs/<alg>/<hex>` for a digest, refusing anything but a plain sha256 digest.
fn blob_entry(idx: &dyn Blobs, referrer: &str, digest: &str) -> Result<String, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("blobs/sha256/{h}"))
        }
        _ => Err(ImageError::Corrupt {
            archive: idx.path().to_path_buf(),
            entry: referrer.to_string(),
            reason: format!("unsupported digest {digest:?}"),
        }),
    }
}

/// Reads a small blob and checks it against its digest.
fn read_blob(
    idx: &mut dyn Blobs,
    referrer: &str,
    d: &Descriptor,
) -> Result<(String, Vec<u8>), ImageError> {
    let entry = blob_entry(idx, referrer, &d.digest)?;
    let bytes = idx.read_small(&entry)?;
    let actual = format!("sha256:{}", sha256_hex(&bytes));
    if actual != d.digest {
        return Err(ImageError::DigestMismatch {
            archive: idx.path().to_path_buf(),
            entry,
            expected: d.digest.clone(),
            actual,
        });
    }
    if let Some(size) = d.size {
        if size != bytes.len() as u64 {
            return Err(ImageError::Corrupt {
                archive: idx.path().to_path_buf(),
                entry,
                reason: format!("size {} but descriptor says {size}", bytes.len()),
            });
        }
    }
    Ok((entry, bytes))
}

fn parse_config(
    idx: &dyn Blobs,
    entry: &str,
    bytes: &[u8],
) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let cf: ConfigFile = parse_json(idx, entry, bytes)?;
    let c = cf.config.unwrap_or_default();
    let config = ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
    };
    Ok((config, cf.rootfs.map(|r| r.diff_ids).unwrap_or_default()))
}

fn check_diff_ids(
    idx: &dyn Blobs,
    config_entry: &str,
    diff_ids: &[String],
    layers: usize,
) -> Result<(), ImageError> {
    if !diff_ids.is_empty() && diff_ids.len() != layers {
        return Err(ImageError::Corrupt {
            archive: idx.path().to_path_buf(),
            entry: config_entry.to_string(),
            reason: format!("{} diff_ids for {layers} layers", diff_ids.len()),
        });
    }
    Ok(())
}

fn resolve_oci(idx: &mut dyn Blobs) -> Result<Resolved, ImageError> {
    let bytes = idx.read_small("index.json")?;
    let index: Index = parse_json(idx, "index.json", &bytes)?;
    let mut referrer = "index.json".to_string();
    let mut candidates = index.manifests;
    // Follow nested indexes (multi-platform images) down to one manifest.
    for _ in 0..4 {
        let Some(desc) = pick_manifest(candidates) else {
            return Err(ImageError::Missing {
                archive: idx.path().to_path_buf(),
                entry: format!("{referrer}: manifests[0]"),
            });
        };
        match desc.media_type.as_str() {
            MT_OCI_INDEX | MT_DOCKER_LIST => {
                let (entry, bytes) = read_blob(idx, &referrer, &desc)?;
                let nested: Index = parse_json(idx, &entry, &bytes)?;
                candidates = nested.manifests;
                referrer = entry;
            }
            MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => {
                return resolve_oci_manifest(idx, &referrer, &desc)
            }
            other => {
                return Err(ImageError::UnknownMediaType {
                    archive: idx.path().to_path_buf(),
                    entry: referrer,
                    media_type: other.to_string(),
                })
            }
        }
    }
    Err(ImageError::Corrupt {
        archive: idx.path().to_path_buf(),
        entry: referrer,
        reason: "image indexes nested too deeply".into(),
    })
}

fn pick_manifest(mut candidates: Vec<Descriptor>) -> Option<Descriptor> {
    let pos = candidates
        .iter()
        .position(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
        })
        .unwrap_or(0);
    (pos < candidates.len()).then(|| candidates.swap_remove(pos))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn resolve_oci_manifest(
    idx: &mut dyn Blobs,
    referrer: &str,
    desc: &Descriptor,
) -> Result<Resolved, ImageError> {
    let (manifest_entry, bytes) = read_blob(idx, referrer, desc)?;
    let manifest: Manifest = parse_json(idx, &manifest_entry, &bytes)?;
    if let Some(mt) = &manifest.media_type {
        if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
            return Err(ImageError::UnknownMediaType {
                archive: idx.path().to_path_buf(),
                entry: manifest_entry,
                media_type: mt.clone(),
            });
        }
    }
    let Some(config_desc) = &manifest.config else {
        return Err(ImageError::Missing {
            archive: idx.path().to_path_buf(),
            entry: format!("{manifest_entry}: config"),
        });
    };
    if config_desc.media_type != MT_OCI_CONFIG && config_desc.media_type != MT_DOCKER_CONFIG {
        return Err(ImageError::UnknownMediaType {
            archive: idx.path().to_path_buf(),
            entry: blob_entry(idx, &manifest_entry, &config_desc.digest)?,
            media_type: config_desc.media_type.clone(),
        });
    }
    let (config_entry, config_bytes) = read_blob(idx, &manifest_entry, config_desc)?;
    let (config, diff_ids) = parse_config(idx, &config_entry, &config_bytes)?;
    check_diff_ids(idx, &config_entry, &diff_ids, manifest.layers.len())?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let entry = blob_entry(idx, &manifest_entry, &l.digest)?;
        if is_foreign_layer(&l.media_type) {
            return Err(ImageError::ForeignLayer {
                archive: idx.path().to_path_buf(),
                entry,
                media_type: l.media_type.clone(),
            });
        }
        let Some(compression) = layer_compression(&l.media_type) else {
            return Err(ImageError::UnknownMediaType {
                archive: idx.path().to_path_buf(),
                entry,
                media_type: l.media_type.clone(),
            });
        };
        if !idx.contains(&entry) {
            return Err(ImageError::Missing {
                archive: idx.path().to_path_buf(),
                entry,
            });
        }
        layers.push(LayerRef {
            entry,
            compression,
            blob_digest: Some(l.digest.clone()),
            diff_id: diff_ids.get(i).cloned(),
        });
    }
    let mut blobs = vec![desc.digest.clone(), config_desc.digest.clone()];
    blobs.extend(layers.iter().filter_map(|l| l.blob_digest.clone()));
    Ok(Resolved {
        digest: desc.digest.clone(),
        config,
        layers,
        blobs,
    })
}

fn resolve_docker(idx: &mut dyn Blobs) -> Result<Resolved, ImageError> {
    let bytes = idx.read_small("manifest.json")?;
    let entries: Vec<DockerManifestEntry> = parse_json(idx, "manifest.json", &bytes)?;
    let Some(m) = entries.into_iter().next() else {
        return Err(ImageError::Missing {
            archive: idx.path().to_path_buf(),
            entry: "manifest.json: [0]".into(),
        });
    };
    let config_entry =
        archive::normalize_name(&m.config).map_err(|reason| ImageError::UnsafePath {
            archive: idx.path().to_path_buf(),
            entry: m.config.clone(),
            reason,
        })?;
    let config_bytes = idx.read_small(&config_entry)?;
    let (config, diff_ids) = parse_config(idx, &config_entry, &config_bytes)?;
    check_diff_ids(idx, &config_entry, &diff_ids, m.layers.len())?;
    let mut layers = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let entry = archive::normalize_name(l).map_err(|reason| ImageError::UnsafePath {
            archive: idx.path().to_path_buf(),
            entry: l.clone(),
            reason,
        })?;
        let mut head = Vec::with_capacity(4);
        idx.reader(&entry)?
            .take(4)
            .read_to_end(&mut head)
            .map_err(|source| ImageError::Read {
                archive: idx.path().to_path_buf(),
                entry: entry.clone(),
                source,
            })?;
        // docker save writes plain tars, but compressed layers occur in the wild.
        let compression = Compression::sniff(&head);
        layers.push(LayerRef {
            entry,
            compression,
            blob_digest: None,
            diff_id: diff_ids.get(i).cloned(),
        });
    }
    Ok(Resolved {
        digest: format!("sha256:{}", sha256_hex(&config_bytes)),
        config,
        layers,
        // A docker-archive's files are not kept in the store.
        blobs: Vec::new(),
    })
}
