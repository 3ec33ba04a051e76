//! Real runc, real namespaces: serving from a container, pooled start, memory limit,
//! exits, crash recovery. Needs root, runc, iproute2, iptables and busybox-static; with
//! CI=true a missing prerequisite fails the test, otherwise it is skipped loudly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use synwake_oci::fixture::{self, Layer};
use synwake_oci::{Container, ContainerSpec, Image, OciConfig, OciRuntime, Pool};
use synwake_test_support::oci::{can_run, names_with_prefix};
use tokio::sync::Mutex;

/// Runtimes share bridge and name prefixes and clean up each other's leftovers at
/// startup: tests using one run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// On a failing test, removes what its runtime left (the test never reaches
/// `cleanup_all`), so one failure does not leak containers into later runs.
struct Janitor(PathBuf);

impl Drop for Janitor {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for id in runc_containers(&self.0) {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(self.0.join("runc"))
                .args(["delete", "-f", &id])
                .status();
        }
        for ns in swk_netns(&self.0) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .status();
        }
    }
}

struct Env {
    _janitor: Janitor,
    _dir: tempfile::TempDir,
    state: PathBuf,
    rt: OciRuntime,
    oci_image: Image,
    docker_image: Image,
}

async fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rt = OciRuntime::new(config(&state)).await.expect("runtime");
    let layers = vec![Layer::new(fixture::busybox_layer().unwrap(), true)];
    let config = fixture::function_config(&layers);
    let oci = dir.path().join("fn.oci.tar");
    fixture::write_oci_archive(&oci, &layers, &config).unwrap();
    let plain = vec![Layer::new(layers[0].tar.clone(), false)];
    let docker = dir.path().join("fn.docker.tar");
    fixture::write_docker_archive(&docker, &plain, &fixture::function_config(&plain)).unwrap();
    let oci_image = rt.import_image(&oci).await.expect("oci-archive import");
    let docker_image = rt
        .import_image(&docker)
        .await
        .expect("docker-archive import");
    Env {
        _janitor: Janitor(state.clone()),
        _dir: dir,
        state,
        rt,
        oci_image,
        docker_image,
    }
}

/// Not the default subnet, so a synwake daemon running on the same host keeps its
/// addresses (names are kept apart by the state dir's tag).
const TEST_SUBNET: &str = "10.73.0.0/16";

fn config(state: &Path) -> OciConfig {
    OciConfig {
        state_dir: state.to_path_buf(),
        subnet: TEST_SUBNET.into(),
        ..OciConfig::default()
    }
}

fn spec(function: &str, image: &Image) -> ContainerSpec {
    ContainerSpec {
        function: function.into(),
        instance: 1,
        image: image.clone(),
        command: None,
        env: BTreeMap::new(),
        container_port: fixture::FUNCTION_PORT,
        memory_bytes: None,
        cpus: None,
        pids: Some(64),
        mounts: Vec::new(),
    }
}

