//! The management API against the real binary: deploy, invoke, update, scale, remove,
//! read-only config functions, validation and persistence across a restart.

mod common;

use std::time::Duration;

use common::*;

fn deployment(name: &str, port: u16, greeting: &str) -> String {
    serde_json::json!({
        "service": name,
        "image": "",
        "envProcess": fn_bin().display().to_string(),
        "envVars": { "GREETING": greeting },
        "labels": { "team": "it" },
        "annotations": { "com.synwake.port": port.to_string() },
    })
    .to_string()
}

#[test]
fn deploy_invoke_update_scale_remove() {
    let d = Daemon::start("");
    let own = free_port();
    let r = d.api_json("POST", "/system/functions", &deployment("web", own, "one"));
    assert_eq!(r.status, 202, "{}", r.text());

    let listed: serde_json::Value =
        serde_json::from_slice(&d.api_get("/system/functions").body).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "web")
        .expect("web listed");
    assert_eq!(entry["annotations"]["com.synwake.port"], own.to_string());
    assert_eq!(entry["annotations"]["com.synwake.runtime"], "process");
    assert_eq!(entry["annotations"]["com.synwake.id"], "0fd9bc91");
    assert_eq!(entry["labels"]["team"], "it");
    assert_eq!(entry["availableReplicas"], 0);

    // Invocable on the shared port, on the API's /function/ and on its own port.
    let r = d.call("web", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from web\n"));
    let r = get(d.api, "/function/web/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from web\n"));
    let r = get(own, "/anything");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from web\n"));
    let before = get(own, "/pid").pid();
    assert_eq!(d.status("web")["invocationCount"], 4);

    // Update: new env, the running instance is replaced.
    let r = d.api_json("PUT", "/system/functions", &deployment("web", own, "two"));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.status("web")["envVars"]["GREETING"], "two");
    let after = get(own, "/pid").pid();
    assert_ne!(before, after, "update did not replace the instance");
    assert!(wait_until(Duration::from_secs(2), || !alive(before)));

    // Scale 0 stops, 1 starts, 0 stops again.
    let scale = |n: u32| {
        let r = d.api_json(
            "POST",
            "/system/scale-function/web",
            &format!("{{\"serviceName\":\"web\",\"replicas\":{n}}}"),
        );
        assert_eq!(r.status, 202, "scale to {n}: {}", r.text());
    };
    scale(0);
    assert_eq!(d.available("web"), 0);
    assert!(wait_until(Duration::from_secs(2), || !alive(after)));
    scale(1);
    assert!(
        wait_until(Duration::from_secs(5), || d.available("web") == 1),
        "scale to 1 did not make an instance available"
    );
    let scaled = d.instance_pids();
    assert_eq!(scaled.len(), 1);
    scale(0);
    assert_eq!(d.available("web"), 0);
    assert!(wait_until(Duration::from_secs(2), || !alive(scaled[0])));
    let r = d.api_json(
        "POST",
        "/system/scale-function/web",
        "{\"serviceName\":\"web\",\"replicas\":2}",
    );
    assert_eq!(r.status, 400, "over max_instances: {}", r.text());
    assert!(r.text().contains("replicas"), "{}", r.text());

    // Remove: gone from the API, the gateway and its own port.
    let r = d.api_json("DELETE", "/system/functions", "{\"functionName\":\"web\"}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.api_get("/system/function/web").status, 404);
    assert_eq!(d.call("web", "/").status, 404);
    assert!(
        wait_until(Duration::from_secs(2), || request(
            loopback(own),
            "GET",
            "/",
            &[],
            None
        )
        .is_err()),
        "own port still answers after removal"
    );
    let r = d.api_json("DELETE", "/system/functions", "{\"functionName\":\"web\"}");
    assert_eq!(r.status, 404);
}

#[test]
fn config_functions_are_read_only() {
    let d = Daemon::start(&function("fixed", ""));
    let r = d.api_json(
        "PUT",
        "/system/functions",
        &deployment("fixed", free_port(), "x"),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("fixed"), "{}", r.text());
    let r = d.api_json(
        "POST",
        "/system/functions",
        &deployment("fixed", free_port(), "x"),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let r = d.api_json(
        "DELETE",
        "/system/functions",
        "{\"functionName\":\"fixed\"}",
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        d.status("fixed")["annotations"]["com.synwake.source"],
        "config"
    );
    assert_eq!(d.call("fixed", "/").status, 200);
}

#[test]
fn validation_errors_are_400_naming_the_field() {
    let taken = free_port();
    let d = Daemon::start(&function("owner", &format!("port = {taken}")));
    let fnp = fn_bin().display().to_string();
    let cases = [
        (serde_json::json!({ "envProcess": fnp }), "service"),
        (
            serde_json::json!({ "service": "Bad/Name", "envProcess": fnp }),
            "service",
        ),
        (serde_json::json!({ "service": "nocmd" }), "envProcess"),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "annotations": { "com.synwake.port": "http" } }),
            "annotations.com.synwake.port",
        ),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "annotations": { "com.synwake.port": taken.to_string() } }),
            "annotations.com.synwake.port",
        ),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "annotations": { "com.synwake.port": d.api.to_string() } }),
            "annotations.com.synwake.port",
        ),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "annotations": { "com.synwake.idle-timeout": "soon" } }),
            "annotations.com.synwake.idle-timeout",
        ),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "annotations": { "com.synwake.runtime": "vm" } }),
            "annotations.com.synwake.runtime",
        ),
    ];
    for (body, field) in cases {
        let r = d.api_json("POST", "/system/functions", &body.to_string());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(
            r.text().contains(&format!("`{field}`")),
            "{body}: body does not name {field}: {}",
            r.text()
        );
    }
    let r = d.api_json("POST", "/system/functions", "{not json");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.api_json("DELETE", "/system/functions", "{}");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("functionName"), "{}", r.text());
    // Nothing was deployed by any of these.
    let listed: serde_json::Value =
        serde_json::from_slice(&d.api_get("/system/functions").body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
}

