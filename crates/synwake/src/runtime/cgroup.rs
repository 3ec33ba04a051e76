//! Cgroups for process instances: each instance runs in a cgroup of its own, below the
//! daemon's own cgroup, so a stop kills everything it started (also what left its process
//! group) and `memory`/`cpus`/`pids` are enforced. The cgroup2 hierarchy is used where it
//! is mounted (membership, `cgroup.kill`, and the controllers it has); a controller only a
//! v1 hierarchy has (a hybrid host) comes from that hierarchy; a v1-only host uses the
//! freezer hierarchy for membership.
//!
//! Layout: `<hierarchy>/<daemon's cgroup>/synwake-<tag>/<function>.<instance>`, `<tag>`
//! derived from the run directory, so daemons with different state dirs never touch each
//! other's instances and a restart on the same state dir finds what a crash left.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// An empty instance cgroup this old has no owner using it (see [`CgroupHost::sweep_stale`]).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// The leaf a daemon in a non-root cgroup2 cgroup moves itself into: cgroup2 lets only a
/// cgroup without processes hand controllers down (the no-internal-processes rule).
pub const DAEMON_LEAF: &str = "daemon";

/// The daemon's cgroup2 path (as /proc shows it) before it moved into [`DAEMON_LEAF`];
/// once per process, so every runtime after the first places instances the same way.
static MOVED_FROM: OnceLock<Option<String>> = OnceLock::new();

