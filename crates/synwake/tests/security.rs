//! Issue 9 attacks against the real binary: another local user must not get root through
//! the management API, password files others can read (or empty ones) are refused,
//! process functions do not run as root by default, image paths outside the image
//! directories are refused without quoting the file, and async callbacks cannot reach
//! loopback, private or link-local addresses. Tests that need root (a second user,
//! `id -u` of a function) fail under CI=true without it and are skipped loudly otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// With CI=true a missing privilege fails the test; otherwise it is skipped loudly.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let msg = format!("!!! SKIPPING `{test}`: needs root (useradd, switching users) !!!");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: privileged tests must run)");
    }
    eprintln!("{msg}");
    false
}

/// A throwaway local account, removed in Drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create(tag: &str) -> TestUser {
        let name = format!("swsec{tag}{}", std::process::id());
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", &name])
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name} failed");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        assert_ne!(uid, 0);
        TestUser { name, uid, gid }
    }

    /// `cmd` run as this user (std drops supplementary groups when root sets a uid).
    fn run(&self, cmd: &mut Command) -> std::process::Output {
        cmd.uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .output()
            .expect("run as the test user")
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// `curl` on the daemon's API, as `user`; returns the HTTP status (0 when none).
fn curl_as(
    user: &TestUser,
    d: &Daemon,
    auth: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]);
    if let Some(a) = auth {
        cmd.args(["-u", a]);
    }
    if !body.is_empty() {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(format!("http://127.0.0.1:{}{path}", d.api));
    let out = user.run(&mut cmd);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn another_local_user_cannot_deploy_or_scale() {
    if !root_or_skip("another_local_user_cannot_deploy_or_scale") {
        return;
    }
    let user = TestUser::create("a");
    let d = Daemon::start(&function("victim", ""));
    // Only the password file's own mode may keep the user out, not a private temp dir.
    for dir in [d.dir.path().to_path_buf(), d.state_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let marker = d.dir.path().join("pwned");
    let evil = json!({
        "service": "evil",
        "envProcess": format!("sh -c 'id > {}'", marker.display()),
    })
    .to_string();

    // The attack of the issue: deploy as an anonymous local user, then invoke.
    for auth in [None, Some("admin:"), Some("admin:admin")] {
        assert_eq!(
            curl_as(&user, &d, auth, "POST", "/system/functions", &evil),
            401,
            "deploy as {} with {auth:?}",
            user.name
        );
        assert_eq!(
            curl_as(&user, &d, auth, "PUT", "/system/functions", &evil),
            401
        );
        let scale = json!({"serviceName": "victim", "replicas": 1}).to_string();
        assert_eq!(
            curl_as(
                &user,
                &d,
                auth,
                "POST",
                "/system/scale-function/victim",
                &scale
            ),
            401,
            "scale as {}",
            user.name
        );
        assert_eq!(
            curl_as(
                &user,
                &d,
                auth,
                "DELETE",
                "/system/functions",
                "{\"functionName\":\"victim\"}"
            ),
            401
        );
    }
    // The user cannot read the generated credential, nor find it through the CLI.
    let cat = user.run(Command::new("cat").arg(d.state_dir().join("api-password")));
    assert!(!cat.status.success(), "{} read the API password", user.name);
    let list = user.run(
        Command::new(synwake_bin())
            .arg("list")
            .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.api))
            .env("SYNWAKE_STATE_DIR", d.state_dir())
            .env_remove("SYNWAKE_PASSWORD"),
    );
    assert!(!list.status.success());
    let err = String::from_utf8_lossy(&list.stderr);
    assert!(err.contains("401") && err.contains("api-password"), "{err}");
    // Nothing happened: no function evil, victim still at zero.
    assert_eq!(d.api_get("/system/function/evil").status, 404);
    assert_eq!(d.available("victim"), 0);
    assert!(!marker.exists());
    // The function endpoints stay public.
    assert_eq!(
        curl_as(&user, &d, None, "GET", "/function/victim/", ""),
        200
    );
}

/// Runs `synwake up` on a config whose API password file is `file`; returns (exit code,
/// stderr) once it exits (bounded).
fn up_with_password_file(file: &std::path::Path) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("synwake.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\napi_listen = \"127.0.0.1:{}\"\nstate_dir = {:?}\napi_password_file = {:?}\n[probe]\nmode = \"off\"\n",
            free_port(),
            free_port(),
            dir.path().join("state").display().to_string(),
            file.display().to_string(),
        ),
    )
    .unwrap();
    let mut child = Command::new(synwake_bin())
        .arg("up")
        .arg("--config")
        .arg(&config)
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
    assert!(exited, "synwake up kept running with {}", file.display());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn empty_or_readable_password_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-password");
    let shown = file.display().to_string();
    for (content, mode, says) in [
        ("", 0o600, "empty"),
        ("\n  \n", 0o600, "empty"),
        ("s3cret\n", 0o644, "chmod 600"),
        ("s3cret\n", 0o640, "chmod 600"),
    ] {
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, stderr) = up_with_password_file(&file);
        assert!(
            code.is_some_and(|c| c != 0),
            "{content:?} mode {mode:o} accepted: {stderr}"
        );
        assert!(
            stderr.contains(&shown) && stderr.contains(says),
            "{content:?} mode {mode:o}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret"),
            "the password was echoed: {stderr}"
        );
    }
}

