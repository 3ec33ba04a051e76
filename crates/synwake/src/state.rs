//! The state directory: every path synwake writes lives here, and every write is crash-safe.
//!
//! ```text
//! <state_dir>/functions.json   functions deployed through the API
//! <state_dir>/idle-history.json  what the adaptive idle policy learned, per function
//! <state_dir>/run/             pid files of live process instances
//! <state_dir>/oci/             image cache, bundles (oci runtime)
//! <state_dir>/async/calls.log  the durable queue of accepted async calls
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
    pub fn secrets(&self) -> crate::secrets::SecretStore {
        crate::secrets::SecretStore::new(self.root.join("secrets"))
    }
    /// The durable async-call queue.
    pub fn async_dir(&self) -> PathBuf {
        self.root.join("async")
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
        self.stage_functions(specs)?.commit();
        Ok(())
    }

    /// Saves `specs` so that the save can still be undone: the caller applies the change
    /// in memory, then commits, or rolls back when applying failed. On error nothing on
    /// disk changed.
    pub fn stage_functions(&self, specs: &[FunctionSpec]) -> Result<StagedSave, StateError> {
        let path = self.functions_file();
        let prev = self.root.join(".functions.json.prev");
        let write_err = |path: &Path, source| StateError::Write {
            path: path.to_path_buf(),
            source,
        };
        let _ = std::fs::remove_file(&prev);
        // A hard link keeps the old content without needing free space, so a rollback
        // works on a full disk too.
        let had_old = match std::fs::hard_link(&path, &prev) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(write_err(&prev, e)),
        };
        let bytes = serde_json::to_vec_pretty(specs).expect("specs serialize");
        if let Err(e) = write_atomic(&path, &bytes) {
            let _ = std::fs::remove_file(&prev);
            return Err(write_err(&path, e));
        }
        Ok(StagedSave {
            path,
            prev: had_old.then_some(prev),
        })
    }

    /// Removes what an interrupted write left behind (temp files of [`write_atomic`], a
    /// staged save's backup) in the state dir and the directories right below it.
    /// Returns how many files were removed.
    pub fn sweep_temp_files(&self) -> usize {
        let mut removed = 0;
        let mut dirs = vec![self.root.clone()];
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let leftover = name.starts_with('.')
                    && (name.contains(TEMP_MARK) || name == ".functions.json.prev");
                if leftover
                    && e.file_type().is_ok_and(|t| t.is_file())
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// A functions file written but not yet final; see [`StateDir::stage_functions`].
#[must_use = "commit or roll back a staged save"]
pub struct StagedSave {
    path: PathBuf,
    /// The previous file (hard link); `None` when there was none.
    prev: Option<PathBuf>,
}

impl StagedSave {
    /// Keeps the new file.
    pub fn commit(self) {
        if let Some(prev) = &self.prev {
            let _ = std::fs::remove_file(prev);
        }
    }

    /// Puts the previous file back (a rename: works on a full disk).
    pub fn rollback(self) -> Result<(), StateError> {
        let r = match &self.prev {
            Some(prev) => std::fs::rename(prev, &self.path),
            None => std::fs::remove_file(&self.path),
        };
        r.map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")));
        Ok(())
    }
}

/// Marks the temp files of [`write_atomic`]; swept at start.
const TEMP_MARK: &str = ".tmp.";

impl StateDir {
    pub fn idle_history_file(&self) -> PathBuf {
        self.root.join("idle-history.json")
    }

    /// The adaptive idle policy's histories as last saved (empty when none were).
    pub fn load_idle_history(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::policy::IdleHistory>, StateError> {
        let path = self.idle_history_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save_idle_history(
        &self,
        histories: &std::collections::BTreeMap<String, crate::policy::IdleHistory>,
    ) -> Result<(), StateError> {
        let path = self.idle_history_file();
        let bytes = serde_json::to_vec(histories).expect("histories serialize");
        write_atomic(&path, &bytes).map_err(|source| StateError::Write { path, source })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file:
/// temp file in the same directory, fsync, rename, fsync the directory. On error the
/// temp file is removed and `path` is unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_temp(path, bytes, true)
}

/// [`write_atomic`] without the fsyncs: never half-written (temp file + rename), but not
/// durable across a power loss. For files that only matter during this boot, such as pid
/// files (a power loss ends the processes they name too): the two fsyncs cost
/// milliseconds on a busy disk, on the path of every cold start.
pub fn write_replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_temp(path, bytes, false)
}

fn write_via_temp(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}{TEMP_MARK}{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if durable {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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
        write_replace(&p, b"three").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn spec(name: &str) -> FunctionSpec {
        let d: crate::api::deploy::FunctionDeployment =
            serde_json::from_value(serde_json::json!({"service": name, "envProcess": "x"}))
                .unwrap();
        d.into_spec(&crate::spec::Policy::default()).unwrap()
    }

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        // A directory where the temp file goes makes the rename fail after the write.
        let tmp = dir
            .path()
            .join(format!(".f.json.tmp.{}", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("x"), b"x").unwrap();
        assert!(write_atomic(&p, b"two").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        // A target that cannot be replaced fails the rename: the temp file goes too.
        let d = dir.path().join("d.json");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"x").unwrap();
        assert!(write_atomic(&d, b"two").is_err());
        let temps = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".d.json"))
            .count();
        assert_eq!(temps, 0);
    }

    #[test]
    fn staged_save_rolls_back_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path()).unwrap();
        // No file before: a rollback removes the new one.
        s.stage_functions(&[spec("a")]).unwrap().rollback().unwrap();
        assert!(!s.functions_file().exists());
        s.stage_functions(&[spec("a")]).unwrap().commit();
        let staged = s.stage_functions(&[spec("a"), spec("b")]).unwrap();
        assert_eq!(s.load_functions().unwrap().len(), 2);
        staged.rollback().unwrap();
        let names: Vec<String> = s
            .load_functions()
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["a"]);
        s.stage_functions(&[spec("b")]).unwrap().commit();
        assert_eq!(s.load_functions().unwrap()[0].name, "b");
        let left: Vec<_> = std::fs::read_dir(s.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["functions.json"], "{left:?}");
    }

    #[test]
    fn sweep_removes_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path()).unwrap();
        s.save_functions(&[spec("a")]).unwrap();
        std::fs::write(
            s.root().join(".functions.json.tmp.4242"),
            vec![0u8; 32 << 10],
        )
        .unwrap();
        std::fs::write(s.root().join(".functions.json.prev"), b"[]").unwrap();
        std::fs::create_dir(s.run_dir()).unwrap();
        std::fs::write(s.run_dir().join(".x.pid.tmp.7"), b"1").unwrap();
        std::fs::write(s.run_dir().join("x.pid"), b"1").unwrap();
        assert_eq!(s.sweep_temp_files(), 3);
        assert!(s.run_dir().join("x.pid").exists());
        assert_eq!(s.load_functions().unwrap().len(), 1);
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
