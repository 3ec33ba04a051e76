//! State machine tests with a runtime whose instances are real loopback listeners started
//! in-process, so timing and failures can be set exactly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::logs::{LogStore, OutputSink};
use crate::metrics::{ByFunction, ByOutcome, ByTrigger};
use crate::runtime::{ExitInfo, Instance, Runtime, StartError};
use crate::spec::{FunctionSpec, OciSpec, Policy, RuntimeKind, Source};

#[derive(Default)]
struct TestRuntime {
    starts: AtomicUsize,
    running: Arc<AtomicUsize>,
    /// When set, each start call records whether this warmth subscriber had been told.
    warmth: std::sync::Mutex<Option<watch::Receiver<u64>>>,
    warmth_told_at_start: std::sync::Mutex<Vec<bool>>,
}

struct TestInstance {
    addr: SocketAddr,
    exit: watch::Sender<Option<ExitInfo>>,
    running: Arc<AtomicUsize>,
}

#[async_trait]
impl Instance for TestInstance {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn describe(&self) -> String {
        format!("test {}", self.addr)
    }
    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await;
        r.map(|e| e.clone().unwrap()).unwrap_or(ExitInfo {
            status: "gone".into(),
        })
    }
    async fn stop(&self, _grace: Duration) {
        // A stop takes a moment, like a real SIGTERM.
        tokio::time::sleep(Duration::from_millis(30)).await;
        if self.exit.borrow().is_none() {
            self.running.fetch_sub(1, Ordering::SeqCst);
            let _ = self.exit.send(Some(ExitInfo {
                status: "stopped".into(),
            }));
        }
    }
}

#[async_trait]
impl Runtime for TestRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }
    async fn start(
        &self,
        spec: &FunctionSpec,
        _id: u64,
        out: OutputSink,
    ) -> Result<Arc<dyn Instance>, StartError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if let Some(rx) = self.warmth.lock().unwrap().as_ref() {
            let told = rx.has_changed().unwrap();
            self.warmth_told_at_start.lock().unwrap().push(told);
        }
        let start_ms: u64 = spec
            .env
            .get("START_MS")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let init: u64 = spec
            .env
            .get("INIT_MS")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let fail = spec.env.contains_key("FAIL");
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (tx, _) = watch::channel(None);
        self.running.fetch_add(1, Ordering::SeqCst);
        // Like `runc create`: the instance exists (and must be cleaned up) before the
        // runtime's start call returns.
        tokio::time::sleep(Duration::from_millis(start_ms)).await;
        let inst = Arc::new(TestInstance {
            addr,
            exit: tx,
            running: self.running.clone(),
        });
        let i2 = inst.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(init)).await;
            if fail {
                out.line("stderr", "boom: cannot open database".into());
                i2.running.fetch_sub(1, Ordering::SeqCst);
                let _ = i2.exit.send(Some(ExitInfo {
                    status: "exit status 3".into(),
                }));
                return;
            }
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            let mut rx = i2.exit.subscribe();
            loop {
                tokio::select! {
                    _ = l.accept() => {}
                    _ = rx.wait_for(|e| e.is_some()) => return,
                }
            }
        });
        Ok(inst)
    }
}

fn spec(name: &str, env: &[(&str, &str)]) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        port: None,
        runtime: RuntimeKind::Process,
        command: vec!["test".into()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        readiness_path: None,
        max_instances: 1,
        max_concurrency: 0,
        policy: Policy {
            idle_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(5),
            ..Policy::default()
        },
        oci: OciSpec::default(),
        labels: Default::default(),
        annotations: Default::default(),
        source: Source::Config,
        hosts: Vec::new(),
        tls_port: None,
        watchdog: Default::default(),
        secrets: Vec::new(),
    }
}