/// (uid, gid, supplementary groups) of the instance answering `/ids` for `name`.
fn ids_of(d: &Daemon, name: &str) -> (u32, u32, String) {
    let r = d.call(name, "/ids");
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    let text = r.text();
    let field = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| {
                panic!(
                    "no {key} in {text:?} (a synwake-fn without /ids: cargo build -p synwake-fn)"
                )
            })
            .trim()
            .to_string()
    };
    // "Uid:\treal effective saved fs": every one of them must be the target.
    let one = |key: &str| -> u32 {
        let all: Vec<u32> = field(key)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(all.iter().all(|v| *v == all[0]), "{key} {all:?}");
        all[0]
    };
    (one("Uid:"), one("Gid:"), field("Groups:"))
}

#[test]
fn process_functions_do_not_run_as_root_by_default() {
    if !root_or_skip("process_functions_do_not_run_as_root_by_default") {
        return;
    }
    let user = TestUser::create("u");
    let d = Daemon::start(&format!(
        "{}{}{}{}",
        function("plain", ""),
        function("asroot", "user = \"root\""),
        function("named", &format!("user = {:?}", user.name)),
        function("numeric", "user = \"4242:4343\""),
    ));
    // The default: nobody, no supplementary groups (root's would let it read root:root 0640).
    let (uid, gid, groups) = ids_of(&d, "plain");
    assert_eq!((uid, gid), (65534, 65534), "a default function's ids");
    assert_eq!(groups, "", "supplementary groups kept");
    assert_eq!(ids_of(&d, "asroot").0, 0, "explicit root");
    let (uid, gid, groups) = ids_of(&d, "named");
    assert_eq!((uid, gid, groups.as_str()), (user.uid, user.gid, ""));
    let (uid, gid, _) = ids_of(&d, "numeric");
    assert_eq!((uid, gid), (4242, 4343));

    // The attack, through the API with the credential: not root either.
    let deploy = |name: &str, user: Option<&str>| {
        let mut annotations = serde_json::Map::new();
        if let Some(u) = user {
            annotations.insert("com.synwake.user".into(), u.into());
        }
        d.api_json(
            "POST",
            "/system/functions",
            &json!({
                "service": name,
                "envProcess": fn_bin().display().to_string(),
                "annotations": annotations,
            })
            .to_string(),
        )
    };
    assert_eq!(deploy("apidefault", None).status, 202);
    assert_eq!(ids_of(&d, "apidefault").0, 65534);
    assert_eq!(deploy("apiuser", Some("1234:1234")).status, 202);
    assert_eq!(ids_of(&d, "apiuser").0, 1234);
    let r = deploy("apibad", Some("root; id"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("annotations.com.synwake.user"),
        "{}",
        r.text()
    );
    // A user that does not exist fails the start, naming it.
    assert_eq!(deploy("apinouser", Some("no-such-user-swsec")).status, 202);
    let r = d.call("apinouser", "/");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("no-such-user-swsec"), "{}", r.text());
}

#[test]
fn image_paths_outside_image_dirs_are_refused_without_their_content() {
    if !root_or_skip("image_paths_outside_image_dirs_are_refused_without_their_content") {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    // A file that is not a tar archive, inside the image dir: the tar error must not
    // quote it (tar's own message carries the header bytes).
    let secret = "root:$y$j9T$SECRETHASHSECRETHASH:19000:0:99999:7:::\n".repeat(20);
    std::fs::write(images.path().join("notatar.tar"), &secret).unwrap();
    // A symlink inside the dir that points out of it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("shadow"), &secret).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("shadow"),
        images.path().join("link.tar"),
    )
    .unwrap();
    let d = Daemon::start(&format!(
        "[oci]\nimage_dirs = [{:?}]\n",
        images.path().display().to_string()
    ));
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let deploy = |image: &str| {
        d.api_json(
            "POST",
            "/system/functions",
            &json!({"service": "steal", "image": image}).to_string(),
        )
    };
    let leaks = |text: &str| {
        text.contains("SECRETHASH")
            || text.contains("root:")
            || shadow
                .lines()
                .filter(|l| l.len() > 8)
                .any(|l| text.contains(l) || text.contains(&l[..8]))
    };
    for image in ["/etc/shadow", "../../../../../../../../etc/shadow"] {
        let r = deploy(image);
        assert_eq!(r.status, 400, "{image}: {}", r.text());
        assert!(r.text().contains("image_dirs"), "{image}: {}", r.text());
        assert!(!leaks(&r.text()), "{image}: content in {}", r.text());
    }
    let link = images.path().join("link.tar").display().to_string();
    let r = deploy(&link);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("symlink") && r.text().contains("image_dirs"),
        "{}",
        r.text()
    );
    assert!(!leaks(&r.text()), "content in {}", r.text());
    let bogus = images.path().join("notatar.tar").display().to_string();
    let r = deploy(&bogus);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not a tar archive"), "{}", r.text());
    assert!(!leaks(&r.text()), "content in {}", r.text());
    assert!(!leaks(&d.log()), "content in the log:\n{}", d.log());
    assert_eq!(d.api_get("/system/function/steal").status, 404);
}

