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

/// The next value of a fixed xorshift sequence: pseudo-random points, the same every run.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A directory the function (run as the unprivileged default user) can write into.
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Call ids the function logged (one line per request it got), as a set.
fn logged(path: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn post_async(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    let r = request(loopback(d.api), "POST", path, headers, Some(b"fault")).ok()?;
    assert!(
        matches!(r.status, 202 | 429 | 503),
        "POST {path}: {} {}",
        r.status,
        r.text()
    );
    (r.status == 202).then(|| r.header("x-call-id").expect("X-Call-Id").to_string())
}

/// The `ROUND` variable of `name` as the API shows it and as the state file holds it.
fn round_env(d: &Daemon, name: &str) -> (Option<String>, Option<String>) {
    let r = d.api_get(&format!("/system/function/{name}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let api = v["envVars"]["ROUND"].as_str().map(str::to_string);
    let text = std::fs::read_to_string(d.state_dir().join("functions.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("state file is whole JSON");
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["functions"].as_array().cloned())
        .unwrap_or_default();
    let disk = list
        .iter()
        .find(|f| f["name"].as_str() == Some(name))
        .and_then(|f| f["env"]["ROUND"].as_str())
        .map(str::to_string);
    (api, disk)
}

/// Temp files a save left behind in the state dir (swept at start).
fn temp_files(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp.") || n.ends_with(".prev"))
        .collect()
}

/// Fault tier for the async queue: synwake is killed with SIGKILL at pseudo-random points
/// while it delivers async calls (cold start included), while an idle instance is being
/// stopped (the function ignores SIGTERM, so the stop lasts its stop grace) and while
/// an update is being applied. After each restart: API state == disk state, no temp file,
/// every call ever answered 202 reaches the function (at least once), nothing stays
/// queued, and a scale to zero leaves no process of the function.
#[test]
fn kill_9_during_async_delivery_stop_and_update_loses_no_call_and_leaves_no_orphans() {
    let name = format!("fdurable{}", std::process::id());
    let dir = shared_dir();
    let log = dir.path().join("calls.txt");
    let mut d = Daemon::start("[async]\nretry_backoff = \"50ms\"\nmax_retries = 20\n");
    let fn_bin = fn_bin().display().to_string();
    // SIGTERM ignored (inherited through exec), so each stop lasts the 1 s stop grace; a
    // 200 ms start and one call at a time keep calls queued when synwake is killed.
    let spec_body = |round: u32| {
        serde_json::json!({
            "service": name,
            "envProcess": format!("sh -c 'trap \"\" TERM; sleep 600 & exec {fn_bin}'"),
            "envVars": {
                "CALL_LOG": log.display().to_string(),
                "ROUND": round.to_string(),
                "INIT_MS": "200",
            },
            "annotations": {
                "com.synwake.max-concurrency": "1",
                "com.synwake.stop-grace": "1s",
                "com.synwake.idle-timeout": "300ms",
            },
        })
        .to_string()
    };
    let r = d.api_json("POST", "/system/functions", &spec_body(0));
    assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let mut seed: u64 = 0x5357_d004;
    let (mut left_by_crashes, mut not_run_at_kill, mut stops_hit) = (0, 0, 0);
    for round in 0..6u32 {
        let kind = ["delivery", "stop", "update"][round as usize % 3];
        let r = next(&mut seed);
        match kind {
            "delivery" => {
                // Calls that each take 50 ms at the function, to a cold function.
                for _ in 0..20 {
                    accepted.extend(post_async(
                        &d,
                        &format!("/async-function/{name}/sleep/50"),
                        &[],
                    ));
                }
                std::thread::sleep(Duration::from_millis(r % 400));
            }
            "stop" => {
                let ids: Vec<String> = (0..3)
                    .filter_map(|_| post_async(&d, &format!("/async-function/{name}"), &[]))
                    .collect();
                accepted.extend(ids.iter().cloned());
                assert!(
                    wait_until(Duration::from_secs(30), || ids
                        .iter()
                        .all(|i| logged(&log).contains(i))),
                    "round {round}: calls not delivered before the stop"
                );
                // The idle stop has begun: no instance counted, its processes still there
                // (for the 1 s stop grace); the kill lands within that grace.
                let instances = format!("synwake_instances{{function=\"{name}\"}}");
                if wait_until(Duration::from_secs(10), || {
                    metrics::Metrics(d.metrics()).get(&instances) == 0.0
                        && !processes_of(&name).is_empty()
                }) {
                    stops_hit += 1;
                }
                std::thread::sleep(Duration::from_millis(r % 500));
            }
            _ => {
                for _ in 0..10 {
                    accepted.extend(post_async(&d, &format!("/async-function/{name}"), &[]));
                }
                let updater = {
                    let body = spec_body(round);
                    let password = d.password();
                    let api = loopback(d.api);
                    std::thread::spawn(move || {
                        let auth = basic_auth("admin", &password);
                        let _ = request(
                            api,
                            "PUT",
                            "/system/functions",
                            &[
                                ("authorization", auth.as_str()),
                                ("content-type", "application/json"),
                            ],
                            Some(body.as_bytes()),
                        );
                    })
                };
                std::thread::sleep(Duration::from_millis(r % 150));
                d.stop_with(libc::SIGKILL, Duration::from_secs(5))
                    .expect("SIGKILL ends synwake");
                let _ = updater.join();
            }
        }
        if kind != "update" {
            d.stop_with(libc::SIGKILL, Duration::from_secs(5))
                .expect("SIGKILL ends synwake");
        }
        not_run_at_kill += accepted.difference(&logged(&log)).count();
        left_by_crashes += processes_of(&name).len();
        d.spawn();

        let listed = api_names(&d);
        assert!(listed.contains(&name), "round {round}: function lost");
        assert_eq!(
            listed,
            disk_names(&d),
            "round {round} ({kind}): API != disk"
        );
        let (api_round, disk_round) = round_env(&d, &name);
        assert_eq!(api_round, disk_round, "round {round} ({kind}): API != disk");
        assert_eq!(temp_files(&d), Vec::<String>::new(), "round {round}");
        assert!(
            wait_until(Duration::from_secs(60), || accepted
                .is_subset(&logged(&log))),
            "round {round} ({kind}, kill after {} ms): {} of {} accepted calls never ran",
            r % 1000,
            accepted.difference(&logged(&log)).count(),
            accepted.len()
        );
        assert!(
            wait_until(Duration::from_secs(10), || {
                metrics::Metrics(d.metrics())
                    .get(&format!("synwake_async_queued{{function=\"{name}\"}}"))
                    == 0.0
            }),
            "round {round}: calls stay queued"
        );
        let r = d.api_json(
            "POST",
            &format!("/system/scale-function/{name}"),
            &format!(r#"{{"serviceName":"{name}","replicas":0}}"#),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        assert!(
            wait_until(Duration::from_secs(15), || processes_of(&name).is_empty()),
            "round {round} ({kind}): processes left: {:?}",
            processes_of(&name)
        );
    }
    assert!(
        accepted.len() >= 60,
        "only {} calls accepted",
        accepted.len()
    );
    // The rounds tested something: calls were queued at a kill, a kill met a stop.
    eprintln!("{not_run_at_kill} calls not run at a kill; {stops_hit} kill(s) during a stop; {left_by_crashes} process(es) left by kills");
    assert!(not_run_at_kill > 0, "every call had run before each kill");
    assert!(stops_hit > 0, "no kill landed during a stop");
    assert!(
        left_by_crashes > 0,
        "no crash ever left a process: the rounds did not test cleanup"
    );
}

/// A function that exits while synwake waits for it to become ready, under kill -9 at
/// pseudo-random points: every accepted call still comes to an end (its callback gets
/// the final 5xx), nothing stays queued, and neither the shell nor its grandchild is left.
#[test]
fn kill_9_while_a_function_exits_during_readiness_leaves_no_orphans_and_every_call_ends() {
    let name = format!("fquit{}", std::process::id());
    let mut d = Daemon::start_with(
        "callback_allow = [\"127.0.0.1\"]",
        "[async]\nretry_backoff = \"50ms\"\nmax_retries = 2\n",
    );
    let receiver = receiver::Receiver::start();
    let cb = format!("http://127.0.0.1:{}/done", receiver.port);
    let body = serde_json::json!({
        "service": name,
        "envProcess": "sh -c 'sleep 600 & sleep 0.2; exit 3'",
        "annotations": {
            "com.synwake.readiness-path": "/ready",
            "com.synwake.start-timeout": "5s",
            "com.synwake.stop-grace": "100ms",
        },
    })
    .to_string();
    let r = d.api_json("POST", "/system/functions", &body);
    assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let mut seed: u64 = 0x5357_0e11;
    let mut not_ended_at_kill = 0;
    for round in 0..3 {
        for _ in 0..5 {
            accepted.extend(post_async(
                &d,
                &format!("/async-function/{name}"),
                &[("x-callback-url", &cb)],
            ));
        }
        let delay = Duration::from_millis(next(&mut seed) % 600);
        std::thread::sleep(delay);
        d.stop_with(libc::SIGKILL, Duration::from_secs(5))
            .expect("SIGKILL ends synwake");
        let ended = || -> BTreeSet<String> {
            receiver
                .wait(0, Duration::ZERO)
                .iter()
                .filter_map(|r| r.header("x-call-id").map(str::to_string))
                .collect()
        };
        not_ended_at_kill += accepted.difference(&ended()).count();
        d.spawn();
        assert_eq!(api_names(&d), disk_names(&d), "round {round}: API != disk");
        assert!(
            wait_until(Duration::from_secs(60), || accepted.is_subset(&ended())),
            "round {round} (kill after {delay:?}): {} of {} calls never ended",
            accepted.difference(&ended()).count(),
            accepted.len()
        );
        for r in receiver.wait(0, Duration::ZERO) {
            let status = r.header("x-function-status").unwrap_or_default();
            assert!(
                status.starts_with('5'),
                "a quitting function answered {status}"
            );
        }
        assert!(
            wait_until(Duration::from_secs(10), || {
                metrics::Metrics(d.metrics())
                    .get(&format!("synwake_async_queued{{function=\"{name}\"}}"))
                    == 0.0
            }),
            "round {round}: calls stay queued"
        );
        assert!(
            wait_until(Duration::from_secs(10), || processes_of(&name).is_empty()),
            "round {round} (kill after {delay:?}): processes left: {:?}",
            processes_of(&name)
        );
    }
    assert_eq!(accepted.len(), 15);
    assert!(
        not_ended_at_kill > 0,
        "every call had ended before each kill"
    );
}