/// Controllers a process function's limits need.
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Errors of setting up an instance's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("process instances cannot get cgroups here ({why}), so `{key}` cannot be enforced")]
    Unavailable { key: &'static str, why: String },
    #[error("no cgroup hierarchy has the {controller} controller, so `{key}` cannot be enforced")]
    NoController {
        controller: &'static str,
        key: &'static str,
    },
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The limits a process function asked for (`memory`, `cpus`, `pids`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

/// One cgroup directory and the hierarchy version it is in.
#[derive(Debug, Clone, PartialEq)]
struct Dir {
    path: PathBuf,
    v2: bool,
}

/// The hierarchies this daemon places instances in, found once at start.
#[derive(Debug)]
pub struct CgroupHost {
    /// `synwake-<tag>`: the directory every instance cgroup of this daemon sits in.
    group: String,
    /// The daemon's own cgroup in the membership hierarchy (v2 if mounted, else v1 freezer).
    membership: Option<Dir>,
    /// `/proc/<pid>/cgroup` path prefix (v2) of this daemon's instance cgroups.
    v2_prefix: Option<String>,
    /// Limit controller -> the daemon's own cgroup in the hierarchy that provides it.
    controllers: BTreeMap<&'static str, Dir>,
    /// Mount points of every cgroup hierarchy (to check paths read back from pid files).
    mounts: Vec<PathBuf>,
    /// Why instances run without cgroups, if they do.
    unavailable: Option<String>,
    /// cgroup2 controllers beyond the limit ones handed down to instances (all the
    /// delegated cgroup offers, once the daemon moved into its leaf).
    extra_v2: Vec<String>,
}

/// A cgroup hierarchy as /proc/self/mountinfo shows it.
#[derive(Debug, PartialEq)]
struct Mount {
    /// The hierarchy's path that is mounted (`/` unless in a cgroup namespace or bind).
    root: String,
    point: PathBuf,
    /// v1 controllers (`memory`, `cpu`, ...); empty for v2.
    controllers: Vec<String>,
    v2: bool,
}

/// cgroup mounts from mountinfo text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let super_opts = post.next().unwrap_or("");
            let (root, point) = (pre.get(3)?, pre.get(4)?);
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if v2 {
                Vec::new()
            } else {
                super_opts
                    .split(',')
                    .filter(|o| !o.contains('=') && !matches!(*o, "rw" | "ro"))
                    .map(str::to_string)
                    .collect()
            };
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                controllers,
                v2,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(c) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// /proc/self/cgroup: (v1 controllers, path) per line; v2's line has no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_id, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` (as /proc shows it) under `mount`, if the mount holds it.
fn dir_in(mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest
    };
    Some(mount.point.join(rel.trim_start_matches('/')))
}

/// The `synwake-<tag>` name of a daemon whose run directory is `run_dir`.
pub fn group_name(run_dir: &Path) -> String {
    let abs = std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    format!(
        "synwake-{:08x}",
        crate::spec::function_id(&abs.to_string_lossy())
    )
}

impl CgroupHost {
    /// Finds the hierarchies of this host and the daemon's place in them (changes nothing
    /// but the controllers the daemon's own cgroup hands down: for `synwake doctor`).
    pub fn detect(run_dir: &Path) -> CgroupHost {
        Self::detect_with(run_dir, false)
    }

    /// [`CgroupHost::detect`] for the daemon: in a non-root cgroup2 cgroup (a systemd
    /// service with `Delegate=yes`) it first moves itself into `<own>/daemon` and enables
    /// every controller `<own>` offers, so instances below `<own>` can get limits.
    pub fn detect_for_daemon(run_dir: &Path) -> CgroupHost {
        Self::detect_with(run_dir, true)
    }

    fn detect_with(run_dir: &Path, settle: bool) -> CgroupHost {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default();
        let mut own = std::fs::read_to_string("/proc/self/cgroup")
            .map(|t| parse_proc_cgroup(&t))
            .unwrap_or_default();
        let v2_mount = mounts.iter().find(|m| m.v2);
        let mut delegated = None;
        if let (true, Some(m), Some(entry)) =
            (settle, v2_mount, own.iter_mut().find(|(c, _)| c.is_empty()))
        {
            let current = entry.1.clone();
            if let Some(from) = MOVED_FROM.get_or_init(|| move_into_leaf(m, &current)) {
                entry.1 = from.clone();
                delegated = dir_in(m, from);
            }
        }
        let mut host = Self::from_parts(group_name(run_dir), &mounts, &own, &|dir, c| {
            std::fs::read_to_string(dir.join("cgroup.controllers"))
                .is_ok_and(|a| a.split_whitespace().any(|x| x == c))
                && enable_controller(dir, c).is_ok()
        });
        if let (Some(m), None) = (&host.membership, &host.unavailable) {
            // Writable? (a daemon that is not root, a read-only /sys). Made again on use.
            let probe = m.path.join(&host.group);
            match std::fs::create_dir(&probe) {
                Ok(()) => {
                    let _ = std::fs::remove_dir(&probe);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => host.unavailable = Some(io_err(&probe)(e).to_string()),
            }
        }
        if let Some(dir) = delegated {
            host.extra_v2 = read_words(&dir.join("cgroup.subtree_control"))
                .into_iter()
                .filter(|c| !LIMIT_CONTROLLERS.contains(&c.as_str()))
                .collect();
        }
        host
    }

    /// The placement `detect` makes; `usable_v2(dir, controller)` says whether the v2
    /// cgroup `dir` can hand `controller` down (and does so).
    fn from_parts(
        group: String,
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
        usable_v2: &dyn Fn(&Path, &str) -> bool,
    ) -> CgroupHost {
        let mut host = CgroupHost {
            group,
            membership: None,
            v2_prefix: None,
            controllers: BTreeMap::new(),
            mounts: mounts.iter().map(|m| m.point.clone()).collect(),
            unavailable: None,
            extra_v2: Vec::new(),
        };
        let v2_path = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p);
        let v2 = mounts
            .iter()
            .find(|m| m.v2)
            .and_then(|m| Some((dir_in(m, v2_path?)?, v2_path?)));
        let v1_dir = |controller: &str| {
            let path = own
                .iter()
                .find(|(c, _)| c.iter().any(|x| x == controller))?;
            let m = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
            dir_in(m, &path.1)
        };
        if let Some((dir, rel)) = &v2 {
            host.membership = Some(Dir {
                path: dir.clone(),
                v2: true,
            });
            host.v2_prefix = Some(format!("{}/{}/", rel.trim_end_matches('/'), host.group));
            // A controller is used in v2 if the daemon's cgroup has it and may hand it down.
            for c in LIMIT_CONTROLLERS {
                if usable_v2(dir, c) {
                    host.controllers.insert(
                        c,
                        Dir {
                            path: dir.clone(),
                            v2: true,
                        },
                    );
                }
            }
        } else if let Some(dir) = v1_dir("freezer") {
            host.membership = Some(Dir {
                path: dir,
                v2: false,
            });
        }
        for c in LIMIT_CONTROLLERS {
            if !host.controllers.contains_key(c) {
                if let Some(path) = v1_dir(c) {
                    host.controllers.insert(c, Dir { path, v2: false });
                }
            }
        }
        if host.membership.is_none() {
            host.unavailable = Some("no cgroup2 or v1 freezer hierarchy".into());
        }
        host
    }

    /// One line for `synwake doctor`: where membership and each limit controller live.
    pub fn describe(&self) -> String {
        if let Some(why) = &self.unavailable {
            return format!("no: {why}");
        }
        let v = |v2: bool| if v2 { "cgroup2" } else { "v1" };
        let mut parts = vec![format!(
            "membership in {}",
            self.membership.as_ref().map_or("?", |m| v(m.v2))
        )];
        for c in LIMIT_CONTROLLERS {
            parts.push(match self.controllers.get(c) {
                Some(d) => format!("{c} from {}", v(d.v2)),
                None => format!("{c} missing"),
            });
        }
        parts.join(", ")
    }

    /// What a process start still joins with a write to `cgroup.procs` (a migration: an
    /// RCU grace period without `favordynmods`): the v1 freezer membership, and the config
    /// keys whose controllers are v1. A cgroup2 cgroup is entered at the fork instead.
    pub fn joined_by_write(&self) -> Vec<&'static str> {
        if self.unavailable.is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.membership.as_ref().is_some_and(|m| !m.v2) {
            out.push("every start (v1 freezer)");
        }
        for (controller, key) in [("memory", "memory"), ("cpu", "cpus"), ("pids", "pids")] {
            if self.controllers.get(controller).is_some_and(|d| !d.v2) {
                out.push(key);
            }
        }
        out
    }

    /// Why instances run without cgroups (stop then kills the process group only).
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// `/proc/<pid>/cgroup` v2 path prefix of this daemon's instances (for the reaper).
    pub fn v2_prefix(&self) -> Option<&str> {
        self.v2_prefix
            .as_deref()
            .filter(|_| self.unavailable.is_none())
    }

    /// `<own>/synwake-<tag>` in the hierarchy of `own`, created (with v2 controllers
    /// handed down) if missing.
    fn group_dir(&self, own: &Dir) -> Result<Dir, CgroupError> {
        let path = own.path.join(&self.group);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        if own.v2 {
            for (c, d) in &self.controllers {
                if d.v2 {
                    enable_controller(&path, c).map_err(io_err(&path))?;
                }
            }
            for c in &self.extra_v2 {
                enable_controller(&path, c).map_err(io_err(&path))?;
            }
        }
        Ok(Dir { path, v2: own.v2 })
    }

    /// Whether `limits` can be enforced here (checked at deploy).
    pub fn check(&self, limits: &Limits) -> Result<(), CgroupError> {
        let needed = needed(limits);
        if let (Some((_, key)), Some(why)) = (needed.first(), &self.unavailable) {
            return Err(CgroupError::Unavailable {
                key,
                why: why.clone(),
            });
        }
        for (controller, key) in needed {
            if !self.controllers.contains_key(controller) {
                return Err(CgroupError::NoController { controller, key });
            }
        }
        Ok(())
    }

    /// Creates the cgroup(s) of one instance with `limits` written.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<InstanceCgroup, CgroupError> {
        let needed = needed(limits);
        let membership = match (&self.membership, &self.unavailable) {
            (Some(m), None) => m,
            (_, why) => {
                return Err(CgroupError::Unavailable {
                    key: needed.first().map(|(_, k)| *k).unwrap_or("cgroup"),
                    why: why.clone().unwrap_or_default(),
                })
            }
        };
        let mut cg = InstanceCgroup {
            dirs: Vec::new(),
            memory: None,
        };
        let place = |own: &Dir, cg: &mut InstanceCgroup| -> Result<Dir, CgroupError> {
            let parent = self.group_dir(own)?;
            let dir = Dir {
                path: parent.path.join(name),
                v2: parent.v2,
            };
            if let Some(d) = cg.dirs.iter().find(|d| d.path == dir.path) {
                return Ok(d.clone());
            }
            let mut made = std::fs::create_dir(&dir.path);
            if made
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
            {
                // Another daemon's sweep removed the (then empty) group dir: once more.
                self.group_dir(own)?;
                made = std::fs::create_dir(&dir.path);
            }
            match made {
                Ok(()) => {}
                // A leftover of the same instance number (a crash): reuse it, emptied.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = InstanceCgroup {
                        dirs: vec![dir.clone()],
                        memory: None,
                    };
                    stale.kill();
                }
                Err(e) => return Err(io_err(&dir.path)(e)),
            }
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        let result = (|| {
            place(membership, &mut cg)?;
            for (controller, key) in &needed {
                let own = self
                    .controllers
                    .get(controller)
                    .ok_or(CgroupError::NoController { controller, key })?;
                let dir = place(own, &mut cg)?;
                write_limit(&dir, controller, limits)?;
                if *controller == "memory" {
                    cg.memory = Some(dir);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove_now();
                Err(e)
            }
        }
    }

    /// Cgroup directories of instances a crashed earlier run left (this daemon's group
    /// dirs, and those named in pid files: `extra`, checked to be ours).
    pub fn leftovers(&self, extra: &[PathBuf]) -> Vec<InstanceCgroup> {
        let mut out: Vec<InstanceCgroup> = Vec::new();
        let mut seen = HashSet::new();
        let mut owns: Vec<&Dir> = self.membership.iter().collect();
        owns.extend(self.controllers.values());
        for own in owns {
            let group = own.path.join(&self.group);
            for e in std::fs::read_dir(&group).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) && seen.insert(e.path()) {
                    out.push(InstanceCgroup::at(e.path(), own.v2));
                }
            }
        }
        for p in extra {
            let ours = p.parent().and_then(|g| g.file_name()) == Some(self.group.as_ref())
                && self.mounts.iter().any(|m| p.starts_with(m))
                && !p.components().any(|c| c == std::path::Component::ParentDir);
            if ours && p.is_dir() && seen.insert(p.clone()) {
                let v2 = p.join("cgroup.kill").exists() || p.join("cgroup.events").exists();
                out.push(InstanceCgroup::at(p.clone(), v2));
            }
        }
        out
    }

    /// Removes empty instance cgroups (and then empty group dirs) of any synwake below
    /// this daemon's own cgroups that are older than [`STALE_AFTER`]: what daemons killed
    /// with -9 and never restarted on their state dir left. A live instance's cgroup is
    /// never empty for that long, so nothing in use is touched; nothing is killed.
    pub fn sweep_stale(&self) -> usize {
        self.sweep_older_than(STALE_AFTER)
    }

    fn sweep_older_than(&self, age: Duration) -> usize {
        let mut removed = 0;
        let mut owns: Vec<&Dir> = self.membership.iter().collect();
        owns.extend(self.controllers.values());
        let old = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() >= age)
        };
        for own in owns {
            for group in std::fs::read_dir(&own.path).into_iter().flatten().flatten() {
                let gpath = group.path();
                let ours = group
                    .file_name()
                    .to_str()
                    // Not the tagger's cgroups (`synwake-tag-*`), which hold processes.
                    .is_some_and(|n| n.starts_with("synwake-") && !n.starts_with("synwake-tag-"));
                if !ours || !gpath.is_dir() {
                    continue;
                }
                for inst in std::fs::read_dir(&gpath).into_iter().flatten().flatten() {
                    let ipath = inst.path();
                    if ipath.is_dir()
                        && read_pids(&ipath).is_empty()
                        && old(&ipath)
                        && std::fs::remove_dir(&ipath).is_ok()
                    {
                        removed += 1;
                    }
                }
                if old(&gpath) {
                    // Fails (ENOTEMPTY/EBUSY) while it still holds an instance cgroup.
                    let _ = std::fs::remove_dir(&gpath);
                }
            }
        }
        removed
    }

    /// Removes this daemon's (empty) group directories.
    pub fn remove_group_dirs(&self) {
        let mut owns: Vec<&Dir> = self.membership.iter().collect();
        owns.extend(self.controllers.values());
        for own in owns {
            let _ = std::fs::remove_dir(own.path.join(&self.group));
        }
    }
}

