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
