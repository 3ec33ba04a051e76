//! `/system/secrets` (OpenFaaS's shape): create, list, update, delete; a function deployed
//! with `secrets` reads them as files in `$SYNWAKE_SECRETS_DIR`; a missing secret refuses
//! the deploy naming it. Process runtime (no root needed); containers: tests/oci.rs.

mod common;

use std::os::unix::fs::MetadataExt;

use common::Daemon;
use serde_json::json;

#[test]
fn secrets_are_stored_0600_given_to_functions_and_checked_at_deploy() {
    let d = Daemon::start("");
    let secret = |method: &str, body: serde_json::Value| {
        d.api_json(method, "/system/secrets", &body.to_string())
    };
    assert_eq!(
        secret("POST", json!({"name": "db-pass", "value": "s3cret-1"})).status,
        201
    );
    assert_eq!(
        secret("POST", json!({"name": "db-pass", "value": "again"})).status,
        409
    );
    assert_eq!(
        secret("PUT", json!({"name": "nope", "value": "x"})).status,
        404
    );
    let r = secret("POST", json!({"name": "../escape", "value": "x"}));
    assert_eq!(r.status, 400, "{}", r.text());
    let stored = d.state_dir().join("secrets/db-pass");
    assert_eq!(std::fs::metadata(&stored).unwrap().mode() & 0o777, 0o600);
    let r = d.api_get("/system/secrets");
    assert_eq!(r.status, 200);
    let list: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(list[0]["name"], "db-pass");
    assert!(!r.text().contains("s3cret"), "values are never listed");

    // A function reads it as a file in $SYNWAKE_SECRETS_DIR.
    let deploy = |secrets: serde_json::Value| {
        d.api_json(
            "POST",
            "/system/functions",
            &json!({
                "service": "reader",
                "envProcess": "sh -c 'cat \"$SYNWAKE_SECRETS_DIR/db-pass\"; stat -c %a \"$SYNWAKE_SECRETS_DIR\"'",
                "annotations": {"com.synwake.watchdog": "stdio"},
                "secrets": secrets,
            })
            .to_string(),
        )
    };
    let r = deploy(json!(["db-pass", "missing-one"]));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("missing-one"), "{}", r.text());
    assert_eq!(d.api_get("/system/function/reader").status, 404);
    assert_eq!(deploy(json!(["db-pass"])).status, 202);
    assert_eq!(d.call("reader", "/").text(), "s3cret-1700\n");

    // Updated: the next instance reads the new value.
    assert_eq!(
        secret("PUT", json!({"name": "db-pass", "value": "s3cret-2"})).status,
        200
    );
    let scale = json!({"serviceName": "reader", "replicas": 0}).to_string();
    assert!(matches!(
        d.api_json("POST", "/system/scale-function/reader", &scale)
            .status,
        200..=202
    ));
    assert!(common::wait_until(
        std::time::Duration::from_secs(5),
        || d.available("reader") == 0
    ));
    assert_eq!(d.call("reader", "/").text(), "s3cret-2700\n");

    assert_eq!(secret("DELETE", json!({"name": "db-pass"})).status, 200);
    assert_eq!(secret("DELETE", json!({"name": "db-pass"})).status, 404);
    assert!(!stored.exists());
}