/// (controller, config key) pairs `limits` needs.
fn needed(limits: &Limits) -> Vec<(&'static str, &'static str)> {
    [
        ("memory", "memory", limits.memory_bytes.is_some()),
        ("cpu", "cpus", limits.cpus.is_some()),
        ("pids", "pids", limits.pids.is_some()),
    ]
    .into_iter()
    .filter(|(_, _, on)| *on)
    .map(|(c, k, _)| (c, k))
    .collect()
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Moves this process (all its threads) from cgroup2 cgroup `current` into its
/// [`DAEMON_LEAF`] and enables what `current` offers in its `cgroup.subtree_control`.
/// Returns `current` if that worked; on failure (not root, other processes still in
/// `current`) the process goes back and nothing is left changed.
fn move_into_leaf(mount: &Mount, current: &str) -> Option<String> {
    if current == "/" {
        return None; // the root cgroup is exempt from the no-internal-processes rule
    }
    let dir = dir_in(mount, current)?;
    let offered = read_words(&dir.join("cgroup.controllers"));
    let enabled = read_words(&dir.join("cgroup.subtree_control"));
    if offered.iter().all(|c| enabled.contains(c)) {
        return None; // nothing to hand down, or a cgroup without processes did it already
    }
    let leaf = dir.join(DAEMON_LEAF);
    let made = match std::fs::create_dir(&leaf) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            tracing::warn!("cannot create {}: {e}", leaf.display());
            return None;
        }
    };
    let pid = std::process::id().to_string();
    if let Err(e) = std::fs::write(leaf.join("cgroup.procs"), &pid) {
        tracing::warn!("cannot move synwake into {}: {e}", leaf.display());
        if made {
            let _ = std::fs::remove_dir(&leaf);
        }
        return None;
    }
    let wanted: Vec<&String> = offered.iter().filter(|c| !enabled.contains(c)).collect();
    let failed: Vec<&str> = wanted
        .iter()
        .filter(|c| enable_controller(&dir, c).is_err())
        .map(|c| c.as_str())
        .collect();
    if failed.len() == wanted.len() {
        // Other processes in `current` keep it busy (EBUSY): go back, change nothing.
        tracing::warn!(
            "cgroup {}: cannot enable {} (other processes in it?); instances get no \
             cgroup2 controllers",
            dir.display(),
            failed.join(" ")
        );
        let _ = std::fs::write(dir.join("cgroup.procs"), &pid);
        if made {
            let _ = std::fs::remove_dir(&leaf);
        }
        return None;
    }
    tracing::info!(
        "moved synwake into {} so {} can hand down {}",
        leaf.display(),
        dir.display(),
        offered.join(" ")
    );
    Some(current.to_string())
}

