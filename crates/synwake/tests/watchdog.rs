//! `watchdog = "stdio"` (OpenFaaS classic): one process per request, the body on stdin,
//! stdout as the response, headers as `Http_*` variables, a non-zero exit -> 500 with
//! stderr. Process runtime here (no root needed); the oci runtime's case is in tests/oci.rs.

mod common;

use common::{loopback, request, Daemon};
use serde_json::json;

fn deploy(d: &Daemon, name: &str, command: &str) -> common::Resp {
    let body = json!({
        "service": name,
        "envProcess": command,
        "annotations": { "com.synwake.watchdog": "stdio" },
    });
    d.api_json("POST", "/system/functions", &body.to_string())
}

#[test]
fn stdio_functions_get_the_body_on_stdin_headers_as_env_and_500_on_failure() {
    let d = Daemon::start(
        "[[function]]\nname = \"upper\"\nwatchdog = \"stdio\"\ncommand = [\"tr\", \"a-z\", \"A-Z\"]\n",
    );
    // A cat-style function: the body comes back, through stdin and stdout.
    assert_eq!(deploy(&d, "cat", "cat").status, 202);
    let body = common::random_bytes(300_000, 7);
    let r = request(
        loopback(d.shared),
        "POST",
        "/function/cat/",
        &[],
        Some(&body),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body, "the body went through cat unchanged");
    // Two requests, two processes (and each sees only its own body).
    let r = request(
        loopback(d.shared),
        "POST",
        "/function/cat/",
        &[],
        Some(b"second"),
    )
    .unwrap();
    assert_eq!(r.body, b"second");

    // Method, path, query and headers as Http_* variables.
    let r = deploy(
        &d,
        "env",
        r#"sh -c 'echo "$Http_Method $Http_Path $Http_Query $Http_X_Team $SYNWAKE_FUNCTION"'"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let r = request(
        loopback(d.shared),
        "PUT",
        "/function/env/items/7?full=1",
        &[("X-Team", "blue")],
        Some(b"x"),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "PUT /items/7 full=1 blue env\n");

    // A non-zero exit: 500 with what the command wrote on stderr.
    assert_eq!(
        deploy(&d, "fails", "sh -c 'echo broken input >&2; exit 3'").status,
        202
    );
    let r = d.call("fails", "/");
    assert_eq!(r.status, 500);
    assert!(r.text().contains("broken input"), "{}", r.text());
    // The instance stays up: the next request runs the command again.
    assert_eq!(d.call("fails", "/").status, 500);
    assert_eq!(d.available("fails"), 1);

    // faas-cli shows a process function's command as its image.
    assert_eq!(d.status("cat")["image"], "cat");

    // From the config file.
    let r = request(
        loopback(d.shared),
        "POST",
        "/function/upper/",
        &[],
        Some(b"shout"),
    )
    .unwrap();
    assert_eq!(r.text(), "SHOUT");

    // A watchdog mode that does not exist is refused, naming the annotation.
    let r = d.api_json(
        "POST",
        "/system/functions",
        &json!({"service": "bad", "envProcess": "cat", "annotations": {"com.synwake.watchdog": "cgi"}}).to_string(),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("com.synwake.watchdog"), "{}", r.text());
}