fn ns_of_self(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn swk_netns(state: &Path) -> std::collections::BTreeSet<String> {
    names_with_prefix(
        Path::new("/run/netns"),
        &format!("swk-{}-", config(state).name_tag()),
    )
}

fn swk_veths(state: &Path) -> std::collections::BTreeSet<String> {
    names_with_prefix(
        Path::new("/sys/class/net"),
        &format!("swkv{}", config(state).name_tag()),
    )
}

fn runc_containers(state: &Path) -> Vec<String> {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(state.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether anything answers HTTP at `addr` within a second (a gone address may take
/// seconds of ARP to fail).
async fn answers(addr: std::net::SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), fixture::http_get(addr, "/")).await,
        Ok(Ok(_))
    )
}

async fn serve(rt: &OciRuntime, c: &Container) -> Duration {
    rt.start(c).await.expect("start");
    fixture::wait_http_ok(c.addr(), "/", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no 200 from {}: {e}; output: {:?}",
                c.addr(),
                c.output_tail(20)
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http_from_its_own_namespaces_and_stop_releases_everything() {
    if !can_run("serves_http") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    for (format, image) in [("oci", &env.oci_image), ("docker", &env.docker_image)] {
        let c = env
            .rt
            .create(&spec(&format!("hello-{format}"), image))
            .await
            .expect("create");
        assert!(c
            .id()
            .starts_with(&format!("{}hello-", env.rt.name_prefix())));
        assert!(Path::new("/run/netns").join(c.netns()).exists());
        serve(&env.rt, &c).await;
        let (code, body) = fixture::http_get(c.addr(), "/cgi-bin/ns").await.unwrap();
        assert_eq!(code, 200, "{body}");
        let mnt = body
            .lines()
            .find_map(|l| l.strip_prefix("mnt="))
            .unwrap_or_else(|| panic!("no mnt line: {body:?}"));
        let net = body
            .lines()
            .find_map(|l| l.strip_prefix("net="))
            .expect("net line");
        assert!(
            mnt.starts_with("mnt:[") && net.starts_with("net:["),
            "{body}"
        );
        assert_ne!(
            mnt,
            ns_of_self("mnt"),
            "container shares our mount namespace"
        );
        assert_ne!(
            net,
            ns_of_self("net"),
            "container shares our network namespace"
        );
        assert_eq!(c.addr().port(), fixture::FUNCTION_PORT);
        assert_ne!(c.addr().ip(), std::net::IpAddr::from(env.rt.gateway()));

        let id = c.id().to_string();
        let netns = c.netns().to_string();
        let t0 = Instant::now();
        env.rt
            .stop(c.clone(), Duration::from_millis(200))
            .await
            .expect("stop");
        // httpd as PID 1 ignores SIGTERM: it takes the grace, then SIGKILL.
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(c.wait_exit().await.signal, Some(libc::SIGKILL));
        assert!(!Path::new("/run/netns").join(&netns).exists(), "netns left");
        let veth = format!(
            "swkv{}{}",
            config(&env.state).name_tag(),
            netns.rsplit_once("-n").unwrap().1
        );
        assert!(!swk_veths(&env.state).contains(&veth), "veth {veth} left");
        assert!(runc_containers(&env.state).is_empty());
        assert!(!env.state.join("bundles").join(&id).exists());
        assert!(!answers(c.addr()).await, "still answering");
    }
    // The bridge keeps its own address while ports come and go (else instances hold a
    // stale gateway MAC and first connections stall).
    let mac = std::fs::read_to_string("/sys/class/net/synwake0/address").unwrap();
    assert_eq!(mac.trim(), synwake_oci::net::BRIDGE_MAC);
    env.rt.cleanup_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_functions_cannot_reach_each_other() {
    if !can_run("isolation") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let a = env.rt.create(&spec("iso-a", &env.oci_image)).await.unwrap();
    let b = env.rt.create(&spec("iso-b", &env.oci_image)).await.unwrap();
    serve(&env.rt, &a).await;
    serve(&env.rt, &b).await;
    // From inside a's netns, b's port must not answer (the host reaches both).
    // busybox wget -T crashes here: bound the attempt from outside instead.
    let out = tokio::process::Command::new("timeout")
        .arg("3")
        .arg("ip")
        .args([
            "netns",
            "exec",
            a.netns(),
            fixture::BUSYBOX,
            "wget",
            "-q",
            "-O",
            "-",
        ])
        .arg(format!("http://{}/", b.addr()))
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "a reached b: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Sanity: the same command reaches a itself.
    let own = tokio::process::Command::new("timeout")
        .arg("3")
        .arg("ip")
        .args([
            "netns",
            "exec",
            a.netns(),
            fixture::BUSYBOX,
            "wget",
            "-q",
            "-O",
            "-",
        ])
        .arg(format!("http://{}/", a.addr()))
        .output()
        .await
        .unwrap();
    assert!(
        own.status.success(),
        "{} / {} / {}",
        String::from_utf8_lossy(&own.stderr),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    env.rt.cleanup_all().await;
    assert!(swk_netns(&env.state).is_empty());
}

/// `process.env` of a created container, from the config.json of its bundle.
fn container_env(state: &Path, id: &str) -> Vec<String> {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(state.join("runc"))
        .args(["state", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "runc state {id}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bundle = PathBuf::from(st["bundle"].as_str().unwrap());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    config["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_serves_only_its_spec_and_an_update_drops_the_old_containers() {
    if !can_run("pool_keyed_by_spec") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let pool = Pool::new(env.rt.clone());
    let mut v1 = spec("upd", &env.oci_image);
    v1.env.insert("VERSION".into(), "1".into());
    let mut v2 = v1.clone();
    v2.env.insert("VERSION".into(), "2".into());
    pool.refill(v1.clone(), 2);
    assert_eq!(pool.wait_ready("upd", 2, Duration::from_secs(20)).await, 2);
    let old: Vec<String> = runc_containers(&env.state);
    assert_eq!(old.len(), 2);

    // The function was updated: a container made for version 1 must not serve it.
    assert!(
        pool.take(&v2).is_none(),
        "pool handed out an old-spec container"
    );
    // Another instance number is the same spec.
    let mut v1_other = v1.clone();
    v1_other.instance = 9;
    let c = pool.take(&v1_other).expect("same spec, other instance");
    env.rt.stop(c, Duration::ZERO).await.unwrap();

    // Refilling for version 2 removes version 1's containers.
    pool.refill(v2.clone(), 1);
    let gone = wait_for(Duration::from_secs(20), || {
        let now = runc_containers(&env.state);
        pool.ready("upd") == 1 && !now.iter().any(|id| old.contains(id))
    })
    .await;
    assert!(
        gone,
        "old containers left: {:?}",
        runc_containers(&env.state)
    );
    let c = pool.take(&v2).expect("version 2 container");
    assert!(container_env(&env.state, c.id()).contains(&"VERSION=2".to_string()));
    env.rt.stop(c, Duration::ZERO).await.unwrap();
    pool.drain("upd").await;
    assert!(runc_containers(&env.state).is_empty());
    env.rt.cleanup_all().await;
}

async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_start_works_and_is_faster_than_create_and_start() {
    if !can_run("pooled_start") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let pool = Pool::new(env.rt.clone());
    let s = spec("pooled", &env.oci_image);
    let (mut pooled, mut unpooled) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        pool.refill(s.clone(), 1);
        assert_eq!(
            pool.wait_ready("pooled", 1, Duration::from_secs(10)).await,
            1
        );
        let t0 = Instant::now();
        let c = pool.take(&s).expect("pooled container");
        assert!(!c.is_started());
        serve(&env.rt, &c).await;
        pooled.push(t0.elapsed());
        env.rt.stop(c, Duration::ZERO).await.unwrap();

        let t0 = Instant::now();
        let c = env.rt.create(&s).await.unwrap();
        serve(&env.rt, &c).await;
        unpooled.push(t0.elapsed());
        env.rt.stop(c, Duration::ZERO).await.unwrap();
    }
    assert!(pool.take(&s).is_none(), "pool should be empty");
    pooled.sort();
    unpooled.sort();
    eprintln!("pooled {pooled:?}\nunpooled {unpooled:?}");
    assert!(
        pooled[2] < unpooled[2],
        "pooled median {:?} not faster than create+start {:?}",
        pooled[2],
        unpooled[2]
    );
    // Drain removes what is pooled, including creations still in flight.
    pool.refill(s.clone(), 2);
    pool.wait_ready("pooled", 2, Duration::from_secs(10)).await;
    pool.drain("pooled").await;
    assert_eq!(pool.ready("pooled"), 0);
    assert!(runc_containers(&env.state).is_empty());
    // What is left are the (function-agnostic) spare namespaces only.
    assert!(
        swk_netns(&env.state).len() <= 2,
        "{:?}",
        swk_netns(&env.state)
    );
    env.rt.cleanup_all().await;
    assert!(swk_netns(&env.state).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_the_container_and_wait_exit_says_oom() {
    if !can_run("memory_limit") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let mut s = spec("hungry", &env.oci_image);
    s.memory_bytes = Some(32 << 20);
    s.cpus = Some(0.5);
    let c = env.rt.create(&s).await.unwrap();
    let cg = |ctrl: &str, file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{ctrl}/synwake/{}/{file}", c.id()))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("pids", "pids.max"), "64");
    serve(&env.rt, &c).await;
    // The CGI's dd allocates 256 MiB past a 32 MiB limit. The kernel kills dd; the
    // runtime then kills the whole container (the CGI may or may not finish its reply).
    let r = fixture::http_get(c.addr(), "/cgi-bin/eat").await;
    assert!(
        !matches!(&r, Ok((_, body)) if body.contains("records out")),
        "allocation past the limit succeeded: {r:?}"
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), c.wait_exit())
        .await
        .expect("container killed after OOM");
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(!answers(c.addr()).await);
    env.rt.stop(c, Duration::ZERO).await.unwrap();
    env.rt.cleanup_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_at_once_reports_code_and_output() {
    if !can_run("exits_at_once") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let mut s = spec("crashy", &env.oci_image);
    s.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo boom on stdout; echo oops on stderr >&2; exit 3".into(),
    ]);
    let c = env.rt.create(&s).await.unwrap();
    env.rt.start(&c).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), c.wait_exit())
        .await
        .unwrap();
    assert_eq!(exit.code, Some(3));
    assert!(!exit.oom_killed);
    // Output is forwarded asynchronously: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while c.output_tail(10).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.output_tail(10), vec!["boom on stdout", "oops on stderr"]);
    assert_eq!(c.output_tail(1), vec!["oops on stderr"]);
    env.rt.stop(c, Duration::ZERO).await.unwrap();
    env.rt.cleanup_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_crash_removes_containers_netns_and_veths_and_nothing_else() {
    if !can_run("crash_recovery") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let started = env
        .rt
        .create(&spec("crash-a", &env.oci_image))
        .await
        .unwrap();
    serve(&env.rt, &started).await;
    let created = env
        .rt
        .create(&spec("crash-b", &env.oci_image))
        .await
        .unwrap();
    assert_eq!(runc_containers(&env.state).len(), 2);
    // Two containers plus two spare namespaces made ahead.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (swk_netns(&env.state).len() < 4 || swk_veths(&env.state).len() < 4)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        swk_netns(&env.state).len(),
        4,
        "{:?}",
        swk_netns(&env.state)
    );
    assert_eq!(
        swk_veths(&env.state).len(),
        4,
        "{:?}",
        swk_veths(&env.state)
    );
    // Someone else's namespace and link must survive our cleanup.
    let foreign_ns = format!("other-{}", std::process::id());
    let foreign_link = format!("othr{}", std::process::id() % 100_000);
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &foreign_ns])
        .status()
        .unwrap()
        .success());
    assert!(std::process::Command::new("ip")
        .args(["link", "add", &foreign_link, "type", "bridge"])
        .status()
        .unwrap()
        .success());

    // "Crash": the runtime goes away without stopping anything.
    let state = env.state.clone();
    drop(env.rt);
    let rt = OciRuntime::new(OciConfig {
        spare_netns: 0,
        ..config(&state)
    })
    .await
    .unwrap();
    assert!(runc_containers(&state).is_empty(), "containers left");
    assert!(
        swk_netns(&state).is_empty(),
        "netns left: {:?}",
        swk_netns(&state)
    );
    assert!(
        swk_veths(&state).is_empty(),
        "veths left: {:?}",
        swk_veths(&state)
    );
    let exit = tokio::time::timeout(Duration::from_secs(5), started.wait_exit())
        .await
        .expect("old container process is gone");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    tokio::time::timeout(Duration::from_secs(5), created.wait_exit())
        .await
        .expect("old created container is gone");
    assert!(!answers(started.addr()).await);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(state.to_str().unwrap()),
        "overlay mount left"
    );
    // The image cache survives a restart.
    assert!(env.oci_image.rootfs.join("bin/busybox").exists());

    assert!(
        Path::new("/run/netns").join(&foreign_ns).exists(),
        "removed a foreign netns"
    );
    assert!(
        Path::new("/sys/class/net").join(&foreign_link).exists(),
        "removed a foreign link"
    );
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &foreign_ns])
        .status();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &foreign_link])
        .status();

    // The restarted runtime works.
    let c = rt.create(&spec("crash-c", &env.oci_image)).await.unwrap();
    serve(&rt, &c).await;
    rt.cleanup_all().await;
    assert!(swk_netns(&state).is_empty());
}

