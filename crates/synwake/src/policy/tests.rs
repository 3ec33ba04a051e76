use super::*;

const FALLBACK: Duration = Duration::from_secs(60);

fn cfg() -> AdaptiveConfig {
    AdaptiveConfig::default()
}

/// Calls at `start`, then every gap in `gaps` (zero-length requests).
fn feed(h: &mut IdleHistory, cfg: &AdaptiveConfig, start: f64, gaps: &[f64]) -> f64 {
    let mut t = start;
    h.on_request(cfg, t);
    h.on_done(t);
    for g in gaps {
        t += g;
        h.on_request(cfg, t);
        h.on_done(t);
    }
    t
}

#[test]
fn bins_are_log_spaced_and_cover_the_range() {
    let c = cfg();
    assert!((c.edge(0) - 0.1).abs() < 1e-9);
    assert!((c.edge(c.bins as usize) - 4.0 * 3600.0).abs() < 1e-6);
    // Equal ratios between consecutive edges.
    let r1 = c.edge(1) / c.edge(0);
    let r2 = c.edge(100) / c.edge(99);
    assert!((r1 - r2).abs() < 1e-9);
    assert_eq!(c.bin_of(0.0), 0);
    assert_eq!(c.bin_of(0.05), 0);
    assert_eq!(c.bin_of(4.0 * 3600.0), c.bins as usize - 1);
    let b = c.bin_of(600.0);
    assert!(c.edge(b) <= 600.0 && 600.0 < c.edge(b + 1));
}

#[test]
fn fallback_until_representative() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    assert_eq!(
        h.window(&c, FALLBACK),
        Window::fixed(FALLBACK, Basis::Fallback)
    );
    let t = feed(&mut h, &c, 0.0, &[600.0; 3]);
    // 3 < min_samples (5): still the fixed keep-alive.
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.basis, Basis::Fallback);
    assert_eq!(w.keep_alive, FALLBACK);
    feed(&mut h, &c, t + 600.0, &[600.0; 3]);
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.basis, Basis::Representative);
    // The 10-minute gap sits inside the window, the window is far from "always on".
    assert!(w.warm_at(600.0), "{w:?}");
    assert!(!w.warm_at(60.0), "{w:?}");
    assert!(w.prewarm_after > Duration::from_secs(400), "{w:?}");
    assert!(w.keep_alive < Duration::from_secs(800), "{w:?}");
}

#[test]
fn evenly_spread_idle_times_are_not_representative() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    // One idle time in every bin: nothing is predictable.
    let gaps: Vec<f64> = (0..c.bins as usize).map(|i| c.edge(i) * 1.01).collect();
    feed(&mut h, &c, 0.0, &gaps);
    assert!(h.recorded() >= c.min_samples as u64);
    assert_eq!(h.window(&c, FALLBACK).basis, Basis::Fallback);
}

#[test]
fn margins_widen_the_window() {
    let mut c = cfg();
    c.prewarm_margin = 0.0;
    c.keepalive_margin = 0.0;
    let mut h = IdleHistory::new(&c);
    feed(&mut h, &c, 0.0, &[600.0; 20]);
    let bare = h.window(&c, FALLBACK);
    let b = c.bin_of(600.0);
    assert!(
        (bare.prewarm_after.as_secs_f64() - c.edge(b)).abs() < 1e-3,
        "{bare:?}"
    );
    assert!(
        (bare.keep_alive.as_secs_f64() - c.edge(b + 1)).abs() < 1e-3,
        "{bare:?}"
    );
    c.prewarm_margin = 0.2;
    c.keepalive_margin = 0.5;
    let wide = h.window(&c, FALLBACK);
    assert!(
        (wide.prewarm_after.as_secs_f64() - c.edge(b) * 0.8).abs() < 1e-3,
        "{wide:?}"
    );
    assert!(
        (wide.keep_alive.as_secs_f64() - c.edge(b + 1) * 1.5).abs() < 1e-3,
        "{wide:?}"
    );
}

#[test]
fn short_prewarm_point_keeps_warm_instead() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    feed(&mut h, &c, 0.0, &[2.0; 30]);
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.basis, Basis::Representative);
    assert_eq!(w.prewarm_after, Duration::ZERO);
    assert!(w.warm_at(0.0) && w.warm_at(2.0));
    // A stay-warm window is never shorter than min_unload: a hot function's rare gap
    // longer than its p99 (2 s here) must not make it cold (fixed 10 min keeps it warm).
    assert_eq!(w.keep_alive, c.min_unload, "{w:?}");
    assert!(w.warm_at(20.0) && !w.warm_at(31.0));
    // Longer keep-alive points are not changed by the floor.
    let mut h = IdleHistory::new(&c);
    feed(&mut h, &c, 0.0, &[5.0, 40.0].repeat(15));
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.prewarm_after, Duration::ZERO);
    assert!(w.keep_alive > Duration::from_secs(40), "{w:?}");
}

