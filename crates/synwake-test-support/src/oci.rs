//! What the runc tests need: their prerequisites, and what a runtime holds on the host
//! (containers, netns, veths, cgroups of one name tag) so a test can assert none is left.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::gate::{is_root, missing_tool, skip_or_fail};

/// The busybox-static binary the OCI fixtures build their images from.
pub const BUSYBOX: &str = "/bin/busybox";

/// Why the runc tests cannot run here (root, runc, iproute2, iptables, busybox-static,
/// the cgroup v1 memory controller), or `None`.
pub fn missing_prerequisite() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    if let Some(tool) = missing_tool(&[
        ("runc", "--version"),
        ("ip", "-V"),
        ("iptables", "--version"),
    ]) {
        return Some(tool);
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} missing (busybox-static)"));
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir() {
        return Some("no cgroup v1 memory controller".into());
    }
    None
}

/// The privileged-test rule for a runc test: true if it may run.
pub fn can_run(test: &str) -> bool {
    match missing_prerequisite() {
        None => true,
        Some(reason) => {
            skip_or_fail(&format!("privileged OCI test `{test}`"), &reason);
            false
        }
    }
}

/// One `runc list` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RuncContainer {
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub created: String,
}

pub fn runc_list(root: &Path) -> Vec<RuncContainer> {
    if !root.is_dir() {
        return Vec::new();
    }
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output()
        .expect("run runc list");
    assert!(
        out.status.success(),
        "runc list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| RuncContainer {
                    id: c["id"].as_str().unwrap_or_default().to_string(),
                    pid: c["pid"].as_i64().unwrap_or(0) as i32,
                    status: c["status"].as_str().unwrap_or_default().to_string(),
                    created: c["created"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a runc process (e.g. `runc create`) for container `id` still runs.
pub fn runc_running_for(id: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmd| {
            let mut args = cmd.split(|b| *b == 0);
            args.next().is_some_and(|a0| a0.ends_with(b"runc")) && args.any(|a| a == id.as_bytes())
        })
}

pub fn names_with_prefix(dir: &Path, prefix: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// `<controller>/synwake/<name>` cgroup dirs whose name starts with `prefix`.
pub fn cgroups_with_prefix(prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ctrl in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for n in names_with_prefix(&ctrl.path().join("synwake"), prefix) {
            out.insert(format!(
                "{}/synwake/{n}",
                ctrl.file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// What one runtime (one name tag) holds on the host.
#[derive(Debug, Default)]
pub struct HostObjects {
    pub containers: Vec<RuncContainer>,
    pub netns: BTreeSet<String>,
    pub veths: BTreeSet<String>,
    pub cgroups: BTreeSet<String>,
}

impl HostObjects {
    pub fn of(oci_state: &Path, tag: &str) -> HostObjects {
        HostObjects {
            containers: runc_list(&oci_state.join("runc")),
            netns: names_with_prefix(Path::new("/run/netns"), &format!("swk-{tag}-")),
            veths: names_with_prefix(Path::new("/sys/class/net"), &format!("swkv{tag}")),
            cgroups: cgroups_with_prefix(&format!("swk-{tag}-")),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
            && self.netns.is_empty()
            && self.veths.is_empty()
            && self.cgroups.is_empty()
    }

    /// Removes all of it (after a failure), so one failing test does not leak into others.
    pub fn remove(&self, oci_state: &Path) {
        for c in &self.containers {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(oci_state.join("runc"))
                .args(["delete", "-f", &c.id])
                .status();
        }
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        for v in &self.veths {
            let _ = Command::new("ip").args(["link", "del", v]).status();
        }
        for c in &self.cgroups {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(c));
        }
    }
}
