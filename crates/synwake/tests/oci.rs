//! The daemon with the `oci` runtime, real runc and real namespaces: cold requests served
//! from inside a container (oci-archive and docker-archive), pooled cold starts, memory
//! limits, deploys through the API (good, corrupt, exiting at once), crash recovery and
//! clean shutdown. Needs root, runc, iproute2, iptables, busybox-static and the cgroup v1
//! memory controller; with CI=true a missing prerequisite fails the test, otherwise it is
//! skipped loudly.
//!
//! Every daemon gets its own state dir (so its own name tag, see
//! `synwake_oci::OciConfig::name_tag`) and its own /24 of 10.75.0.0/16; dropping an
//! [`OciDaemon`] sends SIGTERM and asserts that no container, netns, veth or cgroup of it
//! is left.
//!
//! The cold-start benchmark behind docs/benchmarks-oci.md is the ignored test
//! `cold_start_benchmark` at the end.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{alive, metric, wait_until, Daemon, Resp};
use serde_json::{json, Value};
use synwake_oci::fixture::{self, Layer};
use synwake_oci::OciConfig;
use synwake_test_support::oci::{can_run, runc_list, runc_running_for, HostObjects, RuncContainer};

/// Daemons with containers are heavy on a 2-core machine and the pool test compares
/// timings: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `can_run` plus the image tools (buildah, skopeo, docker-registry): under CI=true a
/// missing one fails the test, otherwise it is skipped loudly.
fn can_run_with_tools(test: &str) -> bool {
    can_run(test)
        && synwake_test_support::gate::can_run(
            test,
            synwake_oci::tools::missing_tool().map(|t| format!("{t} missing")),
        )
}

/// A busybox httpd image `localhost/<image>:<v>` serving `version <v>` at `/`, built by
/// buildah and pushed to the OCI archive `<file><v>.tar` in `tools`' directory.
fn web_version_archive(
    tools: &synwake_oci::tools::ToolStore,
    image: &str,
    file: &str,
    v: &str,
) -> PathBuf {
    let name = format!("localhost/{image}:{v}");
    let body = format!("version {v}\n");
    let spec = synwake_oci::tools::BuildSpec {
        files: vec![("www/index.html", 0o644, body.as_bytes())],
        ..Default::default()
    };
    tools.build(&name, &spec).unwrap();
    let archive = tools.path(&format!("{file}{v}.tar"));
    tools
        .buildah_push(&name, &format!("oci-archive:{}", archive.display()))
        .unwrap();
    archive
}

/// Versions 1 and 2 of [`web_version_archive`]'s image, pushed to `reg` as
/// `team/<name>:1` and `team/<name>:2`.
fn push_web_versions(
    reg: &synwake_oci::tools::Registry,
    tools: &synwake_oci::tools::ToolStore,
    image: &str,
    name: &str,
) {
    for v in ["1", "2"] {
        let archive = web_version_archive(tools, image, name, v);
        reg.push(
            &format!("oci-archive:{}", archive.display()),
            &format!("team/{name}:{v}"),
            &[],
        )
        .unwrap();
    }
}

/// CGI `/cgi-bin/hog?<MiB>`: allocates and touches that much (dd's block buffer) before
/// writing anything. The fixture's `/cgi-bin/eat` prints its headers first, so busybox
/// httpd has sent `200 OK` before the OOM kill and the client sees a 200 with an empty
/// body; here an OOM kill leaves the response unstarted (dd killed: sleep, silently,
/// until the runtime kills the whole container).
const CGI_HOG: &str = "#!/bin/sh\n\
/bin/busybox dd if=/dev/zero of=/dev/null bs=${QUERY_STRING:-256}M count=1 2>/dev/null \
|| exec /bin/busybox sleep 30\n\
echo 'Content-Type: text/plain'\n\
echo\n\
echo \"allocated ${QUERY_STRING:-256} MiB\"\n";

/// CGI `/cgi-bin/version`: the container's `VERSION` env var (httpd passes its env on).
const CGI_VERSION: &str = "#!/bin/sh\n\
echo 'Content-Type: text/plain'\n\
echo\n\
echo \"version=$VERSION\"\n";

/// The fixture function (busybox httpd with /cgi-bin/ns and /cgi-bin/eat) plus a second
/// layer with [`CGI_HOG`], as both archive formats, in a directory of its own.
struct Images {
    dir: tempfile::TempDir,
    oci: PathBuf,
    docker: PathBuf,
}

impl Images {
    fn write() -> Images {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = fixture::busybox_layer().expect("busybox layer");
        let hog = fixture::TarBuilder::new()
            .dir("www")
            .dir("www/cgi-bin")
            .file("www/cgi-bin/hog", 0o755, CGI_HOG.as_bytes())
            .file("www/cgi-bin/version", 0o755, CGI_VERSION.as_bytes())
            .finish();
        let gz = vec![
            Layer::new(base.clone(), true),
            Layer::new(hog.clone(), true),
        ];
        let oci = dir.path().join("fn.oci.tar");
        fixture::write_oci_archive(&oci, &gz, &fixture::function_config(&gz))
            .expect("write oci-archive");
        let plain = vec![Layer::new(base, false), Layer::new(hog, false)];
        let docker = dir.path().join("fn.docker.tar");
        fixture::write_docker_archive(&docker, &plain, &fixture::function_config(&plain))
            .expect("write docker-archive");
        Images { dir, oci, docker }
    }
}

/// A `[[function]]` table for the oci runtime. busybox httpd as PID 1 ignores SIGTERM,
/// so a short stop_grace keeps scale-to-zero and shutdown quick.
fn oci_function(name: &str, image: &Path, extra: &str) -> String {
    format!(
        "[[function]]\nname = \"{name}\"\nruntime = \"oci\"\nimage = {:?}\nstop_grace = \"100ms\"\n{extra}\n",
        image.display().to_string()
    )
}

/// A `synwake up` with the oci runtime on its own subnet. Dropping it sends SIGTERM and
/// asserts the daemon exited 0 and left no container, netns, veth or cgroup.
struct OciDaemon {
    d: Daemon,
    images: Images,
    tag: String,
    running: bool,
}

impl OciDaemon {
    /// `net` picks the instance subnet 10.75.<net>.0/24; `functions` builds the
    /// `[[function]]` tables from the image paths.
    fn start(net: u8, functions: impl FnOnce(&Images) -> String) -> OciDaemon {
        Self::start_in(&format!("10.75.{net}.0/24"), functions)
    }

    /// Like [`OciDaemon::start`] with an explicit subnet; `functions` may begin with more
    /// `[oci]` keys.
    fn start_in(subnet: &str, functions: impl FnOnce(&Images) -> String) -> OciDaemon {
        Self::start_full(subnet, "", functions)
    }

    /// Like [`OciDaemon::start_in`] with more `[gateway]` keys (`gateway`: TOML lines).
    fn start_full(
        subnet: &str,
        gateway: &str,
        functions: impl FnOnce(&Images) -> String,
    ) -> OciDaemon {
        let images = Images::write();
        // The archives' temp dir is the one image directory (local paths elsewhere are refused).
        let body = format!(
            "[oci]\nsubnet = \"{subnet}\"\nimage_dirs = [{:?}]\n{}",
            images.dir.path().display().to_string(),
            functions(&images)
        );
        let d = Daemon::start_with(gateway, &body);
        let tag = OciConfig {
            state_dir: d.state_dir().join("oci"),
            ..OciConfig::default()
        }
        .name_tag();
        OciDaemon {
            d,
            images,
            tag,
            running: true,
        }
    }

    fn oci_state(&self) -> PathBuf {
        self.d.state_dir().join("oci")
    }

    fn host_objects(&self) -> HostObjects {
        HostObjects::of(&self.oci_state(), &self.tag)
    }

    /// Containers of `function` (ids are `swk-<tag>-<function>-<n>`).
    fn containers_of(&self, function: &str) -> Vec<RuncContainer> {
        let prefix = format!("swk-{}-{function}-", self.tag);
        runc_list(&self.oci_state().join("runc"))
            .into_iter()
            .filter(|c| c.id.starts_with(&prefix))
            .collect()
    }

