//! `synwake tag` end to end: the tagger runs a real client (curl, bash) in the client
//! namespace, the real `synwake up` with its probe runs in the server namespace, and the
//! metrics say which trigger woke which function. Each test builds its own namespaces and
//! removes them in `Drop`; without root/BPF a test is skipped loudly (CI=true: failure).

mod common;
mod probe_support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use probe_support::*;

/// The tests here run one at a time: each run of `synwake tag` sweeps the cgroups of
/// taggers that died, and one test kills a tagger on purpose and then inspects its cgroup.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn series(metric: &str, function: &str, trigger: &str) -> String {
    format!("{metric}{{function=\"{function}\",trigger=\"{trigger}\"}}")
}

fn shared(path: &str) -> String {
    format!("http://{SERVER_IP}:{SHARED_PORT}{path}")
}

/// `synwake tag ARGS` inside the client namespace.
fn tag_in_client(net: &Net, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &net.client_ns])
        .arg(synwake_bin())
        .arg("tag")
        .args(args)
        .stdin(Stdio::null());
    command
}

fn run(mut command: Command) -> Output {
    command.output().expect("run synwake tag")
}

fn daemon_with_g_h_k(net: &Net) -> NsDaemon {
    NsDaemon::start(
        net,
        "auto",
        "",
        &format!(
            "{}{}{}",
            function("g", "env = { INIT_MS = \"50\" }"),
            function("h", "env = { INIT_MS = \"50\" }"),
            function("k", "env = { INIT_MS = \"50\" }")
        ),
    )
}

/// The cgroup2 root as this process sees it.
fn cgroup_root() -> PathBuf {
    synwake_ebpf::cgroup::cgroup2_root().expect("a cgroup2 hierarchy")
}

#[test]
fn curl_through_synwake_tag_wakes_the_named_function_on_the_shared_port() {
    const TEST: &str = "curl_through_synwake_tag_wakes_the_named_function_on_the_shared_port";
    let _serial = serial();
    let Some(net) = Net::create_or_skip(TEST) else {
        return;
    };
    let d = daemon_with_g_h_k(&net);
    if !d.probe_or_skip(TEST) {
        return;
    }
    let dest = format!("{SERVER_IP}:{SHARED_PORT}");

    // The SYN alone starts k: the tagged client connects and sends its request only
    // once the test has seen k start with trigger tcp_option. Between the two there is
    // the time a real network would give; here nothing but the SYN can have started k.
    let mut client = tag_in_client(&net, &["--function", "k", "--dest", &dest, "--"]);
    client
        .args(["bash", "-c"])
        .arg(format!(
            "exec 3<>/dev/tcp/{SERVER_IP}/{SHARED_PORT} || exit 3; read -r go || exit 4; \
             printf 'GET /function/k/ HTTP/1.1\\r\\nHost: k\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             head -n 1 <&3"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = client.spawn().expect("spawn synwake tag bash");
    let started = wait_until(Duration::from_secs(10), || {
        d.metrics()
            .get(&series("synwake_cold_starts_total", "k", "tcp_option"))
            == 1.0
    });
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"go\n");
    }
    let out = child.wait_with_output().expect("synwake tag bash");
    assert!(
        started,
        "k did not start on the tagged SYN alone within 10 s:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.metrics().0
    );
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let m = d.metrics();
    for other in ["request", "accept", "syn"] {
        assert_eq!(
            m.get(&series("synwake_cold_starts_total", "k", other)),
            0.0,
            "{other}"
        );
    }
    let lead = m.get("synwake_wake_lead_seconds_count{function=\"k\"}");
    assert_eq!(lead, 1.0, "the wake came before the request: {}", m.0);

    // curl, unchanged, through synwake tag: its SYN names g. At RTT 0 its request
    // follows the SYN by microseconds, before the probe's reader may have read the SYN's
    // event; the request path handles buffered events first, so the SYN still starts g.
    // The reader is starved meanwhile, as on a loaded host.
    let starved = StarvedReader::new(&d);
    let out = run({
        let mut c = tag_in_client(&net, &["--function", "g", "--dest", &dest, "--"]);
        c.args(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(shared("/function/g/"));
        c
    });
    drop(starved);
    assert!(
        out.status.success(),
        "synwake tag curl: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        wait_until(Duration::from_secs(10), || d.metrics().get(&series(
            "synwake_wakes_total",
            "g",
            "tcp_option"
        )) == 1.0),
        "curl's tagged SYN did not wake g: {}",
        d.metrics().0
    );
    let m = d.metrics();
    for (trigger, starts) in [("tcp_option", 1.0), ("request", 0.0), ("accept", 0.0)] {
        assert_eq!(
            m.get(&series("synwake_cold_starts_total", "g", trigger)),
            starts,
            "g {trigger}: {}",
            m.0
        );
    }
    assert_eq!(d.replicas("h"), 0, "h woke too");

    // A destination not configured gets no option: h starts on its request instead.
    let events_before = m.get("synwake_probe_events_total");
    let out = run({
        let mut c = tag_in_client(
            &net,
            &[
                "--function",
                "h",
                "--dest",
                &format!("{SERVER_IP}:9999"),
                "--",
            ],
        );
        c.args(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(shared("/function/h/"));
        c
    });
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let m = d.metrics();
    assert_eq!(
        m.get(&series("synwake_cold_starts_total", "h", "tcp_option")),
        0.0
    );
    assert_eq!(
        m.get(&series("synwake_cold_starts_total", "h", "request"))
            + m.get(&series("synwake_cold_starts_total", "h", "accept")),
        1.0,
        "{}",
        m.0
    );
    assert_eq!(
        m.get("synwake_probe_events_total"),
        events_before,
        "an untagged SYN to the shared port made a probe event"
    );
}

