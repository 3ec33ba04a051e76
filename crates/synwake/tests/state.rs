//! State saves are all-or-nothing: on a full state dir a deploy, an update and a removal
//! fail and change nothing (API and disk agree, before and after a restart), no temp file
//! stays, and temp files an interrupted write left are swept at start.
//!
//! The full disk is a small tmpfs the test mounts over the daemon's state dir (root only;
//! with CI=true a missing privilege fails the test, otherwise it is skipped loudly).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use synwake_test_support::gate::{is_root, skip_or_fail};
use synwake_test_support::*;

/// A tmpfs of `size` mounted at a path; unmounted (lazily, so a daemon still holding it
/// cannot block that) in `Drop`.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            at: at.to_path_buf(),
        })
    }

    /// Fills the file system: writes `path` until ENOSPC. Bounded by the tmpfs size.
    fn fill(&self, path: &Path) {
        let mut f = std::fs::File::create(path).expect("filler file");
        let chunk = [0u8; 4096];
        for _ in 0..100_000 {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = f.sync_all();
        // Really full: not even one more byte fits.
        assert!(
            f.write(&[0u8]).is_err() || f.sync_all().is_err() || {
                let mut g = std::fs::File::create(self.at.join(".probe")).unwrap();
                let r = g.write_all(&chunk).and_then(|_| g.sync_all());
                let _ = std::fs::remove_file(self.at.join(".probe"));
                r.is_err()
            }
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn deployment(name: &str, greeting: &str) -> String {
    serde_json::json!({
        "service": name,
        "envProcess": fn_bin().display().to_string(),
        "envVars": { "GREETING": greeting },
    })
    .to_string()
}

fn listed(d: &Daemon) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&d.api_get("/system/functions").body).expect("function list JSON");
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

fn saved(d: &Daemon) -> Vec<String> {
    let bytes = std::fs::read(d.state_dir().join("functions.json")).unwrap_or_default();
    if bytes.is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("functions.json");
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp.") || n.ends_with(".prev"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn full_state_dir_fails_the_call_and_changes_nothing() {
    const TEST: &str = "full_state_dir_fails_the_call_and_changes_nothing";
    if !is_root() {
        skip_or_fail(TEST, "not root");
        return;
    }
    let mut d = Daemon::start("");
    assert!(d
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .is_some());
    let fs = match Tmpfs::mount(&d.state_dir(), "8m") {
        Ok(fs) => fs,
        Err(e) => {
            skip_or_fail(TEST, &e);
            return;
        }
    };
    d.spawn();
    let r = d.api_json("POST", "/system/functions", &deployment("keep", "one"));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(saved(&d), ["keep"]);

    let filler = d.state_dir().join("filler");
    fs.fill(&filler);

    let r = d.api_json("POST", "/system/functions", &deployment("new", "x"));
    assert_eq!(r.status, 500, "deploy on a full disk: {}", r.text());
    assert!(r.text().contains("nothing changed"), "{}", r.text());
    let r = d.api_json("PUT", "/system/functions", &deployment("keep", "two"));
    assert_eq!(r.status, 500, "update on a full disk: {}", r.text());
    let r = d.api_json("DELETE", "/system/functions", r#"{"functionName":"keep"}"#);
    assert_eq!(r.status, 500, "delete on a full disk: {}", r.text());

    // Memory and disk as they were, and no temp file left.
    assert_eq!(listed(&d), ["keep"]);
    assert_eq!(saved(&d), ["keep"]);
    assert_eq!(d.status("keep")["envVars"]["GREETING"], "one");
    assert_eq!(temp_files(&d.state_dir()), Vec::<String>::new());
    // An async call that cannot be written is not accepted.
    let async_call = |d: &Daemon| {
        request(
            loopback(d.api),
            "POST",
            "/async-function/keep",
            &[],
            Some(b"x"),
        )
        .unwrap()
    };
    let r = async_call(&d);
    assert_eq!(r.status, 503, "async call on a full disk: {}", r.text());
    assert!(r.header("retry-after").is_some());

    // With space again the same calls work; a leftover temp file is swept at start.
    std::fs::remove_file(&filler).unwrap();
    let r = d.api_json("POST", "/system/functions", &deployment("new", "x"));
    assert_eq!(r.status, 202, "{}", r.text());
    let r = async_call(&d);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(20), || {
        metric(
            &d.metrics(),
            "synwake_function_invocations_total{function=\"keep\",code=\"200\"}",
        ) == Some(1.0)
    }));
    let r = d.api_json("DELETE", "/system/functions", r#"{"functionName":"keep"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::write(
        d.state_dir().join(".functions.json.tmp.99999"),
        vec![b'['; 32 << 10],
    )
    .unwrap();
    assert!(d
        .stop_with(libc::SIGKILL, Duration::from_secs(10))
        .is_some());
    d.spawn();
    assert_eq!(listed(&d), ["new"]);
    assert_eq!(saved(&d), ["new"]);
    assert_eq!(temp_files(&d.state_dir()), Vec::<String>::new());
    assert!(d
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .is_some());
    drop(fs);
}