    /// Waits until `function` has a created-but-not-started container in its pool: runc
    /// lists it as created and its `runc create` has exited (the pool takes it in right
    /// after; 50 ms covers that).
    fn wait_pooled(&self, function: &str) {
        let pooled = || {
            self.containers_of(function)
                .iter()
                .any(|c| c.status == "created" && !runc_running_for(&c.id))
        };
        assert!(
            wait_until(Duration::from_secs(15), pooled),
            "no pooled container of {function}: {:?}",
            self.containers_of(function)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    fn call_ok(&self, function: &str, path: &str) -> Resp {
        let r = self.d.call(function, path);
        assert_eq!(r.status, 200, "GET {function}{path}: {}", r.text());
        r
    }

    /// POST /system/scale-function/<f> replicas 0, then waits for availableReplicas 0.
    fn scale_to_zero(&self, function: &str) {
        let r = self.d.api_json(
            "POST",
            &format!("/system/scale-function/{function}"),
            &json!({ "serviceName": function, "replicas": 0 }).to_string(),
        );
        assert!(
            matches!(r.status, 200..=202),
            "scale {function} to 0: {} {}",
            r.status,
            r.text()
        );
        assert!(
            wait_until(Duration::from_secs(15), || self.d.available(function) == 0),
            "{function} still has replicas: {}",
            self.d.status(function)
        );
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&self.d.metrics(), series).unwrap_or(0.0)
    }

    fn start_seconds_sum(&self, function: &str) -> f64 {
        self.metric(&format!(
            "synwake_instance_start_seconds_sum{{function=\"{function}\",runtime=\"oci\"}}"
        ))
    }

    fn kill_9(&mut self) {
        self.running = false;
        self.d
            .stop_with(libc::SIGKILL, Duration::from_secs(5))
            .expect("daemon dies on SIGKILL");
    }

    fn respawn(&mut self) {
        self.d.spawn();
        self.running = true;
    }

    /// SIGTERM and wait; None if it had to be killed.
    fn sigterm(&mut self) -> Option<ExitStatus> {
        self.running = false;
        self.d.stop_with(libc::SIGTERM, Duration::from_secs(20))
    }
}

impl Drop for OciDaemon {
    fn drop(&mut self) {
        let status = if self.running { self.sigterm() } else { None };
        let left = self.host_objects();
        if !left.is_empty() {
            left.remove(&self.oci_state());
        }
        if std::thread::panicking() {
            return;
        }
        if let Some(status) = status {
            assert_eq!(
                status.code(),
                Some(0),
                "synwake exit after SIGTERM ({status:?}, signal {:?}):\n{}",
                status.signal(),
                self.d.log()
            );
        }
        assert!(
            left.is_empty(),
            "synwake left after shutdown: {left:#?}\n{}",
            self.d.log()
        );
    }
}

/// `mnt=` and `net=` from /cgi-bin/ns.
fn namespaces(body: &str) -> (String, String) {
    let get = |key: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {body:?}"))
            .trim()
            .to_string()
    };
    (get("mnt="), get("net="))
}

fn ns_of(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .expect("read ns link")
        .to_string_lossy()
        .into_owned()
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[test]
fn cold_request_is_served_from_inside_a_container() {
    if !can_run("cold_request_is_served_from_inside_a_container") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start(1, |img| {
        oci_function("nsoci", &img.oci, "") + &oci_function("nsdocker", &img.docker, "")
    });
    let daemon = d.d.pid();
    let (host_mnt, host_net) = (ns_of(daemon, "mnt"), ns_of(daemon, "net"));
    for f in ["nsoci", "nsdocker"] {
        assert_eq!(d.d.available(f), 0, "{f} should start cold");
        assert!(
            d.containers_of(f).is_empty(),
            "{f} has a container before any request"
        );
        let r = d.call_ok(f, "/cgi-bin/ns");
        assert_eq!(r.header("x-synwake-cold-start"), Some("true"), "{f}");
        let (mnt, net) = namespaces(&r.text());
        assert!(
            mnt.starts_with("mnt:[") && net.starts_with("net:["),
            "{f}: {mnt} {net}"
        );
        assert_ne!(
            mnt, host_mnt,
            "{f} answered from the daemon's mount namespace"
        );
        assert_ne!(
            net, host_net,
            "{f} answered from the daemon's network namespace"
        );
        let running: Vec<_> = d
            .containers_of(f)
            .into_iter()
            .filter(|c| c.status == "running")
            .collect();
        assert_eq!(running.len(), 1, "{f}: {running:?}");
        // The answer came from that container: its init shares the namespaces.
        assert_eq!(ns_of(running[0].pid, "net"), net, "{f}");
        assert_eq!(ns_of(running[0].pid, "mnt"), mnt, "{f}");
    }
}

#[test]
fn pooled_cold_starts_use_the_pool_and_are_faster_than_create_and_start() {
    if !can_run("pooled_cold_starts") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start(2, |img| {
        oci_function("pooled", &img.oci, "pool = 1") + &oci_function("unpooled", &img.oci, "")
    });
    const ROUNDS: usize = 5;
    let mut starts = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for (i, f) in ["pooled", "unpooled"].into_iter().enumerate() {
            if f == "pooled" {
                // Round 0: filled at deploy; later rounds: refilled after the scale to zero.
                d.wait_pooled(f);
            }
            let pool_before = d.metric(&format!("synwake_pool_starts_total{{function=\"{f}\"}}"));
            let sum_before = d.start_seconds_sum(f);
            let r = d.call_ok(f, "/");
            assert_eq!(
                r.header("x-synwake-cold-start"),
                Some("true"),
                "{f} round {round}"
            );
            let pool_after = d.metric(&format!("synwake_pool_starts_total{{function=\"{f}\"}}"));
            let took = d.start_seconds_sum(f) - sum_before;
            assert!(took > 0.0, "{f} round {round}: no instance start recorded");
            starts[i].push(took);
            let want = if f == "pooled" { 1.0 } else { 0.0 };
            assert_eq!(
                pool_after - pool_before,
                want,
                "{f} round {round}: pool starts {pool_before} -> {pool_after}"
            );
            d.scale_to_zero(f);
        }
    }
    assert!(
        d.containers_of("unpooled").is_empty(),
        "a function without pool keeps containers at zero"
    );
    let ms = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{:.1}", s * 1e3))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "instance start ms: pooled {:?}, create+start {:?}",
        ms(&starts[0]),
        ms(&starts[1])
    );
    let (pooled, unpooled) = (median(&starts[0]), median(&starts[1]));
    assert!(
        pooled < unpooled,
        "pooled median {:.1} ms not below create+start median {:.1} ms",
        pooled * 1e3,
        unpooled * 1e3
    );
}

