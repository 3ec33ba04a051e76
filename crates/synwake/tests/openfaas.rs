//! OpenFaaS tooling against the real binary: the call sequences faas-cli (0.16-ish) makes
//! (PUT-then-POST deploy with null maps and unused fields, list, describe, invoke through
//! the gateway URL, scale, remove), namespaces, /system/info, function logs (tail and
//! follow), basic auth on and off, and synwake's own CLI doing the same.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const NS: &str = "openfaas-fn";

/// The body faas-cli sends for `faas-cli deploy --name <name> --fprocess <cmd>`: maps it
/// has no values for are null, lists are empty, plus a field synwake does not know.
fn faas_cli_deployment(name: &str, greeting: Option<&str>) -> String {
    json!({
        "service": name,
        "image": "ghcr.io/openfaas/alpine:latest",
        "network": "func_functions",
        "envProcess": fn_bin().display().to_string(),
        "envVars": greeting.map(|g| json!({ "GREETING": g })),
        "constraints": [],
        "secrets": [],
        "labels": null,
        "annotations": null,
        "limits": null,
        "requests": null,
        "readOnlyRootFilesystem": false,
        "namespace": NS,
    })
    .to_string()
}

fn basic(user: &str, password: &str) -> String {
    basic_auth(user, password)
}

/// A request to the API port with extra headers (e.g. Authorization).
fn api_req(d: &Daemon, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut h = headers.to_vec();
    if !body.is_empty() {
        h.push(("content-type", "application/json"));
    }
    request(
        loopback(d.api),
        method,
        path,
        &h,
        (!body.is_empty()).then_some(body.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn json_of(r: &Resp) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

fn ndjson(r: &Resp) -> Vec<Value> {
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect()
}

/// Restarts `d` with `api_password_file` set to a file holding `password`.
fn with_password(d: &mut Daemon, password: &str) {
    d.stop_with(libc::SIGTERM, Duration::from_secs(10))
        .expect("daemon stopped");
    let file = d.dir.path().join("api-password");
    // A trailing newline, as `echo secret > file` leaves it; the daemon trims it.
    std::fs::write(&file, format!("{password}\n")).unwrap();
    // Private, or the daemon refuses it.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    d.password_override = Some(password.to_string());
    let text = std::fs::read_to_string(&d.config).unwrap().replacen(
        "[gateway]\n",
        &format!(
            "[gateway]\napi_password_file = {:?}\n",
            file.display().to_string()
        ),
        1,
    );
    std::fs::write(&d.config, text).unwrap();
    d.spawn();
}

/// Runs the synwake CLI against `d` (URL from SYNWAKE_URL, as a user would set it; the
/// generated password found through SYNWAKE_STATE_DIR, as root's CLI finds it).
fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(synwake_bin())
        .args(args)
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.api))
        .env("SYNWAKE_STATE_DIR", d.state_dir())
        .env_remove("SYNWAKE_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run synwake CLI")
}

fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "CLI failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A streaming GET (chunked response read as it arrives), for /system/logs?follow=true.
struct Follow {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub local_port: u16,
}

impl Follow {
    fn open(d: &Daemon, path: &str) -> Follow {
        let port = d.api;
        let mut s = TcpStream::connect(loopback(port)).expect("connect");
        let local_port = s.local_addr().unwrap().port();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {}\r\n\r\n",
            d.auth()
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let mut chunked = false;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).expect("header");
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            chunked |= h == "transfer-encoding: chunked";
        }
        assert!(chunked, "a followed log is a chunked stream");
        Follow {
            reader,
            status,
            local_port,
        }
    }

    /// The next NDJSON record, or None when nothing arrives within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
        let mut line = String::new();
        loop {
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Ok(0) => panic!("log stream closed by the server"),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    assert!(line.is_empty(), "timed out inside a record");
                    return None;
                }
                Err(e) => panic!("reading the log stream: {e}"),
            }
            let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            assert!(n > 0, "log stream ended (last chunk)");
            let mut chunk = vec![0; n + 2];
            self.reader.read_exact(&mut chunk).expect("chunk");
            line.push_str(std::str::from_utf8(&chunk[..n]).expect("utf-8"));
            if line.ends_with('\n') {
                return Some(serde_json::from_str(line.trim_end()).expect("NDJSON record"));
            }
        }
    }
}