#[test]
fn synwake_tag_exits_with_the_command_status_and_removes_its_cgroup() {
    const TEST: &str = "synwake_tag_exits_with_the_command_status_and_removes_its_cgroup";
    let _serial = serial();
    let Some(net) = Net::create_or_skip(TEST) else {
        return;
    };
    let dest = format!("{SERVER_IP}:{SHARED_PORT}");
    // A background process the command leaves behind is stopped with the cgroup.
    let mut c = tag_in_client(&net, &["--function", "g", "--dest", &dest, "--"]);
    c.args([
        "sh",
        "-c",
        "sleep 30 & echo $!; grep '^0::' /proc/self/cgroup; exit 7",
    ]);
    let out = run(c);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code() == Some(125) {
        skip_or_fail(TEST, &String::from_utf8_lossy(&out.stderr));
        return;
    }
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    let mut lines = stdout.lines();
    let sleeper: u32 = lines.next().unwrap().trim().parse().unwrap();
    let cgroup = lines.next().unwrap().trim().trim_start_matches("0::/");
    assert!(cgroup.starts_with("synwake-tag-"), "{cgroup}");
    assert!(
        !cgroup_root().join(cgroup).exists(),
        "cgroup {cgroup} left behind"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !PathBuf::from(format!(
            "/proc/{sleeper}"
        ))
        .exists()),
        "the command's background process survived"
    );
    // Bad input: named, exit 125, nothing run.
    let out = run({
        let mut c = tag_in_client(&net, &["--function", "Bad Name", "--dest", &dest, "--"]);
        c.arg("true");
        c
    });
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--function"));
}

