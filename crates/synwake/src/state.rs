//! The state directory: every path synwake writes lives here, and every write is crash-safe.
//!
//! ```text
//! <state_dir>/functions.json   functions deployed through the API
//! <state_dir>/run/             pid files of live process instances
//! <state_dir>/oci/             image cache, bundles (oci runtime)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::spec::FunctionSpec;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Paths under the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| StateError::Write {
            path: root.clone(),
            source,
        })?;
        // Absolute from here on: runc resolves a bundle's relative paths against the
        // bundle, not against our working directory.
        let root = std::fs::canonicalize(&root).map_err(|source| StateError::Read {
            path: root.clone(),
            source,
        })?;
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn functions_file(&self) -> PathBuf {
        self.root.join("functions.json")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn oci_dir(&self) -> PathBuf {
        self.root.join("oci")
    }

    /// Functions deployed through the API, as last saved.
    pub fn load_functions(&self) -> Result<Vec<FunctionSpec>, StateError> {
        let path = self.functions_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save_functions(&self, specs: &[FunctionSpec]) -> Result<(), StateError> {
        let path = self.functions_file();
        let bytes = serde_json::to_vec_pretty(specs).expect("specs serialize");
        write_atomic(&path, &bytes).map_err(|source| StateError::Write { path, source })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn state_dir_is_canonical() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        let s = StateDir::new(dir.path().join("x/../state")).unwrap();
        assert_eq!(s.root(), dir.path().canonicalize().unwrap().join("state"));
    }

    #[test]
    fn corrupt_state_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path()).unwrap();
        std::fs::write(s.functions_file(), b"{nope").unwrap();
        let e = s.load_functions().unwrap_err().to_string();
        assert!(e.contains("functions.json"), "{e}");
    }
}