/// The adaptive idle policy's pre-warm of an oci function with `pool` is a pooled start
/// (`runc start` of a created container), and the call it was made for finds it ready.
#[test]
fn predicted_prewarm_of_a_pooled_function_starts_from_the_pool() {
    if !can_run("predicted_prewarm_pooled") {
        return;
    }
    let _serial = serial();
    // Calls every 3 s: after three idle times the window is ~2.7 s (pre-warm) to ~3.3 s.
    let knobs = "idle_policy = \"adaptive\"\nidle_timeout = \"1s\"\npool = 1\n\
        adaptive = { histogram_min = \"10ms\", histogram_range = \"60s\", min_samples = 3, min_unload = \"500ms\" }";
    let d = OciDaemon::start_in(
        &format!("10.7.{}.0/24", 1 + std::process::id() % 200),
        |img| oci_function("timer", &img.oci, knobs),
    );
    d.wait_pooled("timer");
    let series = |m: &str| d.metric(&format!("{m}{{function=\"timer\"}}"));
    let t0 = Instant::now();
    let mut warm_calls = 0;
    for k in 0..7u32 {
        let due = t0 + Duration::from_secs(3 * k as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let r = d.call_ok("timer", "/");
        // Calls 0-3 teach the histogram (fallback: stopped 1 s after each call).
        if k >= 4 && r.header("x-synwake-cold-start") == Some("false") {
            warm_calls += 1;
        }
    }
    let prewarms = series("synwake_predicted_prewarms_total");
    let hits = series("synwake_predicted_prewarm_hits_total");
    let predicted_starts =
        d.metric("synwake_cold_starts_total{function=\"timer\",trigger=\"predicted\"}");
    eprintln!("prewarms {prewarms}, hits {hits}, warm calls {warm_calls} of 3");
    assert!(
        prewarms >= 2.0,
        "{prewarms} predicted pre-warms for calls 4-6"
    );
    assert!(
        hits >= 2.0 && warm_calls >= 2,
        "hits {hits}, warm calls {warm_calls}"
    );
    assert_eq!(predicted_starts, prewarms);
    // Every start here came from the pool: the cold ones of calls 0-3 and the pre-warms.
    let pool = series("synwake_pool_starts_total");
    let starts =
        d.metric("synwake_instance_start_seconds_count{function=\"timer\",runtime=\"oci\"}");
    assert!(
        pool >= prewarms + 1.0,
        "pool starts {pool}, prewarms {prewarms}"
    );
    assert!(pool <= starts, "pool starts {pool}, starts {starts}");
}

#[test]
fn after_an_update_a_pooled_cold_start_runs_the_new_spec() {
    if !can_run("pool_after_update") {
        return;
    }
    let _serial = serial();
    let mut d = OciDaemon::start_in("10.5.1.0/24", |_| String::new());
    let deploy = |method: &str, version: &str| {
        let body = json!({
            "service": "upd",
            "image": d.images.oci.display().to_string(),
            "envVars": { "VERSION": version },
            "annotations": {
                "com.synwake.runtime": "oci",
                "com.synwake.stop-grace": "100ms",
                "com.synwake.pool": "1",
            },
        });
        let r = d.d.api_json(method, "/system/functions", &body.to_string());
        assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    };
    deploy("POST", "1");
    assert_eq!(
        d.call_ok("upd", "/cgi-bin/version").text().trim(),
        "version=1"
    );
    d.scale_to_zero("upd");
    d.wait_pooled("upd");
    let old: Vec<String> = d.containers_of("upd").into_iter().map(|c| c.id).collect();
    assert_eq!(old.len(), 1, "{old:?}");

    deploy("PUT", "2");
    // The cold start after the update must not come from version 1's pool.
    let r = d.call_ok("upd", "/cgi-bin/version");
    assert_eq!(
        r.text().trim(),
        "version=2",
        "served by an old pooled container"
    );
    assert!(
        wait_until(Duration::from_secs(15), || d
            .containers_of("upd")
            .iter()
            .all(|c| !old.contains(&c.id))),
        "version 1's pooled container is still there: {:?}",
        d.containers_of("upd")
    );
    d.sigterm();
}

#[test]
fn over_the_memory_limit_the_request_gets_502_and_the_next_one_a_new_container() {
    if !can_run("memory_limit") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start(3, |img| {
        oci_function("hungry", &img.oci, "memory = \"32Mi\"")
    });
    let (_, net_before) = namespaces(&d.call_ok("hungry", "/cgi-bin/ns").text());
    let first = d.containers_of("hungry");
    assert_eq!(first.len(), 1, "{first:?}");
    let cgroup = format!("/sys/fs/cgroup/memory/synwake/{}", first[0].id);
    let limit = std::fs::read_to_string(format!("{cgroup}/memory.limit_in_bytes"))
        .expect("memory cgroup of the container");
    assert_eq!(limit.trim(), (32u64 << 20).to_string());

    // Under the limit the same CGI answers.
    let r = d.call_ok("hungry", "/cgi-bin/hog?4");
    assert_eq!(r.text().trim(), "allocated 4 MiB");
    let r = d.d.call("hungry", "/cgi-bin/hog?256");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("hungry"),
        "502 body does not name the function: {}",
        r.text()
    );
    // Well before the CGI's sleep ends: the runtime killed the container.
    assert!(
        r.elapsed < Duration::from_secs(10),
        "502 after {:?}",
        r.elapsed
    );
    assert!(
        wait_until(Duration::from_secs(10), || !alive(first[0].pid)),
        "OOM-hit container {} still running",
        first[0].id
    );

    let r = d.call_ok("hungry", "/cgi-bin/ns");
    let (_, net_after) = namespaces(&r.text());
    assert_ne!(
        net_after, net_before,
        "the next request was not served by a new container"
    );
    // The dead container is removed (runc delete, netns and address released), not
    // kept until shutdown.
    assert!(
        wait_until(Duration::from_secs(5), || d
            .containers_of("hungry")
            .iter()
            .all(|c| c.id != first[0].id)),
        "the killed container is still listed: {:?}",
        d.containers_of("hungry")
    );
    assert_eq!(d.containers_of("hungry").len(), 1);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .d
            .log()
            .contains("out of memory")),
        "the log does not say out of memory:\n{}",
        d.d.log()
    );
}

#[test]
fn deploy_through_the_api_refuses_corrupt_archives_and_retries_exiting_commands() {
    if !can_run("deploy_through_the_api") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start(4, |_| String::new());
    let deploy = |name: &str, image: &Path, extra: Value| {
        let mut annotations =
            json!({ "com.synwake.runtime": "oci", "com.synwake.stop-grace": "100ms" });
        annotations
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let body = json!({
            "service": name,
            "image": image.display().to_string(),
            "annotations": annotations,
        });
        d.d.api_json("POST", "/system/functions", &body.to_string())
    };

    // A good archive: deployed, and served from a container.
    let r = deploy("viaapi", &d.images.oci, json!({}));
    assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    let (_, net) = namespaces(&d.call_ok("viaapi", "/cgi-bin/ns").text());
    assert_ne!(net, ns_of(d.d.pid(), "net"));
    assert_eq!(d.containers_of("viaapi").len(), 1);

    // A truncated archive: refused, naming the archive; nothing deployed.
    let bytes = std::fs::read(&d.images.oci).unwrap();
    let truncated = d.images.dir.path().join("truncated.oci.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let r = deploy("broken", &truncated, json!({}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains(&truncated.display().to_string()),
        "400 body does not name the archive: {}",
        r.text()
    );
    assert_eq!(d.d.api_get("/system/function/broken").status, 404);

    // A command that exits at once: 502 with its output, and every request tries again.
    let r = deploy(
        "quitter",
        &d.images.oci,
        json!({ "com.synwake.command": "/bin/sh -c 'echo bye; exit 3'" }),
    );
    assert!(matches!(r.status, 200..=202), "{} {}", r.status, r.text());
    let failures = "synwake_start_failures_total{function=\"quitter\"}";
    for attempt in 1..=2 {
        let r = d.d.call("quitter", "/");
        let body = r.text();
        assert_eq!(r.status, 502, "attempt {attempt}: {body}");
        assert!(body.contains("quitter"), "attempt {attempt}: {body}");
        assert!(
            body.contains("bye"),
            "attempt {attempt}: 502 without the output: {body}"
        );
        assert_eq!(d.metric(failures), attempt as f64, "attempt {attempt}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || d
            .containers_of("quitter")
            .is_empty()),
        "failed starts leave containers: {:?}",
        d.containers_of("quitter")
    );
}

/// A netns, a host veth (its peer in that netns) and a memory cgroup named like a
/// runtime's but with another tag: crash recovery must leave them alone. Removed on drop.
struct Decoys {
    netns: String,
    link: String,
    cgroup: PathBuf,
}

impl Decoys {
    fn create(tag: &str) -> Decoys {
        let d = Decoys {
            netns: format!("swk-{tag}-n7"),
            link: format!("swkv{tag}7"),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/memory/synwake/swk-{tag}-decoy-1")),
        };
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        assert!(ok(Command::new("ip").args(["netns", "add", &d.netns])));
        assert!(ok(Command::new("ip").args([
            "link", "add", &d.link, "type", "veth", "peer", "name", "eth0", "netns", &d.netns
        ])));
        std::fs::create_dir_all(&d.cgroup).expect("decoy cgroup");
        d
    }

    fn intact(&self) -> bool {
        Path::new("/run/netns").join(&self.netns).exists()
            && Path::new("/sys/class/net").join(&self.link).exists()
            && self.cgroup.is_dir()
    }
}

impl Drop for Decoys {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Marks a netns and a veth of the current run, so the next run's objects (which may
/// reuse the names: addresses and sequence numbers start over) can be told apart.
const MARK: &str = "swkfirstrun";

fn mark_netns(netns: &str) {
    let ok = Command::new("ip")
        .args(["-n", netns, "link", "set", "dev", "lo", "alias", MARK])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mark netns {netns}");
}

fn mark_veth(veth: &str) {
    std::fs::write(format!("/sys/class/net/{veth}/ifalias"), MARK).expect("mark veth");
}

fn netns_marked(netns: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "dev", "lo"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(MARK))
}

fn veth_marked(veth: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{veth}/ifalias"))
        .is_ok_and(|a| a.trim() == MARK)
}

