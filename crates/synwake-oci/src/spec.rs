//! The OCI runtime spec (`config.json`) for one container, built from the image config and
//! the container spec.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

/// Why a runtime spec could not be built.
// Fields are named for what they hold; the variant docs and messages say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the container spec nor the image gives a command.
    #[error("no command: the image has no Entrypoint/Cmd and none was given")]
    NoCommand,
    /// The image's `User` names a user or group the rootfs does not define.
    #[error("user {user:?}: {reason}")]
    User { user: String, reason: String },
}

/// Everything that decides the contents of `config.json`.
pub struct SpecInput<'a> {
    /// The process' argv.
    pub args: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The image's `User`, resolved against the image rootfs.
    pub user: Option<&'a str>,
    /// The image rootfs (to look names up in `/etc/passwd` and `/etc/group`).
    pub image_rootfs: &'a Path,
    /// The container's (overlay) rootfs.
    pub rootfs: &'a Path,
    /// UTS hostname.
    pub hostname: &'a str,
    /// Path of the network namespace to join.
    pub netns_path: &'a str,
    /// `linux.cgroupsPath` (cgroupfs: `/synwake/<id>`).
    pub cgroups_path: &'a str,
    /// Memory limit in bytes (swap limited to the same, when accounted).
    pub memory_bytes: Option<u64>,
    /// CPU quota in cores.
    pub cpus: Option<f64>,
    /// Process limit.
    pub pids: Option<u64>,
    /// Host file bind-mounted read-only as `/etc/resolv.conf` (with outbound NAT).
    pub resolv_conf: Option<&'a Path>,
    /// Read-only bind mounts.
    pub mounts: &'a [crate::runtime::BindMount],
}

/// Capabilities a container process keeps (Docker's default set).
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Args from an explicit command, else Entrypoint + Cmd.
pub fn command(
    explicit: Option<&[String]>,
    entrypoint: &[String],
    cmd: &[String],
) -> Result<Vec<String>, SpecError> {
    let args: Vec<String> = match explicit {
        Some(c) => c.to_vec(),
        None => entrypoint.iter().chain(cmd).cloned().collect(),
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// Image env overlaid with the spec's env (spec wins), PATH defaulted.
pub fn environment(image_env: &[String], extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    merged.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    for kv in image_env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        merged.insert(k.to_string(), v.to_string());
    }
    for (k, v) in extra {
        merged.insert(k.clone(), v.clone());
    }
    merged
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Resolves `uid[:gid]` / `name[:group]` against the rootfs' passwd and group files.
pub fn resolve_user(user: Option<&str>, rootfs: &Path) -> Result<(u32, u32), SpecError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0));
    };
    let err = |reason: &str| SpecError::User {
        user: user.to_string(),
        reason: reason.to_string(),
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(rootfs, "etc/passwd");
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid =
                lookup(&passwd, |f| f.get(2) == Some(&u)).and_then(|f| f.get(3)?.parse().ok());
            (uid, gid.unwrap_or(0))
        }
        Err(_) => {
            let f = lookup(&passwd, |f| f.first() == Some(&u))
                .ok_or_else(|| err("not in /etc/passwd"))?;
            let uid = f
                .get(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| err("bad passwd line"))?;
            let gid = f.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
            (uid, gid)
        }
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = read_in_root(rootfs, "etc/group");
                lookup(&group, |f| f.first() == Some(&g))
                    .and_then(|f| f.get(2)?.parse().ok())
                    .ok_or_else(|| err("group not in /etc/group"))?
            }
        },
    };
    Ok((uid, gid))
}

/// At most this much of an image's passwd or group file is read.
const MAX_ACCOUNT_FILE: u64 = 1 << 20;

/// The file at `rel` inside `root`, with every symlink (absolute ones and `..` included)
/// resolved as if `root` were `/` (openat2 RESOLVE_IN_ROOT), as the container would see
/// it: an image can never make the daemon read a host file. Missing or unreadable: "".
fn read_in_root(root: &Path, rel: &str) -> String {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let open = || -> std::io::Result<std::fs::File> {
        let dir = std::fs::File::open(root)?;
        let path = std::ffi::CString::new(rel).map_err(std::io::Error::other)?;
        // SAFETY: open_how is plain data; zeroed is its documented default.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid dir fd, NUL-terminated path and an open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
        Ok(std::fs::File::from(unsafe {
            OwnedFd::from_raw_fd(fd as i32)
        }))
    };
    let mut text = String::new();
    if let Ok(file) = open() {
        if file.metadata().is_ok_and(|m| m.is_file()) {
            let _ = file.take(MAX_ACCOUNT_FILE).read_to_string(&mut text);
        }
    }
    text
}

fn lookup<'a>(file: &'a str, pred: impl Fn(&Vec<&'a str>) -> bool) -> Option<Vec<&'a str>> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| pred(f))
}

