//! Fault tier, bounded: synwake is killed with SIGKILL at pseudo-random points while it
//! deploys, starts and stops a function whose command is `sh -c` with a grandchild, and
//! restarted on the same state dir. After each round: no process of the function
//! outlives a scale to zero, and what the API lists equals what the state file holds.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// Processes whose environment names `function` (the instance and its grandchildren).
fn processes_of(function: &str) -> Vec<i32> {
    let needle = format!("SYNWAKE_FUNCTION={function}");
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect();
    pids.sort();
    pids
}

/// Function names the API lists.
fn api_names(d: &Daemon) -> BTreeSet<String> {
    let r = d.api_get("/system/functions");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// Function names the state file holds (empty if there is none yet).
fn disk_names(d: &Daemon) -> BTreeSet<String> {
    let Ok(text) = std::fs::read_to_string(d.state_dir().join("functions.json")) else {
        return BTreeSet::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("state file is whole JSON");
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["functions"].as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .filter_map(|f| {
            f["name"]
                .as_str()
                .or_else(|| f["service"].as_str())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn kill_9_at_random_points_leaves_no_orphans_and_api_equals_disk() {
    let name = format!("flife{}", std::process::id());
    let mut d = Daemon::start("");
    let fn_bin = fn_bin().display().to_string();
    // A shell with a grandchild that outlives nothing: the instance's process tree.
    let deploy_body = serde_json::json!({
        "service": name,
        "image": "process",
        "envProcess": format!("sh -c 'sleep 600 & exec {fn_bin}'"),
        "annotations": { "com.synwake.stop-grace": "100ms" },
    })
    .to_string();
    let mut seed: u64 = 0x5357_0005;
    let mut left_by_crashes = 0;
    for round in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 120);
        // Deploy (first time) or start, then kill -9 after `delay`, mid-way or not.
        if round == 0 {
            let r = d.api_json("POST", "/system/functions", &deploy_body);
            assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
        }
        let addr = loopback(d.shared);
        let path = format!("/function/{name}/pid");
        let caller = std::thread::spawn(move || {
            let _ = request(addr, "GET", &path, &[], None);
        });
        std::thread::sleep(delay);
        d.stop_with(libc::SIGKILL, Duration::from_secs(5))
            .expect("SIGKILL ends synwake");
        let _ = caller.join();
        // The shell's grandchild survives the crash (nothing but the next start kills it).
        left_by_crashes += processes_of(&name).len();
        d.spawn();

        let listed = api_names(&d);
        assert!(
            listed.contains(&name),
            "round {round}: deployed function lost"
        );
        assert_eq!(listed, disk_names(&d), "round {round}: API != disk");
        // Whatever the crash left is gone once the restarted daemon scales to zero.
        let r = d.api_json(
            "POST",
            &format!("/system/scale-function/{name}"),
            &format!(r#"{{"serviceName":"{name}","replicas":0}}"#),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        assert!(
            wait_until(Duration::from_secs(10), || processes_of(&name).is_empty()),
            "round {round} (kill after {delay:?}): processes left: {:?}",
            processes_of(&name)
        );
    }
    assert!(
        left_by_crashes > 0,
        "no crash ever left a process: the rounds did not test cleanup"
    );
    // And one clean cycle still serves.
    assert_eq!(d.call(&name, "/pid").status, 200);
}