#[test]
fn after_kill_9_the_next_start_removes_what_the_crash_left_and_nothing_else() {
    if !can_run("crash_recovery") {
        return;
    }
    let _serial = serial();
    let mut d = OciDaemon::start(5, |img| oci_function("crashy", &img.oci, "pool = 1"));
    let other_tag = OciConfig {
        state_dir: d.d.dir.path().join("another-synwake"),
        ..OciConfig::default()
    }
    .name_tag();
    assert_ne!(other_tag, d.tag);
    let decoys = Decoys::create(&other_tag);

    // A warm container and a pooled one.
    d.call_ok("crashy", "/");
    assert!(
        wait_until(Duration::from_secs(15), || {
            let mut s: Vec<_> = d
                .containers_of("crashy")
                .into_iter()
                .map(|c| c.status)
                .collect();
            s.sort();
            s == ["created", "running"]
        }),
        "want one running and one created container: {:?}",
        d.containers_of("crashy")
    );
    let before = d.host_objects();
    assert!(
        before.netns.len() >= 2 && before.veths.len() >= 2,
        "{before:#?}"
    );
    before.netns.iter().for_each(|n| mark_netns(n));
    before.veths.iter().for_each(|v| mark_veth(v));

    d.kill_9();
    // The crash really leaves them: processes, namespaces and links are all still there.
    for c in &before.containers {
        assert!(alive(c.pid), "container {} died with the daemon", c.id);
    }
    let crashed = d.host_objects();
    assert_eq!(crashed.containers, before.containers);
    assert_eq!(crashed.netns, before.netns);
    assert_eq!(crashed.veths, before.veths);

    d.respawn();
    let after = d.host_objects();
    for c in &before.containers {
        assert!(
            wait_until(Duration::from_secs(5), || !alive(c.pid)),
            "container {} (pid {}) of the crashed run still runs",
            c.id,
            c.pid
        );
        assert!(
            !after
                .containers
                .iter()
                .any(|a| a.id == c.id && a.created == c.created),
            "container {} of the crashed run is still listed: {:?}",
            c.id,
            after.containers
        );
    }
    let stale_ns: Vec<_> = after.netns.iter().filter(|n| netns_marked(n)).collect();
    assert!(
        stale_ns.is_empty(),
        "netns of the crashed run left: {stale_ns:?}"
    );
    let stale_veths: Vec<_> = after.veths.iter().filter(|v| veth_marked(v)).collect();
    assert!(
        stale_veths.is_empty(),
        "veths of the crashed run left: {stale_veths:?}"
    );
    assert!(
        decoys.intact(),
        "recovery removed another runtime's objects"
    );
    assert!(
        d.d.log().contains("removed leftovers of an earlier run"),
        "{}",
        d.d.log()
    );

    // The new run works, from its own pool.
    d.wait_pooled("crashy");
    d.call_ok("crashy", "/");
    assert_eq!(
        d.metric("synwake_pool_starts_total{function=\"crashy\"}"),
        1.0
    );
    drop(d);
    assert!(
        decoys.intact(),
        "shutdown removed another runtime's objects"
    );
}

#[test]
fn sigterm_removes_every_container_netns_and_veth() {
    if !can_run("sigterm_cleanup") {
        return;
    }
    let _serial = serial();
    let mut d = OciDaemon::start(6, |img| {
        oci_function("warm", &img.oci, "pool = 1") + &oci_function("plain", &img.docker, "")
    });
    d.call_ok("warm", "/");
    d.call_ok("plain", "/");
    assert!(
        wait_until(Duration::from_secs(15), || d.containers_of("warm").len()
            == 2),
        "{:?}",
        d.containers_of("warm")
    );
    let before = d.host_objects();
    assert_eq!(before.containers.len(), 3, "{before:#?}");
    assert!(
        before.netns.len() >= 3 && before.veths.len() >= 3,
        "{before:#?}"
    );

    let t0 = Instant::now();
    let status = d.sigterm().expect("synwake exits on SIGTERM");
    eprintln!("shutdown took {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(0), "{status:?}");
    for c in &before.containers {
        assert!(!alive(c.pid), "container {} outlived synwake", c.id);
    }
    let after = d.host_objects();
    assert!(after.is_empty(), "left after SIGTERM: {after:#?}");
}

/// One cold start measured by the client: scale to zero (and wait for the pool), then
/// GET / and time it to the last byte of the 200.
struct ColdStart {
    client: Duration,
    /// The daemon's own start -> ready (synwake_instance_start_seconds_sum delta).
    instance: Duration,
}

fn cold_start(d: &OciDaemon, f: &str, runtime: &str, pooled: bool) -> ColdStart {
    d.scale_to_zero(f);
    if pooled {
        d.wait_pooled(f);
    }
    // Let background work (netns spares, pool refill) finish before the clock starts.
    std::thread::sleep(Duration::from_millis(300));
    let series =
        format!("synwake_instance_start_seconds_sum{{function=\"{f}\",runtime=\"{runtime}\"}}");
    let before = d.metric(&series);
    let r = d.d.call(f, "/");
    assert_eq!(r.status, 200, "{f}: {}", r.text());
    assert_eq!(
        r.header("x-synwake-cold-start"),
        Some("true"),
        "{f} was not cold"
    );
    let instance = Duration::from_secs_f64(d.metric(&series) - before);
    ColdStart {
        client: r.elapsed,
        instance,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// docs/benchmarks-oci.md:
/// `cargo test --release -p synwake --test oci -- --ignored --nocapture cold_start_benchmark`
/// (SYNWAKE_BENCH_RUNS sets starts per mode, default 30).
#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn cold_start_benchmark() {
    if !can_run("cold_start_benchmark") {
        return;
    }
    let _serial = serial();
    let runs: usize = std::env::var("SYNWAKE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    // The same fixture image, also pulled from a real registry (when the tools are here).
    let reg = synwake_oci::tools::missing_tool()
        .is_none()
        .then(|| synwake_oci::tools::Registry::start(false).expect("registry"));
    let d = OciDaemon::start_in("10.6.9.0/24", |img| {
        let mut body = String::new();
        if let Some(reg) = &reg {
            reg.push(
                &format!("oci-archive:{}", img.oci.display()),
                "bench/fn:1",
                &[],
            )
            .expect("push the fixture image");
            body += &format!("insecure_registries = [\"{}\"]\n\n", reg.addr);
            body += &oci_function(
                "ocipull",
                Path::new(&format!("{}/bench/fn:1", reg.addr)),
                "pool = 1",
            );
        }
        body + &common::function("process", "stop_grace = \"100ms\"")
            + &oci_function("oci", &img.oci, "")
            + &oci_function("ocipool", &img.oci, "pool = 1")
    });
    // (function, runtime label, pooled, row name)
    let mut modes = vec![
        ("process", "process", false, "process (synwake-fn)"),
        ("oci", "oci", false, "oci, no pool (create+start)"),
        ("ocipool", "oci", true, "oci, pool = 1 (start only)"),
    ];
    if reg.is_some() {
        modes.push((
            "ocipull",
            "oci",
            true,
            "oci, pool = 1, image pulled from a registry",
        ));
    }
    // One unmeasured start each: page cache, first import, first netns.
    for (f, _, _, _) in &modes {
        d.call_ok(f, "/");
    }
    let load_before = loadavg();
    let mut results: Vec<Vec<ColdStart>> = modes.iter().map(|_| Vec::new()).collect();
    // Interleaved, so load from other builds on the machine hits every mode alike.
    for _ in 0..runs {
        for (i, (f, runtime, pooled, _)) in modes.iter().enumerate() {
            results[i].push(cold_start(&d, f, runtime, *pooled));
        }
    }
    assert_eq!(
        d.metric("synwake_pool_starts_total{function=\"ocipool\"}"),
        (runs + 1) as f64,
        "every ocipool start came from the pool"
    );
    let load_after = loadavg();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\ncold start to first HTTP 200 through synwake (request trigger), {runs} starts per mode"
    );
    println!(
        "kernel {}, {} CPUs, load average before {load_before}, after {load_after}\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| mode | client median ms | client p90 ms | client min ms | client max ms | daemon start->ready median ms |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for ((_, _, _, row), r) in modes.iter().zip(&results) {
        let client: Vec<f64> = r.iter().map(|c| ms(c.client)).collect();
        let instance: Vec<f64> = r.iter().map(|c| ms(c.instance)).collect();
        println!(
            "| {row} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            median(&client),
            percentile(&client, 0.9),
            percentile(&client, 0.0),
            percentile(&client, 1.0),
            median(&instance)
        );
        medians.push(median(&client));
    }
    println!(
        "\npooled / process (client medians): {:.2}x; no pool / pooled: {:.2}x",
        medians[2] / medians[0],
        medians[1] / medians[2]
    );
    if let Some(pulled) = medians.get(3) {
        println!(
            "pulled / archive, both pooled (client medians): {:.2}x",
            pulled / medians[2]
        );
    }
}

/// Deploy by registry reference (a real docker-registry on loopback, images built by
/// buildah and pushed by skopeo): the deploy pulls and reports progress, a failed pull is
/// refused with the registry's reason and leaves the running version alone, and an update
/// to a new tag while requests flow switches from one version to the other at one point.
#[test]
fn deploy_by_registry_reference_and_update_to_a_new_tag_while_requests_flow() {
    if !can_run_with_tools("deploy_by_registry_reference") {
        return;
    }
    let _serial = serial();
    let reg = synwake_oci::tools::Registry::start(false).expect("registry");
    let tools = synwake_oci::tools::ToolStore::new().unwrap();
    push_web_versions(&reg, &tools, "swk-images-web", "web");
    let insecure = format!("insecure_registries = [\"{}\"]\n\n", reg.addr);
    let d = OciDaemon::start_in("10.6.1.0/24", |_| insecure);
    let deploy = |method: &str, tag: &str| {
        let body = json!({
            "service": "web",
            "image": format!("{}/team/web:{tag}", reg.addr),
            "annotations": { "com.synwake.runtime": "oci", "com.synwake.stop-grace": "100ms", "com.synwake.pool": "1" },
        });
        d.d.api_json(method, "/system/functions", &body.to_string())
    };
    let r = deploy("POST", "1");
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        r.text().contains("pulled") && r.text().contains("layer 1/1"),
        "no progress in the deploy answer: {}",
        r.text()
    );
    assert!(d.d.log().contains("team/web:1"), "no pull in the log");
    assert_eq!(d.call_ok("web", "/").text(), "version 1\n");

    // An unknown tag: 400 with the registry's reason; version 1 keeps serving.
    let r = deploy("PUT", "nope");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().to_lowercase().contains("manifest unknown"),
        "{}",
        r.text()
    );
    assert_eq!(d.call_ok("web", "/").text(), "version 1\n");

    // Update while one client sends requests back to back.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && seen.len() < 5000 {
                let r = d.d.call("web", "/");
                seen.push((r.status, r.text()));
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(200));
        let r = deploy("PUT", "2");
        assert_eq!(r.status, 202, "{}", r.text());
        assert!(
            wait_until(Duration::from_secs(10), || d.d.call("web", "/").text()
                == "version 2\n"),
            "version 2 never served"
        );
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        client.join().unwrap()
    });
    assert!(
        seen.iter().all(|(st, _)| *st == 200),
        "failed requests during the update: {:?}",
        seen.iter()
            .filter(|(st, _)| *st != 200)
            .take(3)
            .collect::<Vec<_>>()
    );
    let first_v2 = seen
        .iter()
        .position(|(_, b)| b == "version 2\n")
        .expect("v2 seen by the client");
    assert!(first_v2 > 0, "no request before the update");
    assert!(seen[..first_v2].iter().all(|(_, b)| b == "version 1\n"));
    assert!(
        seen[first_v2..].iter().all(|(_, b)| b == "version 2\n"),
        "went back to version 1 after the switch"
    );
    // Pooled cold start of the pulled image works.
    d.scale_to_zero("web");
    d.wait_pooled("web");
    let r = d.call_ok("web", "/");
    assert_eq!(r.header("x-synwake-cold-start"), Some("true"));
    assert_eq!(r.text(), "version 2\n");
}