/// TCP state (hex, as in /proc/net/tcp) of the API's side of the connection from
/// `client_port`, or None once the daemon has closed and released it.
fn server_side_state(api: u16, client_port: u16) -> Option<String> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
        (port(f[1]) == Some(api) && port(f[2]) == Some(client_port)).then(|| f[3].to_string())
    })
}

fn check_record(rec: &Value, name: &str) {
    assert_eq!(rec["name"], name, "{rec}");
    assert_eq!(rec["namespace"], NS, "{rec}");
    assert!(
        rec["instance"].as_str().is_some_and(|i| !i.is_empty()),
        "{rec}"
    );
    assert!(rec["text"].is_string(), "{rec}");
    let ts = rec["timestamp"].as_str().expect("timestamp");
    let t = humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("{ts:?} not RFC 3339: {e}"));
    let age = std::time::SystemTime::now()
        .duration_since(t)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(120), "timestamp {ts} is stale");
}

#[test]
fn faas_cli_deploy_describe_invoke_scale_remove() {
    let d = Daemon::start("");
    let name = "faasfn";
    let body = faas_cli_deployment(name, None);

    // faas-cli deploy: PUT first; 404 for a new function, then POST the same body.
    let r = d.api_json("PUT", "/system/functions", &body);
    assert_eq!(r.status, 404, "PUT of a new function: {}", r.text());
    let r = d.api_json("POST", "/system/functions", &body);
    assert!(
        matches!(r.status, 200..=202),
        "POST: {} {}",
        r.status,
        r.text()
    );

    // faas-cli list / describe with the namespace it defaults to.
    let r = d.api_get(&format!("/system/functions?namespace={NS}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let list = json_of(&r);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, [name]);
    let r = d.api_get(&format!("/system/function/{name}?namespace={NS}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let st = json_of(&r);
    for field in [
        "name",
        "image",
        "namespace",
        "envProcess",
        "envVars",
        "labels",
        "annotations",
        "replicas",
        "availableReplicas",
        "invocationCount",
    ] {
        assert!(st.get(field).is_some(), "describe lacks {field}: {st}");
    }
    assert_eq!(st["name"], name);
    assert_eq!(st["namespace"], NS);
    assert_eq!(st["envProcess"], fn_bin().display().to_string());
    assert_eq!(st["envVars"], json!({}));
    assert_eq!(st["labels"], json!({}));
    assert_eq!(st["availableReplicas"], 0, "nothing runs before a call");
    assert_eq!(st["invocationCount"], 0);

    // faas-cli invoke: POST <gateway>/function/<name> on the API's URL; cold, then warm.
    let r = api_req(&d, "POST", &format!("/function/{name}"), &[], "ping");
    assert_eq!((r.status, r.text().as_str()), (200, "ping"));
    assert_eq!(r.header("x-synwake-cold-start"), Some("true"));
    let r = api_req(
        &d,
        "POST",
        &format!("/function/{name}/sub/path?x=1"),
        &[],
        "pong",
    );
    assert_eq!((r.status, r.text().as_str()), (200, "pong"));
    assert_eq!(r.header("x-synwake-cold-start"), Some("false"));
    let st = d.status(name);
    assert_eq!(st["availableReplicas"], 1, "Ready after a call: {st}");
    assert_eq!(st["replicas"], 1, "{st}");
    assert_eq!(st["invocationCount"], 2, "{st}");
    let before = get(d.api, &format!("/function/{name}/pid")).pid();

    // The public port serves functions only, never the management API.
    let r = get(d.shared, "/system/functions");
    assert_eq!(r.status, 404, "/system/* on the public port: {}", r.text());
    assert_eq!(get(d.shared, "/system/info").status, 404);

    // Redeploy: PUT of a known function updates it and replaces the running instance.
    let mut update: Value = serde_json::from_str(&faas_cli_deployment(name, Some("two"))).unwrap();
    update["limits"] = json!({ "memory": "64Mi", "cpu": null });
    let r = d.api_json("PUT", "/system/functions", &update.to_string());
    assert!(
        matches!(r.status, 200..=202),
        "PUT update: {} {}",
        r.status,
        r.text()
    );
    assert_eq!(d.status(name)["envVars"]["GREETING"], "two");
    let after = get(d.api, &format!("/function/{name}/pid")).pid();
    assert_ne!(before, after, "the update did not replace the instance");
    assert!(
        wait_until(Duration::from_secs(5), || !alive(before)),
        "the old instance {before} outlived the update"
    );

    // The unknown field was noted in the daemon's log, once over three deploy calls.
    let log = d.log();
    let notes = log
        .lines()
        .filter(|l| l.contains("\"network\"") && l.contains("not used"))
        .count();
    assert_eq!(notes, 1, "notes of the unused field `network`:\n{log}");
    // The process runtime enforces limits (in the instance's cgroup): no note.
    let limits_notes = log
        .lines()
        .filter(|l| l.contains("\"limits\"") && l.contains("not used"))
        .count();
    assert_eq!(limits_notes, 0, "notes of `limits`:\n{log}");
    // Empty lists, nulls and false are not worth a note.
    for quiet in [
        "constraints",
        "secrets",
        "requests",
        "readOnlyRootFilesystem",
    ] {
        assert!(
            !log.lines()
                .any(|l| l.contains(&format!("\"{quiet}\"")) && l.contains("not used")),
            "{quiet} noted although empty:\n{log}"
        );
    }

    // faas-cli scale: replicas 0 stops the instance.
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}?namespace={NS}"),
        &json!({ "serviceName": name, "replicas": 0, "namespace": NS }).to_string(),
    );
    assert!(
        matches!(r.status, 200..=202),
        "scale: {} {}",
        r.status,
        r.text()
    );
    assert_eq!(d.available(name), 0);
    assert!(wait_until(Duration::from_secs(5), || !alive(after)));

    // faas-cli remove: DELETE with the namespace as a query parameter.
    let r = d.api_json(
        "DELETE",
        &format!("/system/functions?namespace={NS}"),
        &json!({ "functionName": name }).to_string(),
    );
    assert!(
        matches!(r.status, 200..=202),
        "DELETE: {} {}",
        r.status,
        r.text()
    );
    let r = d.api_get(&format!("/system/function/{name}?namespace={NS}"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        json_of(&d.api_get("/system/functions")),
        json!([]),
        "list after removal"
    );
}

#[test]
fn one_namespace_and_system_info() {
    let d = Daemon::start("");
    let name = "nsfn";
    let r = d.api_json(
        "POST",
        "/system/functions",
        &faas_cli_deployment(name, None),
    );
    assert_eq!(r.status, 202, "{}", r.text());

    let r = d.api_get("/system/namespaces");
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r), json!([NS]));

    // The one namespace, or none, works; any other is 404.
    assert_eq!(d.api_get(&format!("/system/function/{name}")).status, 200);
    assert_eq!(d.api_get("/system/functions?namespace=").status, 200);
    for path in [
        "/system/functions?namespace=other".to_string(),
        format!("/system/function/{name}?namespace=other"),
        format!("/system/logs?name={name}&namespace=other"),
    ] {
        let r = d.api_get(&path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}?namespace=other"),
        &json!({ "serviceName": name, "replicas": 1 }).to_string(),
    );
    assert_eq!(r.status, 404, "scale in another namespace: {}", r.text());
    let r = d.api_json(
        "DELETE",
        "/system/functions?namespace=other",
        &json!({ "functionName": name }).to_string(),
    );
    assert_eq!(r.status, 404, "delete in another namespace: {}", r.text());
    // The namespace as a body field counts the same as the query parameter.
    let mut other: Value = serde_json::from_str(&faas_cli_deployment("elsewhere", None)).unwrap();
    other["namespace"] = json!("other");
    let r = d.api_json("POST", "/system/functions", &other.to_string());
    assert_eq!(r.status, 404, "deploy into another namespace: {}", r.text());
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}"),
        &json!({ "serviceName": name, "replicas": 1, "namespace": "other" }).to_string(),
    );
    assert_eq!(
        r.status,
        404,
        "scale body naming another namespace: {}",
        r.text()
    );
    let r = d.api_json(
        "DELETE",
        "/system/functions",
        &json!({ "functionName": name, "namespace": "other" }).to_string(),
    );
    assert_eq!(
        r.status,
        404,
        "delete body naming another namespace: {}",
        r.text()
    );
    assert_eq!(d.status(name)["name"], name, "still deployed");
    let listed = json_of(&d.api_get("/system/functions"));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // GET /system/info, as `faas-cli version --gateway` reads it.
    let info = json_of(&d.api_get("/system/info"));
    assert_eq!(info["provider"]["provider"], "synwake", "{info}");
    // "oci" once the oci runtime is set up (as root), "process" otherwise.
    // SAFETY: plain syscall.
    let oci = unsafe { libc::geteuid() } == 0 && !d.log().contains("oci runtime unavailable");
    let want = if oci { "oci" } else { "process" };
    assert_eq!(info["provider"]["orchestration"], want, "{info}");
    let release = info["version"]["release"].as_str().expect("release");
    assert_eq!(release, env!("CARGO_PKG_VERSION"));
    assert!(info["version"]["sha"].is_string(), "{info}");
    assert_eq!(info["provider"]["version"], info["version"], "{info}");
    assert_eq!(info["arch"], std::env::consts::ARCH, "{info}");
}

