//! The workspace's binaries for this test run, found next to the test executable
//! (`<target>/<profile>/deps/<test>` -> `<target>/<profile>/<bin>`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `<target>/<profile>` of the running test binary.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let deps = exe.parent().expect("test binary has a directory");
    // Integration tests live in deps/; a test run from <profile>/ directly (rare) too.
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The `synwake` daemon binary (`SYNWAKE_BIN` overrides), built if missing. Not rebuilt
/// when present: `cargo build -p synwake` unifies features differently from a workspace
/// build and would relink it (~30 s) in every test process; `cargo test` builds it.
pub fn synwake_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("SYNWAKE_BIN", "synwake", "synwake", false))
        .clone()
}

/// The `synwake-fn` test function (`SYNWAKE_FN_BIN` overrides), brought up to date with
/// cargo once per test process (it has no dependencies: a no-op build is a quick
/// fingerprint check), so a binary from an older checkout never tests old code.
/// Process functions run as `nobody` when the daemon is root: when the build's path is
/// not open to others (a checkout under /root), a copy in a world-readable temp dir is
/// returned instead.
pub fn fn_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = workspace_bin("SYNWAKE_FN_BIN", "synwake-fn", "synwake-fn", true);
        if open_to_others(&bin) {
            return bin;
        }
        let dir = std::env::temp_dir().join(format!("synwake-fn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir for synwake-fn");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("synwake-fn");
        std::fs::copy(&bin, &copy).expect("copy synwake-fn");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
}

/// Whether every directory above `path` lets others through and `path` lets them run it.
fn open_to_others(path: &Path) -> bool {
    let ok =
        |p: &Path, bit: u32| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & bit != 0);
    ok(path, 0o005) && path.ancestors().skip(1).all(|a| ok(a, 0o001))
}

/// A binary of package `package` in this run's target dir and profile (another package
/// gives a test no CARGO_BIN_EXE for it), built with cargo when missing or, with
/// `refresh`, always (cargo has released the build lock while tests run).
fn workspace_bin(env: &str, package: &str, bin: &str, refresh: bool) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let profile_dir = profile_dir();
    let path = profile_dir.join(bin);
    if path.exists() && !refresh {
        return path;
    }
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(status) => assert!(status.success(), "cargo build -p {package} failed"),
        // A test binary run by hand on a machine without cargo: use what was built.
        Err(e) if path.exists() => {
            eprintln!(
                "note: cannot run cargo ({e}); using {} as built",
                path.display()
            )
        }
        Err(e) => panic!("{} is missing and cargo cannot run: {e}", path.display()),
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// A `[[function]]` table running synwake-fn; `extra` is more TOML lines for the table.
pub fn function(name: &str, extra: &str) -> String {
    format!(
        "[[function]]\nname = \"{name}\"\ncommand = [{:?}]\n{extra}\n",
        fn_bin().display().to_string()
    )
}