/// The runtime spec document.
pub fn build(i: &SpecInput) -> Result<Value, SpecError> {
    let (uid, gid) = resolve_user(i.user, i.image_rootfs)?;
    let mut resources = json!({
        "devices": [{ "allow": false, "access": "rwm" }],
    });
    if let Some(limit) = i.memory_bytes {
        let mut mem = json!({ "limit": limit });
        // Without swap accounting runc refuses a swap limit; with it, limit+swap == limit
        // means no swap, so the limit is a real OOM boundary.
        if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
            mem["swap"] = json!(limit);
        }
        resources["memory"] = mem;
    }
    if let Some(cpus) = i.cpus.filter(|c| *c > 0.0) {
        let period: u64 = 100_000;
        resources["cpu"] = json!({ "quota": (cpus * period as f64) as i64, "period": period });
    }
    if let Some(pids) = i.pids {
        resources["pids"] = json!({ "limit": pids });
    }
    let mut doc = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": i.args,
            "env": i.env,
            "cwd": i.cwd,
            "capabilities": {
                "bounding": CAPS, "effective": CAPS, "permitted": CAPS,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": i.rootfs, "readonly": false },
        "hostname": i.hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }
        ],
        "linux": {
            "cgroupsPath": i.cgroups_path,
            "resources": resources,
            "namespaces": [
                { "type": "pid" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
                { "type": "network", "path": i.netns_path }
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    });
    if let (Some(resolv), Some(mounts)) = (i.resolv_conf, doc["mounts"].as_array_mut()) {
        mounts.push(json!({
            "destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]
        }));
    }
    if let Some(mounts) = doc["mounts"].as_array_mut() {
        for m in i.mounts {
            mounts.push(json!({
                "destination": m.destination, "type": "bind", "source": m.source,
                "options": ["rbind", "ro", "nosuid", "nodev"]
            }));
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_prefers_explicit_then_entrypoint_cmd() {
        let ep = vec!["/bin/sh".to_string(), "-c".to_string()];
        let cmd = vec!["echo hi".to_string()];
        assert_eq!(
            command(None, &ep, &cmd).unwrap(),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(
            command(Some(&["/x".to_string()]), &ep, &cmd).unwrap(),
            vec!["/x"]
        );
        assert!(matches!(command(None, &[], &[]), Err(SpecError::NoCommand)));
    }

    #[test]
    fn env_spec_overrides_image() {
        let mut extra = BTreeMap::new();
        extra.insert("A".to_string(), "2".to_string());
        let env = environment(&["A=1".into(), "B=x=y".into()], &extra);
        assert!(env.contains(&"A=2".to_string()));
        assert!(env.contains(&"B=x=y".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
    }

    #[test]
    fn user_resolves_names_from_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:33:34::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nwww:x:34:\nstaff:x:50:\n",
        )
        .unwrap();
        assert_eq!(resolve_user(Some("web"), dir.path()).unwrap(), (33, 34));
        assert_eq!(
            resolve_user(Some("web:staff"), dir.path()).unwrap(),
            (33, 50)
        );
        assert_eq!(resolve_user(Some("1000:7"), dir.path()).unwrap(), (1000, 7));
        assert_eq!(resolve_user(None, dir.path()).unwrap(), (0, 0));
        assert!(resolve_user(Some("nobody"), dir.path()).is_err());
    }

    #[test]
    fn user_lookup_never_leaves_the_rootfs() {
        // Host files an image's absolute symlinks point at.
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("passwd"), "evil:x:4242:4243::/:/bin/sh\n").unwrap();
        std::fs::write(host.path().join("group"), "evilgrp:x:4244:\n").unwrap();
        // etc/passwd -> /<host>/passwd (absolute), etc/group likewise.
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(host.path().join("passwd"), a.path().join("etc/passwd"))
            .unwrap();
        std::os::unix::fs::symlink(host.path().join("group"), a.path().join("etc/group")).unwrap();
        assert!(
            resolve_user(Some("evil"), a.path()).is_err(),
            "read the host's file through an absolute symlink"
        );
        assert!(resolve_user(Some("0:evilgrp"), a.path()).is_err());
        // etc -> /<host> (an absolute symlinked directory), and ../ escapes.
        let b = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(host.path(), b.path().join("etc")).unwrap();
        assert!(resolve_user(Some("evil"), b.path()).is_err());
        let c = tempfile::tempdir().unwrap();
        std::fs::create_dir(c.path().join("etc")).unwrap();
        let up = format!(
            "../../../../../../..{}",
            host.path().join("passwd").display()
        );
        std::os::unix::fs::symlink(up, c.path().join("etc/passwd")).unwrap();
        assert!(resolve_user(Some("evil"), c.path()).is_err());
        // Absolute symlinks resolve inside the rootfs, as they would in the container.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        std::fs::write(d.path().join("usr/lib/passwd"), "app:x:77:78::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/usr/lib/passwd", d.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve_user(Some("app"), d.path()).unwrap(), (77, 78));
    }
}
