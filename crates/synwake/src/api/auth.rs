//! The management API's credential: basic auth as user `admin`, always on.
//!
//! The password comes from `gateway.api_password_file`, or, when that is not set, from
//! `<state_dir>/api-password`, generated at first start (random, mode 0600, owned by the
//! daemon's user). Either file is refused when it is empty, not a regular file, open to
//! group or others, or owned by another user: a password others can read or replace is
//! no protection.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use http::HeaderValue;

/// The one API user, as in OpenFaaS.
pub const USER: &str = "admin";

/// Name of the generated password file inside the state dir.
pub const GENERATED_FILE: &str = "api-password";

/// Longest password file accepted (a password, not a document).
const MAX_LEN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the API password file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the API password file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API password file {path} is empty; put a password in it")]
    Empty { path: PathBuf },
    #[error("the API password file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("the API password file {path} is longer than {MAX_LEN} bytes")]
    TooLong { path: PathBuf },
    #[error(
        "the API password file {path} is open to group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(
        "the API password file {path} is owned by uid {owner}, not by synwake's user (uid {euid}) or root"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
}

/// The API password; compares in constant time.
#[derive(Clone)]
pub struct Credential {
    expected: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

impl Credential {
    pub fn new(password: &str) -> Self {
        Credential {
            expected: format!("{USER}:{password}").into_bytes(),
        }
    }

    /// Whether an `Authorization` header carries this credential.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| decode_base64(b.trim()))
            .is_some_and(|cred| constant_time_eq(&cred, &self.expected))
    }
}

/// Where the password lives: the configured file or the generated one.
pub fn password_path(configured: Option<&Path>, state_root: &Path) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .unwrap_or_else(|| state_root.join(GENERATED_FILE))
}

/// What [`load_or_generate`] found.
pub struct Loaded {
    pub credential: Credential,
    pub path: PathBuf,
    /// The new password, when this start generated it (shown once).
    pub generated: Option<String>,
}

/// Reads the configured password file, or the generated one, generating it when absent.
pub fn load_or_generate(configured: Option<&Path>, state_root: &Path) -> Result<Loaded, AuthError> {
    let path = password_path(configured, state_root);
    let absent = matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if configured.is_none() && absent {
        let password = generate_password(&path)?;
        return Ok(Loaded {
            credential: Credential::new(&password),
            path,
            generated: Some(password),
        });
    }
    let password = read_password_file(&path)?;
    Ok(Loaded {
        credential: Credential::new(&password),
        path,
        generated: None,
    })
}

/// Reads and checks a password file (see the module docs for what is refused).
pub fn read_password_file(path: &Path) -> Result<String, AuthError> {
    let read_err = |source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    // Checked on the opened file, so a swap between check and read cannot pass.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(AuthError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(AuthError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    if meta.len() > MAX_LEN {
        return Err(AuthError::TooLong {
            path: path.to_path_buf(),
        });
    }
    let mut text = String::new();
    file.take(MAX_LEN + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    let password = text.trim();
    if password.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(password.to_string())
}

/// Writes a fresh random password to `path`: 0600 from creation, fsynced, renamed into
/// place, so a crash leaves either no file or the whole one.
fn generate_password(path: &Path) -> Result<String, AuthError> {
    let write_err = |source| AuthError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{GENERATED_FILE}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{password}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(password)
}

/// `Basic <base64(admin:password)>`, for clients.
pub fn basic_header(password: &str) -> String {
    format!(
        "Basic {}",
        encode_base64(format!("{USER}:{password}").as_bytes())
    )
}

fn encode_base64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn base64_round_trip() {
        assert_eq!(encode_base64(b"admin:secret"), "YWRtaW46c2VjcmV0");
        assert_eq!(encode_base64(b"a"), "YQ==");
        assert_eq!(encode_base64(b"ab"), "YWI=");
        assert_eq!(decode_base64("YWRtaW46c2VjcmV0").unwrap(), b"admin:secret");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert!(decode_base64("!!").is_none());
    }

    #[test]
    fn credential_checks_user_and_password() {
        let c = Credential::new("s3cret");
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(c.accepts(Some(&h(&basic_header("s3cret")))));
        assert!(!c.accepts(Some(&h(&basic_header("s3cre")))));
        assert!(!c.accepts(Some(&h(&format!(
            "Basic {}",
            encode_base64(b"root:s3cret")
        )))));
        assert!(!c.accepts(Some(&h(&basic_header("")))));
        assert!(!c.accepts(None));
    }

    #[test]
    fn generates_once_private_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(None, dir.path()).unwrap();
        let password = first.generated.clone().expect("generated on first start");
        assert_eq!(password.len(), 48);
        let meta = std::fs::metadata(dir.path().join(GENERATED_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let second = load_or_generate(None, dir.path()).unwrap();
        assert!(second.generated.is_none(), "generated only once");
        assert_eq!(read_password_file(&second.path).unwrap(), password);
        // Only the file itself is left (no temp file).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_empty_open_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, " \n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_password_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("empty") && e.contains(&p.display().to_string()),
            "{e}"
        );
        std::fs::write(&p, "pw\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_password_file(&p).unwrap_err().to_string();
            assert!(
                e.contains("chmod 600") && e.contains(&p.display().to_string()),
                "{e}"
            );
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_password_file(&p).unwrap(), "pw");
        // A configured file is never generated.
        let missing = dir.path().join("missing");
        assert!(load_or_generate(Some(&missing), dir.path()).is_err());
        assert!(!missing.exists());
    }
}