fn post_async_with_callback(d: &Daemon, url: &str) -> Resp {
    request(
        loopback(d.api),
        "POST",
        "/async-function/echo",
        &[("x-callback-url", url)],
        Some(b"x"),
    )
    .expect("POST /async-function/echo")
}

/// Issue 9, item 3: a callback cannot be aimed at loopback, private or link-local
/// addresses or at synwake's own API; refused before anything is queued or connected.
#[test]
fn callbacks_to_internal_addresses_and_own_listeners_are_refused_before_connect() {
    let d = Daemon::start(&function("echo", ""));
    // A listener the refused callbacks would have reached: nothing may connect to it.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let api = d.api;
    for (url, rule) in [
        (format!("http://127.0.0.1:{trap_port}/x"), "loopback"),
        (format!("http://[::1]:{trap_port}/x"), "loopback"),
        (
            format!("http://[::ffff:127.0.0.1]:{trap_port}/x"),
            "loopback",
        ),
        (
            format!("http://127.0.0.1:{api}/system/functions"),
            "synwake's own listeners",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        ("http://10.1.2.3/hook".to_string(), "private"),
        ("http://192.168.0.1/hook".to_string(), "private"),
    ] {
        let r = post_async_with_callback(&d, &url);
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        assert!(r.text().contains(rule), "{url}: {}", r.text());
    }
    // A name is checked on the address it resolves to, when the callback is sent.
    let r = post_async_with_callback(&d, &format!("http://localhost:{trap_port}/x"));
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log()
            .contains("callback refused")),
        "the callback to localhost was not refused: {}",
        d.log()
    );
    assert!(d.log().contains("callback_allow"), "{}", d.log());
    match trap.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a refused callback connected: {other:?}"),
    }

    // Allowing loopback opens it, but never synwake's own API.
    let d = Daemon::start_with("callback_allow = [\"127.0.0.1\"]", &function("echo", ""));
    let r = post_async_with_callback(&d, &format!("http://127.0.0.1:{trap_port}/x"));
    assert_eq!(r.status, 202, "{}", r.text());
    let r = post_async_with_callback(&d, &format!("http://127.0.0.1:{}/system/functions", d.api));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("own listeners"), "{}", r.text());
}

/// The daemon's own environment (credentials an operator exported, the service manager's
/// variables) must not reach functions: they get their spec's env, PORT and synwake's
/// variables, plus PATH/LANG/TZ.
#[test]
fn functions_do_not_inherit_the_daemons_environment() {
    let d = Daemon::start(
        "[[function]]\nname = \"env\"\nwatchdog = \"stdio\"\ncommand = [\"env\"]\nenv = { OWN = \"yes\" }\n",
    );
    // Cargo runs tests with CARGO_* set, so the daemon has some; the check below can fail.
    let daemon_env = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    assert!(
        daemon_env
            .split(|b| *b == 0)
            .any(|kv| kv.starts_with(b"CARGO")),
        "the daemon should have CARGO_* variables under cargo test"
    );
    let r = d.call("env", "/");
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(
        names.contains(&"OWN"),
        "the spec's env is passed: {names:?}"
    );
    assert!(names.contains(&"PATH"), "PATH is passed: {names:?}");
    let leaked: Vec<&&str> = names
        .iter()
        .filter(|n| n.starts_with("CARGO") || **n == "CI" || **n == "RUST_LOG")
        .collect();
    assert!(
        leaked.is_empty(),
        "daemon variables leaked to the function: {leaked:?}"
    );
}

/// A bare command name is looked up in PATH as the function's account, as execvp would:
/// an entry that account cannot reach (root's own tool dirs, e.g. ~/.pyenv/shims first in
/// root's PATH) is skipped, not chosen because synwake itself can see it.
#[test]
fn a_bare_command_is_found_in_path_as_the_functions_account() {
    if !root_or_skip("a_bare_command_is_found_in_path_as_the_functions_account") {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // First in PATH: a directory only root can enter, with a decoy of the same name.
    let private = base.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::copy("/bin/false", private.join("synwake-fn")).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Second: the real function, open to everyone.
    let public = base.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::copy(fn_bin(), public.join("synwake-fn")).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        public.join("synwake-fn"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let d = Daemon::start(&format!(
        "[[function]]\nname = \"bare\"\ncommand = [\"synwake-fn\"]\nenv = {{ PATH = \"{}:{}\" }}\n",
        private.display(),
        public.display()
    ));
    let r = d.call("bare", "/");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        ids_of(&d, "bare").0,
        0,
        "runs as the default account, not root"
    );
}