#[test]
fn window_is_capped() {
    let mut c = cfg();
    c.max_window = Duration::from_secs(1000);
    // Idle times of 10 min and of 1 h: the capped window goes where most of them are.
    for (short, long, expect) in [(20, 40, 3600.0), (40, 20, 600.0)] {
        let mut h = IdleHistory::new(&c);
        let mut gaps = vec![600.0; short];
        gaps.extend(vec![3600.0; long]);
        feed(&mut h, &c, 0.0, &gaps);
        let w = h.window(&c, FALLBACK);
        assert_eq!(w.basis, Basis::Representative);
        let len = w.keep_alive.as_secs_f64() - w.prewarm_after.as_secs_f64();
        assert!((len - 1000.0).abs() < 1e-6, "{w:?}");
        assert!(w.warm_at(expect), "{expect}: {w:?}");
    }
}

#[test]
fn out_of_range_idle_times_place_the_window_separately() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    // A daily job, jitter of a minute: every idle time is beyond the 4 h range.
    let day = 86_400.0;
    feed(
        &mut h,
        &c,
        0.0,
        &[day - 30.0, day + 20.0, day, day + 50.0, day - 10.0, day],
    );
    assert!(
        h.bins.iter().all(|b| *b == 0.0),
        "out-of-range times are not binned"
    );
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.basis, Basis::OutOfRange);
    assert!(w.warm_at(day), "{w:?}");
    assert!(!w.warm_at(day / 2.0), "{w:?}");
    let len = w.keep_alive.as_secs_f64() - w.prewarm_after.as_secs_f64();
    assert!(len <= c.max_window.as_secs_f64() + 1e-6, "{w:?}");
    assert!(w.reason(h.recorded()).contains("out of range"));
}

#[test]
fn clock_jumps_do_not_poison_the_histogram() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    let t = feed(&mut h, &c, 1000.0, &[60.0; 10]);
    let before = h.clone();
    // The wall clock steps back an hour: no negative sample, and the next gap counts from
    // the new time.
    h.on_request(&c, t - 3600.0);
    assert_eq!(h.recorded(), before.recorded());
    assert_eq!(h.bins, before.bins);
    h.on_done(t - 3600.0);
    h.on_request(&c, t - 3600.0 + 60.0);
    assert_eq!(h.recorded(), before.recorded() + 1);
    let w = h.window(&c, FALLBACK);
    assert_eq!(w.basis, Basis::Representative);
    assert!(w.warm_at(60.0));
    // A forward jump of a week is one out-of-range sample, not a new pattern.
    let now = h.last_activity().unwrap();
    h.on_request(&c, now + 7.0 * 86_400.0);
    assert_eq!(h.window(&c, FALLBACK).basis, Basis::Representative);
    // Non-finite times are ignored.
    h.on_request(&c, f64::NAN);
    h.on_done(f64::INFINITY);
    assert!(h.last_activity().unwrap().is_finite());
}

#[test]
fn follows_a_function_that_changes_pattern() {
    let c = cfg();
    let mut h = IdleHistory::new(&c);
    let t = feed(&mut h, &c, 0.0, &[60.0; 200]);
    let w = h.window(&c, FALLBACK);
    assert!(w.warm_at(60.0) && !w.warm_at(1800.0), "{w:?}");
    // The function now runs every 30 minutes. The keep-alive point follows within a few
    // calls (cold starts stop quickly); the pre-warm point once the old gaps have decayed.
    let t = feed(&mut h, &c, t + 1800.0, &[1800.0; 5]);
    let w = h.window(&c, FALLBACK);
    assert!(w.warm_at(1800.0), "after 6 new gaps: {w:?}");
    feed(&mut h, &c, t + 1800.0, &[1800.0; 400]);
    let w = h.window(&c, FALLBACK);
    assert!(
        w.warm_at(1800.0) && !w.warm_at(60.0),
        "after 400 new gaps: {w:?}"
    );
    assert!(w.prewarm_after > Duration::from_secs(1200), "{w:?}");
}

#[test]
fn window_cost_and_warmth() {
    let w = Window {
        prewarm_after: Duration::from_secs(100),
        keep_alive: Duration::from_secs(200),
        basis: Basis::Representative,
    };
    assert!(!w.warm_at(99.0) && w.warm_at(100.0) && w.warm_at(200.0) && !w.warm_at(201.0));
    assert_eq!(w.idle_cost(50.0), 0.0);
    assert_eq!(w.idle_cost(150.0), 50.0);
    assert_eq!(w.idle_cost(500.0), 100.0);
    let f = Window::fixed(Duration::from_secs(60), Basis::Fixed);
    assert_eq!(f.idle_cost(30.0), 30.0);
    assert_eq!(f.idle_cost(300.0), 60.0);
}

#[test]
fn config_ranges() {
    assert!(cfg().validate().is_ok());
    let mut c = cfg();
    c.bins = 0;
    assert!(c.validate().unwrap_err().0.contains("bins"));
    let mut c = cfg();
    c.prewarm_percentile = 99.5;
    assert!(c.validate().unwrap_err().0.contains("prewarm_percentile"));
    let mut c = cfg();
    c.keepalive_margin = 2.0;
    assert!(c.validate().unwrap_err().0.contains("keepalive_margin"));
    let mut c = cfg();
    c.histogram_min = c.histogram_range;
    assert!(c.validate().unwrap_err().0.contains("histogram_min"));
}
