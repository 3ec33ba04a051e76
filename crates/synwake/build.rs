//! Builds the stdio watchdog (watchdog/main.rs) as a static, std-only binary that the
//! daemon embeds and bind-mounts into containers (images need no libc for it).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=watchdog/main.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("synwake-watchdog");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "synwake_watchdog",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
        ])
        .args(["--target", &target])
        .arg("-o")
        .arg(&out)
        .arg("watchdog/main.rs")
        .status()
        .expect("running rustc for the watchdog");
    assert!(status.success(), "building watchdog/main.rs failed");
}
