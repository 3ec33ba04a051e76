//! Cold start to first HTTP 200 of the busybox httpd fixture: host process spawn, oci
//! create+start, oci pooled (start only), plus the memory a pooled container costs.
//!
//!     cargo run --release -p synwake-oci --example coldstart -- [RUNS] [POOLED_FOR_MEMORY]
//!
//! Needs root, runc, iproute2, iptables, busybox-static. Results go to stdout as markdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use synwake_oci::fixture::{self, Layer};
use synwake_oci::{ContainerSpec, OciConfig, OciRuntime, Pool};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before each timed pooled start, so the previous run's teardown (netns
/// destruction runs in a kernel workqueue) and the refill are not measured.
const SETTLE: Duration = Duration::from_millis(200);

fn stats(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split(' ').take(3).collect::<Vec<_>>().join(" ")
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    // RUST_LOG=synwake_oci=debug shows per-create timings (net, bundle, runc create).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(25);
    let pooled_for_memory: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);

    let load_before = loadavg();
    let dir = tempfile::tempdir().unwrap();
    let rt = OciRuntime::new(OciConfig {
        state_dir: dir.path().join("state"),
        // Not the default subnet: a synwake daemon on the same host keeps its addresses.
        subnet: "10.74.0.0/16".into(),
        ..OciConfig::default()
    })
    .await
    .expect("runtime (root, runc, ip, iptables needed)");
    let layers = vec![Layer::new(fixture::busybox_layer().unwrap(), true)];
    let archive = dir.path().join("fn.tar");
    fixture::write_oci_archive(&archive, &layers, &fixture::function_config(&layers)).unwrap();
    let t0 = Instant::now();
    let image = rt.import_image(&archive).await.unwrap();
    let first_import = t0.elapsed();
    let t0 = Instant::now();
    rt.import_image(&archive).await.unwrap();
    let cached_import = t0.elapsed();
    let spec = ContainerSpec {
        function: "bench".into(),
        instance: 0,
        image: image.clone(),
        command: None,
        env: BTreeMap::new(),
        container_port: fixture::FUNCTION_PORT,
        memory_bytes: Some(128 << 20),
        cpus: None,
        pids: Some(256),
        mounts: Vec::new(),
    };

    // 1. Host process: the same busybox httpd, spawned directly.
    let mut host = Vec::new();
    let www = image.rootfs.join("www");
    for i in 0..runs {
        let port = 18_080 + (i % 50) as u16;
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(fixture::BUSYBOX)
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        fixture::wait_http_ok(addr, "/", TIMEOUT).await.unwrap();
        host.push(t0.elapsed());
        child.kill().await.unwrap();
    }

    // 2. oci without pool: create + start + readiness.
    let (mut cold, mut create_only, mut stop_times) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let c = rt.create(&spec).await.unwrap();
        create_only.push(t0.elapsed());
        let t_start = Instant::now();
        rt.start(&c).await.unwrap();
        let start_took = t_start.elapsed();
        fixture::wait_http_ok(c.addr(), "/", TIMEOUT).await.unwrap();
        cold.push(t0.elapsed());
        if t0.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "outlier {}: start {start_took:?}, total {:?}",
                c.id(),
                t0.elapsed()
            );
        }
        let t1 = Instant::now();
        rt.stop(c, Duration::ZERO).await.unwrap();
        stop_times.push(t1.elapsed());
    }

    // 3. oci with pool: start (exec fifo) + readiness; the refill is not timed.
    let pool = Pool::new(rt.clone());
    let (mut pooled, mut start_only) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        pool.refill(spec.clone(), 1);
        if pool.wait_ready("bench", 1, TIMEOUT).await != 1 {
            eprintln!("pool refill did not complete in {TIMEOUT:?}; sample skipped");
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let t0 = Instant::now();
        let c = pool.take(&spec).unwrap();
        rt.start(&c).await.unwrap();
        start_only.push(t0.elapsed());
        fixture::wait_http_ok(c.addr(), "/", TIMEOUT).await.unwrap();
        pooled.push(t0.elapsed());
        rt.stop(c, Duration::ZERO).await.unwrap();
    }

    // 4. For comparison: a pooled container started by spawning `runc start`.
    let runc_root = dir.path().join("state/runc");
    let mut pooled_runc = Vec::new();
    for _ in 0..runs {
        pool.refill(spec.clone(), 1);
        if pool.wait_ready("bench", 1, TIMEOUT).await != 1 {
            eprintln!("pool refill did not complete in {TIMEOUT:?}; sample skipped");
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let t0 = Instant::now();
        let c = pool.take(&spec).unwrap();
        let st = tokio::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["start", c.id()])
            .status()
            .await
            .unwrap();
        assert!(st.success());
        fixture::wait_http_ok(c.addr(), "/", TIMEOUT).await.unwrap();
        pooled_runc.push(t0.elapsed());
        rt.stop(c, Duration::ZERO).await.unwrap();
    }

    // 5. Memory of pooled (created, not started) containers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = mem_available_kib();
    pool.refill(spec.clone(), pooled_for_memory);
    let ready = pool
        .wait_ready("bench", pooled_for_memory, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = mem_available_kib();
    let mut pss = 0;
    let mut cg = 0;
    let mut taken = Vec::new();
    while let Some(c) = pool.take(&spec) {
        pss += pss_kib(c.pid());
        cg += read_u64(&c.memory_cgroup().join("memory.usage_in_bytes")) / 1024;
        taken.push(c);
    }
    let n = taken.len().max(1) as u64;
    for c in taken {
        rt.stop(c, Duration::ZERO).await.unwrap();
    }
    rt.cleanup_all().await;

    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    println!("kernel {}", String::from_utf8_lossy(&uname.stdout).trim());
    println!("load average before: {load_before}; after: {}", loadavg());
    println!(
        "image import: first {:.1} ms, cached {:.2} ms\n",
        first_import.as_secs_f64() * 1000.0,
        cached_import.as_secs_f64() * 1000.0
    );
    println!("| path (to first HTTP 200) | runs | median ms | p90 ms | min ms | max ms |");
    println!("|---|---|---|---|---|---|");
    println!("{}", stats("host process spawn (busybox httpd)", host));
    println!("{}", stats("oci, no pool: create + start", cold));
    println!("{}", stats("oci, pool: start (exec fifo)", pooled));
    println!("{}", stats("oci, pool: `runc start` spawned", pooled_runc));
    println!(
        "{}",
        stats("  part: create (netns, overlay, runc create)", create_only)
    );
    println!(
        "{}",
        stats("  part: start call only (exec fifo)", start_only)
    );
    println!(
        "{}",
        stats("  stop (SIGKILL, runc delete, netns del)", stop_times)
    );
    println!();
    println!(
        "pooled containers: {ready} created; MemAvailable drop {} KiB total = {} KiB each; \
         runc-init PSS {} KiB each; memory cgroup usage {} KiB each",
        before.saturating_sub(after),
        before.saturating_sub(after) / n,
        pss / n,
        cg / n
    );
}
