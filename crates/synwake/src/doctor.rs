//! `synwake doctor`: what this machine supports and what `up` would enable.

use std::fmt::Write;
use std::path::Path;
use std::process::Command;

fn check(out: &mut String, ok: bool, what: &str, detail: &str) {
    let _ = writeln!(
        out,
        "  [{}] {what}{}",
        if ok { " ok " } else { "MISS" },
        if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        }
    );
}

fn command_version(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// Whether the cgroup2 mount favours dynamic changes: without `favordynmods` every move
/// into a cgroup waits for an RCU grace period; measured here at p50 +10 ms per cold start
/// on an idle machine (docs/benchmarks.md). Process instances are forked into their
/// cgroup2 cgroup, so only what `joined_by_write` lists (v1 cgroups) still moves. `None`
/// without a cgroup2 mount.
fn favordynmods(mountinfo: &str, joined_by_write: &[&str]) -> Option<(bool, String)> {
    let line = mountinfo.lines().find(|l| {
        l.split_once(" - ")
            .is_some_and(|(_, fs)| fs.split_whitespace().next() == Some("cgroup2"))
    })?;
    let (before, after) = line.split_once(" - ")?;
    let point = before.split_whitespace().nth(4)?;
    let on = after
        .split_whitespace()
        .nth(2)
        .is_some_and(|opts| opts.split(',').any(|o| o == "favordynmods"));
    Some(if on {
        (true, format!("{point} has it"))
    } else if joined_by_write.is_empty() {
        (
            true,
            format!(
                "{point} lacks it; not needed: process instances are forked into their \
                 cgroup2 cgroup (no migration)"
            ),
        )
    } else {
        let who = if joined_by_write.iter().any(|j| j.starts_with("every start")) {
            "every process start joins its v1 freezer cgroup".to_string()
        } else {
            let keys: Vec<String> = joined_by_write.iter().map(|k| format!("`{k}`")).collect();
            format!(
                "starts of process functions with {} join v1 cgroups",
                keys.join(" or ")
            )
        };
        (
            false,
            format!(
                "{point} lacks it: {who}, which waits an RCU grace period (ms) per cold \
                 start (other starts are forked into their cgroup2 cgroup); `mount -o \
                 remount,favordynmods {point}` (host-wide: forks and exits get slightly \
                 dearer) or boot with cgroup_favordynmods=true"
            ),
        )
    })
}

/// The whole report, ready to print.
/// `interfaces`: where to try the probe's attach modes (`None`: every interface that is up).
pub fn report(interfaces: Option<&[String]>) -> String {
    let mut out = String::from("synwake doctor\n\nmachine:\n");
    let root = unsafe { libc::geteuid() } == 0;
    check(
        &mut out,
        root,
        "running as root",
        if root {
            ""
        } else {
            "the probe and the oci runtime need root"
        },
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check(&mut out, true, "kernel", kernel.trim());
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    check(
        &mut out,
        bpffs,
        "bpffs mounted",
        if bpffs {
            ""
        } else {
            "mount -t bpf bpf /sys/fs/bpf"
        },
    );
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    check(&mut out, btf, "kernel BTF", "/sys/kernel/btf/vmlinux");
    let runc = command_version("runc", "--version");
    check(
        &mut out,
        runc.is_some(),
        "runc",
        runc.as_deref().unwrap_or("not found: apt-get install runc"),
    );
    let ip = command_version("ip", "-V");
    check(
        &mut out,
        ip.is_some(),
        "iproute2",
        ip.as_deref()
            .unwrap_or("not found: apt-get install iproute2"),
    );
    let ipt = command_version("iptables", "--version");
    check(
        &mut out,
        ipt.is_some(),
        "iptables",
        ipt.as_deref()
            .unwrap_or("not found: apt-get install iptables"),
    );
    let _ = writeln!(out, "\nprobe:");
    out.push_str(&crate::probe::doctor(interfaces));
    let _ = writeln!(
        out,
        "\ntagging (`synwake tag`, trigger tcp_option on the client side):"
    );
    out.push_str(&crate::tag::doctor());
    let _ = writeln!(out, "\nfeatures `synwake up` would enable:");
    check(&mut out, true, "process runtime", "always");
    let cgroups = crate::runtime::cgroup::CgroupHost::detect(Path::new("/var/lib/synwake/run"));
    check(
        &mut out,
        cgroups.unavailable().is_none(),
        "process instances in cgroups (stop kills the cgroup; memory, cpus, pids)",
        &cgroups.describe(),
    );
    let (delegated, how) = crate::runtime::cgroup::delegation();
    check(
        &mut out,
        delegated,
        "cgroup2 controllers for instances (for the cgroup doctor runs in)",
        &how,
    );
    if let Some((ok, detail)) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| favordynmods(&m, &cgroups.joined_by_write()))
    {
        check(
            &mut out,
            ok,
            "fast cgroup joins (cgroup2 `favordynmods`)",
            &detail,
        );
    }
    check(
        &mut out,
        root && runc.is_some() && ip.is_some(),
        "oci runtime",
        "needs root, runc and iproute2",
    );
    check(
        &mut out,
        true,
        "wake on accept / request",
        "always (the fallback when the probe is off)",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::favordynmods;

    #[test]
    fn favordynmods_is_read_from_the_cgroup2_super_options() {
        let on =
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods\n";
        let off = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let v1 = "33 31 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let hybrid = ["memory", "pids"];
        assert_eq!(favordynmods(on, &hybrid).map(|(ok, _)| ok), Some(true));
        let (ok, detail) = favordynmods(&format!("{v1}{off}"), &hybrid).unwrap();
        assert!(!ok);
        assert!(
            detail.contains("remount,favordynmods /sys/fs/cgroup")
                && detail.contains("`memory` or `pids`"),
            "{detail}"
        );
        // Everything from cgroup2: instances are forked into it, the option does not matter.
        let (ok, detail) = favordynmods(off, &[]).unwrap();
        assert!(ok && detail.contains("not needed"), "{detail}");
        assert_eq!(favordynmods(v1, &hybrid), None);
    }
}
