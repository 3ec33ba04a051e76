//! Counts cgroup migrations: the `cgroup:cgroup_attach_task` trace event (one per process
//! moved with a write to `cgroup.procs`, any hierarchy) in a private tracefs instance, so
//! no other tracer is disturbed. A process forked straight into a cgroup
//! (clone3 `CLONE_INTO_CGROUP`) is no migration and shows no event.

use std::path::PathBuf;

/// One `cgroup_attach_task` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    /// Hierarchy id: 0 is cgroup2, v1 hierarchies count from 1.
    pub dst_root: i32,
    /// The destination cgroup's path within its hierarchy.
    pub dst_path: String,
    pub pid: i32,
}

/// A tracefs instance recording migrations into cgroups whose path contains a needle;
/// removed on drop.
pub struct Migrations {
    dir: PathBuf,
}

/// The tracefs mount, if any.
fn tracefs() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("instances").is_dir())
}

impl Migrations {
    /// Why migrations cannot be counted here (`None`: they can).
    pub fn missing() -> Option<String> {
        match tracefs() {
            None => Some("tracefs is not mounted (/sys/kernel/tracing)".into()),
            Some(t) if !t.join("events/cgroup/cgroup_attach_task").is_dir() => {
                Some("no cgroup:cgroup_attach_task trace event".into())
            }
            Some(_) => None,
        }
    }

    /// Starts recording in instance `name` (make it unique: a test name and the pid)
    /// migrations into cgroups whose path contains `needle` (no `"` or `*`).
    pub fn start(name: &str, needle: &str) -> std::io::Result<Migrations> {
        let root = tracefs().ok_or_else(|| std::io::Error::other("no tracefs"))?;
        let dir = root.join("instances").join(name);
        std::fs::create_dir(&dir)?;
        let m = Migrations { dir };
        let event = m.event();
        std::fs::write(event.join("filter"), format!("dst_path ~ \"*{needle}*\""))?;
        std::fs::write(event.join("enable"), "1")?;
        Ok(m)
    }

    fn event(&self) -> PathBuf {
        self.dir.join("events/cgroup/cgroup_attach_task")
    }

    /// The migrations recorded so far.
    pub fn events(&self) -> Vec<Migration> {
        let text = std::fs::read_to_string(self.dir.join("trace")).unwrap_or_default();
        text.lines().filter_map(parse).collect()
    }
}

/// `... cgroup_attach_task: dst_root=0 dst_id=5 dst_level=1 dst_path=/x pid=7 comm=sh`
fn parse(line: &str) -> Option<Migration> {
    let rest = line.split_once("cgroup_attach_task: ")?.1;
    let field = |key: &str| -> Option<&str> {
        let start = rest.find(&format!("{key}="))? + key.len() + 1;
        let tail = &rest[start..];
        Some(tail.split(' ').next().unwrap_or(tail))
    };
    Some(Migration {
        dst_root: field("dst_root")?.parse().ok()?,
        dst_path: field("dst_path")?.to_string(),
        pid: field(" pid")?.parse().ok()?,
    })
}

impl Drop for Migrations {
    fn drop(&mut self) {
        let _ = std::fs::write(self.event().join("enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trace_lines_are_parsed() {
        let l = "           sleep-1690    [000] d..1. 20476.768211: cgroup_attach_task: \
                 dst_root=0 dst_id=291728 dst_level=1 dst_path=/clone3-try-1646 pid=1690 comm=launcher";
        let m = super::parse(l).unwrap();
        assert_eq!(m.dst_root, 0);
        assert_eq!(m.dst_path, "/clone3-try-1646");
        assert_eq!(m.pid, 1690);
        assert_eq!(super::parse("# tracer: nop"), None);
    }
}