/// A moved tag is pulled again at deploy (the digest decides whether the image changes;
/// an unchanged one keeps the pooled container), and after a restart with the registry
/// gone a tag comes from the store (logged) while a reference pinned by digest is not
/// pulled at all.
#[test]
fn a_moved_tag_is_pulled_again_at_deploy_and_a_restart_without_the_registry_uses_the_store() {
    if !can_run_with_tools("moved_tag_and_offline_restart") {
        return;
    }
    let _serial = serial();
    let reg = synwake_oci::tools::Registry::start(false).expect("registry");
    let tools = synwake_oci::tools::ToolStore::new().unwrap();
    let archive = |v: &str| {
        let archive = web_version_archive(&tools, "swk-images3-web", "web", v);
        format!("oci-archive:{}", archive.display())
    };
    let (v1, v2) = (archive("1"), archive("2"));
    reg.push(&v1, "team/web:latest", &[]).unwrap();
    let v1_digest = reg.digest("team/web:latest").unwrap();
    let latest = format!("{}/team/web:latest", reg.addr);
    let pinned = format!("{}/team/web@{v1_digest}", reg.addr);
    let insecure = format!("insecure_registries = [\"{}\"]\n\n", reg.addr);
    let mut d = OciDaemon::start_in("10.10.1.0/24", |_| insecure);
    let deploy = |d: &OciDaemon, method: &str, name: &str, image: &str| {
        let body = json!({
            "service": name,
            "image": image,
            "annotations": { "com.synwake.runtime": "oci", "com.synwake.stop-grace": "100ms", "com.synwake.pool": "1" },
        });
        let r = d.d.api_json(method, "/system/functions", &body.to_string());
        assert_eq!(r.status, 202, "{method} {name} {image}: {}", r.text());
        r.text()
    };
    deploy(&d, "POST", "web", &latest);
    deploy(&d, "POST", "pinned", &pinned);
    assert_eq!(d.call_ok("web", "/").text(), "version 1\n");
    d.scale_to_zero("web");
    d.wait_pooled("web");
    let pooled: Vec<String> = d.containers_of("web").into_iter().map(|c| c.id).collect();

    // The same reference, the tag unchanged: asked again, nothing fetched, nothing replaced.
    let answer = deploy(&d, "PUT", "web", &latest);
    assert!(
        answer.contains(&format!("pulling {latest}")) && answer.contains("fetching 0 blobs"),
        "the redeploy did not ask the registry: {answer}"
    );
    d.wait_pooled("web");
    let after: Vec<String> = d.containers_of("web").into_iter().map(|c| c.id).collect();
    assert_eq!(
        after, pooled,
        "an unchanged digest replaced the pooled container"
    );

    // The tag moves: the same reference deployed again runs the new image.
    reg.push(&v2, "team/web:latest", &[]).unwrap();
    let answer = deploy(&d, "PUT", "web", &latest);
    assert!(
        answer.contains("fetching 2 blobs") || answer.contains("fetching 3 blobs"),
        "{answer}"
    );
    let r = d.call_ok("web", "/");
    assert_eq!(r.text(), "version 2\n");
    assert_eq!(r.header("x-synwake-cold-start"), Some("true"));
    assert_eq!(d.call_ok("pinned", "/").text(), "version 1\n");

    // Restart with the registry gone.
    assert_eq!(d.sigterm().and_then(|s| s.code()), Some(0), "{}", d.d.log());
    drop(reg);
    let before = d.d.log().len();
    d.respawn();
    assert!(
        wait_until(Duration::from_secs(20), || d.d.call("web", "/").status
            == 200),
        "web not served after the restart:\n{}",
        d.d.log()
    );
    assert_eq!(d.call_ok("web", "/").text(), "version 2\n");
    assert_eq!(d.call_ok("pinned", "/").text(), "version 1\n");
    let log = d.d.log()[before..].to_string();
    assert!(
        log.contains("offline fallback") && log.contains(&format!("pulling {latest}")),
        "no logged fallback for the tag:\n{log}"
    );
    assert!(
        !log.contains(&format!("pulling {pinned}")) && !log.contains("pinned: function"),
        "the pinned reference was pulled again:\n{log}"
    );
}