fn lifecycle() -> (Lifecycle, Arc<TestRuntime>) {
    let rt = Arc::new(TestRuntime::default());
    let lc = Lifecycle::new(
        vec![rt.clone() as Arc<dyn Runtime>],
        Default::default(),
        Arc::new(Metrics::new()),
        Arc::new(LogStore::new()),
    );
    (lc, rt)
}

#[tokio::test]
async fn single_flight_under_concurrent_requests() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[("INIT_MS", "50")])).await.unwrap();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let lc = lc.clone();
            tokio::spawn(async move { lc.acquire("f").await.map(|l| l.cold) })
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap().unwrap(),
            "every request waited for the start"
        );
    }
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(rt.starts.load(Ordering::SeqCst), 1);
    // Warm now.
    assert!(!lc.acquire("f").await.unwrap().cold);
    assert_eq!(
        lc.metrics()
            .cold_starts
            .get(&ByTrigger::new("f", "request")),
        1
    );
}

#[tokio::test]
async fn wakes_share_the_start_with_requests() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[("INIT_MS", "30")])).await.unwrap();
    assert_eq!(
        lc.wake("f", Trigger::Syn, Instant::now()),
        WakeOutcome::Started
    );
    assert_eq!(
        lc.wake("f", Trigger::Syn, Instant::now()),
        WakeOutcome::AlreadyUp
    );
    let lease = lc.acquire("f").await.unwrap();
    assert!(lease.cold);
    assert_eq!(rt.starts.load(Ordering::SeqCst), 1);
    assert_eq!(lc.metrics().cold_starts.get(&ByTrigger::new("f", "syn")), 1);
    assert_eq!(
        lc.metrics()
            .series("synwake_wake_lead_seconds_count{function=\"f\"}")
            .unwrap_or(0.0),
        1.0
    );
    assert_eq!(
        lc.wake("nope", Trigger::Syn, Instant::now()),
        WakeOutcome::UnknownFunction
    );
}

/// The probe reader's wake makes the start call before it returns (a plain wake leaves the
/// whole start to a new task), tells the warmth subscribers (the probe's map sync) only
/// after that call, and the rest of the start finishes in a task of its own.
#[tokio::test]
async fn an_inline_wake_makes_the_start_call_before_it_returns() {
    let (lc, rt) = lifecycle();
    // START_MS: the runtime's start call itself waits, so its first poll is pending.
    lc.deploy(spec("f", &[("START_MS", "20"), ("INIT_MS", "10")]))
        .await
        .unwrap();
    lc.deploy(spec("g", &[("INIT_MS", "10")])).await.unwrap();
    let mut warmth = lc.subscribe_warmth();
    warmth.borrow_and_update();
    *rt.warmth.lock().unwrap() = Some(lc.subscribe_warmth());
    // The runtime's own view of the warmth channel, marked seen.
    let rt_saw_warmth = || {
        rt.warmth
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .borrow_and_update();
    };
    rt_saw_warmth();
    // One runtime thread: a start handed to a task has not run before this one yields.
    assert_eq!(
        lc.wake("g", Trigger::Syn, Instant::now()),
        WakeOutcome::Started
    );
    assert_eq!(rt.starts.load(Ordering::SeqCst), 0);
    assert!(warmth.has_changed().unwrap());
    warmth.borrow_and_update();
    rt_saw_warmth();
    assert_eq!(
        lc.wake_inline("f", Trigger::Syn, Instant::now()),
        WakeOutcome::Started
    );
    assert_eq!(
        rt.starts.load(Ordering::SeqCst),
        1,
        "f's start call was made inside wake_inline"
    );
    assert_eq!(*rt.warmth_told_at_start.lock().unwrap(), [false]);
    assert!(
        warmth.has_changed().unwrap(),
        "warmth subscribers hear of f"
    );
    assert_eq!(
        lc.wake_inline("f", Trigger::Syn, Instant::now()),
        WakeOutcome::AlreadyUp
    );
    let lease = lc.acquire("f").await.unwrap();
    assert!(lease.cold);
    assert_eq!(lc.metrics().cold_starts.get(&ByTrigger::new("f", "syn")), 1);
    drop(lc.acquire("g").await.unwrap());
    assert_eq!(rt.starts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn request_after_wake_and_ready_is_warm() {
    let (lc, _) = lifecycle();
    lc.deploy(spec("f", &[("INIT_MS", "10")])).await.unwrap();
    lc.wake("f", Trigger::Syn, Instant::now());
    // However long the start takes on a loaded machine: a request after it is warm.
    assert!(
        wait_until(
            || lc.status("f").unwrap().available == 1,
            Duration::from_secs(10)
        )
        .await
    );
    assert!(!lc.acquire("f").await.unwrap().cold);
}

#[tokio::test]
async fn start_failure_reaches_every_waiter_and_next_request_retries() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[("FAIL", "1"), ("INIT_MS", "20")]))
        .await
        .unwrap();
    let (a, b) = tokio::join!(lc.acquire("f"), lc.acquire("f"));
    for r in [a, b] {
        let e = r.err().unwrap().to_string();
        assert!(e.contains("exit status 3"), "{e}");
        assert!(e.contains("boom: cannot open database"), "{e}");
        assert!(e.contains("function f"), "{e}");
    }
    assert_eq!(rt.starts.load(Ordering::SeqCst), 1);
    assert!(lc.acquire("f").await.is_err());
    assert_eq!(
        rt.starts.load(Ordering::SeqCst),
        2,
        "a new request tries again"
    );
}

