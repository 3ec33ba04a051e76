//! Applies one layer tar onto a rootfs: whiteouts, opaque dirs, hard and symbolic links,
//! never following a link out of the rootfs and refusing device nodes.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ImageError;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Recognises a compressed stream by its magic bytes (docker-archive layers carry no
    /// media type).
    pub(super) fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
}

/// Context for error messages.
struct Ctx<'a> {
    archive: &'a Path,
    layer: &'a str,
}

impl Ctx<'_> {
    fn entry(&self, path: &str) -> String {
        format!("{}!/{}", self.layer, path)
    }
    fn corrupt(&self, path: &str, reason: impl Into<String>) -> ImageError {
        ImageError::Corrupt {
            archive: self.archive.to_path_buf(),
            entry: self.entry(path),
            reason: reason.into(),
        }
    }
    fn read(&self, path: &str, e: io::Error) -> ImageError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::Truncated {
                archive: self.archive.to_path_buf(),
                entry: self.entry(path),
            }
        } else {
            self.corrupt(path, e.to_string())
        }
    }
    fn unsafe_path(&self, path: &str, reason: &'static str) -> ImageError {
        ImageError::UnsafePath {
            archive: self.archive.to_path_buf(),
            entry: self.entry(path),
            reason,
        }
    }
    fn write(&self, dest: &Path, source: io::Error) -> ImageError {
        ImageError::Cache {
            path: dest.to_path_buf(),
            source,
        }
    }
}

/// Unpacks one layer onto `root`, verifying the blob digest and the diff id when given.
/// Returns the diff id (`sha256:` of the uncompressed tar) it computed.
pub(super) fn unpack(
    root: &Path,
    blob: impl Read,
    compression: Compression,
    blob_digest: Option<&str>,
    diff_id: Option<&str>,
    archive: &Path,
    layer: &str,
) -> Result<String, ImageError> {
    let ctx = Ctx { archive, layer };
    let mut blob = HashingReader::new(blob);
    let diff = apply_layer(root, &mut blob, compression, diff_id, &ctx)?;
    io::copy(&mut blob, &mut io::sink()).map_err(|e| ctx.read("<end of blob>", e))?;
    let blob_hash = format!("sha256:{}", hex::encode(blob.hasher.finalize()));
    if let Some(expected) = blob_digest {
        if expected != blob_hash {
            return Err(ImageError::DigestMismatch {
                archive: archive.to_path_buf(),
                entry: layer.to_string(),
                expected: expected.to_string(),
                actual: blob_hash,
            });
        }
    }
    Ok(diff)
}

/// Decompresses and applies the layer, checking the uncompressed digest.
fn apply_layer<R: Read>(
    root: &Path,
    blob: &mut R,
    compression: Compression,
    diff_id: Option<&str>,
    ctx: &Ctx,
) -> Result<String, ImageError> {
    let decompressed: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(blob)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(blob)
                .map_err(|e| ctx.corrupt("<zstd frame header>", e.to_string()))?,
        ),
    };
    let mut tar_stream = HashingReader::new(decompressed);
    apply_entries(root, &mut tar_stream, ctx)?;
    // Drain the tar's end padding so the digest covers the whole stream.
    io::copy(&mut tar_stream, &mut io::sink()).map_err(|e| ctx.read("<end of layer>", e))?;
    let diff = format!("sha256:{}", hex::encode(tar_stream.hasher.finalize()));
    match diff_id {
        Some(expected) if expected != diff => Err(ImageError::DigestMismatch {
            archive: ctx.archive.to_path_buf(),
            entry: format!("{} (uncompressed)", ctx.layer),
            expected: expected.to_string(),
            actual: diff,
        }),
        _ => Ok(diff),
    }
}

