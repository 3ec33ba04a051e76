//! `synwake doctor`: what the probe needs from this machine, and which attach mode works
//! on each interface that is up.

use std::fmt;

use crate::{
    probe::{error_chain, HookMode, Probe},
    sys,
};

/// One machine-level check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorCheck {
    /// What was checked, e.g. `bpffs mounted`.
    pub name: &'static str,
    pub ok: bool,
    /// The evidence or the failure reason.
    pub detail: String,
}

/// Which attach modes work on one interface (each was attached, then detached again;
/// `tc-clsact` is only tried when `tcx` fails, as it would leave a clsact qdisc behind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceReport {
    pub interface: String,
    /// `(mode, Ok(()) or the reason it failed)`, in `auto`'s order of preference.
    pub modes: Vec<(&'static str, Result<(), String>)>,
}

impl InterfaceReport {
    /// The mode `auto` would pick, if any works.
    pub fn best_mode(&self) -> Option<&'static str> {
        crate::probe::HookMode::AUTO
            .iter()
            .map(|m| m.name())
            .find(|name| self.modes.iter().any(|(mode, r)| mode == name && r.is_ok()))
    }
}

/// What `doctor` found; `Display` renders it for a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorReport {
    pub checks: Vec<DoctorCheck>,
    pub interfaces: Vec<InterfaceReport>,
}

impl DoctorReport {
    /// True when every check passed and at least one interface can take the probe.
    pub fn probe_usable(&self) -> bool {
        self.checks.iter().all(|check| check.ok)
            && self
                .interfaces
                .iter()
                .any(|report| report.best_mode().is_some())
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "eBPF probe:")?;
        for check in &self.checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            writeln!(f, "  [{mark}] {}: {}", check.name, check.detail)?;
        }
        writeln!(
            f,
            "attach modes per interface (auto tries native XDP, TCX, clsact, then generic XDP):"
        )?;
        if self.interfaces.is_empty() {
            writeln!(f, "  (none tested)")?;
        }
        for report in &self.interfaces {
            let best = report.best_mode().unwrap_or("none");
            writeln!(f, "  {}: auto -> {best}", report.interface)?;
            for (mode, result) in &report.modes {
                match result {
                    Ok(()) => writeln!(f, "      {mode:<12} works")?,
                    Err(reason) => writeln!(f, "      {mode:<12} fails: {reason}")?,
                }
            }
        }
        write!(
            f,
            "verdict: {}",
            if self.probe_usable() {
                "the probe can run"
            } else {
                "the probe cannot run here; synwake wakes on accept/request only"
            }
        )
    }
}

/// Checks root, bpffs, BTF, the bpf syscall, ring buffer maps, bpf_loop (the probe
/// program's verification) and, per interface that is up, each attach mode by attaching
/// and detaching at once. Attaching native XDP can briefly reset some NIC drivers.
pub fn doctor() -> DoctorReport {
    doctor_interfaces(None)
}

/// Like [`doctor`], but tries attach modes only on `only` (`None`: every interface
/// that is up). Trying a mode attaches and detaches for real, and native XDP attach can
/// reset a NIC on some drivers: pass the interfaces the probe is configured for.
pub fn doctor_interfaces(only: Option<&[String]>) -> DoctorReport {
    let mut checks = Vec::new();
    let root = sys::is_root();
    checks.push(DoctorCheck {
        name: "running as root",
        ok: root,
        detail: if root {
            "euid 0".to_string()
        } else {
            "not root: loading BPF needs root or CAP_BPF+CAP_NET_ADMIN".to_string()
        },
    });
    let bpffs = sys::bpffs_mounted();
    checks.push(DoctorCheck {
        name: "bpffs mounted",
        ok: bpffs,
        detail: if bpffs {
            "a bpf filesystem is mounted".to_string()
        } else {
            "not mounted (not needed by the probe; `mount -t bpf bpf /sys/fs/bpf` for bpftool pinning)".to_string()
        },
    });
    // The probe pins nothing, so missing bpffs is informational.
    checks.last_mut().expect("just pushed").ok = true;
    let btf = sys::btf_present();
    checks.push(DoctorCheck {
        name: "kernel BTF",
        ok: btf,
        detail: format!(
            "{} {}",
            sys::BTF_VMLINUX,
            if btf { "present" } else { "missing" }
        ),
    });
    let syscall = sys::try_create_map(sys::BPF_MAP_TYPE_ARRAY, 4, 8, 1);
    checks.push(DoctorCheck {
        name: "bpf syscall",
        ok: syscall.is_ok(),
        detail: match &syscall {
            Ok(()) => "array map created".to_string(),
            Err(error) => format!("BPF_MAP_CREATE failed: {error}"),
        },
    });
    let ring = sys::try_create_map(sys::BPF_MAP_TYPE_RINGBUF, 0, 0, 4096);
    checks.push(DoctorCheck {
        name: "ring buffer map",
        ok: ring.is_ok(),
        detail: match &ring {
            Ok(()) => "BPF_MAP_TYPE_RINGBUF created (kernel >= 5.8)".to_string(),
            Err(error) => format!("BPF_MAP_TYPE_RINGBUF failed: {error}"),
        },
    });
    let version = sys::kernel_version();
    let loop_ok = matches!(version, Some(v) if v >= (5, 17));
    checks.push(DoctorCheck {
        name: "bpf_loop helper",
        ok: loop_ok,
        detail: match version {
            Some((major, minor)) => format!("kernel {major}.{minor} (bpf_loop needs >= 5.17)"),
            None => "kernel version unknown".to_string(),
        },
    });
    let loaded = Probe::load();
    checks.push(DoctorCheck {
        name: "probe program verified",
        ok: loaded.is_ok(),
        detail: match &loaded {
            Ok(_) => "synwake_xdp and synwake_tc loaded".to_string(),
            Err(error) => error_chain(error),
        },
    });

    let mut interfaces = Vec::new();
    if let Ok(mut probe) = loaded {
        let names = match only {
            Some(list) => list.to_vec(),
            None => sys::interfaces_up().unwrap_or_default(),
        };
        for interface in names {
            let mut modes: Vec<(&'static str, Result<(), String>)> = Vec::new();
            for mode in HookMode::ALL {
                let tcx_works = modes.iter().any(|(name, r)| *name == "tcx" && r.is_ok());
                // Trying clsact would leave a clsact qdisc behind; only needed without TCX.
                let result = if mode == HookMode::TcNetlink && tcx_works {
                    Err("not tried: tcx works (clsact is only the fallback)".to_string())
                } else {
                    probe
                        .attach_hook(&interface, mode)
                        .and_then(|link| probe.detach_hook(link))
                };
                modes.push((mode.name(), result));
            }
            interfaces.push(InterfaceReport { interface, modes });
        }
    }
    DoctorReport { checks, interfaces }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_renders_checks_modes_and_verdict() {
        let report = DoctorReport {
            checks: vec![DoctorCheck {
                name: "kernel BTF",
                ok: true,
                detail: "present".into(),
            }],
            interfaces: vec![InterfaceReport {
                interface: "lo".into(),
                modes: vec![
                    ("xdp-native", Err("Operation not supported".into())),
                    ("xdp-generic", Ok(())),
                ],
            }],
        };
        assert_eq!(report.interfaces[0].best_mode(), Some("xdp-generic"));
        assert!(report.probe_usable());
        let text = report.to_string();
        assert!(text.contains("lo: auto -> xdp-generic"), "{text}");
        assert!(
            text.contains("xdp-native   fails: Operation not supported"),
            "{text}"
        );
        assert!(text.ends_with("verdict: the probe can run"), "{text}");
    }
}