/// Values that used to be accepted and then failed at every start (or panicked the
/// connection task, or were truncated) are refused at deploy with the field named.
#[test]
fn out_of_range_values_are_refused_at_deploy() {
    let d = Daemon::start("");
    let fnp = fn_bin().display().to_string();
    let ann = |k: &str, v: &str| {
        serde_json::json!({ "service": "p", "envProcess": fnp,
            "annotations": { format!("com.synwake.{k}"): v } })
    };
    let cases = [
        (
            ann("start-timeout", "18446744073709551615s"),
            "annotations.com.synwake.start-timeout",
            "out of range",
        ),
        (
            ann("max-instances", "99999999999"),
            "annotations.com.synwake.max-instances",
            "out of range",
        ),
        (
            ann("max-instances", "4294967296"),
            "annotations.com.synwake.max-instances",
            "out of range",
        ),
        (
            ann("readiness-path", "/ready\r\nX: y"),
            "annotations.com.synwake.readiness-path",
            "visible ASCII",
        ),
        (
            ann("readiness-path", "/a b"),
            "annotations.com.synwake.readiness-path",
            "visible ASCII",
        ),
        (
            serde_json::json!({ "service": "p", "envProcess": fnp,
                "envVars": { "A": "x\u{0}y" } }),
            "envVars",
            "NUL",
        ),
    ];
    for (body, field, why) in cases {
        let r = d.api_json("POST", "/system/functions", &body.to_string());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let text = r.text();
        assert!(text.contains(&format!("`{field}`")), "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
    let listed: serde_json::Value =
        serde_json::from_slice(&d.api_get("/system/functions").body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    // The daemon is still whole: a good deploy of the same name works and answers.
    let r = d.api_json(
        "POST",
        "/system/functions",
        &ann("start-timeout", "10s").to_string(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.call("p", "/").status, 200);
}

#[test]
fn deployed_functions_survive_a_restart() {
    let mut d = Daemon::start("");
    let own = free_port();
    let r = d.api_json("POST", "/system/functions", &deployment("kept", own, "one"));
    assert_eq!(r.status, 202, "{}", r.text());
    // (That the port listens right when the deploy returns is its own test below.)
    assert!(wait_listening(own), "own port {own} never listened");
    let pid = get(own, "/pid").pid();

    let status = d.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exit after SIGTERM"
    );
    assert!(!alive(pid), "instance outlived the daemon");

    d.spawn();
    let listed: serde_json::Value =
        serde_json::from_slice(&d.api_get("/system/functions").body).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(d.status("kept")["envVars"]["GREETING"], "one");
    assert_eq!(d.status("kept")["annotations"]["com.synwake.source"], "api");
    let r = d.call("kept", "/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from kept\n"));
    assert!(
        wait_listening(own),
        "own port {own} not reopened after the restart"
    );
    let r = get(own, "/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from kept\n"));
}

#[test]
fn own_port_listens_when_the_deploy_returns() {
    // A client told "deployed" may call the function's port at once (and the probe wakes
    // on SYNs to it): a refused connection there is a lost request.
    let d = Daemon::start("");
    let own = free_port();
    let r = d.api_json("POST", "/system/functions", &deployment("prompt", own, "x"));
    assert_eq!(r.status, 202, "{}", r.text());
    let first = request(loopback(own), "GET", "/", &[], None);
    assert!(
        first.as_ref().is_ok_and(|r| r.status == 200),
        "first request to the own port right after the 202: {first:?}"
    );
}

#[test]
fn config_function_ports_listen_when_healthz_answers() {
    let own = free_port();
    let d = Daemon::start(&function("early", &format!("port = {own}")));
    // Daemon::start returned on the first 200 from /healthz.
    let first = request(loopback(own), "GET", "/", &[], None);
    assert!(
        first.as_ref().is_ok_and(|r| r.status == 200),
        "first request to the own port once /healthz answers: {first:?}"
    );
    drop(d);
}

/// The adaptive idle policy through the real daemon: its decision in the API and in
/// `synwake describe`, and its learned history kept across a restart.
#[test]
fn idle_policy_is_visible_and_its_history_survives_a_restart() {
    let body = format!(
        "[[function]]\nname = \"learner\"\ncommand = [{:?}]\nidle_policy = \"adaptive\"\n",
        fn_bin().display().to_string()
    );
    let mut d = Daemon::start(&body);
    let p = &d.status("learner")["idlePolicy"];
    assert_eq!(p["policy"], "adaptive");
    assert_eq!(p["basis"], "fallback");
    assert_eq!(p["keepAliveSeconds"], 60.0);
    for _ in 0..3 {
        assert_eq!(d.call("learner", "/").status, 200);
    }
    assert_eq!(d.status("learner")["idlePolicy"]["samples"], 2);
    let out = std::process::Command::new(synwake_bin())
        .args(["describe", "learner"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.api))
        .env("SYNWAKE_STATE_DIR", d.state_dir())
        .env_remove("SYNWAKE_PASSWORD")
        .env_remove("SYNWAKE_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("idle policy:  adaptive (fallback, 2 idle times)"),
        "{text}"
    );
    assert!(
        text.contains("keep-alive:   1m after the last request"),
        "{text}"
    );

    let status = d.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    assert!(d.state_dir().join("idle-history.json").exists());
    d.spawn();
    assert_eq!(
        d.status("learner")["idlePolicy"]["samples"],
        2,
        "history restored"
    );
}
