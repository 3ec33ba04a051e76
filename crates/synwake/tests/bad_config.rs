//! A bad config stops `synwake up` with a non-zero exit and a message naming the file,
//! the line and the key.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs `synwake up` on `text`; returns (exit code, stderr, config path).
fn up_with(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(synwake_bin())
        .arg("up")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "synwake up kept running on:\n{text}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

/// The config head every case shares: free ports, a private state dir.
fn head() -> String {
    let dir = std::env::temp_dir().join(format!("synwake-badcfg-{}", std::process::id()));
    format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\napi_listen = \"127.0.0.1:{}\"\nstate_dir = {:?}\n[probe]\nmode = \"off\"\n",
        free_port(),
        free_port(),
        dir.display().to_string()
    )
}

/// 1-based line of the first line containing `marker`.
fn line_of(text: &str, marker: &str) -> usize {
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in config"))
        + 1
}

fn assert_refused(tail: &str, marker: &str, key: &str) {
    let text = format!("{}{tail}", head());
    let line = line_of(&text, marker);
    let (code, stderr, path) = up_with(&text);
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?} on a bad config; stderr: {stderr}"
    );
    assert!(stderr.contains(&path), "file not named: {stderr}");
    assert!(
        stderr.contains(&format!("{path}:{line}:")) || stderr.contains(&format!("line {line}")),
        "line {line} not named: {stderr}"
    );
    assert!(stderr.contains(key), "key {key} not named: {stderr}");
}

#[test]
fn unknown_key() {
    assert_refused(
        "[defaults]\nidle_timeout = \"1s\"\nidel_timeout = \"2s\"\n",
        "idel_timeout",
        "idel_timeout",
    );
    let f = function("a", "comand = [\"x\"]");
    assert_refused(&f, "comand", "comand");
}

#[test]
fn wrong_type() {
    assert_refused(
        "[defaults]\nmax_pending = \"lots\"\n",
        "max_pending",
        "max_pending",
    );
    assert_refused(
        &function("a", "max_instances = \"two\""),
        "max_instances",
        "max_instances",
    );
}

#[test]
fn duplicate_function_name() {
    let second = function("a", "").replace("name = \"a\"", "name = \"a\" # again");
    assert_refused(
        &format!("{}{second}", function("a", "")),
        "# again",
        "function.name",
    );
}

#[test]
fn duplicate_port() {
    let port = free_port();
    assert_refused(
        &format!(
            "{}{}",
            function("a", &format!("port = {port}")),
            function("b", &format!("port = {port} # again"))
        ),
        "# again",
        "function.port",
    );
}

#[test]
fn invalid_duration() {
    assert_refused(
        "[defaults]\nidle_timeout = \"soon\"\n",
        "soon",
        "idle_timeout",
    );
    assert_refused(
        &function("a", "start_timeout = \"5 parsecs\""),
        "parsecs",
        "start_timeout",
    );
}

#[test]
fn out_of_range_values_name_line_and_key() {
    assert_refused(
        &function("a", "start_timeout = \"18446744073709551615s\""),
        "18446744073709551615s",
        "function.start_timeout",
    );
    assert_refused(
        "[defaults]\nidle_timeout = \"1s\"\nprewarm_ttl = \"400d\"\n",
        "400d",
        "defaults.prewarm_ttl",
    );
    assert_refused(
        &function("a", "max_instances = 0"),
        "max_instances",
        "function.max_instances",
    );
    assert_refused(
        &function("a", "readiness_path = \"/a b\""),
        "readiness_path",
        "function.readiness_path",
    );
    assert_refused(
        &function("a", "env = { A = \"x\\u0000y\" }"),
        "env =",
        "function.env",
    );
}
