//! Builds the stdio watchdog (watchdog/main.rs) and the process launcher (launcher/main.rs)
//! as static, std-only binaries that the daemon embeds (the watchdog is bind-mounted into
//! containers: images need no libc for it).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    build_static("watchdog/main.rs", "synwake_watchdog", "synwake-watchdog");
    build_static("launcher/main.rs", "synwake_launcher", "synwake-launcher");
}

fn build_static(source: &str, crate_name: &str, output: &str) {
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(output);
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            crate_name,
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
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {source}: {e}"));
    assert!(status.success(), "building {source} failed");
}