/// `watchdog = "stdio"` in a container: the static watchdog is bind-mounted into an image
/// without a libc (busybox) and runs the command once per request.
#[test]
fn stdio_watchdog_runs_the_command_per_request_inside_the_container() {
    if !can_run("stdio_watchdog_in_oci") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start_in("10.6.2.0/24", |_| String::new());
    let r = d.d.api_json(
        "POST",
        "/system/secrets",
        &json!({"name": "tok", "value": "t0ken"}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let body = json!({
        "service": "ocicat",
        "secrets": ["tok"],
        "image": d.images.oci.display().to_string(),
        "annotations": {
            "com.synwake.runtime": "oci",
            "com.synwake.stop-grace": "100ms",
            "com.synwake.watchdog": "stdio",
            "com.synwake.command": "/bin/sh -c 'echo \"$Http_Method $Http_Path\"; cat /var/openfaas/secrets/tok; echo; touch /var/openfaas/secrets/tok 2>/dev/null && echo writable; cat; test \"$Http_X_Fail\" != yes || { echo failing >&2; exit 4; }'",
        },
    });
    let r = d.d.api_json("POST", "/system/functions", &body.to_string());
    assert_eq!(r.status, 202, "{}", r.text());
    let r = common::request(
        common::loopback(d.d.shared),
        "POST",
        "/function/ocicat/in/box",
        &[],
        Some(b"from stdin"),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "POST /in/box\nt0ken\nfrom stdin",
        "secret mounted read-only"
    );
    let r = common::request(
        common::loopback(d.d.shared),
        "POST",
        "/function/ocicat/",
        &[("X-Fail", "yes")],
        Some(b""),
    )
    .unwrap();
    assert_eq!(r.status, 500);
    assert!(r.text().contains("failing"), "{}", r.text());
    assert_eq!(
        d.containers_of("ocicat").len(),
        1,
        "one container served both"
    );
}

/// A runc that fails `create` or `start` (the word in `<dir>/fail`) and otherwise runs
/// the real one: configured as `[oci] runtime_binary`.
fn failing_runc(dir: &Path) -> PathBuf {
    let wrapper = dir.join("runc-failing");
    let script = format!(
        "#!/bin/sh\nmode=$(cat {fail:?} 2>/dev/null)\nfor a in \"$@\"; do\n  if [ \"$a\" = \"$mode\" ]; then echo \"injected $mode failure\" >&2; exit 1; fi\ndone\nexec runc \"$@\"\n",
        fail = dir.join("fail").display().to_string()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

#[test]
fn runc_failing_at_create_or_start_answers_502_and_leaves_nothing() {
    if !can_run("runc_faults") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = failing_runc(dir.path());
    let mut d = OciDaemon::start_in("10.5.2.0/24", |img| {
        format!("runtime_binary = {:?}\n\n", wrapper.display().to_string())
            + &oci_function("faulty", &img.oci, "")
    });
    for mode in ["create", "start"] {
        std::fs::write(dir.path().join("fail"), mode).unwrap();
        let r = d.d.call("faulty", "/");
        assert_eq!(r.status, 502, "runc {mode} failing: {}", r.text());
        assert!(r.text().contains("faulty"), "{}", r.text());
        assert!(
            wait_until(Duration::from_secs(10), || d
                .containers_of("faulty")
                .is_empty()),
            "runc {mode} failed, yet containers are left: {:?}",
            d.containers_of("faulty")
        );
    }
    // With runc working again the same function serves.
    std::fs::write(dir.path().join("fail"), "").unwrap();
    d.call_ok("faulty", "/");
    // Drop: SIGTERM, exit 0, and no container, netns, veth or cgroup left.
    let status = d.sigterm().expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
    let left = d.host_objects();
    assert!(left.is_empty(), "{left:#?}");
}

/// An oci-archive in `dir`: the fixture busybox function with `www/index.html` = `page`.
fn page_image(dir: &Path, name: &str, page: &str) -> PathBuf {
    let base = fixture::busybox_layer().expect("busybox layer");
    let top = fixture::TarBuilder::new()
        .dir("www")
        .file("www/index.html", 0o644, page.as_bytes())
        .finish();
    let layers = vec![Layer::new(base, true), Layer::new(top, true)];
    let path = dir.join(name);
    fixture::write_oci_archive(&path, &layers, &fixture::function_config(&layers))
        .expect("write oci-archive");
    path
}

/// `GET /system/images` as (usage, digest -> functions).
fn stored_images(d: &OciDaemon) -> (Value, Vec<(String, Vec<String>)>) {
    let r = d.d.api_get("/system/images");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_str(&r.text()).unwrap();
    let images = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let f = i["functions"].as_array().unwrap();
            (
                i["digest"].as_str().unwrap().to_string(),
                f.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect();
    (v["usage"].clone(), images)
}

/// Two functions on one base layer store it once; an update collects the old image once
/// its running container has stopped, a remove collects at once; `/system/info` and
/// /metrics show the disk use; `synwake images prune` removes leftovers only.
#[test]
fn functions_sharing_a_base_layer_store_it_once_and_unused_images_are_collected() {
    if !can_run("functions_sharing_a_base_layer") {
        return;
    }
    let _serial = serial();
    let d = OciDaemon::start_in("10.6.2.0/24", |_| String::new());
    let dir = d.images.dir.path();
    let deploy = |method: &str, name: &str, image: &Path| {
        let body = json!({
            "service": name,
            "image": image.display().to_string(),
            "annotations": { "com.synwake.runtime": "oci", "com.synwake.stop-grace": "100ms" },
        });
        let r = d.d.api_json(method, "/system/functions", &body.to_string());
        assert!(
            matches!(r.status, 200..=202),
            "{method} {name}: {}",
            r.text()
        );
    };
    deploy("POST", "pa", &page_image(dir, "a.tar", "page a\n"));
    deploy("POST", "pb", &page_image(dir, "b.tar", "page b\n"));
    assert_eq!(d.call_ok("pa", "/").text(), "page a\n");
    assert_eq!(d.call_ok("pb", "/").text(), "page b\n");

    let (usage, images) = stored_images(&d);
    assert_eq!(images.len(), 2, "{images:?}");
    assert_eq!(usage["layers"], 3, "one base chain + two tops: {usage}");
    let old_b = images
        .iter()
        .find(|(_, f)| f == &["pb"])
        .expect("pb's image")
        .0
        .clone();
    // The base's busybox is one inode in both functions' root filesystems.
    let store = d.oci_state().join("images");
    let inode = |digest: &str| {
        let rec: Value = serde_json::from_slice(
            &std::fs::read(
                store
                    .join("images")
                    .join(format!("{}.json", &digest["sha256:".len()..])),
            )
            .unwrap(),
        )
        .unwrap();
        let rootfs = PathBuf::from(rec["rootfs"].as_str().unwrap());
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(rootfs.join("bin/busybox")).unwrap())
    };
    assert_eq!(inode(&images[0].0), inode(&images[1].0));
    let bytes = usage["bytes"].as_u64().unwrap();
    let info: Value = serde_json::from_str(&d.d.api_get("/system/info").text()).unwrap();
    assert_eq!(info["imageStore"]["layers"], 3, "{info}");
    assert!(d.metric("synwake_image_store_bytes") > 0.0);
    assert_eq!(d.metric("synwake_image_store_layers"), 3.0);

    // Update pb while its container runs: the old image goes once that container stopped
    // (at most image_gc::RETRY = 10 s later).
    deploy("PUT", "pb", &page_image(dir, "b2.tar", "page b2\n"));
    assert!(
        wait_until(Duration::from_secs(25), || {
            let (usage, images) = stored_images(&d);
            images.len() == 2
                && images.iter().all(|(digest, _)| *digest != old_b)
                && usage["layers"] == 3
        }),
        "old image of pb not collected: {:?}\n{}",
        stored_images(&d),
        d.d.log()
    );
    assert_eq!(d.call_ok("pb", "/").text(), "page b2\n");

    // Remove pa: its image and top chain go right away, the shared base stays.
    let r = d.d.api_json(
        "DELETE",
        "/system/functions",
        &json!({ "functionName": "pa" }).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (usage, images) = stored_images(&d);
            images.len() == 1 && usage["layers"] == 2
        }),
        "pa's image not collected: {:?}",
        stored_images(&d)
    );
    let (usage, images) = stored_images(&d);
    assert_eq!(images[0].1, ["pb"]);
    assert_eq!(usage["layers"], 2, "{usage}");
    assert!(usage["bytes"].as_u64().unwrap() < bytes, "{usage}");
    assert_eq!(d.call_ok("pb", "/").text(), "page b2\n");

    // Prune (the CLI) removes a stray chain and the pre-layer-store cache layout only.
    std::fs::create_dir_all(store.join("layers").join(format!("{:064x}", 1)).join("etc")).unwrap();
    std::fs::create_dir_all(store.join(format!("{:064x}", 2)).join("rootfs")).unwrap();
    let out = Command::new(common::synwake_bin())
        .args(["images", "prune"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.d.api))
        .env("SYNWAKE_STATE_DIR", d.d.state_dir())
        .env_remove("SYNWAKE_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("removed 0 images, 1 layer chains"),
        "{stdout}"
    );
    assert!(!store.join(format!("{:064x}", 2)).exists());
    let (usage, images) = stored_images(&d);
    assert_eq!((images.len(), usage["layers"].as_u64()), (1, Some(2)));
    assert_eq!(d.call_ok("pb", "/").text(), "page b2\n");
    let out = Command::new(common::synwake_bin())
        .args(["images", "list"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.d.api))
        .env("SYNWAKE_STATE_DIR", d.d.state_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(" pb") && stdout.contains("2 layer chains"),
        "{stdout}"
    );
}

/// A stand-in for OpenFaaS's of-watchdog, as faas-cli templates run it: listens on 8080 at
/// once, but `/` and `/_/health` answer only after the function behind it started (1 s).
const FAKE_FWATCHDOG: &str = "#!/bin/busybox sh\n\
B=/bin/busybox\n\
$B mkdir -p /tmp/www/_\n\
$B httpd -f -p 8080 -h /tmp/www &\n\
$B sleep 1\n\
echo \"function ready: $fprocess\" > /tmp/www/index.html\n\
echo OK > /tmp/www/_/health\n\
wait\n";

/// An OpenFaaS-style image built by buildah (`fwatchdog` entrypoint, `fprocess` env, port
/// 8080), deployed with no synwake annotation: readiness waits for `/_/health`, so the
/// cold request gets the function, not the watchdog's 404 from before it was ready.
#[test]
fn openfaas_watchdog_image_is_ready_on_its_health_endpoint_with_no_annotations() {
    if !can_run_with_tools("openfaas_watchdog_image") {
        return;
    }
    let _serial = serial();
    let tools = synwake_oci::tools::ToolStore::new().unwrap();
    let spec = synwake_oci::tools::BuildSpec {
        files: vec![("usr/bin/fwatchdog", 0o755, FAKE_FWATCHDOG.as_bytes())],
        entrypoint: Some(vec!["/usr/bin/fwatchdog"]),
        cmd: Some(vec![]),
        env: vec![("fprocess", "cat")],
        ..Default::default()
    };
    tools.build("localhost/swk-images2-ofw:1", &spec).unwrap();
    let d = OciDaemon::start_in("10.6.3.0/24", |_| String::new());
    let archive = d.images.dir.path().join("ofw.tar");
    tools
        .buildah_push(
            "localhost/swk-images2-ofw:1",
            &format!("oci-archive:{}", archive.display()),
        )
        .unwrap();
    let body = json!({ "service": "ofw", "image": archive.display().to_string() });
    let r = d.d.api_json("POST", "/system/functions", &body.to_string());
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        d.d.status("ofw")["annotations"]["com.synwake.runtime"],
        "oci",
        "{}",
        d.d.status("ofw")
    );
    let t0 = Instant::now();
    let r = d.d.call("ofw", "/");
    assert_eq!(r.status, 200, "cold request: {}\n{}", r.text(), d.d.log());
    assert_eq!(r.text(), "function ready: cat\n");
    assert_eq!(r.header("x-synwake-cold-start"), Some("true"));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "served before the watchdog was healthy ({:?})",
        t0.elapsed()
    );
}

