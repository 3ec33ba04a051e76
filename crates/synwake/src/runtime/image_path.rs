//! Local image paths (archives, rootfs directories) are read only from `[oci] image_dirs`:
//! a deploy naming `/etc/shadow` or `../../etc/shadow` must not make root read it.
//!
//! The path is checked twice: lexically (`..` resolved without touching the disk, so a
//! path outside says nothing about whether it exists) and after `canonicalize` (every
//! symlink resolved), each against the directories' own canonical paths.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImagePathError {
    #[error("{path:?} is outside the image directories ([oci] image_dirs: {}); put the archive in one of them", fmt_dirs(.dirs))]
    Outside { path: String, dirs: Vec<PathBuf> },
    #[error("{path:?} resolves (through a symlink) to a place outside the image directories ([oci] image_dirs: {})", fmt_dirs(.dirs))]
    EscapesBySymlink { path: String, dirs: Vec<PathBuf> },
    #[error("{path:?} cannot be opened: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path:?} is not a {want}")]
    WrongKind { path: String, want: &'static str },
}

fn fmt_dirs(dirs: &[PathBuf]) -> String {
    let v: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    v.join(", ")
}

/// What the path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An image archive (a regular file).
    Archive,
    /// An unpacked root filesystem (a directory).
    Rootfs,
}

/// Returns the canonical form of `path` when it lies inside one of `dirs`, else why not.
/// Relative paths are taken from synwake's working directory, as before.
pub fn check(path: &str, dirs: &[PathBuf], kind: Kind) -> Result<PathBuf, ImagePathError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let lexical = normalize(&cwd.join(path));
    // Directories as written and as resolved (a configured dir may itself be a symlink).
    let resolved_dirs: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| {
            let n = normalize(d);
            let c = std::fs::canonicalize(d).ok();
            std::iter::once(n).chain(c)
        })
        .collect();
    let inside = |p: &Path| resolved_dirs.iter().any(|d| p.starts_with(d) && p != d);
    if !inside(&lexical) {
        return Err(ImagePathError::Outside {
            path: path.to_string(),
            dirs: dirs.to_vec(),
        });
    }
    let real = std::fs::canonicalize(&lexical).map_err(|source| ImagePathError::Unreadable {
        path: path.to_string(),
        source,
    })?;
    let canonical_dirs: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    if !canonical_dirs
        .iter()
        .any(|d| real.starts_with(d) && &real != d)
    {
        return Err(ImagePathError::EscapesBySymlink {
            path: path.to_string(),
            dirs: dirs.to_vec(),
        });
    }
    let meta = std::fs::metadata(&real).map_err(|source| ImagePathError::Unreadable {
        path: path.to_string(),
        source,
    })?;
    match kind {
        Kind::Archive if !meta.is_file() => Err(ImagePathError::WrongKind {
            path: path.to_string(),
            want: "regular file (an image archive)",
        }),
        Kind::Rootfs if !meta.is_dir() => Err(ImagePathError::WrongKind {
            path: path.to_string(),
            want: "directory (a root filesystem)",
        }),
        _ => Ok(real),
    }
}

/// `.` and `..` removed without looking at the disk (`..` above `/` stays at `/`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_outside_and_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("ok.tar"), b"x").unwrap();
        std::fs::create_dir(images.join("rootfs")).unwrap();
        std::fs::write(root.path().join("secret"), b"root:hash").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), images.join("link.tar")).unwrap();
        let dirs = [images.clone()];
        let ok = images.join("ok.tar").display().to_string();
        assert_eq!(
            check(&ok, &dirs, Kind::Archive).unwrap(),
            images.canonicalize().unwrap().join("ok.tar")
        );
        let r = images.join("rootfs").display().to_string();
        assert!(check(&r, &dirs, Kind::Rootfs).is_ok());
        assert!(matches!(
            check(&r, &dirs, Kind::Archive),
            Err(ImagePathError::WrongKind { .. })
        ));
        for outside in [
            "/etc/shadow".to_string(),
            "../../../../etc/shadow".to_string(),
            format!("{}/../secret", images.display()),
            images.display().to_string(),
        ] {
            let e = check(&outside, &dirs, Kind::Archive).unwrap_err();
            assert!(
                matches!(e, ImagePathError::Outside { .. }),
                "{outside}: {e}"
            );
            assert!(e.to_string().contains("[oci] image_dirs"), "{e}");
        }
        let link = images.join("link.tar").display().to_string();
        let e = check(&link, &dirs, Kind::Archive).unwrap_err();
        assert!(matches!(e, ImagePathError::EscapesBySymlink { .. }), "{e}");
        assert!(!e.to_string().contains("root:hash"));
        let missing = images.join("missing.tar").display().to_string();
        assert!(matches!(
            check(&missing, &dirs, Kind::Archive),
            Err(ImagePathError::Unreadable { .. })
        ));
    }

    #[test]
    fn lexical_normalization() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(normalize(Path::new("/../../etc")), PathBuf::from("/etc"));
    }
}