#[tokio::test]
async fn start_timeout_gives_timeout_error() {
    let (lc, _) = lifecycle();
    let mut s = spec("f", &[("INIT_MS", "2000")]);
    s.policy.start_timeout = Duration::from_millis(100);
    lc.deploy(s).await.unwrap();
    let t0 = Instant::now();
    let e = lc.acquire("f").await.err().unwrap();
    assert!(
        matches!(e, AcquireError::StartFailed(StartError::Timeout { .. })),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn max_pending_refuses_the_excess() {
    let (lc, _) = lifecycle();
    let mut s = spec("f", &[("INIT_MS", "200")]);
    s.policy.max_pending = 3;
    lc.deploy(s).await.unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let lc = lc.clone();
            tokio::spawn(async move { lc.acquire("f").await.is_ok() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = lc.acquire("f").await.err().unwrap();
    assert!(
        matches!(e, AcquireError::Overloaded { pending: 3, .. }),
        "{e}"
    );
    for w in waiting {
        assert!(w.await.unwrap());
    }
}

#[tokio::test]
async fn cancelled_waiter_frees_its_pending_slot() {
    let (lc, _) = lifecycle();
    let mut s = spec("f", &[("INIT_MS", "300")]);
    s.policy.max_pending = 1;
    lc.deploy(s).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(20), lc.acquire("f")).await;
    // The client went away; its place is free again.
    assert!(lc.acquire("f").await.is_ok());
}

#[tokio::test]
async fn idle_instances_stop_and_prewarms_are_wasted() {
    let (lc, rt) = lifecycle();
    let mut s = spec("f", &[]);
    s.policy.idle_timeout = Duration::from_millis(150);
    s.policy.prewarm_ttl = Duration::from_millis(100);
    lc.deploy(s).await.unwrap();
    drop(lc.acquire("f").await.unwrap());
    assert_eq!(lc.status("f").unwrap().available, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lc.status("f").unwrap().available, 0);
    assert_eq!(rt.running.load(Ordering::SeqCst), 0);
    assert_eq!(lc.metrics().prewarms_wasted.get(&ByFunction::new("f")), 0);

    lc.wake("f", Trigger::Syn, Instant::now());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(lc.status("f").unwrap().replicas, 0);
    assert_eq!(lc.metrics().prewarms_wasted.get(&ByFunction::new("f")), 1);
}

#[tokio::test]
async fn idle_instance_seconds_count_ready_time_without_requests() {
    let (lc, _) = lifecycle();
    let mut s = spec("f", &[]);
    s.policy.idle_timeout = Duration::from_millis(300);
    lc.deploy(s).await.unwrap();
    let t0 = Instant::now();
    let lease = lc.acquire("f").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(lease);
    assert!(
        wait_until(
            || lc.status("f").unwrap().replicas == 0,
            Duration::from_secs(5)
        )
        .await
    );
    let up = t0.elapsed().as_secs_f64();
    let idle = lc
        .metrics()
        .idle_instance_seconds
        .get(&ByFunction::new("f"));
    // Busy for 400 ms, then idle until the 300 ms idle_timeout stopped it.
    assert!(idle >= 0.3, "idle {idle}");
    assert!(
        idle <= up - 0.4 + 0.01,
        "idle {idle} up {up}: the busy time was counted"
    );
    let text = lc.metrics().render();
    assert!(text.contains("synwake_idle_instance_seconds_total{function=\"f\"}"));
}

#[tokio::test]
async fn affinity_wakes_only_a_sole_recent_function_within_the_rate_limit() {
    let (lc, rt) = lifecycle();
    for name in ["a", "b"] {
        let mut s = spec(name, &[]);
        s.policy.prewarm_ttl = Duration::from_millis(100);
        s.policy.max_wakes_per_second = 1;
        lc.deploy(s).await.unwrap();
    }
    let (one, two): (IpAddr, IpAddr) = ("10.7.0.1".parse().unwrap(), "10.7.0.2".parse().unwrap());
    // Off by default: nothing recorded, nothing woken.
    lc.record_client(one, "a");
    assert!(lc.wake_by_affinity(one, Instant::now()).is_none());
    lc.set_affinity(Some(Duration::from_secs(60)));
    lc.record_client(one, "a");
    lc.record_client(two, "a");
    lc.record_client(two, "b");
    // An IPv4-mapped IPv6 peer is the same client as the probe's IPv4 source.
    let mapped: IpAddr = "::ffff:10.7.0.1".parse().unwrap();
    assert_eq!(
        lc.wake_by_affinity(mapped, Instant::now()),
        Some((Arc::from("a"), WakeOutcome::Started))
    );
    assert!(
        lc.wake_by_affinity(two, Instant::now()).is_none(),
        "two functions: ambiguous"
    );
    assert!(lc
        .wake_by_affinity("10.7.0.3".parse().unwrap(), Instant::now())
        .is_none());
    assert!(
        wait_until(
            || lc.status("a").unwrap().available == 1,
            Duration::from_secs(5)
        )
        .await
    );
    assert_eq!(lc.status("b").unwrap().replicas, 0);
    assert_eq!(
        lc.wake_by_affinity(one, Instant::now()).map(|w| w.1),
        Some(WakeOutcome::AlreadyUp)
    );
    // Unused: undone after prewarm_ttl and counted as wasted.
    assert!(
        wait_until(
            || lc.status("a").unwrap().replicas == 0,
            Duration::from_secs(5)
        )
        .await
    );
    assert_eq!(lc.metrics().prewarms_wasted.get(&ByFunction::new("a")), 1);
    assert_eq!(
        lc.metrics()
            .cold_starts
            .get(&ByTrigger::new("a", "affinity")),
        1
    );
    // The bucket (1 per second) is empty right after the first wake, so a SYN flood from
    // that client starts nothing more.
    let mut started = 0;
    for _ in 0..50 {
        if lc.wake_by_affinity(one, Instant::now()).map(|w| w.1) == Some(WakeOutcome::Started) {
            started += 1;
        }
    }
    assert!(started <= 1, "{started} starts past the rate limit");
    let m = lc.metrics();
    assert_eq!(
        m.affinity_syns.get(&ByOutcome { outcome: "woke" }),
        1 + started as u64
    );
    assert!(
        m.affinity_syns.get(&ByOutcome {
            outcome: "suppressed"
        }) + started as u64
            >= 49
    );
    assert_eq!(
        m.affinity_syns.get(&ByOutcome {
            outcome: "no_single_function"
        }),
        2
    );
    drop(rt);
}

#[tokio::test]
async fn busy_instance_is_not_reaped() {
    let (lc, _) = lifecycle();
    let mut s = spec("f", &[]);
    s.policy.idle_timeout = Duration::from_millis(50);
    lc.deploy(s).await.unwrap();
    let lease = lc.acquire("f").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lc.status("f").unwrap().available,
        1,
        "a lease keeps it alive"
    );
    drop(lease);
    // Reaped once idle, within a bound a loaded machine keeps (200 ms was not always).
    assert!(
        wait_until(
            || lc.status("f").unwrap().available == 0,
            Duration::from_secs(5)
        )
        .await,
        "an idle instance was not reaped"
    );
}

#[tokio::test]
async fn the_idle_reaper_sleeps_while_nothing_is_up() {
    let (lc, _) = lifecycle();
    let passes = || lc.inner.reaper_passes.load(Ordering::Relaxed);
    let mut s = spec("f", &[]);
    s.policy.idle_timeout = Duration::from_millis(100);
    lc.deploy(s).await.unwrap();
    // Deployed, never called: a pass for the deploy, then none (it ticked every 50 ms).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cold = passes();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(passes(), cold, "the reaper ran with no instance up");
    // Up: it runs again, and stops the instance once idle.
    drop(lc.acquire("f").await.unwrap());
    assert!(
        wait_until(
            || lc.status("f").unwrap().replicas == 0 && lc.status("f").unwrap().available == 0,
            Duration::from_secs(5)
        )
        .await,
        "the idle instance was not stopped"
    );
    assert!(passes() >= cold + 2, "the reaper did not run while up");
    // Scaled to zero again: quiet again (at most the pass that saw the last slot go).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let after = passes();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        passes(),
        after,
        "the reaper kept running after the instance stopped"
    );
}

#[tokio::test]
async fn request_during_stop_starts_a_new_instance() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[])).await.unwrap();
    drop(lc.acquire("f").await.unwrap());
    let lc2 = lc.clone();
    let scale = tokio::spawn(async move { lc2.scale("f", 0).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        lc.status("f").unwrap().replicas,
        0,
        "the stop is in progress"
    );
    let lease = lc.acquire("f").await.unwrap();
    scale.await.unwrap().unwrap();
    assert_eq!(rt.starts.load(Ordering::SeqCst), 2);
    assert!(lease.cold);
    assert_eq!(lc.status("f").unwrap().available, 1);
}

