//! A bad config stops `synwake up` with a non-zero exit and a message naming the file,
//! the line and the key.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs `synwake up` on `text`; returns (exit code, stderr, config path).
fn up_with(text: &str) -> (Option<i32>, String, String) {
    up_with_env(text, None)
}

/// `synwake up` on `config`, with `SYNWAKE_SERVING_THREADS` set to `serving` or unset.
fn synwake_up(config: &std::path::Path, serving: Option<&str>) -> Command {
    let mut cmd = Command::new(synwake_bin());
    cmd.arg("up").arg("--config").arg(config);
    match serving {
        Some(v) => cmd.env("SYNWAKE_SERVING_THREADS", v),
        None => cmd.env_remove("SYNWAKE_SERVING_THREADS"),
    };
    cmd
}

/// [`up_with`] with `SYNWAKE_SERVING_THREADS` set to `serving` (or unset).
fn up_with_env(text: &str, serving: Option<&str>) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = synwake_up(&path, serving)
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
    assert_refused_text(&format!("{}{tail}", head()), marker, key);
}

fn assert_refused_text(text: &str, marker: &str, key: &str) {
    let text = text.to_string();
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

/// [`head`] with more `[gateway]` lines.
fn head_with(gateway: &str) -> String {
    head().replace("[probe]", &format!("{gateway}\n[probe]"))
}

#[test]
fn serving_threads_out_of_range_names_line_and_key() {
    for bad in [
        "serving_threads = 257",
        "serving_threads = 100000000000",
        "serving_threads = -1",
        "serving_threads = \"two\"",
    ] {
        assert_refused_text(&head_with(bad), bad, "serving_threads");
    }
    // The variable that overrides it is checked the same way.
    for bad in ["lots", "257", "-1", ""] {
        let (code, stderr, _) = up_with_env(&head(), Some(bad));
        assert!(
            code.is_some_and(|c| c != 0),
            "SYNWAKE_SERVING_THREADS={bad:?}: exit {code:?}; stderr: {stderr}"
        );
        assert!(
            stderr.contains("SYNWAKE_SERVING_THREADS") && stderr.contains("0 to 256"),
            "{bad:?}: {stderr}"
        );
    }
}

/// A running `synwake up`, stopped (SIGTERM, then SIGKILL) in `Drop`.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        signal(self.0.id() as i32, libc::SIGTERM);
        let exited = wait_until(Duration::from_secs(10), || {
            self.0.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The line `synwake up` logs about its serving threads, on `gateway` lines and
/// `SYNWAKE_SERVING_THREADS` = `serving`.
fn serving_line(gateway: &str, serving: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synwake.toml");
    // A state dir of its own: this daemon gets as far as using it.
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\napi_listen = \"127.0.0.1:{}\"\nstate_dir = {:?}\n{gateway}\n[probe]\nmode = \"off\"\n",
        free_port(),
        free_port(),
        dir.path().join("state").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut up = Up(synwake_up(&path, serving)
        .env("SYNWAKE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap());
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let found = wait_until(Duration::from_secs(15), || {
        read().contains("client connections are served on")
            || up.0.try_wait().ok().flatten().is_some()
    });
    let text = read();
    assert!(found, "no serving line after 15 s:\n{text}");
    text.lines()
        .find(|l| l.contains("client connections are served on"))
        .unwrap_or_else(|| panic!("synwake exited:\n{text}"))
        .to_string()
}

#[test]
fn serving_threads_come_from_the_config_and_the_variable_overrides_them() {
    let line = serving_line("serving_threads = 3", None);
    assert!(line.ends_with("served on 3 thread(s)"), "{line}");
    let line = serving_line("serving_threads = 0", None);
    assert!(
        line.ends_with("served on the daemon's multi-threaded runtime"),
        "{line}"
    );
    let line = serving_line("serving_threads = 3", Some("1"));
    assert!(line.ends_with("served on 1 thread(s)"), "{line}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let line = serving_line("", None);
    assert!(
        line.ends_with(&format!("served on {cpus} thread(s)")),
        "{line}"
    );
}