const CRASH_STATE_ENV: &str = "SYNWAKE_OCI_CRASH_CHILD_STATE";
const CRASH_IMAGE_ENV: &str = "SYNWAKE_OCI_CRASH_CHILD_IMAGE";

/// Not a test on its own: the "daemon" process that the kill -9 test starts and kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of restart_after_kill_9_of_the_daemon"]
async fn crash_child_daemon() {
    let (Ok(state), Ok(image)) = (
        std::env::var(CRASH_STATE_ENV),
        std::env::var(CRASH_IMAGE_ENV),
    ) else {
        return;
    };
    let rt = OciRuntime::new(config(Path::new(&state))).await.unwrap();
    let image = rt.import_image(Path::new(&image)).await.unwrap();
    let started = rt.create(&spec("killed-a", &image)).await.unwrap();
    serve(&rt, &started).await;
    let pool = Pool::new(rt.clone());
    pool.refill(spec("killed-b", &image), 2);
    assert_eq!(
        pool.wait_ready("killed-b", 2, Duration::from_secs(10))
            .await,
        2
    );
    println!("READY {}", started.addr());
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill_9_of_the_daemon_leaves_no_container_netns_or_veth() {
    if !can_run("kill_9_recovery") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _janitor = Janitor(state.clone());
    let layers = vec![Layer::new(fixture::busybox_layer().unwrap(), true)];
    let archive = dir.path().join("fn.tar");
    fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_daemon",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_STATE_ENV, &state)
        .env(CRASH_IMAGE_ENV, &archive)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // The harness prints "test crash_child_daemon ... " on the same line.
            if let Some((_, addr)) = line.split_once("READY ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("child daemon became ready")
        .parse()
        .unwrap();
    assert!(answers(addr).await, "child's container serves");
    assert_eq!(runc_containers(&state).len(), 3);
    assert!(swk_netns(&state).len() >= 3, "{:?}", swk_netns(&state));

    child.kill().unwrap(); // SIGKILL: no cleanup code runs
    child.wait().unwrap();
    assert_eq!(
        runc_containers(&state).len(),
        3,
        "containers outlive the daemon"
    );
    assert!(answers(addr).await, "the orphaned container still serves");

    let rt = OciRuntime::new(OciConfig {
        spare_netns: 0,
        ..config(&state)
    })
    .await
    .unwrap();
    assert!(runc_containers(&state).is_empty(), "containers left");
    assert!(
        swk_netns(&state).is_empty(),
        "netns left: {:?}",
        swk_netns(&state)
    );
    assert!(
        swk_veths(&state).is_empty(),
        "veths left: {:?}",
        swk_veths(&state)
    );
    assert!(!answers(addr).await, "the orphaned container still serves");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(state.to_str().unwrap()),
        "overlay mount left"
    );
    let cgroups = names_with_prefix(
        Path::new("/sys/fs/cgroup/memory/synwake"),
        &format!("swk-{}-", config(&state).name_tag()),
    );
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    rt.cleanup_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_executable_fails_create_with_the_runtime_error() {
    if !can_run("missing_executable") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let mut s = spec("broken", &env.oci_image);
    s.command = Some(vec!["/bin/does-not-exist".into()]);
    let err = env.rt.create(&s).await.expect_err("create must fail");
    let msg = err.to_string();
    assert!(msg.contains("does-not-exist"), "{msg}");
    eprintln!("create error: {msg}");
    assert!(runc_containers(&env.state).is_empty());
    assert!(env.rt.container_ids().is_empty());
    let bundles = std::fs::read_dir(env.state.join("bundles"))
        .unwrap()
        .count();
    assert_eq!(bundles, 0, "bundle left behind");
    env.rt.cleanup_all().await;
}

fn masquerade_rule_present() -> bool {
    std::process::Command::new("iptables")
        .args([
            "-w",
            "-t",
            "nat",
            "-C",
            "POSTROUTING",
            "-s",
            TEST_SUBNET,
            "!",
            "-o",
            "synwake0",
        ])
        .args(["-j", "MASQUERADE", "-m", "comment", "--comment", "synwake"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_nat_adds_and_removes_the_masquerade_rule() {
    if !can_run("outbound_nat") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let with_nat = OciRuntime::new(OciConfig {
        outbound_nat: true,
        spare_netns: 0,
        ..config(&state)
    })
    .await
    .unwrap();
    assert!(masquerade_rule_present());
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    // Instances that may reach the outside get the host's resolver config.
    if let Ok(host_resolv) = std::fs::read_to_string("/etc/resolv.conf") {
        let layers = vec![Layer::new(fixture::busybox_layer().unwrap(), true)];
        let archive = dir.path().join("fn.tar");
        fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
        let image = with_nat.import_image(&archive).await.unwrap();
        let mut s = spec("resolv", &image);
        s.command = Some(vec![
            "/bin/busybox".into(),
            "cat".into(),
            "/etc/resolv.conf".into(),
        ]);
        let c = with_nat.create(&s).await.unwrap();
        with_nat.start(&c).await.unwrap();
        assert_eq!(c.wait_exit().await.code, Some(0));
        let deadline = Instant::now() + Duration::from_secs(2);
        let want: Vec<String> = host_resolv
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect();
        while c.output_tail(100).len() < want.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(c.output_tail(100), want);
        with_nat.stop(c, Duration::ZERO).await.unwrap();
    }
    with_nat.cleanup_all().await;
    let without = OciRuntime::new(OciConfig {
        spare_netns: 0,
        ..config(&state)
    })
    .await
    .unwrap();
    assert!(!masquerade_rule_present());
    without.cleanup_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_container_whose_init_died_reports_the_exit() {
    if !can_run("dead_init") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let env = setup().await;
    let c = env.rt.create(&spec("dead", &env.oci_image)).await.unwrap();
    // SAFETY: plain kill(2) of the container's init, which this test owns.
    assert_eq!(unsafe { libc::kill(c.pid(), libc::SIGKILL) }, 0);
    let exit = tokio::time::timeout(Duration::from_secs(5), c.wait_exit())
        .await
        .unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    let err = tokio::time::timeout(Duration::from_secs(5), env.rt.start(&c))
        .await
        .expect("start returns")
        .expect_err("start of a dead container fails");
    assert!(
        matches!(err, synwake_oci::OciError::Exited { .. }),
        "{err:?}"
    );
    env.rt.stop(c, Duration::ZERO).await.unwrap();
    env.rt.cleanup_all().await;
}
