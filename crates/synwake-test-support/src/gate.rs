//! The privileged-test rule: with `CI=true` a missing capability or tool fails the test;
//! otherwise the test is skipped with a loud message saying exactly what was missing.

use std::io::Write;

/// Whether this run is CI's (where a skip counts as a failure).
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Applies the rule for `test` that cannot run because of `why`: panics under CI=true,
/// otherwise prints a loud SKIPPED line.
pub fn skip_or_fail(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: cannot run under CI=true: {why} (privileged tests must run)");
    }
    // Straight to fd 2, not eprintln!: the test harness captures the latter.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED {test}: {why} (set CI=true to make this a failure)\n"
    );
}

/// `None` when `test` may run; applies the rule to `missing` (a reason) otherwise and
/// returns false.
pub fn can_run(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) => {
            skip_or_fail(test, &why);
            false
        }
    }
}

/// The first of `tools` (binary, probe argument) that does not run successfully.
pub fn missing_tool(tools: &[(&str, &str)]) -> Option<String> {
    tools.iter().find_map(|(bin, arg)| {
        match std::process::Command::new(bin)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(s) if s.success() => None,
            _ => Some(format!("`{bin}` not runnable")),
        }
    })
}

/// Debian's python3 (the one that sees Debian's python3-* modules) when it can import
/// `module`; otherwise the rule for `test` applies (`deb` names the package to install)
/// and the answer is `None`.
pub fn python_with(test: &str, module: &str, deb: &str) -> Option<&'static str> {
    let py = "/usr/bin/python3";
    let ok = std::process::Command::new(py)
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    skip_or_fail(
        test,
        &format!("{py} cannot import {module} (scripts/deps.sh installs {deb})"),
    );
    None
}