#[test]
fn logs_tail_follow_and_cli() {
    let d = Daemon::start("");
    let name = "logfn";
    let r = d.api_json(
        "POST",
        "/system/functions",
        &faas_cli_deployment(name, None),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let r = d.api_get(&format!("/system/logs?name={name}&namespace={NS}&tail=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "", "no output before the first start");

    // Two starts: each instance prints its "listening" line.
    assert_eq!(d.call(name, "/").status, 200);
    let first_pid = get(d.api, &format!("/function/{name}/pid")).pid();
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}"),
        &json!({ "serviceName": name, "replicas": 0 }).to_string(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(5), || !alive(first_pid)));
    assert_eq!(d.call(name, "/").status, 200);

    let r = d.api_get(&format!("/system/logs?name={name}&namespace={NS}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let all = ndjson(&r);
    let listening: Vec<&Value> = all
        .iter()
        .filter(|l| {
            l["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("synwake-fn: listening on"))
        })
        .collect();
    assert_eq!(listening.len(), 2, "{all:?}");
    assert_ne!(listening[0]["instance"], listening[1]["instance"]);

    // faas-cli logs --tail 1: exactly the last line, in the OpenFaaS record shape.
    let r = d.api_get(&format!(
        "/system/logs?name={name}&namespace={NS}&tail=1&follow=false"
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let tail = ndjson(&r);
    assert_eq!(tail.len(), 1, "{}", r.text());
    check_record(&tail[0], name);
    assert_eq!(&tail[0], all.last().unwrap());
    let keys: Vec<&str> = tail[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["instance", "name", "namespace", "text", "timestamp"]
    );

    // instance= and since= narrow it down.
    let second = listening[1]["instance"].as_str().unwrap();
    let r = d.api_get(&format!("/system/logs?name={name}&instance={second}"));
    let of_second = ndjson(&r);
    assert!(!of_second.is_empty());
    assert!(
        of_second.iter().all(|l| l["instance"] == second),
        "{of_second:?}"
    );
    let since = listening[1]["timestamp"].as_str().unwrap();
    let r = d.api_get(&format!("/system/logs?name={name}&since={since}"));
    let recent = ndjson(&r);
    assert!(recent
        .iter()
        .all(|l| l["timestamp"].as_str() >= Some(since)));
    assert!(!recent.iter().any(|l| l == listening[0]), "{recent:?}");
    // Go clients format `since` in local time: the same instant as +01:00.
    let plus_one = humantime::format_rfc3339_nanos(
        humantime::parse_rfc3339(since).unwrap() + Duration::from_secs(3600),
    )
    .to_string();
    let plus_one = format!("{}%2B01:00", plus_one.trim_end_matches('Z'));
    let r = d.api_get(&format!("/system/logs?name={name}&since={plus_one}"));
    assert_eq!(r.status, 200, "since={plus_one}: {}", r.text());
    assert_eq!(ndjson(&r), recent, "since={plus_one}");
    assert_eq!(d.api_get("/system/logs?name=nosuch").status, 404);
    assert_eq!(d.api_get("/system/logs").status, 400);

    // synwake logs <name> --tail 1 prints that line.
    let out = ok_stdout(&cli(&d, &["logs", name, "--tail", "1"]));
    let text = tail[0]["text"].as_str().unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(text) && out.contains(second), "{out}");

    // follow=true: the backlog, then a line printed after the request started.
    let mut follow = Follow::open(
        &d,
        &format!("/system/logs?name={name}&namespace={NS}&tail=1&follow=true"),
    );
    assert_eq!(follow.status, 200);
    let backlog = follow.next(Duration::from_secs(5)).expect("the tail line");
    assert_eq!(backlog, tail[0]);
    assert!(
        follow.next(Duration::from_millis(300)).is_none(),
        "nothing new yet"
    );
    // The CLI follows too.
    let mut cli_follow = Command::new(synwake_bin())
        .args(["logs", name, "-f", "--tail", "1"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.api))
        .env("SYNWAKE_STATE_DIR", d.state_dir())
        .env_remove("SYNWAKE_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("synwake logs -f");
    let (tx, rx) = mpsc::channel();
    let stdout = cli_follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The backlog line printed means the daemon has subscribed the CLI to new lines.
    let printed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("synwake logs -f printed the backlog");
    assert!(
        printed.contains(text) && printed.contains(second),
        "{printed}"
    );

    let second_pid = get(d.api, &format!("/function/{name}/pid")).pid();
    let r = d.api_json(
        "POST",
        &format!("/system/scale-function/{name}"),
        &json!({ "serviceName": name, "replicas": 0 }).to_string(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(5), || !alive(second_pid)));
    assert_eq!(d.call(name, "/").status, 200, "third start");

    let live = follow
        .next(Duration::from_secs(10))
        .expect("a line printed after the follow started");
    check_record(&live, name);
    assert!(
        live["text"]
            .as_str()
            .unwrap()
            .starts_with("synwake-fn: listening on"),
        "{live}"
    );
    assert_ne!(
        live["instance"], second,
        "a new instance printed it: {live}"
    );
    let printed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("synwake logs -f printed the new line");
    assert!(printed.contains("synwake-fn: listening on"), "{printed}");
    assert!(
        printed.contains(live["instance"].as_str().unwrap()),
        "{printed}"
    );
    let _ = cli_follow.kill();
    let _ = cli_follow.wait();

    // The stream stays open while the client is there...
    assert!(follow.next(Duration::from_millis(500)).is_none());
    assert_eq!(
        server_side_state(d.api, follow.local_port).as_deref(),
        Some("01"),
        "the daemon's side of the follow is ESTABLISHED"
    );
    // ...and the daemon lets it go when the client does.
    let port = follow.local_port;
    drop(follow);
    assert!(
        wait_until(Duration::from_secs(5), || server_side_state(d.api, port)
            .is_none()),
        "the daemon kept the follow connection after the client left: state {:?}",
        server_side_state(d.api, port)
    );
}

/// A `curl -u admin:<password>` call on the API: a real basic-auth client.
fn curl(d: &Daemon, user_password: Option<&str>, method: &str, path: &str, body: &str) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]);
    if let Some(up) = user_password {
        cmd.args(["-u", up]);
    }
    if !body.is_empty() {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{}{path}", d.api))
        .output()
        .expect("run curl (scripts/deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn basic_auth_always_on() {
    let mut d = Daemon::start("");
    let name = "authfn";
    // No password file configured: a password is generated, never an open API.
    let generated = d.state_dir().join("api-password");
    let mode = std::fs::metadata(&generated).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "generated password file mode"
    );
    let password = d.password();
    assert!(password.len() >= 32, "a strong password: {password:?}");
    assert_eq!(
        d.log().matches(&password).count(),
        1,
        "printed once on generation:\n{}",
        d.log()
    );
    let deployment = faas_cli_deployment(name, None);
    assert_eq!(
        api_req(&d, "POST", "/system/functions", &[], &deployment).status,
        401,
        "an unauthenticated deploy"
    );
    assert_eq!(
        curl(&d, None, "POST", "/system/functions", &deployment),
        401
    );
    assert_eq!(
        curl(&d, Some("admin:"), "GET", "/system/functions", ""),
        401
    );
    // curl -u with the generated password: a real basic-auth client.
    let up = format!("admin:{password}");
    assert_eq!(
        curl(&d, Some(&up), "POST", "/system/functions", &deployment),
        202
    );
    assert_eq!(curl(&d, Some(&up), "GET", "/system/info", ""), 200);
    // Root's CLI finds the generated password in the state dir.
    let out = ok_stdout(&cli(&d, &["list"]));
    assert!(out.lines().any(|l| l.starts_with(name)), "{out}");
    // Without it (another state dir, nothing in the environment), the CLI gets 401 and
    // says how to log in.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(synwake_bin())
        .args(["list"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.api))
        .env("SYNWAKE_STATE_DIR", elsewhere.path())
        .env_remove("SYNWAKE_PASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("401"), "{err}");
    assert!(err.contains("--password"), "{err}");
    // A restart reuses the password and does not print it again.
    d.stop_with(libc::SIGTERM, Duration::from_secs(10))
        .expect("daemon stopped");
    d.spawn();
    assert_eq!(d.password(), password);
    assert_eq!(d.log().matches(&password).count(), 1, "{}", d.log());
    assert_eq!(curl(&d, Some(&up), "GET", "/system/functions", ""), 200);

    with_password(&mut d, "s3cret");
    let good = basic("admin", "s3cret");
    let calls: Vec<(&str, String, String)> = vec![
        ("GET", "/system/functions".into(), String::new()),
        (
            "GET",
            format!("/system/functions?namespace={NS}"),
            String::new(),
        ),
        ("GET", format!("/system/function/{name}"), String::new()),
        ("GET", "/system/info".into(), String::new()),
        ("GET", "/system/namespaces".into(), String::new()),
        ("GET", format!("/system/logs?name={name}"), String::new()),
        (
            "PUT",
            "/system/functions".into(),
            faas_cli_deployment(name, Some("authed")),
        ),
        (
            "POST",
            "/system/functions".into(),
            faas_cli_deployment("authfn2", None),
        ),
        (
            "POST",
            format!("/system/scale-function/{name}"),
            json!({ "serviceName": name, "replicas": 0 }).to_string(),
        ),
        (
            "DELETE",
            "/system/functions".into(),
            json!({ "functionName": "authfn2" }).to_string(),
        ),
        ("GET", "/system/no-such-endpoint".into(), String::new()),
    ];
    let wrong = [
        None,
        Some(basic("admin", "wrong")),
        Some(basic("root", "s3cret")),
        Some("Bearer s3cret".to_string()),
        Some("Basic !!!".to_string()),
    ];
    for (method, path, body) in &calls {
        for cred in &wrong {
            let h: Vec<(&str, &str)> = cred.iter().map(|c| ("authorization", c.as_str())).collect();
            let r = api_req(&d, method, path, &h, body);
            assert_eq!(r.status, 401, "{method} {path} with {cred:?}: {}", r.text());
            let challenge = r.header("www-authenticate").unwrap_or("");
            assert!(
                challenge.starts_with("Basic realm="),
                "{method} {path}: WWW-Authenticate {challenge:?}"
            );
        }
    }
    // Nothing changed through the refused calls.
    assert_eq!(
        api_req(
            &d,
            "GET",
            "/system/function/authfn2",
            &[("authorization", &good)],
            ""
        )
        .status,
        404
    );
    for (method, path, body) in &calls {
        let r = api_req(&d, method, path, &[("authorization", &good)], body);
        let want = if path.ends_with("no-such-endpoint") {
            405
        } else if *method == "GET" {
            200
        } else {
            202
        };
        let ok = r.status == want || (*method == "DELETE" && r.status == 200);
        assert!(ok, "{method} {path} as admin: {} {}", r.status, r.text());
    }
    let st = json_of(&api_req(
        &d,
        "GET",
        &format!("/system/function/{name}"),
        &[("authorization", &good)],
        "",
    ));
    assert_eq!(st["envVars"]["GREETING"], "authed");

    // Functions and health stay open.
    assert_eq!(d.api_get("/healthz").status, 200);
    let r = api_req(&d, "POST", &format!("/function/{name}"), &[], "open");
    assert_eq!((r.status, r.text().as_str()), (200, "open"));
    let r = get(d.api, &format!("/function/{name}/x?y=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.call(name, "/").status, 200);

    // The CLI: refused with the (now unused) generated password, works with --password.
    let out = cli(&d, &["list"]);
    assert!(
        !out.status.success(),
        "list with the wrong password succeeded"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok_stdout(&cli(&d, &["--password", "s3cret", "list"]));
    assert!(out.lines().any(|l| l.starts_with(name)), "{out}");
}

#[test]
fn synwake_cli_against_the_daemon() {
    let mut d = Daemon::start("");
    with_password(&mut d, "pw");
    let fnp = fn_bin().display().to_string();
    let pw = ["--password", "pw"];
    let run = |args: &[&str]| -> String {
        let mut all: Vec<&str> = pw.to_vec();
        all.extend_from_slice(args);
        ok_stdout(&cli(&d, &all))
    };

    let out = run(&[
        "deploy",
        "--name",
        "clifn",
        "--command",
        &fnp,
        "-e",
        "GREETING=x",
    ]);
    assert!(out.contains("clifn deployed"), "{out}");
    // The same command again is an update (PUT, no POST).
    let out = run(&[
        "deploy",
        "--name",
        "clifn",
        "--command",
        &fnp,
        "-e",
        "GREETING=y",
    ]);
    assert!(out.contains("clifn updated"), "{out}");
    let auth = basic("admin", "pw");
    let st = json_of(&api_req(
        &d,
        "GET",
        "/system/function/clifn",
        &[("authorization", &auth)],
        "",
    ));
    assert_eq!(st["envVars"]["GREETING"], "y");

    let out = run(&["list"]);
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("clifn "))
        .unwrap_or_else(|| panic!("clifn not listed: {out}"))
        .split_whitespace()
        .collect();
    // NAME INVOCATIONS REPLICAS AVAILABLE RUNTIME PORT
    assert_eq!(row, ["clifn", "0", "0", "0", "process", "-"], "{out}");

    let out = cli(
        &d,
        &["--password", "pw", "invoke", "clifn", "--data", "hi", "-v"],
    );
    assert_eq!(ok_stdout(&out), "hi");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("200 OK") && err.contains("cold start: true"),
        "{err}"
    );
    let out = cli(
        &d,
        &["--password", "pw", "invoke", "clifn", "--path", "/a", "-v"],
    );
    assert_eq!(ok_stdout(&out), "hello from clifn\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cold start: false"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["list"]);
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("clifn "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["clifn", "2", "1", "1"], "{out}");

    let out = run(&["scale", "clifn", "0"]);
    assert!(out.contains("scaled to 0"), "{out}");
    let st = json_of(&api_req(
        &d,
        "GET",
        "/system/function/clifn",
        &[("authorization", &auth)],
        "",
    ));
    assert_eq!(st["availableReplicas"], 0, "{st}");

    let out = run(&["remove", "clifn"]);
    assert!(out.contains("clifn removed"), "{out}");
    let r = api_req(
        &d,
        "GET",
        "/system/function/clifn",
        &[("authorization", &auth)],
        "",
    );
    assert_eq!(r.status, 404);
    let out = cli(&d, &["--password", "pw", "remove", "clifn"]);
    assert!(!out.status.success(), "removing twice succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

/// Reads one HTTP request from `stream`: (request line + headers, lowercased names; body).
fn read_one_request(stream: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).expect("read callback");
        assert!(n > 0, "callback connection closed early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).expect("read body");
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    (head, buf[head_end..head_end + len].to_vec())
}

#[test]
fn async_function_calls_back_with_the_response() {
    // The callback receiver is on loopback, which callbacks may reach only when allowed.
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &function("echo", ""));
    // The callback receiver: a plain listener on loopback.
    let callback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cb_port = callback.local_addr().unwrap().port();
    let cb_url = format!("http://127.0.0.1:{cb_port}/done");

    let r = api_req(
        &d,
        "POST",
        "/async-function/echo",
        &[("x-callback-url", cb_url.as_str())],
        "ping from an async call",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let call_id = r.header("x-call-id").expect("X-Call-Id").to_string();
    assert!(!call_id.is_empty());

    let (mut conn, _) = callback.accept().expect("the callback arrives");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (head, body) = read_one_request(&mut conn);
    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .unwrap();
    assert!(head.starts_with("post /done "), "{head}");
    assert!(head.contains(&format!("x-call-id: {call_id}")), "{head}");
    assert!(head.contains("x-function-status: 200"), "{head}");
    assert_eq!(body, b"ping from an async call");

    // Unknown function, wrong method, bad callback URL.
    assert_eq!(
        api_req(&d, "POST", "/async-function/nope", &[], "x").status,
        404
    );
    assert_eq!(
        api_req(&d, "GET", "/async-function/echo", &[], "").status,
        405
    );
    let r = api_req(
        &d,
        "POST",
        "/async-function/echo",
        &[("x-callback-url", "ftp://example/x")],
        "x",
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("X-Callback-Url"), "{}", r.text());
}

/// What faas-cli 0.16 shows: `createdAt` is set and kept by an update, the invocation
/// count survives an update, limits come back in the units they were given, and a
/// process function's `image` is its command.
#[test]
fn faas_cli_fields_survive_an_update_and_limits_keep_their_units() {
    let d = Daemon::start("");
    let name = "countme";
    let r = d.api_json(
        "POST",
        "/system/functions",
        &faas_cli_deployment(name, None),
    );
    assert!(matches!(r.status, 200..=202), "{}", r.text());
    for i in 0..3 {
        let r = api_req(&d, "POST", &format!("/function/{name}"), &[], "x");
        assert_eq!(r.status, 200, "call {i}: {}", r.text());
    }
    let st = d.status(name);
    assert_eq!(st["invocationCount"], 3, "{st}");
    assert_eq!(st["image"], fn_bin().display().to_string(), "{st}");
    let created = st["createdAt"].as_str().expect("createdAt").to_string();
    let t = humantime::parse_rfc3339(&created).expect("createdAt is RFC 3339");
    let age = std::time::SystemTime::now().duration_since(t).unwrap();
    assert!(
        age < Duration::from_secs(120),
        "createdAt {created} is {age:?} old"
    );

    std::thread::sleep(Duration::from_millis(1100)); // a later second for a new createdAt
    let r = d.api_json(
        "PUT",
        "/system/functions",
        &faas_cli_deployment(name, Some("updated")),
    );
    assert!(matches!(r.status, 200..=202), "{}", r.text());
    let st = d.status(name);
    assert_eq!(st["envVars"]["GREETING"], "updated", "{st}");
    assert_eq!(st["invocationCount"], 3, "count lost by the update: {st}");
    assert_eq!(st["createdAt"], created.as_str(), "{st}");
    let r = api_req(&d, "POST", &format!("/function/{name}"), &[], "y");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.status(name)["invocationCount"], 4);

    // Limits as given (never started: limits need cgroups, not this test's subject).
    let mut body: Value = serde_json::from_str(&faas_cli_deployment("limited", None)).unwrap();
    body["limits"] = json!({ "memory": "64Mi", "cpu": "500m" });
    let r = d.api_json("POST", "/system/functions", &body.to_string());
    assert!(matches!(r.status, 200..=202), "{}", r.text());
    let st = d.status("limited");
    assert_eq!(
        st["limits"],
        json!({ "memory": "64Mi", "cpu": "500m" }),
        "{st}"
    );
    let r = d.api_get("/system/functions");
    let listed = json_of(&r);
    let limited = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "limited")
        .unwrap();
    assert_eq!(limited["limits"]["memory"], "64Mi");
    assert!(limited["createdAt"].is_string());
}
