//! Secrets as OpenFaaS has them: named values kept in `<state_dir>/secrets/<name>` (mode
//! 0600, directory 0700), managed through `/system/secrets`, and given to functions as
//! files: read-only at `/var/openfaas/secrets/<name>` in containers, in a private
//! directory named by `$SYNWAKE_SECRETS_DIR` for process functions.

use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where containers find their secrets (OpenFaaS's path).
pub const CONTAINER_DIR: &str = "/var/openfaas/secrets";
/// Largest secret value accepted.
pub const MAX_VALUE: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?} is invalid: 1 to 253 of a-z, A-Z, 0-9, '.', '-', '_', not starting with '.'")]
    BadName(String),
    #[error("secret {0:?} does not exist")]
    Missing(String),
    #[error("secret {0:?} already exists (update it with PUT)")]
    Exists(String),
    #[error("secret {name:?}: value is {len} bytes, more than {MAX_VALUE}")]
    TooLarge { name: String, len: usize },
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The secrets directory of one state dir.
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

pub fn check_name(name: &str) -> Result<(), SecretError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName(name.chars().take(80).collect()))
    }
}

impl SecretStore {
    pub fn new(dir: PathBuf) -> Self {
        SecretStore { dir }
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> SecretError {
        let path = path.to_path_buf();
        move |source| SecretError::Io {
            path: path.clone(),
            source,
        }
    }

    fn ensure_dir(&self) -> Result<(), SecretError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(self.io(&self.dir))
    }

    /// Names, sorted.
    pub fn list(&self) -> Result<Vec<String>, SecretError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn exists(&self, name: &str) -> bool {
        check_name(name).is_ok() && self.dir.join(name).is_file()
    }

    /// Creates (`create`) or replaces (`!create`) a secret, written whole or not at all.
    pub fn put(&self, name: &str, value: &[u8], create: bool) -> Result<(), SecretError> {
        check_name(name)?;
        if value.len() > MAX_VALUE {
            return Err(SecretError::TooLarge {
                name: name.into(),
                len: value.len(),
            });
        }
        match (create, self.exists(name)) {
            (true, true) => return Err(SecretError::Exists(name.into())),
            (false, false) => return Err(SecretError::Missing(name.into())),
            _ => {}
        }
        self.ensure_dir()?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let write = || -> io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            io::Write::write_all(&mut f, value)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(&path)(e)
        })
    }

    pub fn delete(&self, name: &str) -> Result<(), SecretError> {
        check_name(name)?;
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SecretError::Missing(name.into())),
            Err(e) => Err(self.io(&path)(e)),
        }
    }

    /// The first of `names` that does not exist.
    pub fn first_missing<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names.iter().find(|n| !self.exists(n)).map(String::as_str)
    }

    /// Copies `names` into `dest` (a directory only root can enter, mode 0700, recreated),
    /// each file with `mode`; returns `(name, path)` pairs.
    pub fn materialize(
        &self,
        names: &[String],
        dest: &Path,
        mode: u32,
    ) -> Result<Vec<(String, PathBuf)>, SecretError> {
        let io_dest = self.io(dest);
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest).map_err(&io_dest)?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700)).map_err(&io_dest)?;
        let mut out = Vec::new();
        for n in names {
            check_name(n)?;
            let value = std::fs::read(self.dir.join(n)).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => SecretError::Missing(n.clone()),
                _ => self.io(&self.dir.join(n))(e),
            })?;
            let p = dest.join(n);
            std::fs::write(&p, value).map_err(self.io(&p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(self.io(&p))?;
            out.push((n.clone(), p));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn put_update_delete_with_modes_and_names_checked() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        s.put("db-password", b"s3cret", true).unwrap();
        assert!(matches!(
            s.put("db-password", b"x", true),
            Err(SecretError::Exists(_))
        ));
        assert!(matches!(
            s.put("nope", b"x", false),
            Err(SecretError::Missing(_))
        ));
        s.put("db-password", b"new", false).unwrap();
        let m = std::fs::metadata(d.path().join("secrets/db-password")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        let dm = std::fs::metadata(d.path().join("secrets")).unwrap();
        assert_eq!(dm.mode() & 0o777, 0o700);
        assert_eq!(s.list().unwrap(), vec!["db-password"]);
        for bad in ["", "../x", ".hidden", "a/b", "x y"] {
            assert!(
                matches!(s.put(bad, b"v", true), Err(SecretError::BadName(_))),
                "{bad}"
            );
        }
        let out = s
            .materialize(&["db-password".into()], &d.path().join("fn"), 0o400)
            .unwrap();
        assert_eq!(std::fs::read(&out[0].1).unwrap(), b"new");
        s.delete("db-password").unwrap();
        assert!(matches!(
            s.delete("db-password"),
            Err(SecretError::Missing(_))
        ));
        assert_eq!(
            s.first_missing(&["db-password".into()]),
            Some("db-password")
        );
    }
}
