use super::*;
use synwake_bench::trace::{parse_csv, read_csv};

fn small() -> Trace {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../synwake-bench/testdata/small.csv"
    );
    read_csv(std::path::Path::new(p)).unwrap()
}

fn params() -> SimParams {
    SimParams {
        start_ms: Some(100.0),
        rtt_ms: 20.0,
        affinity_window: Duration::from_secs(120),
        ..SimParams::default()
    }
}

fn run(trace: &Trace, policy: &str) -> Record {
    simulate(trace, &PolicySpec::parse(policy).unwrap(), &params())
}

// The expected numbers below are worked out by hand from testdata/small.csv:
// a at 0, 30, 100; b at 200, 290; every start takes 100 ms.

#[test]
fn fixed_60s_on_the_small_trace() {
    let r = run(&small(), "fixed-60s");
    // Cold: a@0, a@100 (gap 70 > 60), b@200, b@290 (gap 90). Warm: a@30.
    assert_eq!(r.invocations, 5);
    assert_eq!(r.cold_starts, 4);
    assert!((r.cold_start_fraction - 0.8).abs() < 1e-12);
    // Idle: 30 (a@0..30) + 60 (a@30..90) + 60 (b@200..260) + 60 (a after 100, trace ends 290).
    assert!((r.idle_instance_seconds - 210.0).abs() < 1e-9, "{r:?}");
    assert_eq!(r.p50_added_ms, 100.0);
    assert_eq!(r.p99_added_ms, 100.0);
}

#[test]
fn fixed_10m_on_the_small_trace() {
    let r = run(&small(), "fixed-10m");
    assert_eq!(r.cold_starts, 2); // a@0, b@200
                                  // 30 + 70 + 90 (gaps) + 190 (a from 100 to the end at 290).
    assert!((r.idle_instance_seconds - 380.0).abs() < 1e-9, "{r:?}");
    assert_eq!(r.p50_added_ms, 0.0);
    assert_eq!(r.p99_added_ms, 100.0);
}

#[test]
fn adaptive_falls_back_on_too_little_history() {
    // Two idle times per function are below min_samples: exactly fixed-60s (idle_timeout).
    let a = run(&small(), "adaptive");
    let f = run(&small(), "fixed-60s");
    assert_eq!(a.cold_starts, f.cold_starts);
    assert_eq!(a.idle_instance_seconds, f.idle_instance_seconds);
    assert_eq!(a.predicted_prewarms, 0);
}

#[test]
fn affinity_hides_one_round_trip() {
    let r = run(&small(), "adaptive+affinity");
    // a@100: its client called only a 70 s before (window 120 s) -> woken at the SYN, the
    // request waits 100 - 20 ms. b@290 the same. a@30 was warm: no wake.
    assert_eq!(r.affinity_wakes, 2);
    assert_eq!(r.affinity_wasted, 0);
    assert_eq!(r.cold_starts, 4);
    assert_eq!(r.p50_added_ms, 80.0); // sorted: 0, 80, 80, 100, 100
    assert_eq!(r.p99_added_ms, 100.0);
    assert!((r.idle_instance_seconds - 210.0).abs() < 1e-9, "{r:?}");
}

#[test]
fn affinity_wake_for_the_wrong_function_is_wasted() {
    let t = parse_csv(
        "timestamp,function,client\n0,a,c\n100,b,c\n300,z,other\n".as_bytes(),
        "t.csv",
    )
    .unwrap();
    let r = run(&t, "fixed-60s+affinity");
    // c's only recent function at 100 is a: a is woken, then c calls b. a's instance
    // stays prewarm_ttl (10 s) unused.
    assert_eq!(r.affinity_wakes, 1);
    assert_eq!(r.affinity_wasted, 1);
    assert_eq!(r.cold_starts, 3);
    // a: 60 after 0; b: 60 after 100; the wasted wake: 10.
    assert!((r.idle_instance_seconds - 130.0).abs() < 1e-9, "{r:?}");
}

#[test]
fn affinity_wakes_respect_the_rate_limit() {
    // f goes cold 1 ms after each call; its only client calls it every 10 ms for a second,
    // so every call's SYN would wake it.
    let mut text = String::from("timestamp,function,client\n0,f,c\n");
    for i in 0..100 {
        text.push_str(&format!("{:.3},f,c\n", 100.0 + i as f64 * 0.01));
    }
    let t = parse_csv(text.as_bytes(), "t.csv").unwrap();
    let mut p = params();
    p.max_wakes_per_second = 3;
    let r = simulate(&t, &PolicySpec::parse("fixed-1ms+affinity").unwrap(), &p);
    // Burst of 3, then 3 per second over the 1 s of calls.
    assert!((3..=6).contains(&r.affinity_wakes), "{r:?}");
    p.max_wakes_per_second = 1000;
    let r = simulate(&t, &PolicySpec::parse("fixed-1ms+affinity").unwrap(), &p);
    assert_eq!(r.affinity_wakes, 100, "{r:?}");
}

#[test]
fn adaptive_prewarms_a_timer() {
    let mut text = String::from("timestamp,function,client\n");
    for k in 0..10 {
        text.push_str(&format!("{},timer,\n", k * 600));
    }
    let t = parse_csv(text.as_bytes(), "t.csv").unwrap();
    let r = run(&t, "adaptive");
    let c = AdaptiveConfig::default();
    // Calls 0..=5 are cold (call 0 has no history, calls 1-5 see fewer than 5 idle times
    // and fall back to 60 s); calls 6..=9 find the instance pre-warmed.
    assert_eq!(r.cold_starts, 6);
    assert_eq!(r.predicted_prewarms, 4);
    assert_eq!(r.prewarm_hits, 4);
    assert_eq!(r.prewarms_wasted, 0);
    let prewarm = c.edge(c.bin_of(600.0)) * (1.0 - c.prewarm_margin);
    let expected = 5.0 * 60.0 + 4.0 * (600.0 - prewarm);
    assert!(
        (r.idle_instance_seconds - expected).abs() < 1e-6,
        "{r:?} vs {expected}"
    );
    let fixed = run(&t, "fixed-60s");
    assert_eq!(fixed.cold_starts, 10);
}

#[test]
fn policy_names() {
    assert_eq!(
        PolicySpec::parse("fixed-60s").unwrap().fixed,
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        PolicySpec::parse("fixed-10m").unwrap().fixed,
        Some(Duration::from_secs(600))
    );
    let a = PolicySpec::parse("adaptive+affinity").unwrap();
    assert!(a.affinity && a.fixed.is_none());
    for bad in ["fixed", "fixed-0s", "adaptive+", "lru", "fixed-10x"] {
        assert!(PolicySpec::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn start_times_are_stable_and_in_range() {
    for name in ["a", "timer-3", "hot-0"] {
        let s = start_ms_of(name);
        assert!((50.0..=1000.0).contains(&s), "{name}: {s}");
        assert_eq!(s, start_ms_of(name));
    }
}
