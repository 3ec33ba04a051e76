//! Registry pull with the OCI distribution protocol (oci-client: token and basic auth,
//! manifests, ranged blob reads) into the store's content-addressed blob directory
//! `blobs/sha256/<hex>`. Every blob is hashed before it is renamed into place, so the
//! blob directory only ever holds verified content; a pulled image is then unpacked like
//! an oci-archive, from those blobs.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::ClientProtocol;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{
    host_arch, resolve_oci_manifest, Blobs, Descriptor, Image, ImageError, ImageStore,
    MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
};

/// Manifests (and indexes) larger than this are refused.
const MAX_MANIFEST: usize = 4 << 20;
/// Attempts per blob (the first plus retries that resume where the last one stopped).
const BLOB_ATTEMPTS: u32 = 4;
const PARTIAL_PREFIX: &str = ".partial-";

/// How to reach registries. Read once per pull (an edited auth file takes effect at the
/// next deploy).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `host:port` of registries spoken to over plain HTTP; every other one needs HTTPS.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` with credentials (`auths.<registry>.auth` or
    /// `username`/`password`).
    pub auth_file: Option<PathBuf>,
    /// PEM file with CA certificates trusted in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Blobs fetched at the same time.
    pub concurrent_blobs: usize,
    /// Connect timeout and read (idle) timeout per request.
    pub connect_timeout: Duration,
    /// See `connect_timeout`.
    pub read_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure_registries: Vec::new(),
            auth_file: None,
            ca_file: None,
            concurrent_blobs: 3,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a pull failed. Each variant names the reference; registry failures carry the
/// registry's own reason.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image {reference:?} is not a valid registry reference: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry auth file {path}: {reason}")]
    AuthFile { path: PathBuf, reason: String },
    #[error("registry CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// The registry refused or could not be reached (auth failure, unknown repository or
    /// tag, TLS failure, connection refused, ...).
    #[error("pulling {reference}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("pulling {reference}: no manifest for linux/{wanted} in the image index (it has: {available})")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("pulling {reference}: {what} {expected}: digest mismatch, the registry sent content hashing to {actual}")]
    DigestMismatch {
        reference: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("pulling {reference}: {what}: {reason}")]
    Invalid {
        reference: String,
        what: String,
        reason: String,
    },
    #[error("image store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The reference as given.
    pub reference: String,
    /// `sha256:` of the image manifest (the one for this platform).
    pub digest: String,
    /// Layers in the image.
    pub layers: usize,
    /// Blobs (config and layers) fetched now.
    pub fetched_blobs: usize,
    /// Blobs already in the store (shared with other images, or pulled before).
    pub reused_blobs: usize,
    /// Bytes fetched now.
    pub fetched_bytes: u64,
}

/// Whether `image` names a registry reference rather than a file: paths are absolute or
/// start with `.`.
pub fn is_registry_reference(image: &str) -> bool {
    !(image.starts_with('/') || image.starts_with('.'))
}

/// Checks a registry reference's syntax (`host[:port]/repo[:tag][@sha256:...]`).
pub fn parse_reference(image: &str) -> Result<Reference, PullError> {
    let r: Reference = image
        .parse()
        .map_err(|e: oci_client::ParseError| PullError::Reference {
            reference: image.to_string(),
            reason: e.to_string(),
        })?;
    if let Some(d) = r.digest() {
        if !is_sha256(d) {
            return Err(PullError::Reference {
                reference: image.to_string(),
                reason: format!("digest {d:?} is not sha256:<64 hex digits>"),
            });
        }
    }
    Ok(r)
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// `https://index.docker.io/v1/` -> `index.docker.io`, `Host:5000` -> `host:5000`.
fn registry_key(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "registry-1.docker.io" => "index.docker.io".into(),
        _ => host,
    }
}

