//! Index of the outer image tar: entry name -> (offset, size), so blobs are read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{Blobs, ImageError};

/// JSON documents (index, manifests, configs) larger than this are refused as corrupt.
const MAX_JSON: u64 = 16 << 20;

pub(super) struct ArchiveIndex {
    path: PathBuf,
    file: File,
    entries: HashMap<String, (u64, u64)>,
}

/// Normalizes an archive path (`./a//b` -> `a/b`), refusing absolute paths and `..`.
pub(super) fn normalize_name(raw: &str) -> Result<String, &'static str> {
    if raw.starts_with('/') {
        return Err("absolute path");
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("path contains \"..\""),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

impl ArchiveIndex {
    pub(super) fn open(path: &Path) -> Result<Self, ImageError> {
        let read_err = |entry: &str, source: io::Error| ImageError::Read {
            archive: path.to_path_buf(),
            entry: entry.to_string(),
            source,
        };
        let file = File::open(path).map_err(|e| read_err("", e))?;
        let len = file.metadata().map_err(|e| read_err("", e))?.len();
        let mut entries = HashMap::new();
        let mut archive = tar::Archive::new(file.try_clone().map_err(|e| read_err("", e))?);
        let mut last = String::from("<first header>");
        let iter = archive
            .entries_with_seek()
            .map_err(|e| read_err(&last, e))?;
        for entry in iter {
            let entry = entry.map_err(|e| truncated_or(path, &last, e))?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            last = format!("<header after {raw:?}>");
            let name = normalize_name(&raw).map_err(|reason| ImageError::UnsafePath {
                archive: path.to_path_buf(),
                entry: raw.clone(),
                reason,
            })?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let pos = entry.raw_file_position();
            let size = entry.size();
            if pos.saturating_add(size) > len {
                return Err(ImageError::Truncated {
                    archive: path.to_path_buf(),
                    entry: name,
                });
            }
            entries.insert(name, (pos, size));
        }
        Ok(ArchiveIndex {
            path: path.to_path_buf(),
            file,
            entries,
        })
    }
}

impl Blobs for ArchiveIndex {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// A reader over one entry's bytes.
    fn reader(&mut self, name: &str) -> Result<Box<dyn Read>, ImageError> {
        let Some(&(pos, size)) = self.entries.get(name) else {
            return Err(ImageError::Missing {
                archive: self.path.clone(),
                entry: name.to_string(),
            });
        };
        let read_err = |source| ImageError::Read {
            archive: self.path.clone(),
            entry: name.to_string(),
            source,
        };
        let mut f = self.file.try_clone().map_err(read_err)?;
        f.seek(SeekFrom::Start(pos)).map_err(read_err)?;
        Ok(Box::new(f.take(size)))
    }

    /// Reads a small (JSON) entry completely.
    fn read_small(&mut self, name: &str) -> Result<Vec<u8>, ImageError> {
        let size = self.entries.get(name).map(|e| e.1).unwrap_or(0);
        if size > MAX_JSON {
            return Err(ImageError::Corrupt {
                archive: self.path.clone(),
                entry: name.to_string(),
                reason: format!("{size} bytes is too large for a JSON document"),
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.reader(name)?
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::Read {
                archive: self.path.clone(),
                entry: name.to_string(),
                source,
            })?;
        Ok(buf)
    }
}

fn truncated_or(archive: &Path, entry: &str, e: io::Error) -> ImageError {
    if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("entire block") {
        ImageError::Truncated {
            archive: archive.to_path_buf(),
            entry: entry.to_string(),
        }
    } else {
        // tar's own message quotes the header's bytes (for a file that is not a tar, its
        // first line): never pass file content on.
        let reason = if e.to_string().contains("checksum") {
            "tar header checksum mismatch: not a tar archive, or a damaged one"
        } else {
            "unreadable tar header: not a tar archive, or a damaged one"
        };
        ImageError::Corrupt {
            archive: archive.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }
}