#[tokio::test]
async fn scale_out_at_max_concurrency_and_balance() {
    let (lc, rt) = lifecycle();
    let mut s = spec("f", &[("INIT_MS", "20")]);
    s.max_instances = 3;
    s.max_concurrency = 1;
    lc.deploy(s).await.unwrap();
    let (a, b, c) = tokio::join!(lc.acquire("f"), lc.acquire("f"), lc.acquire("f"));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let mut addrs = vec![a.instance.addr(), b.instance.addr(), c.instance.addr()];
    addrs.sort();
    addrs.dedup();
    assert_eq!(
        addrs.len(),
        3,
        "three requests at concurrency 1 use three instances"
    );
    assert_eq!(rt.starts.load(Ordering::SeqCst), 3);
    // A fourth waits until one lease is released.
    let lc2 = lc.clone();
    let d = tokio::spawn(async move { lc2.acquire("f").await.map(|l| l.instance.addr()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!d.is_finished());
    let freed = b.instance.addr();
    drop(b);
    assert_eq!(d.await.unwrap().unwrap(), freed);
    assert_eq!(rt.starts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn packet_wakes_are_rate_limited() {
    let (lc, rt) = lifecycle();
    let mut s = spec("f", &[("FAIL", "1")]);
    s.policy.max_wakes_per_second = 2;
    lc.deploy(s).await.unwrap();
    let (mut started, mut suppressed) = (0, 0);
    let t0 = std::time::Instant::now();
    for _ in 0..50 {
        match lc.wake("f", Trigger::Syn, Instant::now()) {
            WakeOutcome::Started => started += 1,
            WakeOutcome::Suppressed => suppressed += 1,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The burst of 2, plus the refill at 2/s over however long the loop took (~100 ms
    // when the machine is idle).
    let allowed = 2 + (t0.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(started <= allowed, "started {started}, allowed {allowed}");
    assert!(suppressed >= 10, "suppressed {suppressed}");
    assert_eq!(
        lc.metrics().wakes_suppressed.get(&ByFunction::new("f")),
        suppressed as u64
    );
    assert_eq!(rt.starts.load(Ordering::SeqCst), started);
}

#[tokio::test]
async fn removal_fails_waiters_and_stops_instances() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[("INIT_MS", "200")])).await.unwrap();
    let lc2 = lc.clone();
    let w = tokio::spawn(async move { lc2.acquire("f").await.err().map(|e| e.to_string()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(lc.remove("f").await);
    let e = w.await.unwrap().unwrap();
    assert!(e.contains("removed"), "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rt.running.load(Ordering::SeqCst), 0);
    assert!(matches!(
        lc.acquire("f").await,
        Err(AcquireError::UnknownFunction { .. })
    ));
}

#[tokio::test]
async fn update_moves_waiters_to_the_new_version() {
    let (lc, _) = lifecycle();
    lc.deploy(spec("f", &[("INIT_MS", "200")])).await.unwrap();
    let lc2 = lc.clone();
    let w = tokio::spawn(async move {
        lc2.acquire("f")
            .await
            .map(|l| l.spec().env.get("V").cloned())
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    lc.deploy(spec("f", &[("V", "2")])).await.unwrap();
    assert_eq!(w.await.unwrap().unwrap().as_deref(), Some("2"));
}

#[tokio::test]
async fn shutdown_stops_starts_in_flight_before_it_returns() {
    let (lc, rt) = lifecycle();
    // One start still inside the runtime's start call, one waiting for readiness.
    let mut a = spec("a", &[("START_MS", "150")]);
    a.policy.start_timeout = Duration::from_secs(30);
    lc.deploy(a).await.unwrap();
    let mut b = spec("b", &[("INIT_MS", "20000")]);
    b.policy.start_timeout = Duration::from_secs(30);
    lc.deploy(b).await.unwrap();
    assert_eq!(
        lc.wake("a", Trigger::Api, Instant::now()),
        WakeOutcome::Started
    );
    assert_eq!(
        lc.wake("b", Trigger::Api, Instant::now()),
        WakeOutcome::Started
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(rt.running.load(Ordering::SeqCst), 2);
    let t0 = Instant::now();
    lc.shutdown().await;
    assert_eq!(
        rt.running.load(Ordering::SeqCst),
        0,
        "an instance whose start was in flight outlived shutdown"
    );
    // The readiness wait was cut short, not sat out until start_timeout.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rt.starts.load(Ordering::SeqCst), 2);
    assert_eq!(rt.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn removal_stops_a_start_in_flight_before_it_returns() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[("START_MS", "150")])).await.unwrap();
    lc.wake("f", Trigger::Syn, Instant::now());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(lc.remove("f").await);
    assert_eq!(rt.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn scale_after_shutdown_starts_nothing() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[])).await.unwrap();
    lc.shutdown().await;
    let e = lc.scale("f", 1).await.expect_err("scale refused");
    assert!(matches!(e, ScaleError::ShuttingDown { .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rt.starts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn scale_racing_a_removal_starts_nothing() {
    let (lc, rt) = lifecycle();
    lc.deploy(spec("f", &[])).await.unwrap();
    // The scale looked the function up just before the DELETE took it away.
    let f = lc.get("f").unwrap();
    assert!(lc.remove("f").await);
    let e = lc.scale_function(&f, 1).await.expect_err("scale refused");
    assert!(matches!(e, ScaleError::UnknownFunction { .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rt.starts.load(Ordering::SeqCst), 0);
    assert_eq!(rt.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn waiting_for_a_saturated_warm_instance_is_not_a_start() {
    let (lc, rt) = lifecycle();
    let mut s = spec("f", &[]);
    s.max_concurrency = 1;
    s.policy.start_timeout = Duration::from_millis(150);
    lc.deploy(s).await.unwrap();
    let held = lc.acquire("f").await.unwrap();
    assert!(held.cold);
    let waits_before = lc
        .metrics()
        .series("synwake_cold_start_wait_seconds_count{function=\"f\"}")
        .unwrap_or(0.0);

    // Nobody frees the instance: the wait ends as "saturated", not as a start timeout.
    let e = lc.acquire("f").await.err().expect("no capacity");
    assert!(matches!(e, AcquireError::Saturated { .. }), "{e}");
    assert_eq!(lc.metrics().start_failures.get(&ByFunction::new("f")), 0);

    // Freed while waiting: served warm, not counted as a cold wait.
    let lc2 = lc.clone();
    let waiter = tokio::spawn(async move { lc2.acquire("f").await.map(|l| l.cold) });
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(held);
    assert!(!waiter.await.unwrap().unwrap(), "flagged cold");
    assert_eq!(
        lc.metrics()
            .series("synwake_cold_start_wait_seconds_count{function=\"f\"}")
            .unwrap_or(0.0),
        waits_before
    );
    assert_eq!(rt.starts.load(Ordering::SeqCst), 1);
}

/// An adaptive function whose history says "the next call comes 2 s after the last one".
fn adaptive_spec(name: &str) -> (FunctionSpec, IdleHistory) {
    let mut s = spec(name, &[]);
    s.policy.idle_policy = IdlePolicyKind::Adaptive;
    s.policy.adaptive = crate::policy::AdaptiveConfig {
        histogram_min: Duration::from_millis(10),
        histogram_range: Duration::from_secs(60),
        min_samples: 3,
        min_unload: Duration::from_millis(200),
        ..Default::default()
    };
    let cfg = &s.policy.adaptive;
    let mut h = IdleHistory::new(cfg);
    let now = idle::wall_now();
    for k in 0..10 {
        let t = now - 2.0 * (10 - k) as f64;
        h.on_request(cfg, t);
        h.on_done(t);
    }
    // The last request ended just now.
    h.on_request(cfg, now);
    h.on_done(now);
    (s, h)
}

async fn wait_until(mut cond: impl FnMut() -> bool, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn adaptive_prewarms_at_the_predicted_point_and_the_request_is_a_hit() {
    let (lc, rt) = lifecycle();
    let (s, h) = adaptive_spec("f");
    lc.restore_idle_histories([("f".to_string(), h)].into());
    let t0 = Instant::now();
    lc.deploy(s).await.unwrap();
    let st = lc.status("f").unwrap();
    assert_eq!(st.idle.basis, "representative", "{:?}", st.idle);
    assert!(
        st.idle.prewarm_after_seconds > 1.0 && st.idle.keep_alive_seconds < 3.0,
        "{:?}",
        st.idle
    );
    assert_eq!(st.replicas, 0);
    // Nothing runs before the pre-warm point, then the policy starts it unasked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rt.starts.load(Ordering::SeqCst), 0);
    let m = lc.metrics().clone();
    assert!(
        wait_until(
            || lc.status("f").unwrap().available == 1,
            Duration::from_secs(10)
        )
        .await
    );
    assert!(t0.elapsed() >= Duration::from_secs_f64(st.idle.prewarm_after_seconds * 0.9));
    assert_eq!(m.predicted_prewarms.get(&ByFunction::new("f")), 1);
    let lease = lc.acquire("f").await.unwrap();
    assert!(!lease.cold, "the pre-warmed instance served the request");
    drop(lease);
    assert_eq!(m.predicted_hits.get(&ByFunction::new("f")), 1);
    assert_eq!(m.cold_starts.get(&ByTrigger::new("f", "predicted")), 1);
    // With a pre-warm point set, the instance stops right after the request.
    assert!(
        wait_until(
            || lc.status("f").unwrap().replicas == 0,
            Duration::from_secs(5)
        )
        .await
    );
    assert_eq!(m.predicted_wasted.get(&ByFunction::new("f")), 0);
}

#[tokio::test]
async fn unused_predicted_prewarm_is_wasted_at_the_keep_alive_point() {
    let (lc, rt) = lifecycle();
    let (s, h) = adaptive_spec("f");
    lc.restore_idle_histories([("f".to_string(), h)].into());
    lc.deploy(s).await.unwrap();
    let m = lc.metrics().clone();
    assert!(
        wait_until(
            || m.predicted_prewarms.get(&ByFunction::new("f")) == 1,
            Duration::from_secs(10)
        )
        .await
    );
    assert!(
        wait_until(
            || m.predicted_wasted.get(&ByFunction::new("f")) == 1,
            Duration::from_secs(10)
        )
        .await
    );
    assert!(
        wait_until(
            || lc.status("f").unwrap().replicas == 0,
            Duration::from_secs(5)
        )
        .await
    );
    // One pre-warm per idle period: no second start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rt.starts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn fallback_keeps_the_fixed_timeout_and_learns_from_requests() {
    let (lc, _rt) = lifecycle();
    let mut s = spec("f", &[]);
    s.policy.idle_policy = IdlePolicyKind::Adaptive;
    s.policy.idle_timeout = Duration::from_millis(300);
    lc.deploy(s).await.unwrap();
    let st = lc.status("f").unwrap();
    assert_eq!(st.idle.basis, "fallback");
    assert_eq!(st.idle.keep_alive_seconds, 0.3);
    drop(lc.acquire("f").await.unwrap());
    drop(lc.acquire("f").await.unwrap());
    assert_eq!(lc.status("f").unwrap().idle.samples, 1);
    assert!(
        wait_until(
            || lc.status("f").unwrap().replicas == 0,
            Duration::from_secs(5)
        )
        .await
    );
    let saved = lc.idle_histories_if_changed().expect("changed");
    assert_eq!(saved["f"].recorded(), 1);
    assert!(
        lc.idle_histories_if_changed().is_none(),
        "nothing new since"
    );
}

#[tokio::test]
async fn idle_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = crate::state::StateDir::new(dir.path()).unwrap();
    let (s, h) = adaptive_spec("f");
    {
        let (lc, _rt) = lifecycle();
        lc.restore_idle_histories([("f".to_string(), h.clone())].into());
        lc.deploy(s.clone()).await.unwrap();
        drop(lc.acquire("f").await.unwrap());
        let saved = lc.idle_histories_if_changed().unwrap();
        state.save_idle_history(&saved).unwrap();
        lc.shutdown().await;
    }
    // A new daemon: the history comes back from the state dir, representative at once.
    let loaded = state.load_idle_history().unwrap();
    assert_eq!(loaded["f"].recorded(), h.recorded() + 1);
    let (lc, _rt) = lifecycle();
    lc.restore_idle_histories(loaded);
    lc.deploy(s).await.unwrap();
    let st = lc.status("f").unwrap();
    assert_eq!(st.idle.basis, "representative", "{:?}", st.idle);
    assert_eq!(st.idle.samples, h.recorded() + 1);
    // A torn file is refused with its name, not half-read.
    std::fs::write(state.idle_history_file(), b"{\"f\":").unwrap();
    let e = state.load_idle_history().unwrap_err().to_string();
    assert!(e.contains("idle-history.json"), "{e}");
    lc.shutdown().await;
}