/// Credentials for `registry` from a Docker `config.json`; anonymous when it has none.
fn auth_for(path: &Path, registry: &str) -> Result<RegistryAuth, PullError> {
    let err = |reason: String| PullError::AuthFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| err(e.to_string()))?;
    // serde's message names line and column only, never the content.
    let cfg: DockerConfig = serde_json::from_slice(&bytes)
        .map_err(|e| err(format!("not a Docker config.json: {e}")))?;
    let want = registry_key(registry);
    let Some((key, entry)) = cfg.auths.iter().find(|(k, _)| registry_key(k) == want) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    let Some(b64) = &entry.auth else {
        return Err(err(format!(
            "auths.{key:?} has neither \"auth\" nor \"username\" and \"password\""
        )));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| err(format!("auths.{key:?}.auth is not base64")))?;
    let text =
        String::from_utf8(decoded).map_err(|_| err(format!("auths.{key:?}.auth is not UTF-8")))?;
    let Some((u, p)) = text.split_once(':') else {
        return Err(err(format!(
            "auths.{key:?}.auth is not base64 of user:password"
        )));
    };
    Ok(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

/// Every certificate of a PEM bundle (reqwest reads one certificate per entry).
fn ca_certificates(path: &Path) -> Result<Vec<Certificate>, PullError> {
    let err = |reason: String| PullError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    const END: &str = "-----END CERTIFICATE-----";
    let certs: Vec<Certificate> = text
        .split_inclusive(END)
        .filter_map(|chunk| {
            let start = chunk.find("-----BEGIN CERTIFICATE-----")?;
            chunk.ends_with(END).then(|| Certificate {
                encoding: CertificateEncoding::Pem,
                data: chunk.as_bytes()[start..].to_vec(),
            })
        })
        .collect();
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Why a request failed, as the registry said it where it said anything.
fn reason(e: &OciDistributionError) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    // Bounded: a registry's error body is not ours to echo in full.
    if msg.len() > 600 {
        let mut cut = 600;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push_str("...");
    }
    msg
}

/// Directory of the reference records (see [`ImageStore::stored`]).
pub(super) const REFS_DIR: &str = "refs";

/// One reference record: the reference (checked on read) and the image digest.
#[derive(Serialize, Deserialize)]
struct RefRecord {
    reference: String,
    digest: String,
}

#[derive(Deserialize)]
struct MediaTyped {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<super::Platform>,
}

#[derive(Deserialize)]
struct ManifestBlobs {
    config: Option<BlobDesc>,
    #[serde(default)]
    layers: Vec<BlobDesc>,
}

#[derive(Deserialize, Clone)]
struct BlobDesc {
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

const ACCEPT: &[&str] = &[
    MT_OCI_MANIFEST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_DOCKER_LIST,
];

/// Pulled blobs read in place from the store's blob directory.
struct BlobDir {
    label: PathBuf,
    dir: PathBuf,
}

impl BlobDir {
    fn file(&self, entry: &str) -> PathBuf {
        // Entries are `blobs/sha256/<hex>` as made by blob_entry (checked hex).
        self.dir.join(entry.strip_prefix("blobs/").unwrap_or(entry))
    }
}

impl Blobs for BlobDir {
    fn path(&self) -> &Path {
        &self.label
    }
    fn contains(&self, entry: &str) -> bool {
        self.file(entry).is_file()
    }
    fn reader(&mut self, entry: &str) -> Result<Box<dyn Read>, ImageError> {
        let f = fs::File::open(self.file(entry)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::Missing {
                archive: self.label.clone(),
                entry: entry.to_string(),
            },
            _ => ImageError::Read {
                archive: self.label.clone(),
                entry: entry.to_string(),
                source: e,
            },
        })?;
        Ok(Box::new(io::BufReader::with_capacity(256 << 10, f)))
    }
    fn read_small(&mut self, entry: &str) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        self.reader(entry)?
            .take(MAX_MANIFEST as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::Read {
                archive: self.label.clone(),
                entry: entry.to_string(),
                source,
            })?;
        Ok(buf)
    }
}

/// A sink for progress lines ("layer 2/3 ... done").
pub type Progress = Arc<dyn Fn(String) + Send + Sync>;

