//! cgroup v2 for the tagger: finding (or privately mounting) the unified hierarchy, and
//! the fresh cgroup `synwake tag -- COMMAND` runs its command in.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::sys;

/// Where the tagger mounts a cgroup2 hierarchy when none is mounted (a hybrid or v1 host,
/// or the private mount namespace of `ip netns exec`, which remounts /sys).
pub const PRIVATE_CGROUP2_MOUNT: &str = "/run/synwake/cgroup2";
/// Names of the cgroups `synwake tag` creates: this prefix and the tagger's pid.
pub const TAG_CGROUP_PREFIX: &str = "synwake-tag-";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// A tag cgroup whose tagger is gone is swept only after this long.
const STALE_AFTER: Duration = Duration::from_secs(2);

/// Errors of finding, mounting, creating and removing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 hierarchy is mounted and mounting one at {path} failed (needs root)")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("creating cgroup {path} failed")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("moving a process into cgroup {path} failed")]
    Join {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The mount point of a cgroup2 hierarchy in this mount namespace, if any.
pub fn mounted_cgroup2() -> Option<PathBuf> {
    let mounts = fs::read_to_string(sys::PROC_SELF_MOUNTS).ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(code) = u8::from_str_radix(digits, 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The root of the cgroup2 hierarchy: the mounted one, else a private mount at
/// [`PRIVATE_CGROUP2_MOUNT`] (the same hierarchy; it stays mounted for the next run).
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    if let Some(path) = mounted_cgroup2() {
        return Ok(path);
    }
    let path = PathBuf::from(PRIVATE_CGROUP2_MOUNT);
    fs::create_dir_all(&path).map_err(|source| CgroupError::Mount {
        path: path.clone(),
        source,
    })?;
    sys::mount_cgroup2(&path).map_err(|source| CgroupError::Mount {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Checks that `path` is a directory of a cgroup2 filesystem.
pub fn check_cgroup2_dir(path: &Path) -> Result<(), CgroupError> {
    match sys::statfs_type(path) {
        Ok(magic) if magic == CGROUP2_SUPER_MAGIC && path.is_dir() => Ok(()),
        _ => Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
        }),
    }
}

/// A cgroup this process created; dropping it kills what still runs in it and removes it.
#[derive(Debug)]
pub struct TagCgroup {
    path: PathBuf,
}

impl TagCgroup {
    /// Creates `<root>/synwake-tag-<pid>` (after removing the empty leftovers of taggers
    /// that died with kill -9).
    pub fn create(root: &Path) -> Result<Self, CgroupError> {
        Self::create_named(root, &format!("{TAG_CGROUP_PREFIX}{}", std::process::id()))
    }

    /// Creates `<root>/<name>` (a single path component), removing stale tag cgroups first.
    pub fn create_named(root: &Path, name: &str) -> Result<Self, CgroupError> {
        check_cgroup2_dir(root)?;
        remove_stale(root);
        let path = root.join(name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::Create {
                path,
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a single path component"),
            });
        }
        match fs::create_dir(&path) {
            Ok(()) => {}
            // Our own pid: a leftover of an earlier process with the same pid.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path, source }),
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs` of this cgroup opened for writing: a forked child writes "0" to it to
    /// move itself in before exec (no allocation needed after fork).
    pub fn procs_file(&self) -> Result<fs::File, CgroupError> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .map_err(|source| CgroupError::Join {
                path: self.path.clone(),
                source,
            })
    }

    /// Pids of the processes in this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.path)
    }
}

fn read_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

impl Drop for TagCgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) takes the whole subtree; otherwise kill the listed pids.
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for pid in read_pids(&self.path) {
                // SAFETY: plain kill(2) of a pid listed in our own cgroup.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        // rmdir fails with EBUSY until the killed processes are reaped; bounded wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Removes `synwake-tag-<pid>` cgroups whose tagger is gone and that are empty.
fn remove_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TAG_CGROUP_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Young ones may belong to a tagger in another pid namespace that is setting up.
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < STALE_AFTER);
        if pid != std::process::id() && !young && !Path::new(&format!("/proc/{pid}")).exists() {
            // rmdir refuses a populated cgroup, so a live leftover stays as it is.
            let _ = fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\"), "/a\\");
    }
}