/// One line for `synwake doctor` on cgroup2 delegation: (ok, what synwake does or needs).
pub fn delegation() -> (bool, String) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map(|t| parse_proc_cgroup(&t))
        .unwrap_or_default();
    let Some(m) = mounts.iter().find(|m| m.v2) else {
        return (true, "no cgroup2 mounted: not needed".into());
    };
    let Some(path) = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p) else {
        return (true, "not in a cgroup2 cgroup: not needed".into());
    };
    if path == "/" {
        return (true, "in the root cgroup: not needed".into());
    }
    let Some(dir) = dir_in(m, path) else {
        return (
            false,
            format!("own cgroup {path} is not below the cgroup2 mount"),
        );
    };
    let offered = read_words(&dir.join("cgroup.controllers")).join(" ");
    let control = std::ffi::CString::new(
        dir.join("cgroup.subtree_control")
            .as_os_str()
            .as_encoded_bytes(),
    )
    .unwrap_or_default();
    // SAFETY: a NUL-terminated path that lives across the call.
    let writable = unsafe { libc::access(control.as_ptr(), libc::W_OK) } == 0;
    if writable {
        (
            true,
            format!("own cgroup {path} (offers: {offered}); `synwake up` moves itself into {path}/{DAEMON_LEAF} and hands these down to instances"),
        )
    } else {
        (
            false,
            format!("own cgroup {path} is not writable: run synwake as root; as a systemd service set Delegate=yes"),
        )
    }
}