#[test]
fn kill_9_of_synwake_tag_leaves_no_tagging_behind() {
    const TEST: &str = "kill_9_of_synwake_tag_leaves_no_tagging_behind";
    let _serial = serial();
    let Some(net) = Net::create_or_skip(TEST) else {
        return;
    };
    let d = daemon_with_g_h_k(&net);
    if !d.probe_or_skip(TEST) {
        return;
    }
    let dest = format!("{SERVER_IP}:{SHARED_PORT}");
    let mut c = tag_in_client(&net, &["--function", "g", "--dest", &dest, "--"]);
    c.args(["sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut tagger = c.spawn().expect("spawn synwake tag");
    // `ip netns exec` execs synwake, so the child's pid is the tagger's.
    let group = cgroup_root().join(format!("synwake-tag-{}", tagger.id()));
    let procs = group.join("cgroup.procs");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&procs)
            .is_ok_and(|p| !p.trim().is_empty())),
        "the command never joined {}",
        group.display()
    );
    let sleeper: u32 = std::fs::read_to_string(&procs)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    tagger.kill().unwrap(); // SIGKILL
    tagger.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !PathBuf::from(format!(
            "/proc/{sleeper}"
        ))
        .exists()),
        "the command outlived its tagger"
    );
    // The link died with the process: a connection made from the leftover cgroup now
    // carries no option, so g is not woken by its SYN.
    let script = format!(
        "echo $$ > {}; exec 3<>/dev/tcp/{SERVER_IP}/{SHARED_PORT}",
        procs.display()
    );
    // From a thread in the client namespace, not `ip netns exec` (which remounts /sys).
    let status = net.in_client(move || Command::new("bash").args(["-c", &script]).status());
    let status = status.unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.replicas("g"),
        0,
        "a SYN from the dead tagger's cgroup woke g"
    );
    assert_eq!(d.metrics().get("synwake_probe_events_total"), 0.0);
    // The next run of the tagger removes the leftover cgroup once it is empty.
    let events = group.join("cgroup.events");
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&events).is_ok_and(|e| e.lines().any(|l| l == "populated 0"))
    }));
    // Leftovers younger than 2 s are spared (a tagger elsewhere may be setting up).
    std::thread::sleep(Duration::from_millis(2500));
    let out = run({
        let mut c = tag_in_client(&net, &["--function", "g", "--dest", &dest, "--"]);
        c.arg("true");
        c
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!group.exists(), "stale {} not removed", group.display());
}

#[test]
fn synwake_tag_config_tags_its_cgroup_until_sigterm() {
    const TEST: &str = "synwake_tag_config_tags_its_cgroup_until_sigterm";
    let _serial = serial();
    let Some(net) = Net::create_or_skip(TEST) else {
        return;
    };
    let d = daemon_with_g_h_k(&net);
    if !d.probe_or_skip(TEST) {
        return;
    }
    let name = format!("synwake-tag-{}-config", std::process::id());
    let group = synwake_ebpf::cgroup::TagCgroup::create_named(&cgroup_root(), &name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tag.toml");
    // Relative to the cgroup2 root: `ip netns exec` sees the hierarchy at another path.
    std::fs::write(
        &config,
        format!(
            "cgroup = \"{name}\"\n[[destination]]\ndest = \"{SERVER_IP}:{SHARED_PORT}\"\nfunction = \"g\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("tag.log");
    let mut tagger = tag_in_client(&net, &["--config", config.to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || read_log()
            .contains("carry function g")),
        "tagger not up: {}",
        read_log()
    );
    let script = format!(
        "echo $$ > {}; exec 3<>/dev/tcp/{SERVER_IP}/{SHARED_PORT}",
        group.path().join("cgroup.procs").display()
    );
    let status = net.in_client(move || Command::new("bash").args(["-c", &script]).status());
    assert!(status.unwrap().success());
    assert!(
        wait_until(Duration::from_secs(5), || d.available("g") == 1),
        "g not woken by the tagged SYN:\n{}",
        read_log()
    );
    assert_eq!(
        d.metrics()
            .get(&series("synwake_cold_starts_total", "g", "tcp_option")),
        1.0
    );
    // SAFETY: signals the tagger this test started (ip netns exec execs it).
    unsafe { libc::kill(tagger.id() as i32, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(5), || {
        matches!(tagger.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = tagger.kill();
    }
    assert!(exited, "the tagger ignored SIGTERM");
    assert_eq!(tagger.wait().unwrap().code(), Some(0));
    assert!(
        read_log().contains("stopping; 1 SYNs tagged"),
        "{}",
        read_log()
    );
}