/// A TCP proxy in front of a registry that holds every blob request until `open` is set
/// (manifests pass), so a test can look at a deploy while its pull is in flight.
struct GatedRegistry {
    addr: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl GatedRegistry {
    fn start(upstream: &str) -> GatedRegistry {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s, up) = (open.clone(), stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = std::net::TcpStream::connect(&up).unwrap();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                let (o, s) = (o.clone(), s.clone());
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if String::from_utf8_lossy(&buf[..n]).contains("/blobs/") {
                            // Bounded: at most 30 s, or until the test opens the gate.
                            for _ in 0..3000 {
                                if o.load(Ordering::Relaxed) || s.load(Ordering::Relaxed) {
                                    break;
                                }
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        GatedRegistry { addr, open, stop }
    }
}

impl Drop for GatedRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pull holds no API-wide lock: while one function's blobs are held back, another
/// function is deployed, scaled and removed; a second deploy of the pulling function waits
/// for the first and wins (it runs the second image).
#[test]
fn a_pull_does_not_hold_up_other_changes_and_two_deploys_of_one_function_serialize() {
    if !can_run_with_tools("pull_outside_the_write_lock") {
        return;
    }
    use std::io::{Read, Write};
    let _serial = serial();
    let reg = synwake_oci::tools::Registry::start(false).expect("registry");
    let tools = synwake_oci::tools::ToolStore::new().unwrap();
    push_web_versions(&reg, &tools, "swk-images3-lock", "lock");
    let gate = GatedRegistry::start(&reg.addr);
    let insecure = format!(
        "insecure_registries = [\"{}\", \"{}\"]\n\n",
        gate.addr, reg.addr
    );
    let d = OciDaemon::start_in("10.10.2.0/24", |_| insecure);
    let body = |name: &str, image: String| {
        json!({
            "service": name,
            "image": image,
            "annotations": { "com.synwake.runtime": "oci", "com.synwake.stop-grace": "100ms" },
        })
        .to_string()
    };
    // Deploy 1 of `slow`: its blobs are held by the gate.
    let first = body("slow", format!("{}/team/lock:1", gate.addr));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.d.api)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    write!(
        s,
        "POST /system/functions?progress=true HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
        d.d.auth(),
        first.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("pulling") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    std::thread::scope(|sc| {
        // Deploy 2 of `slow` arrives while deploy 1 pulls: it must wait, then win.
        let second = sc.spawn(|| {
            d.d.api_json(
                "POST",
                "/system/functions",
                &body("slow", format!("{}/team/lock:2", reg.addr)),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        // Another function: deploy, call, scale to zero, remove, all during the pull.
        let r = d.d.api_json(
            "POST",
            "/system/functions",
            &body("other", format!("{}/team/lock:2", reg.addr)),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(d.call_ok("other", "/").text(), "version 2\n");
        d.scale_to_zero("other");
        let r = d.d.api_json(
            "DELETE",
            "/system/functions",
            &json!({ "functionName": "other" }).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        // All of that happened while the first pull was still held back.
        assert_eq!(d.d.api_get("/system/function/slow").status, 404);
        assert!(!second.is_finished(), "deploy 2 did not wait for deploy 1");
        gate.open.store(true, std::sync::atomic::Ordering::Relaxed);
        s.read_to_end(&mut got).unwrap();
        let all = String::from_utf8_lossy(&got).to_string();
        assert!(all.contains(r#""status":202"#), "{all}");
        let r = second.join().unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
    });
    assert_eq!(d.call_ok("slow", "/").text(), "version 2\n");
    let st = d.d.status("slow");
    assert!(
        st["image"]
            .as_str()
            .is_some_and(|i| i.ends_with("team/lock:2")),
        "{st}"
    );

    // A deploy refused after its pull (a host another function claims) leaves no image.
    let claim = |name: &str, tag: &str| {
        json!({
            "service": name,
            "image": format!("{}/team/lock:{tag}", reg.addr),
            "annotations": { "com.synwake.runtime": "oci", "com.synwake.hosts": "h.images3.test" },
        })
        .to_string()
    };
    let r = d.d.api_json("POST", "/system/functions", &claim("a", "2"));
    assert_eq!(r.status, 202, "{}", r.text());
    let r = d.d.api_json("POST", "/system/functions", &claim("b", "1"));
    assert_eq!(r.status, 409, "{}", r.text());
    let only_used = || {
        let (_, images) = stored_images(&d);
        images.len() == 1 && images.iter().all(|(_, users)| !users.is_empty())
    };
    assert!(
        wait_until(Duration::from_secs(30), only_used),
        "images nobody uses are kept: {:?}",
        stored_images(&d)
    );

    // A remove of a function whose deploy is pulling waits for it, then removes it.
    gate.open.store(false, std::sync::atomic::Ordering::Relaxed);
    std::thread::scope(|sc| {
        let update = sc.spawn(|| {
            d.d.api_json(
                "POST",
                "/system/functions",
                &body("slow", format!("{}/team/lock:1", gate.addr)),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let remove = sc.spawn(|| {
            d.d.api_json(
                "DELETE",
                "/system/functions",
                &json!({ "functionName": "slow" }).to_string(),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(!update.is_finished() && !remove.is_finished());
        gate.open.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = update.join().unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        let r = remove.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    });
    assert_eq!(d.d.api_get("/system/function/slow").status, 404);
}

/// `?progress=true` streams a deploy's pull progress while the pull runs: the first line
/// arrives while the blobs are still held back (the function is not deployed yet), the
/// outcome comes last; `synwake deploy` prints the same lines and the outcome.
#[test]
fn deploy_progress_is_streamed_while_the_pull_runs() {
    if !can_run_with_tools("deploy_progress_is_streamed") {
        return;
    }
    use std::io::{Read, Write};
    let _serial = serial();
    let reg = synwake_oci::tools::Registry::start(false).expect("registry");
    let tools = synwake_oci::tools::ToolStore::new().unwrap();
    tools
        .build("localhost/swk-images2-live:1", &Default::default())
        .unwrap();
    let archive = tools.path("live.tar");
    tools
        .buildah_push(
            "localhost/swk-images2-live:1",
            &format!("oci-archive:{}", archive.display()),
        )
        .unwrap();
    reg.push(
        &format!("oci-archive:{}", archive.display()),
        "team/live:1",
        &[],
    )
    .unwrap();
    let gate = GatedRegistry::start(&reg.addr);
    let insecure = format!("insecure_registries = [\"{}\"]\n\n", gate.addr);
    let d = OciDaemon::start_in("10.6.4.0/24", |_| insecure);
    let body = json!({
        "service": "live",
        "image": format!("{}/team/live:1", gate.addr),
        "annotations": { "com.synwake.stop-grace": "100ms" },
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.d.api)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /system/functions?progress=true HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        d.d.auth(),
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"progress\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("pulling"), "{head}");
    // Blobs are held: the deploy has not happened, and the outcome is not sent yet.
    assert_eq!(d.d.api_get("/system/function/live").status, 404);
    assert!(!head.contains("\"status\""), "{head}");
    gate.open.store(true, std::sync::atomic::Ordering::Relaxed);
    s.read_to_end(&mut got).unwrap();
    let all = String::from_utf8_lossy(&got).to_string();
    assert!(all.contains("pulled"), "{all}");
    assert!(
        all.contains(r#""status":202"#) && all.contains("function live deployed"),
        "{all}"
    );
    let (p_pulled, p_outcome) = (
        all.find("pulled ").unwrap(),
        all.find(r#""status":"#).unwrap(),
    );
    assert!(p_pulled < p_outcome, "outcome before the progress: {all}");
    assert_eq!(d.call_ok("live", "/").status, 200);

    // `synwake deploy` (PUT, 404, then POST) prints the progress and the outcome.
    let out = Command::new(common::synwake_bin())
        .args(["deploy", "--name", "live2", "--image"])
        .arg(format!("{}/team/live:1", gate.addr))
        .args(["--annotation", "com.synwake.stop-grace=100ms"])
        .env("SYNWAKE_URL", format!("http://127.0.0.1:{}", d.d.api))
        .env("SYNWAKE_STATE_DIR", d.d.state_dir())
        .env_remove("SYNWAKE_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pulling") && stdout.contains("function live2 deployed"),
        "{stdout}"
    );
}

/// Fault tier for containers: synwake is killed with SIGKILL at pseudo-random points while
/// async calls cold-start a container and are delivered, and after the idle timeout, when
/// the container is being stopped. After each restart every call answered 202 ends with a
/// 200 callback (none is lost), and once scaled to zero no container, netns, veth or
/// cgroup of this daemon is left. Subnet 10.4.1.0/24 (helper 4).
#[test]
fn kill_9_during_container_start_delivery_and_stop_leaves_nothing_and_loses_no_call() {
    if !can_run("oci_kill_9_faults") {
        return;
    }
    let _serial = serial();
    let receiver = synwake_test_support::Receiver::start();
    let cb = format!("http://127.0.0.1:{}/done", receiver.port);
    let mut d = OciDaemon::start_full("10.4.1.0/24", "callback_allow = [\"127.0.0.1\"]", |img| {
        oci_function(
            "fdur",
            &img.oci,
            // One call at a time: deliveries last long enough for a kill to meet them.
            "idle_timeout = \"300ms\"\nmax_concurrency = 1",
        ) + "[async]\nretry_backoff = \"50ms\"\nmax_retries = 20\n"
    });
    let ended = || -> Vec<(String, String)> {
        receiver
            .wait(0, Duration::ZERO)
            .iter()
            .map(|r| {
                (
                    r.header("x-call-id").unwrap_or_default().to_string(),
                    r.header("x-function-status")
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    };
    let mut accepted: Vec<String> = Vec::new();
    let mut not_ended_at_kill = 0;
    let mut seed: u64 = 0x5357_0c14;
    for round in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut post = |n: usize| {
            for _ in 0..n {
                let r = common::request(
                    common::loopback(d.d.api),
                    "POST",
                    "/async-function/fdur/cgi-bin/ns",
                    &[("x-callback-url", cb.as_str())],
                    Some(b"x"),
                )
                .expect("POST /async-function/fdur");
                assert_eq!(r.status, 202, "{}", r.text());
                accepted.push(r.header("x-call-id").unwrap().to_string());
            }
        };
        let delay = if round % 2 == 0 {
            // Start and delivery: calls to a cold function, killed part-way. 100, not 20:
            // on a quiet machine 20 one-at-a-time calls could all end before the kill.
            post(100);
            Duration::from_millis(seed % 100)
        } else {
            // Stop: the calls ran, the idle timeout passed, the container is being stopped.
            post(2);
            let n = accepted.len();
            assert!(
                wait_until(Duration::from_secs(30), || ended().len() >= n),
                "round {round}: calls not delivered"
            );
            Duration::from_millis(300 + seed % 400)
        };
        std::thread::sleep(delay);
        // Marked just before the crash, so the next run's (reused) names are told apart.
        // An object gone by the time it is marked cannot be left over: not an error here.
        let before = d.host_objects();
        for n in &before.netns {
            let _ = Command::new("ip")
                .args(["-n", n, "link", "set", "dev", "lo", "alias", MARK])
                .status();
        }
        for v in &before.veths {
            let _ = std::fs::write(format!("/sys/class/net/{v}/ifalias"), MARK);
        }
        d.kill_9();
        let ids: std::collections::BTreeSet<String> = ended().into_iter().map(|e| e.0).collect();
        not_ended_at_kill += accepted.iter().filter(|a| !ids.contains(*a)).count();
        d.respawn();
        let all_ended = || {
            let ids: std::collections::BTreeSet<String> =
                ended().into_iter().map(|e| e.0).collect();
            accepted.iter().all(|a| ids.contains(a))
        };
        assert!(
            wait_until(Duration::from_secs(90), all_ended),
            "round {round} (kill after {delay:?}): accepted calls never ended: {:?}\n{}",
            ended(),
            d.d.log()
        );
        let failed: Vec<_> = ended().into_iter().filter(|e| e.1 != "200").collect();
        assert!(failed.is_empty(), "round {round}: {failed:?}");
        d.scale_to_zero("fdur");
        // Nothing of the crashed run, no container or cgroup; only the runtime's spare
        // namespaces (`spare_netns`, 2) stay ready until shutdown.
        let clean = || {
            let h = d.host_objects();
            h.containers.is_empty()
                && h.cgroups.is_empty()
                && h.netns.len() <= 2
                && h.veths.len() <= 2
                && !h.netns.iter().any(|n| netns_marked(n))
                && !h.veths.iter().any(|v| veth_marked(v))
        };
        assert!(
            wait_until(Duration::from_secs(20), clean),
            "round {round} (kill after {delay:?}): left: {:#?}",
            d.host_objects()
        );
    }
    assert!(
        not_ended_at_kill > 0,
        "every call had ended before each kill: the rounds tested nothing"
    );
}

/// Fault tier, runc failing: async calls accepted while `runc create` (then `runc
/// start`) fails are retried, survive a kill -9 in the middle of those failures, and all
/// end with a 200 callback once runc works again; no container of the failed starts is
/// left. Subnet 10.4.2.0/24 (helper 4).
#[test]
fn async_calls_accepted_while_runc_fails_all_run_once_it_works_again() {
    if !can_run("runc_faults_async") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = failing_runc(dir.path());
    let receiver = synwake_test_support::Receiver::start();
    let cb = format!("http://127.0.0.1:{}/done", receiver.port);
    let mut d = OciDaemon::start_full("10.4.2.0/24", "callback_allow = [\"127.0.0.1\"]", |img| {
        format!("runtime_binary = {:?}\n\n", wrapper.display().to_string())
                + &oci_function("rfault", &img.oci, "")
                + "[async]\nmax_retries = 100\nretry_backoff = \"100ms\"\nretry_backoff_max = \"300ms\"\n"
    });
    let mut accepted = Vec::new();
    for mode in ["create", "start"] {
        std::fs::write(dir.path().join("fail"), mode).unwrap();
        let retried_before = d.metric("synwake_async_retried_total{function=\"rfault\"}");
        for _ in 0..3 {
            let r = common::request(
                common::loopback(d.d.api),
                "POST",
                "/async-function/rfault/cgi-bin/ns",
                &[("x-callback-url", cb.as_str())],
                Some(b"x"),
            )
            .expect("POST /async-function/rfault");
            assert_eq!(r.status, 202, "{}", r.text());
            accepted.push(r.header("x-call-id").unwrap().to_string());
        }
        assert!(
            wait_until(Duration::from_secs(30), || d
                .metric("synwake_async_retried_total{function=\"rfault\"}")
                >= retried_before + 2.0),
            "runc {mode} failing: no retries\n{}",
            d.d.log()
        );
        assert!(
            receiver.wait(0, Duration::ZERO).is_empty(),
            "a call ended while runc {mode} fails"
        );
        // Killed while the starts fail; the restart retries from the queue file.
        d.kill_9();
        d.respawn();
        assert!(
            wait_until(Duration::from_secs(30), || d
                .metric("synwake_async_retried_total{function=\"rfault\"}")
                >= 1.0),
            "runc {mode} failing: no retries after the restart"
        );
        assert!(
            wait_until(Duration::from_secs(10), || d
                .containers_of("rfault")
                .iter()
                .all(|c| c.status == "created" || c.status == "creating")),
            "runc {mode} failing, yet containers run: {:?}",
            d.containers_of("rfault")
        );
    }
    std::fs::write(dir.path().join("fail"), "").unwrap();
    let got = receiver.wait(accepted.len(), Duration::from_secs(60));
    let ended: std::collections::BTreeMap<String, String> = got
        .iter()
        .map(|r| {
            (
                r.header("x-call-id").unwrap_or_default().to_string(),
                r.header("x-function-status")
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for id in &accepted {
        assert_eq!(
            ended.get(id).map(String::as_str),
            Some("200"),
            "call {id}: {ended:?}\n{}",
            d.d.log()
        );
    }
    let log = d.d.log();
    for mode in ["create", "start"] {
        assert!(
            log.contains(&format!("injected {mode} failure")),
            "runc {mode} never failed:\n{log}"
        );
    }
    // Drop: SIGTERM, exit 0, and no container, netns, veth or cgroup left.
}