fn enable_controller(dir: &Path, controller: &str) -> io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    if std::fs::read_to_string(&control)?
        .split_whitespace()
        .any(|c| c == controller)
    {
        return Ok(());
    }
    std::fs::write(control, format!("+{controller}"))
}

/// CFS (quota, period) in microseconds for `cpus` CPUs: a 100 ms period, 1 s for less
/// than 0.01 CPU so the quota stays at or above the kernel's 1 ms minimum.
pub fn cpu_quota(cpus: f64) -> (u64, u64) {
    let period: u64 = if cpus < 0.01 { 1_000_000 } else { 100_000 };
    let quota = ((cpus * period as f64).round() as u64).max(1000);
    (quota, period)
}

fn write_limit(dir: &Dir, controller: &str, limits: &Limits) -> Result<(), CgroupError> {
    let write = |file: &str, value: String| {
        let path = dir.path.join(file);
        std::fs::write(&path, value).map_err(io_err(&path))
    };
    // Files that only exist with swap accounting on: absent is fine.
    let write_optional = |file: &str, value: String| {
        let path = dir.path.join(file);
        if path.exists() {
            std::fs::write(&path, value).map_err(io_err(&path))
        } else {
            Ok(())
        }
    };
    match (controller, dir.v2) {
        ("memory", v2) => {
            let bytes = limits.memory_bytes.unwrap_or(u64::MAX);
            if v2 {
                write("memory.max", bytes.to_string())?;
                write_optional("memory.swap.max", "0".into())?;
            } else {
                write("memory.limit_in_bytes", bytes.to_string())?;
                // memory + swap capped at the same figure: no swapping past the limit.
                write_optional("memory.memsw.limit_in_bytes", bytes.to_string())?;
            }
        }
        ("cpu", v2) => {
            let (quota, period) = cpu_quota(limits.cpus.unwrap_or(1.0));
            if v2 {
                write("cpu.max", format!("{quota} {period}"))?;
            } else {
                write("cpu.cfs_period_us", period.to_string())?;
                write("cpu.cfs_quota_us", quota.to_string())?;
            }
        }
        ("pids", _) => write("pids.max", limits.pids.unwrap_or(u64::MAX).to_string())?,
        _ => {}
    }
    Ok(())
}

/// The cgroup(s) one instance runs in. The first directory is the membership one.
#[derive(Debug)]
pub struct InstanceCgroup {
    dirs: Vec<Dir>,
    memory: Option<Dir>,
}

impl InstanceCgroup {
    fn at(path: PathBuf, v2: bool) -> InstanceCgroup {
        InstanceCgroup {
            dirs: vec![Dir { path, v2 }],
            memory: None,
        }
    }