fn apply_entries<R: Read>(root: &Path, stream: R, ctx: &Ctx) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(stream);
    // Host paths this layer created: an opaque whiteout must keep them.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut last = String::from("<first header>");
    let entries = archive.entries().map_err(|e| ctx.read(&last, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ctx.read(&last, e))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        last = format!("<header after {raw:?}>");
        let parts = split_path(&raw).map_err(|reason| ctx.unsafe_path(&raw, reason))?;
        let Some((name, parents)) = parts.split_last() else {
            continue; // the root directory itself
        };
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            return Err(ImageError::DeviceNode {
                archive: ctx.archive.to_path_buf(),
                entry: ctx.entry(&raw),
            });
        }
        let parent = resolve(root, parents).map_err(|e| ctx.corrupt(&raw, e.to_string()))?;
        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            let dir = root.join(&parent);
            if let Ok(rd) = fs::read_dir(&dir) {
                for child in rd.flatten() {
                    let p = child.path();
                    if !created.contains(&p) {
                        remove_any(&p).map_err(|e| ctx.write(&p, e))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            let p = root.join(&parent).join(OsStr::from_bytes(hidden));
            remove_any(&p).map_err(|e| ctx.write(&p, e))?;
            continue;
        }
        let parent_dir = root.join(&parent);
        fs::create_dir_all(&parent_dir).map_err(|e| ctx.write(&parent_dir, e))?;
        let dest = parent_dir.join(name);
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| ctx.corrupt(&raw, e.to_string()))?
            & 0o7777;
        let uid = header.uid().unwrap_or(0) as libc::uid_t;
        let gid = header.gid().unwrap_or(0) as libc::gid_t;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&dest).map_err(|e| ctx.write(&dest, e))?;
                        fs::create_dir(&dest).map_err(|e| ctx.write(&dest, e))?;
                    }
                    Err(_) => fs::create_dir(&dest).map_err(|e| ctx.write(&dest, e))?,
                }
                lchown(&dest, uid, gid).map_err(|e| ctx.write(&dest, e))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx.write(&dest, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&dest).map_err(|e| ctx.write(&dest, e))?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|e| ctx.write(&dest, e))?;
                io::copy(&mut entry, &mut f).map_err(|e| ctx.read(&raw, e))?;
                lchown(&dest, uid, gid).map_err(|e| ctx.write(&dest, e))?;
                // After chown, which clears setuid bits.
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| ctx.write(&dest, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.corrupt(&raw, "symlink without target"))?
                    .into_owned();
                let target_str = String::from_utf8_lossy(&target).into_owned();
                if escapes(parents.len(), &target) {
                    return Err(ImageError::SymlinkEscape {
                        archive: ctx.archive.to_path_buf(),
                        entry: ctx.entry(&raw),
                        target: target_str,
                    });
                }
                remove_any(&dest).map_err(|e| ctx.write(&dest, e))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                    .map_err(|e| ctx.write(&dest, e))?;
                lchown(&dest, uid, gid).map_err(|e| ctx.write(&dest, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.corrupt(&raw, "hard link without target"))?
                    .into_owned();
                let target_str = String::from_utf8_lossy(&target).into_owned();
                let tparts = split_path(&target_str).map_err(|reason| {
                    ctx.unsafe_path(&format!("{raw} (link to {target_str})"), reason)
                })?;
                let Some((tname, tparents)) = tparts.split_last() else {
                    return Err(ctx.corrupt(&raw, "hard link to the root directory"));
                };
                let tparent =
                    resolve(root, tparents).map_err(|e| ctx.corrupt(&raw, e.to_string()))?;
                let src = root.join(tparent).join(tname);
                match fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(ctx.corrupt(
                            &raw,
                            format!("hard link target {target_str:?} is not a file in the rootfs"),
                        ))
                    }
                }
                if src != dest {
                    remove_any(&dest).map_err(|e| ctx.write(&dest, e))?;
                    fs::hard_link(&src, &dest).map_err(|e| ctx.write(&dest, e))?;
                }
            }
            tar::EntryType::Fifo => {
                remove_any(&dest).map_err(|e| ctx.write(&dest, e))?;
                let c = std::ffi::CString::new(dest.as_os_str().as_bytes())
                    .map_err(|_| ctx.corrupt(&raw, "NUL in path"))?;
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) } != 0 {
                    return Err(ctx.write(&dest, io::Error::last_os_error()));
                }
                lchown(&dest, uid, gid).map_err(|e| ctx.write(&dest, e))?;
            }
            other => {
                return Err(ctx.corrupt(&raw, format!("unsupported entry type {other:?}")));
            }
        }
        created.insert(dest);
    }
    Ok(())
}

/// Splits a layer path into components, refusing absolute paths and `..`.
fn split_path(raw: &str) -> Result<Vec<OsString>, &'static str> {
    if raw.starts_with('/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("path contains \"..\""),
            c => out.push(OsString::from(c)),
        }
    }
    Ok(out)
}

/// Whether a relative symlink target, placed `depth` directories below the root, climbs
/// above the root. Absolute targets resolve inside the container's root, so they stay.
fn escapes(depth: usize, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return false;
    }
    let mut d = depth as isize;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                d -= 1;
                if d < 0 {
                    return true;
                }
            }
            _ => d += 1,
        }
    }
    false
}

/// Resolves directory components under `root` the way the container will see them:
/// symlinks are followed with `root` as `/`, and `..` never climbs above it. The result is
/// relative to `root` and contains no symlinks that exist now, so writes cannot escape.
fn resolve(root: &Path, parts: &[OsString]) -> io::Result<PathBuf> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = parts.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == "." || c.is_empty() {
            continue;
        }
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for comp in target.components().rev() {
                    match comp {
                        Component::Normal(n) => pending.push_front(n.to_os_string()),
                        Component::ParentDir => pending.push_front(OsString::from("..")),
                        _ => {}
                    }
                }
            }
            Ok(m) if !m.is_dir() => {
                // A file where a directory is needed: the layer replaces it.
                fs::remove_file(&candidate)?;
                resolved.push(c);
            }
            _ => resolved.push(c),
        }
    }
    Ok(resolved.into_iter().collect())
}

/// Removes a file, symlink or directory tree without following symlinks; absent is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn lchown(p: &Path, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes().to_vec())
        .map_err(|_| io::Error::other("NUL in path"))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        let e = io::Error::last_os_error();
        // Unprivileged imports keep the caller's ownership.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_symlink_escape_is_detected() {
        assert!(escapes(0, b".."));
        assert!(escapes(1, b"../../etc"));
        assert!(!escapes(1, b"../etc"));
        assert!(!escapes(0, b"/etc/passwd"));
        assert!(escapes(2, b"x/../../../../y"));
        assert!(!escapes(0, b"busybox"));
    }

    #[test]
    fn split_refuses_parent_and_absolute() {
        assert_eq!(split_path("/etc").unwrap_err(), "absolute path");
        assert!(split_path("a/../b").is_err());
        assert_eq!(split_path("./a//b/").unwrap().len(), 2);
    }

    #[test]
    fn resolve_keeps_links_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("usr")).unwrap();
        std::os::unix::fs::symlink("/tmp/../../outside", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("usr", root.join("lib")).unwrap();
        let p = resolve(root, &["abs".into(), "x".into()]).unwrap();
        assert_eq!(p, PathBuf::from("outside/x"));
        let p = resolve(root, &["lib".into(), "a".into()]).unwrap();
        assert_eq!(p, PathBuf::from("usr/a"));
    }
}