impl ImageStore {
    /// `<store>/blobs`: every pulled blob, by digest, shared by all images.
    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.blobs_dir().join("sha256").join(hex)
    }

    /// `<store>/refs/<sha256 of the reference>.json`: which image a reference was last
    /// pulled as (what a restart falls back on when the registry is unreachable).
    fn ref_path(&self, reference: &str) -> PathBuf {
        self.dir.join(REFS_DIR).join(format!(
            "{}.json",
            sha256_of(reference.as_bytes()).trim_start_matches("sha256:")
        ))
    }

    /// The image `reference` was last pulled as, if it is still in the store. For a
    /// reference pinned by digest this is the image itself (no registry needed).
    pub fn stored(&self, reference: &str) -> Option<Image> {
        let bytes = fs::read(self.ref_path(reference)).ok()?;
        let rec: RefRecord = serde_json::from_slice(&bytes).ok()?;
        if rec.reference != reference || !is_sha256(&rec.digest) {
            return None;
        }
        self.cached(&self.image_meta(&rec.digest))
    }

    /// Records (atomically) that `reference` resolved to the image `digest`.
    fn remember_ref(&self, reference: &str, digest: &str) -> io::Result<()> {
        let path = self.ref_path(reference);
        fs::create_dir_all(path.parent().expect("refs dir"))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let rec = RefRecord {
            reference: reference.to_string(),
            digest: digest.to_string(),
        };
        fs::write(&tmp, serde_json::to_vec(&rec).map_err(io::Error::other)?)?;
        fs::rename(&tmp, &path)
    }

    /// Pulls `reference` from its registry and unpacks it into the cache. Blobs already in
    /// the store are not fetched again; each fetched blob is verified against its digest
    /// before it is kept. Progress lines go to `progress`.
    pub async fn pull(
        &self,
        reference: &str,
        cfg: &RegistryConfig,
        progress: Progress,
    ) -> Result<(Image, PullReport), PullError> {
        let r = parse_reference(reference)?;
        let registry = r.resolve_registry().to_string();
        let auth = match &cfg.auth_file {
            Some(p) => auth_for(p, &registry)?,
            None => RegistryAuth::Anonymous,
        };
        let extra_root_certificates = match &cfg.ca_file {
            Some(p) => ca_certificates(p)?,
            None => Vec::new(),
        };
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(cfg.insecure_registries.clone()),
            extra_root_certificates,
            connect_timeout: Some(cfg.connect_timeout),
            read_timeout: Some(cfg.read_timeout),
            // Indexes are resolved below, with an error that lists what the index has.
            platform_resolver: None,
            max_concurrent_download: cfg.concurrent_blobs.max(1),
            ..ClientConfig::default()
        });
        let reg_err = |e: OciDistributionError| PullError::Registry {
            reference: reference.to_string(),
            reason: reason(&e),
        };
        let invalid = |what: &str, reason: String| PullError::Invalid {
            reference: reference.to_string(),
            what: what.to_string(),
            reason,
        };
        let (mut bytes, _) = client
            .pull_manifest_raw(&r, &auth, ACCEPT)
            .await
            .map_err(reg_err)?;
        let mut digest = sha256_of(&bytes);
        if let Some(want) = r.digest() {
            if want != digest {
                return Err(PullError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest",
                    expected: want.to_string(),
                    actual: digest,
                });
            }
        }
        // An index (multi-platform image): pick this machine's manifest, by digest.
        for _ in 0..2 {
            if bytes.len() > MAX_MANIFEST {
                return Err(invalid(
                    "manifest",
                    format!("{} bytes is too large", bytes.len()),
                ));
            }
            let head: MediaTyped = serde_json::from_slice(&bytes)
                .map_err(|e| invalid("manifest", format!("invalid JSON: {e}")))?;
            let is_index = matches!(
                head.media_type.as_deref(),
                Some(MT_OCI_INDEX | MT_DOCKER_LIST)
            ) || (head.media_type.is_none() && head.manifests.is_some());
            if !is_index {
                break;
            }
            let entries = head.manifests.unwrap_or_default();
            let pick = entries.iter().find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
                    && matches!(e.media_type.as_str(), MT_OCI_MANIFEST | MT_DOCKER_MANIFEST)
            });
            let Some(pick) = pick else {
                let available: Vec<String> = entries
                    .iter()
                    .map(|e| match &e.platform {
                        Some(p) => format!("{}/{}", p.os, p.architecture),
                        None => "unknown platform".into(),
                    })
                    .collect();
                return Err(PullError::NoPlatform {
                    reference: reference.to_string(),
                    wanted: host_arch().to_string(),
                    available: if available.is_empty() {
                        "nothing".into()
                    } else {
                        available.join(", ")
                    },
                });
            };
            if !is_sha256(&pick.digest) {
                return Err(invalid(
                    "index",
                    format!("unsupported digest {:?}", pick.digest),
                ));
            }
            let by_digest = r.clone_with_digest(pick.digest.clone());
            let (b, _) = client
                .pull_manifest_raw(&by_digest, &auth, ACCEPT)
                .await
                .map_err(reg_err)?;
            let actual = sha256_of(&b);
            if actual != pick.digest {
                return Err(PullError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest",
                    expected: pick.digest.clone(),
                    actual,
                });
            }
            bytes = b;
            digest = actual;
        }
        let head: MediaTyped = serde_json::from_slice(&bytes)
            .map_err(|e| invalid("manifest", format!("invalid JSON: {e}")))?;
        let media_type = head
            .media_type
            .unwrap_or_else(|| MT_OCI_MANIFEST.to_string());
        if media_type != MT_OCI_MANIFEST && media_type != MT_DOCKER_MANIFEST {
            return Err(invalid(
                "manifest",
                format!("unsupported media type {media_type:?}"),
            ));
        }
        let m: ManifestBlobs = serde_json::from_slice(&bytes)
            .map_err(|e| invalid("manifest", format!("invalid JSON: {e}")))?;
        let Some(config) = m.config.clone() else {
            return Err(invalid("manifest", "no config".into()));
        };
        let mut wanted: Vec<(String, BlobDesc)> = vec![("config".into(), config)];
        for (i, l) in m.layers.iter().enumerate() {
            if super::is_foreign_layer(&l.media_type) {
                return Err(ImageError::ForeignLayer {
                    archive: PathBuf::from(reference),
                    entry: l.digest.clone(),
                    media_type: l.media_type.clone(),
                }
                .into());
            }
            wanted.push((format!("layer {}/{}", i + 1, m.layers.len()), l.clone()));
        }
        for (what, d) in &wanted {
            if !is_sha256(&d.digest) {
                return Err(invalid(what, format!("unsupported digest {:?}", d.digest)));
            }
        }
        let store_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PullError::Store { path, source }
        };
        let sha_dir = self.blobs_dir().join("sha256");
        fs::create_dir_all(&sha_dir).map_err(store_err(&sha_dir))?;
        self.keep_blob(&digest, &bytes)
            .map_err(store_err(&sha_dir))?;

        let missing: Vec<(String, BlobDesc)> = wanted
            .iter()
            .filter(|(_, d)| !self.blob_path(&d.digest).is_file())
            .cloned()
            .collect();
        let reused = wanted.len() - missing.len();
        let total: u64 = missing.iter().filter_map(|(_, d)| d.size).sum();
        progress(format!(
            "pulling {reference}: manifest {digest}, {} layers, fetching {} blobs ({}), {reused} already stored",
            m.layers.len(),
            missing.len(),
            human_bytes(total),
        ));
        let started = Instant::now();
        let mut fetches = Vec::with_capacity(missing.len());
        for (what, d) in &missing {
            let (client, r, auth, progress) = (&client, &r, &auth, progress.clone());
            fetches.push(async move {
                self.fetch_blob(client, r, auth, reference, what, d, progress)
                    .await
            });
        }
        let fetched: Vec<u64> = futures_util::stream::iter(fetches)
            .buffer_unordered(cfg.concurrent_blobs.max(1))
            .try_collect()
            .await?;
        let fetched_bytes = fetched.iter().sum();
        progress(format!(
            "pulled {reference}: {} in {} ms",
            human_bytes(fetched_bytes),
            started.elapsed().as_millis()
        ));

        let store = self.clone();
        let label = PathBuf::from(reference);
        let desc = Descriptor {
            media_type,
            digest: digest.clone(),
            size: Some(bytes.len() as u64),
            platform: None,
        };
        let image = tokio::task::spawn_blocking(move || {
            let mut src = BlobDir {
                label,
                dir: store.blobs_dir(),
            };
            let referrer = src.label.display().to_string();
            let resolved = resolve_oci_manifest(&mut src, &referrer, &desc)?;
            store.unpack_resolved(&mut src, &resolved)
        })
        .await
        .map_err(|e| PullError::Store {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })??;
        if let Some(d) = image.digest.as_deref() {
            self.remember_ref(reference, d)
                .map_err(store_err(&self.dir.join(REFS_DIR)))?;
        }
        Ok((
            image,
            PullReport {
                reference: reference.to_string(),
                digest,
                layers: m.layers.len(),
                fetched_blobs: missing.len(),
                reused_blobs: reused,
                fetched_bytes,
            },
        ))
    }

    /// Writes a small verified blob (a manifest) unless it is there.
    fn keep_blob(&self, digest: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.blob_path(digest);
        if path.is_file() {
            return Ok(());
        }
        let tmp = path.with_file_name(format!(
            "{PARTIAL_PREFIX}{}-m{}",
            path.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, &path)
    }

    /// One exclusive fetch per digest at a time (two deploys of images sharing a layer
    /// fetch it once; the second then finds it stored).
    fn blob_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.pulls.lock().unwrap();
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks
            .entry(digest.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    }

    /// Fetches one blob into `blobs/sha256/.partial-<hex>`, resuming with a ranged read
    /// after an interrupted attempt, then verifies the whole file and renames it into
    /// place. Returns the bytes fetched.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        client: &Client,
        r: &Reference,
        auth: &RegistryAuth,
        reference: &str,
        what: &str,
        d: &BlobDesc,
        progress: Progress,
    ) -> Result<u64, PullError> {
        let lock = self.blob_lock(&d.digest);
        let _held = lock.lock().await;
        let path = self.blob_path(&d.digest);
        if path.is_file() {
            return Ok(0);
        }
        let hex = d.digest.trim_start_matches("sha256:");
        let partial = path.with_file_name(format!("{PARTIAL_PREFIX}{hex}"));
        // A fetch cancelled (another blob failed) or failed leaves no partial file behind.
        let _cleanup = RemoveOnDrop(partial.clone());
        let store_err = |source| PullError::Store {
            path: partial.clone(),
            source,
        };
        let reg_err = |e: OciDistributionError| PullError::Registry {
            reference: reference.to_string(),
            reason: format!("{what} {}: {}", d.digest, reason(&e)),
        };
        // Make sure the client holds a token for this repository.
        client
            .auth(r, auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(reg_err)?;
        let started = Instant::now();
        let mut fetched = 0u64;
        let mut last_err = String::new();
        for attempt in 1..=BLOB_ATTEMPTS {
            let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let result = if have == 0 {
                let f = tokio::fs::File::create(&partial).await.map_err(store_err)?;
                let mut counting = CountingWriter { inner: f, n: 0 };
                let res = client.pull_blob(r, d.digest.as_str(), &mut counting).await;
                let _ = counting.inner.flush().await;
                fetched += counting.n;
                res
            } else {
                self.resume(client, r, d, &partial, have, &mut fetched)
                    .await
            };
            match result {
                Ok(()) => break,
                Err(OciDistributionError::DigestError(DigestError::VerificationError {
                    expected,
                    actual,
                })) => {
                    let _ = fs::remove_file(&partial);
                    return Err(PullError::DigestMismatch {
                        reference: reference.to_string(),
                        what: if what == "config" { "config" } else { "layer" },
                        expected,
                        actual,
                    });
                }
                // 4xx (unknown blob, denied) will not change on a retry.
                Err(
                    e @ OciDistributionError::ServerError {
                        code: 400..=499, ..
                    },
                )
                | Err(e @ OciDistributionError::AuthenticationFailure(_))
                | Err(e @ OciDistributionError::UnauthorizedError { .. }) => {
                    let _ = fs::remove_file(&partial);
                    return Err(reg_err(e));
                }
                Err(e) => {
                    last_err = reason(&e);
                    let now = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                    if attempt == BLOB_ATTEMPTS {
                        let _ = fs::remove_file(&partial);
                        return Err(PullError::Registry {
                            reference: reference.to_string(),
                            reason: format!(
                                "{what} {}: failed after {BLOB_ATTEMPTS} attempts: {last_err}",
                                d.digest
                            ),
                        });
                    }
                    progress(format!(
                        "pulling {reference}: {what} interrupted at {} ({last_err}); resuming, attempt {}/{BLOB_ATTEMPTS}",
                        human_bytes(now),
                        attempt + 1
                    ));
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        let _ = last_err;
        // Verify the whole file: a resumed download was only checked piecewise.
        let (p2, want, size) = (partial.clone(), d.digest.clone(), d.size);
        let actual = tokio::task::spawn_blocking(move || -> io::Result<(String, u64)> {
            let mut f = fs::File::open(&p2)?;
            let mut h = Sha256::new();
            let n = io::copy(&mut f, &mut HashWriter(&mut h))?;
            Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
        })
        .await
        .map_err(|e| store_err(io::Error::other(e.to_string())))?
        .map_err(store_err)?;
        if actual.0 != want || size.is_some_and(|s| s != actual.1) {
            let _ = fs::remove_file(&partial);
            return Err(PullError::DigestMismatch {
                reference: reference.to_string(),
                what: if what == "config" { "config" } else { "layer" },
                expected: want,
                actual: actual.0,
            });
        }
        fs::rename(&partial, &path).map_err(store_err)?;
        progress(format!(
            "pulling {reference}: {what} {} {} in {} ms",
            &d.digest[..19],
            human_bytes(actual.1),
            started.elapsed().as_millis()
        ));
        Ok(fetched)
    }

    async fn resume(
        &self,
        client: &Client,
        r: &Reference,
        d: &BlobDesc,
        partial: &Path,
        have: u64,
        fetched: &mut u64,
    ) -> Result<(), OciDistributionError> {
        let resp = client
            .pull_blob_stream_partial(r, d.digest.as_str(), have, None)
            .await?;
        let (mut f, mut stream) = match resp {
            BlobResponse::Partial(s) => (
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(partial)
                    .await?,
                s.stream,
            ),
            // The registry ignored the range: start over.
            BlobResponse::Full(s) => (tokio::fs::File::create(partial).await?, s.stream),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            *fetched += chunk.len() as u64;
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        Ok(())
    }

    /// Removes `.partial-*` downloads a crash left behind.
    pub(super) fn remove_partial_pulls(&self) {
        let Ok(rd) = fs::read_dir(self.blobs_dir().join("sha256")) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = p {
            self.n += n as u64;
        }
        p
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_paths_are_told_apart() {
        assert!(!is_registry_reference("/srv/images/fn.tar"));
        assert!(!is_registry_reference("./fn.tar"));
        assert!(is_registry_reference("127.0.0.1:5000/team/fn:1.2"));
        assert!(parse_reference("127.0.0.1:5000/team/fn:1.2").is_ok());
        let d = format!("docker.io/library/x@sha256:{}", "a".repeat(64));
        assert_eq!(parse_reference(&d).unwrap().repository(), "library/x");
        assert!(parse_reference("Bad Ref").is_err());
    }

    #[test]
    fn auth_file_entries_match_by_registry_host() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        fs::write(
            &p,
            format!(r#"{{"auths": {{"https://Reg.example:5000/v2/": {{"auth": "{b64}"}}, "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}}}}}}"#),
        )
        .unwrap();
        match auth_for(&p, "reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, pw) => {
                assert_eq!((u.as_str(), pw.as_str()), ("alice", "s3cret"))
            }
            _ => panic!("expected basic auth"),
        }
        assert!(
            matches!(auth_for(&p, "index.docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "bob")
        );
        assert!(matches!(
            auth_for(&p, "other:5000").unwrap(),
            RegistryAuth::Anonymous
        ));
        fs::write(&p, "{ not json s3cret").unwrap();
        let e = auth_for(&p, "reg.example:5000").unwrap_err().to_string();
        assert!(e.contains("config.json") && !e.contains("s3cret"), "{e}");
    }
}
