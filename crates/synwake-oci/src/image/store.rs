//! The shared, content-addressed layer store and its garbage collection.
//!
//! Layout under the store directory:
//! - `layers/<chain id hex>/`: the root filesystem as it is after applying a chain of
//!   layers (OCI ChainID: `chain(L1) = diffid(L1)`, `chain(Ln) = sha256(chain(Ln-1) + " " +
//!   diffid(Ln))`). A chain is unpacked once; a longer chain starts as a hard-link clone of
//!   its parent, so a base layer used by ten images is decompressed and written once and
//!   its file data is on disk once.
//! - `images/<digest hex>.json`: one image (config, chain, blobs), written last.
//! - `blobs/sha256/<hex>`: pulled blobs (see the registry module).
//!
//! Every instance mounts an overlay with the image's top chain directory as its only
//! lowerdir, so the cold path is the same as for an image unpacked whole.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Image, ImageError, ImageStore};

pub(super) const LAYERS_DIR: &str = "layers";
pub(super) const IMAGES_DIR: &str = "images";

/// The chain id (hex, no `sha256:`) of `id` applied on top of the chain `parent` (hex).
pub(super) fn chain_id(parent: Option<&str>, id: &str) -> String {
    match parent {
        None => id.strip_prefix("sha256:").unwrap_or(id).to_string(),
        Some(p) => hex::encode(Sha256::digest(format!("sha256:{p} {id}").as_bytes())),
    }
}

/// Recreates the tree at `src` under `dst` (which must not exist): directories are new
/// (with the same owner and mode), everything else is a hard link to the same inode.
/// Layer application only ever unlinks and recreates entries, so the parent's files are
/// never written through a link.
pub(super) fn clone_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((from, to)) = stack.pop() {
        let m = fs::symlink_metadata(&from)?;
        fs::create_dir(&to)?;
        super::layer::lchown(&to, m.uid(), m.gid())?;
        fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        for e in fs::read_dir(&from)? {
            let e = e?;
            let (f, t) = (e.path(), to.join(e.file_name()));
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push((f, t));
            } else {
                link_or_copy(&f, &t, ft.is_file())?;
            }
        }
    }
    Ok(())
}

/// A hard link (it does not follow symlinks on Linux); a copy when the inode has too many.
fn link_or_copy(from: &Path, to: &Path, is_file: bool) -> io::Result<()> {
    match fs::hard_link(from, to) {
        Err(e) if is_file && e.raw_os_error() == Some(libc::EMLINK) => {
            let m = fs::symlink_metadata(from)?;
            fs::copy(from, to)?;
            super::layer::lchown(to, m.uid(), m.gid())?;
            fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))
        }
        r => r,
    }
}