    /// The directories, for the pid file (so a restart finds them even from elsewhere).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.path.as_path())
    }

    fn membership(&self) -> &Dir {
        &self.dirs[0]
    }

    /// Pids in the instance's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.membership().path)
    }

    /// True once no process is left in it.
    pub fn is_empty(&self) -> bool {
        let m = self.membership();
        if m.v2 {
            if let Ok(events) = std::fs::read_to_string(m.path.join("cgroup.events")) {
                return events.lines().any(|l| l == "populated 0");
            }
        }
        self.pids().is_empty()
    }

    /// Sends `sig` to every process in it, through pidfds (a pid that was reused after
    /// the process left the cgroup is never signalled). Returns the pidfds used.
    pub fn signal_all(&self, sig: i32) -> Vec<(i32, OwnedFd)> {
        let path = &self.membership().path;
        let opened: Vec<(i32, OwnedFd)> = read_pids(path)
            .into_iter()
            .filter_map(|pid| pidfd_open(pid).ok().map(|fd| (pid, fd)))
            .collect();
        // Still listed after the pidfd was opened: the pidfd is that member.
        let now: HashSet<i32> = read_pids(path).into_iter().collect();
        let members: Vec<(i32, OwnedFd)> = opened
            .into_iter()
            .filter(|(pid, _)| now.contains(pid))
            .collect();
        for (_, fd) in &members {
            let _ = pidfd_send_signal(fd, sig);
        }
        members
    }

    /// SIGKILL to everything in it: `cgroup.kill` (v2, Linux 5.14+; atomic, forks
    /// included), else freeze (v1 freezer), kill each member, thaw. Returns pidfds of the
    /// members killed one by one (to reap those reparented to this daemon).
    pub fn kill(&self) -> Vec<(i32, OwnedFd)> {
        let m = self.membership();
        if m.v2 && std::fs::write(m.path.join("cgroup.kill"), "1").is_ok() {
            return Vec::new();
        }
        let freezer = m.path.join("freezer.state");
        let frozen = !m.v2 && std::fs::write(&freezer, "FROZEN").is_ok();
        if frozen {
            for _ in 0..200 {
                if std::fs::read_to_string(&freezer).is_ok_and(|s| s.trim() == "FROZEN") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut killed = Vec::new();
        // Without a freezer a member may fork while we kill: repeat, bounded.
        for _ in 0..if frozen { 1 } else { 20 } {
            let round = self.signal_all(libc::SIGKILL);
            if round.is_empty() {
                break;
            }
            killed.extend(round);
        }
        if frozen {
            let _ = std::fs::write(&freezer, "THAWED");
        }
        killed
    }

    /// Waits (bounded) until it is empty.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// True if the kernel's OOM killer killed a process in it.
    pub fn oom_killed(&self) -> bool {
        let Some(m) = &self.memory else {
            return false;
        };
        let file = if m.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(m.path.join(file))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the directories (each must be empty; retried briefly while the killed
    /// processes finish exiting).
    pub async fn remove(&self) {
        for _ in 0..100 {
            if self.try_remove() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::warn!(
            "cgroup {} still busy; left in place",
            self.membership().path.display()
        );
    }

    fn remove_now(&self) {
        self.try_remove();
    }

    /// [`InstanceCgroup::remove`] for callers outside the async runtime (start-up sweep).
    pub fn remove_blocking(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.try_remove() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_remove(&self) -> bool {
        self.dirs
            .iter()
            .all(|d| match std::fs::remove_dir(&d.path) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            })
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A pidfd for `pid`: it keeps naming that process even after its pid is reused.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd` (ESRCH once it has exited).
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with a valid fd and a null siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the process behind `pidfd` if it is an exited child of ours (an orphan the
/// kernel reparented to this subreaper); anything else is left alone.
pub fn reap_pidfd(pidfd: &OwnedFd) -> bool {
    matches!(synwake_oci::waitid_pidfd(pidfd), Ok(Some(_)))
}

/// Zombie children of this daemon whose v2 cgroup is one of this daemon's instance
/// cgroups (`prefix`): orphaned descendants of process functions, reparented to synwake
/// because it is a child subreaper (the oci runtime makes it one). Instance leaders are
/// among them until their own waiter reaps them: see [`reap_zombies`].
pub fn orphan_zombies(prefix: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_zombie_child_of(*pid, me))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.strip_prefix("0::").is_some_and(|p| p.starts_with(prefix)))
            })
        })
        .collect()
}

/// Reaps each of `zombies` that is not in `leaders`; returns how many were reaped.
pub fn reap_zombies(zombies: &[i32], leaders: &HashSet<i32>) -> usize {
    zombies
        .iter()
        .filter(|pid| !leaders.contains(pid))
        // SAFETY: waitpid on one specific pid, nonblocking; reaps only a zombie child.
        .filter(|pid| unsafe { libc::waitpid(**pid, std::ptr::null_mut(), libc::WNOHANG) } == **pid)
        .count()
}

/// Whether this process is a child subreaper (orphans below it are reparented to it).
pub fn is_child_subreaper() -> bool {
    let mut flag: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int through the pointer.
    let rc = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) };
    rc == 0 && flag != 0
}

/// State `Z` and parent `ppid` in /proc/<pid>/stat.
fn is_zombie_child_of(pid: i32, ppid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut f = after.split_whitespace();
    f.next() == Some("Z") && f.next().and_then(|p| p.parse().ok()) == Some(ppid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
31 25 0:29 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
";
    const OWN: &str = "\
9:name=systemd:/
4:memory:/process_api/abc
3:pids:/
2:cpu,cpuacct:/
1:freezer:/
0::/
";

    #[test]
    fn mountinfo_names_each_hierarchy_and_its_controllers() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 6);
        assert!(m[0].v2 && m[0].point == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].controllers, ["cpu", "cpuacct"]);
        assert_eq!(m[4].controllers, Vec::<String>::new(), "name=systemd");
        let own = parse_proc_cgroup(OWN);
        assert_eq!(
            own[1],
            (vec!["memory".to_string()], "/process_api/abc".into())
        );
        assert_eq!(own[5], (vec![], "/".to_string()));
    }

    #[test]
    fn a_hybrid_host_gives_v2_membership_and_v1_limits_below_the_daemons_own_cgroups() {
        let host = CgroupHost::from_parts(
            "synwake-0000abcd".into(),
            &parse_mountinfo(HYBRID),
            &parse_proc_cgroup(OWN),
            &|_, _| false,
        );
        let m = host.membership.as_ref().unwrap();
        assert!(m.v2);
        assert_eq!(m.path, Path::new("/sys/fs/cgroup/unified/"));
        assert_eq!(host.v2_prefix.as_deref(), Some("/synwake-0000abcd/"));
        // No controller is usable in v2 here, so all three come from v1.
        assert_eq!(
            host.controllers["memory"].path,
            Path::new("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(
            host.controllers["cpu"].path,
            Path::new("/sys/fs/cgroup/cpu,cpuacct/")
        );
        assert!(!host.controllers["pids"].v2);
        assert_eq!(
            host.describe(),
            "membership in cgroup2, memory from v1, cpu from v1, pids from v1"
        );
        // The cgroup2 cgroup is entered at the fork; each v1 one is still a write.
        assert_eq!(host.joined_by_write(), ["memory", "cpus", "pids"]);
    }

    #[test]
    fn controllers_the_v2_cgroup_can_hand_down_are_used_from_v2() {
        let host = CgroupHost::from_parts(
            "synwake-2".into(),
            &parse_mountinfo(HYBRID),
            &parse_proc_cgroup(OWN),
            &|_, c| c == "memory",
        );
        assert!(host.controllers["memory"].v2);
        assert_eq!(
            host.controllers["memory"].path,
            Path::new("/sys/fs/cgroup/unified")
        );
        assert!(!host.controllers["cpu"].v2);
        assert_eq!(host.joined_by_write(), ["cpus", "pids"]);
    }

    #[test]
    fn a_v1_only_host_uses_the_freezer_for_membership() {
        let mounts: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        let host = CgroupHost::from_parts(
            "synwake-1".into(),
            &parse_mountinfo(&mounts),
            &parse_proc_cgroup(OWN),
            &|_, _| false,
        );
        let m = host.membership.as_ref().unwrap();
        assert!(!m.v2);
        assert_eq!(m.path, Path::new("/sys/fs/cgroup/freezer/"));
        assert_eq!(host.v2_prefix, None);
        assert_eq!(host.joined_by_write()[0], "every start (v1 freezer)");
    }

    #[test]
    fn a_mount_of_a_subtree_maps_paths_below_its_root_only() {
        let m = Mount {
            root: "/kubepods/pod1".into(),
            point: "/sys/fs/cgroup".into(),
            controllers: vec![],
            v2: true,
        };
        assert_eq!(
            dir_in(&m, "/kubepods/pod1/c"),
            Some(PathBuf::from("/sys/fs/cgroup/c"))
        );
        assert_eq!(dir_in(&m, "/kubepods/pod10"), None);
        assert_eq!(dir_in(&m, "/other"), None);
    }

    #[test]
    fn limits_without_a_controller_or_without_cgroups_are_refused() {
        let mut host = CgroupHost::from_parts(
            "synwake-3".into(),
            &parse_mountinfo(HYBRID),
            &parse_proc_cgroup("0::/\n1:freezer:/\n"),
            &|_, _| false,
        );
        let mem = Limits {
            memory_bytes: Some(1 << 26),
            ..Limits::default()
        };
        assert!(host.check(&Limits::default()).is_ok());
        let e = host.check(&mem).unwrap_err().to_string();
        assert!(
            e.contains("memory controller") && e.contains("`memory`"),
            "{e}"
        );
        host.unavailable = Some("not root".into());
        assert!(
            host.check(&Limits::default()).is_ok(),
            "no limits: runs anyway"
        );
        let e = host.check(&mem).unwrap_err().to_string();
        assert!(e.contains("not root") && e.contains("`memory`"), "{e}");
    }

    /// This host seen as v1-only (its cgroup2 mount hidden): membership in the freezer.
    fn v1_only_host(group: &str) -> CgroupHost {
        let mounts: Vec<Mount> =
            parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
                .into_iter()
                .filter(|m| !m.v2)
                .collect();
        let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        CgroupHost::from_parts(group.into(), &mounts, &own, &|_, _| false)
    }

    #[tokio::test]
    async fn on_a_v1_only_host_the_freezer_cgroup_is_killed_whole_and_limits_apply() {
        let test = "on_a_v1_only_host_the_freezer_cgroup_is_killed_whole_and_limits_apply";
        let missing = if !synwake_test_support::gate::is_root() {
            Some("not root".to_string())
        } else if !Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists()
            || !Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
        {
            Some("no v1 freezer and pids hierarchies".to_string())
        } else {
            None
        };
        if !synwake_test_support::gate::can_run(test, missing) {
            return;
        }
        let host = v1_only_host(&format!("synwake-cgtest{}", std::process::id()));
        assert!(host.unavailable().is_none(), "{:?}", host.unavailable());
        assert!(!host.membership.as_ref().unwrap().v2);
        let limits = Limits {
            pids: Some(50),
            ..Limits::default()
        };
        let cg = host.create("f.1", &limits).expect("create");
        // Opened here, written by the child before exec (as the launcher joins).
        let procs: Vec<std::fs::File> = cg
            .paths()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.join("cgroup.procs"))
                    .unwrap()
            })
            .collect();
        let fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = std::process::Command::new("sh");
        // A background child, one in a session of its own, and the leader.
        cmd.args(["-c", "sleep 600 & setsid sleep 600 & exec sleep 600"]);
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for fd in &fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn");
        drop(procs);
        assert!(
            synwake_test_support::wait_until(Duration::from_secs(5), || cg.pids().len() == 3),
            "members: {:?}",
            cg.pids()
        );
        let pids_dir = &cg.dirs[1].path;
        assert!(pids_dir.starts_with("/sys/fs/cgroup/pids"), "{pids_dir:?}");
        assert_eq!(
            std::fs::read_to_string(pids_dir.join("pids.max"))
                .unwrap()
                .trim(),
            "50"
        );
        let members = cg.pids();
        cg.kill();
        let _ = child.wait();
        assert!(
            cg.wait_empty(Duration::from_secs(5)).await,
            "{:?}",
            cg.pids()
        );
        for pid in members {
            let gone = synwake_test_support::wait_until(Duration::from_secs(5), || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| s.contains(") Z "))
            });
            assert!(gone, "pid {pid} survived the kill");
        }
        cg.remove().await;
        assert!(cg.dirs.iter().all(|d| !d.path.exists()));
        host.remove_group_dirs();
    }

    #[test]
    fn the_sweep_removes_empty_instance_cgroups_and_keeps_populated_ones() {
        let test = "the_sweep_removes_empty_instance_cgroups_and_keeps_populated_ones";
        let missing = if !synwake_test_support::gate::is_root() {
            Some("not root".to_string())
        } else if !Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
            Some("no cgroup2 at /sys/fs/cgroup/unified".to_string())
        } else {
            None
        };
        if !synwake_test_support::gate::can_run(test, missing) {
            return;
        }
        // A cgroup standing in for "the daemon's own", so nothing else is swept.
        let rel = format!("/cgroup-sweeptest-{}", std::process::id());
        let own = PathBuf::from(format!("/sys/fs/cgroup/unified{rel}"));
        std::fs::create_dir(&own).unwrap();
        let mounts: Vec<Mount> =
            parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
                .into_iter()
                .filter(|m| m.v2)
                .collect();
        let host = CgroupHost::from_parts(
            "synwake-00000001".into(),
            &mounts,
            &[(vec![], rel)],
            &|_, _| false,
        );
        for d in [
            "synwake-aa/f.1",
            "synwake-bb/g.1",
            "synwake-cc",
            "other/h.1",
            "synwake-tag-1/x",
        ] {
            std::fs::create_dir_all(own.join(d)).unwrap();
        }
        let busy = InstanceCgroup::at(own.join("synwake-bb/g.1"), true);
        let mut sleep = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(
            own.join("synwake-bb/g.1/cgroup.procs"),
            sleep.id().to_string(),
        )
        .unwrap();

        let removed = host.sweep_older_than(Duration::ZERO);
        let left = |d: &str| own.join(d).exists();
        let state = (
            removed,
            left("synwake-aa"),
            left("synwake-bb/g.1"),
            left("synwake-cc"),
            left("other/h.1"),
            left("synwake-tag-1/x"),
        );
        busy.kill();
        let _ = sleep.wait();
        busy.remove_blocking(Duration::from_secs(5));
        for d in [
            "synwake-bb",
            "other/h.1",
            "other",
            "synwake-tag-1/x",
            "synwake-tag-1",
            "",
        ] {
            let _ = std::fs::remove_dir(own.join(d));
        }
        assert_eq!(
            state,
            (1, false, true, false, true, true),
            "(removed, aa, bb/g.1, cc, other/h.1, synwake-tag-1/x)"
        );
    }

    #[test]
    fn cpu_quota_keeps_the_kernels_minimum() {
        assert_eq!(cpu_quota(0.5), (50_000, 100_000));
        assert_eq!(cpu_quota(2.0), (200_000, 100_000));
        assert_eq!(cpu_quota(0.001), (1_000, 1_000_000));
        assert_eq!(cpu_quota(0.005), (5_000, 1_000_000));
        assert_eq!(cpu_quota(1024.0), (102_400_000, 100_000));
    }

    #[test]
    fn group_names_differ_per_run_dir() {
        let a = group_name(Path::new("/var/lib/synwake/run"));
        assert!(a.starts_with("synwake-") && a.len() == "synwake-".len() + 8);
        assert_ne!(a, group_name(Path::new("/tmp/x/run")));
    }
}
