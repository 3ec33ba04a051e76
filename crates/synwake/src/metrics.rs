//! Prometheus metrics on `prometheus-client`: one family per metric with a typed label set,
//! atomics (a small lock per histogram series) behind the family's read lock. `GET /metrics`
//! serves the registry in the OpenMetrics text format.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What `render` writes (Prometheus lists it first in its `Accept`).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// For every other client (curl, browsers, Telegraf, which does not accept OpenMetrics).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (a media range of that type, q > 0).
pub fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        parts
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
            && parts.all(|p| match p.strip_prefix("q=") {
                Some(q) => q.parse::<f32>().is_ok_and(|q| q > 0.0),
                None => true,
            })
    })
}

/// The same document in the Prometheus text format 0.0.4: no `# EOF`, and a counter's
/// HELP and TYPE name its samples' `_total` name (OpenMetrics names the family without it).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line says whether it is a counter.
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        let counter = line
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" counter"));
        if let (Some(name), Some(h)) = (counter, help) {
            let text = h
                .strip_prefix("# HELP ")
                .and_then(|h| h.strip_prefix(name))
                .unwrap_or("");
            let _ = writeln!(
                out,
                "# HELP {name}_total{text}\n# TYPE {name}_total counter"
            );
            help = None;
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A function's name as a label value; cloning a series key shares it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FunctionName(Arc<str>);

impl From<&str> for FunctionName {
    fn from(name: &str) -> Self {
        FunctionName(name.into())
    }
}

impl From<&String> for FunctionName {
    fn from(name: &String) -> Self {
        FunctionName(name.as_str().into())
    }
}

impl From<&FunctionName> for FunctionName {
    fn from(name: &FunctionName) -> Self {
        name.clone()
    }
}

impl FunctionName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for FunctionName {
    fn encode(&self, out: &mut LabelValueEncoder) -> std::fmt::Result {
        // prometheus-client writes label values verbatim; names are validated, escape anyway.
        for c in self.0.chars() {
            match c {
                '\\' => out.write_str("\\\\")?,
                '"' => out.write_str("\\\"")?,
                '\n' => out.write_str("\\n")?,
                c => out.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `{function}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByFunction {
    pub function: FunctionName,
}

impl ByFunction {
    pub fn new(function: impl Into<FunctionName>) -> Self {
        ByFunction {
            function: function.into(),
        }
    }
}

/// `{function,code}`: the HTTP status of a proxied request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByCode {
    pub function: FunctionName,
    pub code: u16,
}

impl ByCode {
    pub fn new(function: impl Into<FunctionName>, code: u16) -> Self {
        ByCode {
            function: function.into(),
            code,
        }
    }
}

/// `{function,trigger}`: what woke or started an instance (`Trigger::as_str`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByTrigger {
    pub function: FunctionName,
    pub trigger: &'static str,
}

impl ByTrigger {
    pub fn new(function: impl Into<FunctionName>, trigger: &'static str) -> Self {
        ByTrigger {
            function: function.into(),
            trigger,
        }
    }
}

/// `{function,runtime}` (`RuntimeKind::as_str`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRuntime {
    pub function: FunctionName,
    pub runtime: &'static str,
}

impl ByRuntime {
    pub fn new(function: impl Into<FunctionName>, runtime: &'static str) -> Self {
        ByRuntime {
            function: function.into(),
            runtime,
        }
    }
}

/// `{outcome}` of an affinity SYN.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByOutcome {
    pub outcome: &'static str,
}

/// The function a label set belongs to, if any (for forgetting a removed function).
pub trait OfFunction {
    fn function(&self) -> Option<&str>;
}

macro_rules! of_function {
    ($($t:ty),*) => {$(
        impl OfFunction for $t {
            fn function(&self) -> Option<&str> {
                Some(self.function.as_str())
            }
        }
    )*};
}
of_function!(ByFunction, ByCode, ByTrigger, ByRuntime);

impl OfFunction for ByOutcome {
    fn function(&self) -> Option<&str> {
        None
    }
}

/// One registered family plus the label sets it holds: `Family` cannot be iterated, and a
/// removed function's series must be found to be dropped.
pub struct Series<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    created: Mutex<HashSet<S>>,
}

impl<S, M, C> Series<S, M, C>
where
    S: Clone + Hash + Eq + OfFunction,
    C: MetricConstructor<M>,
{
    fn with<R>(&self, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        let found = self.family.get(labels);
        if let Some(m) = found {
            return f(&m);
        }
        // A new series: recorded under the same lock forget_function takes, so a series
        // created while its function is forgotten cannot be missed.
        let mut created = self.created.lock().unwrap();
        created.insert(labels.clone());
        let m = self.family.get_or_create(labels);
        drop(created);
        f(&m)
    }

    fn forget_function(&self, function: &str) {
        let mut created = self.created.lock().unwrap();
        created.retain(|s| {
            let drop = s.function() == Some(function);
            if drop {
                self.family.remove(s);
            }
            !drop
        });
    }
}

impl<S: Clone + Hash + Eq + OfFunction> Series<S, Counter> {
    pub fn inc(&self, labels: &S) {
        self.with(labels, |c| c.inc());
    }

    /// Current value (0 when never touched); used by tests and the API.
    pub fn get(&self, labels: &S) -> u64 {
        self.family.get(labels).map_or(0, |c| c.get())
    }
}

impl<S: Clone + Hash + Eq + OfFunction> Series<S, Counter<f64, AtomicU64>> {
    pub fn add(&self, labels: &S, v: f64) {
        self.with(labels, |c| c.inc_by(v));
    }

    pub fn get(&self, labels: &S) -> f64 {
        self.family.get(labels).map_or(0.0, |c| c.get())
    }
}

impl<S: Clone + Hash + Eq + OfFunction> Series<S, Gauge> {
    pub fn set(&self, labels: &S, v: i64) {
        self.with(labels, |g| g.set(v));
    }

    pub fn get(&self, labels: &S) -> i64 {
        self.family.get(labels).map_or(0, |g| g.get())
    }
}

impl<S: Clone + Hash + Eq + OfFunction> Series<S, Histogram, fn() -> Histogram> {
    pub fn observe(&self, labels: &S, v: f64) {
        self.with(labels, |h| h.observe(v));
    }
}

/// Forgetting a removed function, over families of any type.
trait Forget {
    fn forget(&self, function: &str);
}

impl<S, M, C> Forget for Series<S, M, C>
where
    S: Clone + Hash + Eq + OfFunction,
    C: MetricConstructor<M>,
{
    fn forget(&self, function: &str) {
        self.forget_function(function);
    }
}

fn counter<S, V>(reg: &mut Registry, name: &str, help: &str) -> Series<S, Counter<V, AtomicU64>>
where
    S: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    Counter<V, AtomicU64>: Default + EncodeMetric + std::fmt::Debug + Send + Sync + 'static,
    Family<S, Counter<V, AtomicU64>>: prometheus_client::registry::Metric,
{
    let family = Family::default();
    reg.register(name, no_period(help), family.clone());
    Series {
        family,
        created: Mutex::default(),
    }
}

fn gauge<S>(reg: &mut Registry, name: &str, help: &str) -> Series<S, Gauge>
where
    S: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::default();
    reg.register(name, no_period(help), family.clone());
    Series {
        family,
        created: Mutex::default(),
    }
}

fn histogram<S>(
    reg: &mut Registry,
    name: &str,
    help: &str,
    buckets: fn() -> Histogram,
) -> Series<S, Histogram, fn() -> Histogram>
where
    S: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::new_with_constructor(buckets);
    reg.register(name, no_period(help), family.clone());
    Series {
        family,
        created: Mutex::default(),
    }
}

/// `Registry::register` ends every help text with a period; ours already do.
fn no_period(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// Families filled at render time from counts another module keeps for its own use (the
/// async queue, the image store), passed to `Metrics::render_with`.
#[derive(Default)]
pub struct Snapshot(Registry);

impl Snapshot {
    pub fn gauge_per_function<'a>(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = (&'a str, i64)>,
    ) {
        let family = Family::<ByFunction, Gauge>::default();
        for (f, v) in values {
            family.get_or_create(&ByFunction::new(f)).set(v);
        }
        self.0.register(name, no_period(help), family);
    }

    /// `name` without `_total` (the encoder appends it).
    pub fn counter_per_function<'a>(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        let family = Family::<ByFunction, Counter>::default();
        for (f, v) in values {
            family.get_or_create(&ByFunction::new(f)).inc_by(v);
        }
        self.0.register(name, no_period(help), family);
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: i64) {
        let g = Gauge::<i64>::default();
        g.set(v);
        self.0.register(name, no_period(help), g);
    }

    pub fn gauge_f64(&mut self, name: &str, help: &str, v: f64) {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        self.0.register(name, no_period(help), g);
    }

    /// `name` without `_total`.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.0.register(name, no_period(help), ConstCounter::new(v));
    }
}

const LATENCY: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

fn latency() -> Histogram {
    Histogram::new(LATENCY)
}

/// The wake -> start call path is tens of microseconds: finer buckets.
fn wake_to_start_buckets() -> Histogram {
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1,
    ])
}

/// Every metric synwake exports (the async queue and the image store add theirs at render).
/// Counters are registered without `_total`: the OpenMetrics encoder appends it.
pub struct Metrics {
    pub invocations: Series<ByCode, Counter>,
    pub request_duration: Series<ByFunction, Histogram, fn() -> Histogram>,
    pub cold_starts: Series<ByTrigger, Counter>,
    pub cold_start_wait: Series<ByFunction, Histogram, fn() -> Histogram>,
    pub instance_start: Series<ByRuntime, Histogram, fn() -> Histogram>,
    pub instances: Series<ByFunction, Gauge>,
    pub start_failures: Series<ByFunction, Counter>,
    pub wakes: Series<ByTrigger, Counter>,
    pub wakes_suppressed: Series<ByFunction, Counter>,
    pub prewarms_wasted: Series<ByFunction, Counter>,
    pub predicted_prewarms: Series<ByFunction, Counter>,
    pub predicted_hits: Series<ByFunction, Counter>,
    pub predicted_wasted: Series<ByFunction, Counter>,
    pub wake_lead: Series<ByFunction, Histogram, fn() -> Histogram>,
    pub pool_starts: Series<ByFunction, Counter>,
    pub wake_to_start: Series<ByTrigger, Histogram, fn() -> Histogram>,
    pub idle_instance_seconds: Series<ByFunction, Counter<f64, AtomicU64>>,
    pub affinity_syns: Series<ByOutcome, Counter>,
    pub upstream_resends: Series<ByFunction, Counter>,
    probe_counters: Arc<Mutex<Option<ProbeCounters>>>,
    registry: Registry,
}

/// Returns (events, lost events) from the probe, or `None` once it is gone.
pub type ProbeCounters = Box<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

/// The probe's kernel counters, read when /metrics is rendered (off the SYN's path).
struct ProbeCollector(Arc<Mutex<Option<ProbeCounters>>>);

impl std::fmt::Debug for ProbeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeCollector")
    }
}

impl Collector for ProbeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // 0 when the probe is off.
        let (events, lost) = self
            .0
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|f| f())
            .unwrap_or((0, 0));
        for (name, help, v) in [
            (
                "synwake_probe_events",
                "SYN events the probe delivered to userspace.",
                events,
            ),
            (
                "synwake_probe_lost_events",
                "SYN events lost because the ring buffer was full.",
                lost,
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(e)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = &mut Registry::default();
        let probe_counters = Arc::new(Mutex::new(None));
        let m = Metrics {
            invocations: counter(
                r,
                "synwake_function_invocations",
                "Requests proxied to a function, by HTTP status code.",
            ),
            request_duration: histogram(
                r,
                "synwake_function_request_duration_seconds",
                "Time from request arrival to response headers, cold waits included.",
                latency,
            ),
            cold_starts: counter(
                r,
                "synwake_cold_starts",
                "Instances started from zero, by the trigger that started them.",
            ),
            cold_start_wait: histogram(
                r,
                "synwake_cold_start_wait_seconds",
                "Time requests spent waiting for an instance to start.",
                latency,
            ),
            instance_start: histogram(
                r,
                "synwake_instance_start_seconds",
                "From the runtime's start call to the instance being ready.",
                latency,
            ),
            instances: gauge(
                r,
                "synwake_instances",
                "Instances per function that are starting or ready.",
            ),
            start_failures: counter(
                r,
                "synwake_start_failures",
                "Instance starts that failed or timed out.",
            ),
            wakes: counter(
                r,
                "synwake_wakes",
                "Wake signals received, by trigger (a wake of a warm function counts too).",
            ),
            wakes_suppressed: counter(
                r,
                "synwake_wakes_suppressed",
                "Packet-triggered wakes dropped by the per-function rate limit.",
            ),
            prewarms_wasted: counter(
                r,
                "synwake_prewarms_wasted",
                "Packet-woken instances stopped because no request used them within prewarm_ttl.",
            ),
            predicted_prewarms: counter(
                r,
                "synwake_predicted_prewarms",
                "Starts at the adaptive idle policy's pre-warm point (trigger predicted).",
            ),
            predicted_hits: counter(
                r,
                "synwake_predicted_prewarm_hits",
                "Predicted pre-warms whose instance served a request.",
            ),
            predicted_wasted: counter(
                r,
                "synwake_predicted_prewarms_wasted",
                "Predicted pre-warms stopped at the keep-alive point without serving a request.",
            ),
            wake_lead: histogram(
                r,
                "synwake_wake_lead_seconds",
                "From a packet wake to the arrival of the request it served: the head start the SYN bought.",
                latency,
            ),
            idle_instance_seconds: counter(
                r,
                "synwake_idle_instance_seconds",
                "Seconds instances were ready with no request in flight (the memory an idle policy costs), counted when an instance stops.",
            ),
            affinity_syns: counter(
                r,
                "synwake_affinity_syns",
                "SYNs to a shared port seen with affinity on, by outcome: woke (the client's only recent function was cold), warm, suppressed (rate limit), no_single_function.",
            ),
            pool_starts: counter(
                r,
                "synwake_pool_starts",
                "Instance starts served from a pre-created container (oci pool).",
            ),
            wake_to_start: histogram(
                r,
                "synwake_wake_to_start_seconds",
                "From the wake (the SYN's arrival, for probe triggers) to the runtime's start call.",
                wake_to_start_buckets,
            ),
            upstream_resends: counter(
                r,
                "synwake_upstream_resends",
                "Requests sent again on a new connection because the kept one failed first: before a byte of the request left, or (idempotent, no body) closed or reset before a byte of the answer came.",
            ),
            probe_counters: probe_counters.clone(),
            registry: Registry::default(),
        };
        r.register_collector(Box::new(ProbeCollector(probe_counters)));
        Metrics {
            registry: std::mem::take(r),
            ..m
        }
    }

    /// Drops every series of a removed function.
    pub fn forget_function(&self, function: &str) {
        let all: [&dyn Forget; 19] = [
            &self.invocations,
            &self.request_duration,
            &self.cold_starts,
            &self.cold_start_wait,
            &self.instance_start,
            &self.instances,
            &self.start_failures,
            &self.wakes,
            &self.wakes_suppressed,
            &self.prewarms_wasted,
            &self.predicted_prewarms,
            &self.predicted_hits,
            &self.predicted_wasted,
            &self.wake_lead,
            &self.pool_starts,
            &self.wake_to_start,
            &self.idle_instance_seconds,
            &self.affinity_syns,
            &self.upstream_resends,
        ];
        for s in all {
            s.forget(function);
        }
    }

    /// Where the probe's counters come from; read on each render, off the SYN's path.
    pub fn set_probe_counters(&self, f: ProbeCounters) {
        *self.probe_counters.lock().unwrap() = Some(f);
    }

    /// The whole registry as an OpenMetrics text document.
    pub fn render(&self) -> String {
        self.render_with(&[])
    }

    /// The registry followed by `more` (other modules' families), then `# EOF`.
    pub fn render_with(&self, more: &[Snapshot]) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        for s in more {
            let _ = encode_registry(&mut out, &s.0);
        }
        let _ = encode_eof(&mut out);
        out
    }

    /// `render_with` in the format `accept` asks for: (content type, body).
    pub fn render_for(&self, accept: Option<&str>, more: &[Snapshot]) -> (&'static str, String) {
        let text = self.render_with(more);
        if accept.is_some_and(accepts_openmetrics) {
            (OPENMETRICS, text)
        } else {
            (PROMETHEUS_TEXT, to_prometheus_text(&text))
        }
    }

    /// The value of one rendered series (`name{labels}` exactly), for tests.
    #[cfg(test)]
    pub fn series(&self, series: &str) -> Option<f64> {
        self.render().lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_under_the_names_users_scrape() {
        let m = Metrics::new();
        m.invocations.inc(&ByCode::new("hello", 200));
        m.invocations.inc(&ByCode::new("hello", 200));
        m.cold_start_wait.observe(&ByFunction::new("hello"), 0.003);
        m.wake_to_start
            .observe(&ByTrigger::new("hello", "syn"), 0.00002);
        m.instances.set(&ByFunction::new("hello"), 2);
        m.idle_instance_seconds.add(&ByFunction::new("hello"), 1.5);
        m.affinity_syns.inc(&ByOutcome { outcome: "woke" });
        let text = m.render();
        for line in [
            "# TYPE synwake_function_invocations counter",
            "synwake_function_invocations_total{function=\"hello\",code=\"200\"} 2",
            "# TYPE synwake_cold_start_wait_seconds histogram",
            "synwake_cold_start_wait_seconds_bucket{le=\"0.0025\",function=\"hello\"} 0",
            "synwake_cold_start_wait_seconds_bucket{le=\"0.005\",function=\"hello\"} 1",
            "synwake_cold_start_wait_seconds_bucket{le=\"+Inf\",function=\"hello\"} 1",
            "synwake_cold_start_wait_seconds_count{function=\"hello\"} 1",
            "synwake_wake_to_start_seconds_bucket{le=\"0.00001\",function=\"hello\",trigger=\"syn\"} 0",
            "synwake_wake_to_start_seconds_bucket{le=\"0.000025\",function=\"hello\",trigger=\"syn\"} 1",
            "synwake_cold_start_wait_seconds_bucket{le=\"1.0\",function=\"hello\"} 1",
            "synwake_cold_start_wait_seconds_bucket{le=\"30.0\",function=\"hello\"} 1",
            "synwake_instances{function=\"hello\"} 2",
            "synwake_idle_instance_seconds_total{function=\"hello\"} 1.5",
            "synwake_affinity_syns_total{outcome=\"woke\"} 1",
            "synwake_probe_events_total 0",
            "synwake_probe_lost_events_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(m.invocations.get(&ByCode::new("hello", 200)), 2);
        assert_eq!(
            m.series("synwake_cold_start_wait_seconds_count{function=\"hello\"}"),
            Some(1.0)
        );

        m.forget_function("hello");
        let text = m.render();
        assert!(!text.contains("function=\"hello\""), "{text}");
        assert!(text.contains("synwake_affinity_syns_total{outcome=\"woke\"} 1"));
        // A forgotten function's series starts again from zero.
        m.invocations.inc(&ByCode::new("hello", 200));
        assert_eq!(m.invocations.get(&ByCode::new("hello", 200)), 1);
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.cold_starts.inc(&ByTrigger::new("f", "syn"));
        m.instances.set(&ByFunction::new("f"), 1);
        let (ct, text) = m.render_for(Some("text/plain;version=0.0.4"), &[]);
        assert_eq!(ct, PROMETHEUS_TEXT);
        for line in [
            "# HELP synwake_cold_starts_total Instances started from zero, by the trigger that started them.",
            "# TYPE synwake_cold_starts_total counter",
            "synwake_cold_starts_total{function=\"f\",trigger=\"syn\"} 1",
            "# HELP synwake_instances Instances per function that are starting or ready.",
            "# TYPE synwake_instances gauge",
            "synwake_instances{function=\"f\"} 1",
            "# TYPE synwake_probe_events_total counter",
            "# TYPE synwake_function_request_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# TYPE synwake_cold_starts counter"));
        // Every sample keeps its line.
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples(&text), samples(&m.render()));

        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (ct, text) = m.render_for(Some(prometheus), &[]);
        assert_eq!(ct, OPENMETRICS);
        assert!(text.ends_with("# EOF\n"));
        assert!(!accepts_openmetrics("application/openmetrics-text;q=0"));
        assert!(!accepts_openmetrics("*/*"));
        assert_eq!(m.render_for(None, &[]).0, PROMETHEUS_TEXT);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.start_failures.inc(&ByFunction::new("a\"b\\c\nd"));
        assert!(m
            .render()
            .contains("synwake_start_failures_total{function=\"a\\\"b\\\\c\\nd\"} 1"));
    }
}