/// What the store holds, counted on disk (a hard-linked inode once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreUsage {
    /// Bytes allocated for everything under the store directory.
    pub bytes: u64,
    /// Images (`images/*.json`).
    pub images: u64,
    /// Unpacked layer chains (`layers/*`).
    pub layers: u64,
    /// Pulled blobs (`blobs/sha256/*`).
    pub blobs: u64,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Digests of the images removed.
    pub images: Vec<String>,
    /// Unpacked layer chains removed.
    pub layers: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes the store shrank by.
    pub freed_bytes: u64,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    pub(super) fn layers_dir(&self) -> PathBuf {
        self.dir.join(LAYERS_DIR)
    }

    pub(super) fn layer_dir(&self, chain: &str) -> PathBuf {
        self.layers_dir().join(chain)
    }

    pub(super) fn image_meta(&self, digest: &str) -> PathBuf {
        self.dir
            .join(IMAGES_DIR)
            .join(format!("{}.json", hex_of(digest)))
    }

    /// Every image the store holds.
    pub fn images(&self) -> Vec<Image> {
        let Ok(rd) = fs::read_dir(self.dir.join(IMAGES_DIR)) else {
            return Vec::new();
        };
        let mut out: Vec<Image> = rd
            .flatten()
            .filter_map(|e| self.cached(&e.path()))
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Disk use of the store (walks it; a hard-linked inode is counted once).
    pub fn usage(&self) -> StoreUsage {
        let count = |p: PathBuf| fs::read_dir(p).map(|rd| rd.count() as u64).unwrap_or(0);
        StoreUsage {
            bytes: disk_bytes(&self.dir),
            images: count(self.dir.join(IMAGES_DIR)),
            layers: count(self.layers_dir()),
            blobs: count(self.dir.join("blobs").join("sha256")),
        }
    }

    /// Removes every image not in `keep`, every layer chain and blob no kept image uses,
    /// and what crashed imports and the pre-layer-store cache layout left behind.
    ///
    /// The caller must not import or pull into this store while it runs (the daemon holds
    /// its image lock), and must list in `keep` every image a live container mounts.
    pub fn prune(&self, keep: &[Image]) -> Result<PruneReport, ImageError> {
        let before = disk_bytes(&self.dir);
        let kept_images: HashSet<&str> = keep
            .iter()
            .filter_map(|i| i.digest.as_deref())
            .map(hex_of)
            .collect();
        let kept_layers: HashSet<&str> = keep
            .iter()
            .flat_map(|i| i.layers.iter().map(String::as_str))
            .collect();
        let kept_blobs: HashSet<&str> = keep
            .iter()
            .flat_map(|i| i.blobs.iter().map(|b| hex_of(b)))
            .collect();
        let mut report = PruneReport::default();
        let rm = |p: &Path| -> Result<(), ImageError> {
            let r = match fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(p),
                Ok(_) => fs::remove_file(p),
                Err(_) => Ok(()),
            };
            r.map_err(|source| ImageError::Cache {
                path: p.to_path_buf(),
                source,
            })
        };
        // Image records first: a crash mid-prune leaves layers without a record (removed
        // next time), never a record whose layers are gone.
        for img in self.images() {
            let Some(d) = img.digest.as_deref() else {
                continue;
            };
            if !kept_images.contains(hex_of(d)) {
                rm(&self.image_meta(d))?;
                report.images.push(d.to_string());
            }
        }
        if let Ok(rd) = fs::read_dir(self.dir.join(IMAGES_DIR)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".json").unwrap_or("");
                if !is_hex64(stem) || !kept_images.contains(stem) {
                    rm(&e.path())?;
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.layers_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !kept_layers.contains(name.as_str()) {
                    rm(&e.path())?;
                    report.layers += u64::from(is_hex64(&name));
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.dir.join("blobs").join("sha256")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !kept_blobs.contains(name.as_str()) {
                    rm(&e.path())?;
                    report.blobs += u64::from(is_hex64(&name));
                }
            }
        }
        // Reference records of removed images (they would name nothing).
        if let Ok(rd) = fs::read_dir(self.dir.join(super::registry::REFS_DIR)) {
            for e in rd.flatten() {
                let digest = fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["digest"].as_str().map(|d| hex_of(d).to_string()));
                if !digest.is_some_and(|d| kept_images.contains(d.as_str())) {
                    rm(&e.path())?;
                }
            }
        }
        // `<hex>/{rootfs,image.json}` (the cache before the layer store) and temp dirs.
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_hex64(&name) || name.starts_with(super::TMP_PREFIX) {
                    rm(&e.path())?;
                }
            }
        }
        report.freed_bytes = before.saturating_sub(disk_bytes(&self.dir));
        Ok(report)
    }
}

/// Bytes allocated under `root`, each inode once, not following symlinks.
fn disk_bytes(root: &Path) -> u64 {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        total += m.blocks() * 512;
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let b = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let c1 = chain_id(None, a);
        assert_eq!(c1, &a[7..]);
        let c2 = chain_id(Some(&c1), b);
        let want = hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(c2, want);
        assert_ne!(chain_id(Some(&c1), b), chain_id(Some(&b[7..]), a));
    }

    #[test]
    fn clone_tree_links_files_and_recreates_dirs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("etc/sub")).unwrap();
        fs::write(src.join("etc/sub/f"), b"x").unwrap();
        fs::set_permissions(src.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("/nowhere", src.join("link")).unwrap();
        let dst = d.path().join("dst");
        clone_tree(&src, &dst).unwrap();
        let (a, b) = (
            fs::metadata(src.join("etc/sub/f")).unwrap(),
            fs::metadata(dst.join("etc/sub/f")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "files are hard links");
        let (sa, sb) = (
            fs::metadata(src.join("etc")).unwrap(),
            fs::metadata(dst.join("etc")).unwrap(),
        );
        assert_ne!(sa.ino(), sb.ino(), "directories are new");
        assert_eq!(sb.mode() & 0o7777, 0o750);
        assert_eq!(
            fs::read_link(dst.join("link")).unwrap(),
            PathBuf::from("/nowhere")
        );
        // Disk use counts the linked file once.
        let once = disk_bytes(&src);
        let both = disk_bytes(d.path());
        assert!(both < 2 * once + 4 * 4096, "{both} vs {once}");
    }
}
