//! The built-in watchdog for `watchdog = "stdio"` functions (OpenFaaS classic mode): a
//! static binary built from `watchdog/main.rs` by build.rs, embedded here, written next to
//! the runtime's state and run in front of the function's command (on the host for the
//! process runtime, bind-mounted read-only into the container for the oci runtime).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The watchdog executable.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/synwake-watchdog"));

/// Where the watchdog is mounted inside containers.
pub const CONTAINER_PATH: &str = "/.synwake-watchdog";

/// Writes the watchdog to `<dir>/synwake-watchdog` (mode 0755) unless an identical copy is
/// there; returns its path.
pub fn install(dir: &Path) -> io::Result<PathBuf> {
    install_binary(dir, "synwake-watchdog", BINARY)
}

/// Writes `bytes` to `<dir>/<name>` (mode 0755, atomically) unless an identical copy is
/// there; returns its path.
pub(crate) fn install_binary(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|b| b == bytes) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The command line that runs `command` under the watchdog listening on `listen`.
pub fn wrap(watchdog: &str, listen: &str, command: &[String]) -> Vec<String> {
    let mut v = vec![
        watchdog.to_string(),
        "--listen".to_string(),
        listen.to_string(),
        "--".to_string(),
    ];
    v.extend(command.iter().cloned());
    v
}
