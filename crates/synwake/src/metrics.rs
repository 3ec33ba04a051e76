//! Prometheus metrics: a small registry of labelled counters, gauges and histograms,
//! rendered in the text exposition format on `GET /metrics`.

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Series keyed by label values; the hot path looks a series up without allocating (the
/// values are hashed as given and compared in place), only a new series allocates.
struct LabelMap<V> {
    buckets: HashMap<u64, Vec<(Vec<String>, V)>>,
}

impl<V> Default for LabelMap<V> {
    fn default() -> Self {
        LabelMap {
            buckets: HashMap::new(),
        }
    }
}

fn hash_labels(labels: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for l in labels {
        l.hash(&mut h);
    }
    h.finish()
}

impl<V> LabelMap<V> {
    fn entry(&mut self, labels: &[&str], new: impl FnOnce() -> V) -> &mut V {
        let bucket = self.buckets.entry(hash_labels(labels)).or_default();
        let pos = match bucket.iter().position(|(k, _)| k.iter().eq(labels.iter())) {
            Some(p) => p,
            None => {
                bucket.push((labels.iter().map(|s| s.to_string()).collect(), new()));
                bucket.len() - 1
            }
        };
        &mut bucket[pos].1
    }

    fn get(&self, labels: &[&str]) -> Option<&V> {
        self.buckets
            .get(&hash_labels(labels))?
            .iter()
            .find(|(k, _)| k.iter().eq(labels.iter()))
            .map(|(_, v)| v)
    }

    fn retain(&mut self, mut keep: impl FnMut(&[String]) -> bool) {
        for b in self.buckets.values_mut() {
            b.retain(|(k, _)| keep(k));
        }
        self.buckets.retain(|_, b| !b.is_empty());
    }

    /// Every series, sorted by label values (stable output).
    fn sorted(&self) -> Vec<(&Vec<String>, &V)> {
        let mut v: Vec<_> = self
            .buckets
            .values()
            .flatten()
            .map(|(k, v)| (k, v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

/// A labelled counter or gauge family.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    labels: &'static [&'static str],
    values: Mutex<LabelMap<f64>>,
}

impl Family {
    fn new(
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Family {
            name,
            help,
            kind,
            labels,
            values: Mutex::new(LabelMap::default()),
        }
    }

    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    pub fn add(&self, labels: &[&str], v: f64) {
        debug_assert_eq!(labels.len(), self.labels.len(), "{}", self.name);
        *self.values.lock().unwrap().entry(labels, || 0.0) += v;
    }

    pub fn set(&self, labels: &[&str], v: f64) {
        *self.values.lock().unwrap().entry(labels, || 0.0) = v;
    }

    /// Current value (0 when never touched); used by tests and the API.
    pub fn get(&self, labels: &[&str]) -> f64 {
        self.values
            .lock()
            .unwrap()
            .get(labels)
            .copied()
            .unwrap_or(0.0)
    }

    /// Forget every series of one function (after it is removed).
    pub fn forget_function(&self, function: &str) {
        if self.labels.first() == Some(&"function") {
            self.values.lock().unwrap().retain(|k| k[0] != function);
        }
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (k, v) in self.values.lock().unwrap().sorted() {
            let _ = writeln!(
                out,
                "{}{} {}",
                self.name,
                label_str(self.labels, k, None),
                v
            );
        }
    }
}

/// A labelled histogram family (seconds).
pub struct HistogramFamily {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    values: Mutex<LabelMap<Hist>>,
}

#[derive(Clone, Default)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl HistogramFamily {
    fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        HistogramFamily {
            name,
            help,
            labels,
            buckets,
            values: Mutex::new(LabelMap::default()),
        }
    }

    pub fn observe(&self, labels: &[&str], v: f64) {
        let mut map = self.values.lock().unwrap();
        let h = map.entry(labels, || Hist {
            counts: vec![0; self.buckets.len()],
            ..Default::default()
        });
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += v;
        h.count += 1;
    }

    /// Number of observations for these labels.
    pub fn count(&self, labels: &[&str]) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(labels)
            .map(|h| h.count)
            .unwrap_or(0)
    }

    pub fn forget_function(&self, function: &str) {
        self.values.lock().unwrap().retain(|k| k[0] != function);
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        for (k, h) in self.values.lock().unwrap().sorted() {
            for (i, b) in self.buckets.iter().enumerate() {
                let le = format!("{b}");
                let _ = writeln!(
                    out,
                    "{}_bucket{} {}",
                    self.name,
                    label_str(self.labels, k, Some(&le)),
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{}_bucket{} {}",
                self.name,
                label_str(self.labels, k, Some("+Inf")),
                h.count
            );
            let _ = writeln!(
                out,
                "{}_sum{} {}",
                self.name,
                label_str(self.labels, k, None),
                h.sum
            );
            let _ = writeln!(
                out,
                "{}_count{} {}",
                self.name,
                label_str(self.labels, k, None),
                h.count
            );
        }
    }
}

fn label_str(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Every metric synwake exports.
pub struct Metrics {
    pub invocations: Family,
    pub request_duration: HistogramFamily,
    pub cold_starts: Family,
    pub cold_start_wait: HistogramFamily,
    pub instance_start: HistogramFamily,
    pub instances: Family,
    pub start_failures: Family,
    pub wakes: Family,
    pub wakes_suppressed: Family,
    pub prewarms_wasted: Family,
    pub predicted_prewarms: Family,
    pub predicted_hits: Family,
    pub predicted_wasted: Family,
    pub wake_lead: HistogramFamily,
    pub pool_starts: Family,
    pub wake_to_start: HistogramFamily,
    pub idle_instance_seconds: Family,
    pub affinity_syns: Family,
    /// Reads the probe's kernel counters (events, lost) when /metrics is rendered.
    probe_counters: std::sync::Mutex<Option<ProbeCounters>>,
}

/// Returns (events, lost events) from the probe, or `None` once it is gone.
pub type ProbeCounters = Box<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            invocations: Family::new(
                "synwake_function_invocations_total",
                "Requests proxied to a function, by HTTP status code.",
                "counter",
                &["function", "code"],
            ),
            request_duration: HistogramFamily::new(
                "synwake_function_request_duration_seconds",
                "Time from request arrival to response headers, cold waits included.",
                &["function"],
                LATENCY,
            ),
            cold_starts: Family::new(
                "synwake_cold_starts_total",
                "Instances started from zero, by the trigger that started them.",
                "counter",
                &["function", "trigger"],
            ),
            cold_start_wait: HistogramFamily::new(
                "synwake_cold_start_wait_seconds",
                "Time requests spent waiting for an instance to start.",
                &["function"],
                LATENCY,
            ),
            instance_start: HistogramFamily::new(
                "synwake_instance_start_seconds",
                "From the runtime's start call to the instance being ready.",
                &["function", "runtime"],
                LATENCY,
            ),
            instances: Family::new(
                "synwake_instances",
                "Instances per function that are starting or ready.",
                "gauge",
                &["function"],
            ),
            start_failures: Family::new(
                "synwake_start_failures_total",
                "Instance starts that failed or timed out.",
                "counter",
                &["function"],
            ),
            wakes: Family::new(
                "synwake_wakes_total",
                "Wake signals received, by trigger (a wake of a warm function counts too).",
                "counter",
                &["function", "trigger"],
            ),
            wakes_suppressed: Family::new(
                "synwake_wakes_suppressed_total",
                "Packet-triggered wakes dropped by the per-function rate limit.",
                "counter",
                &["function"],
            ),
            prewarms_wasted: Family::new(
                "synwake_prewarms_wasted_total",
                "Packet-woken instances stopped because no request used them within prewarm_ttl.",
                "counter",
                &["function"],
            ),
            predicted_prewarms: Family::new(
                "synwake_predicted_prewarms_total",
                "Starts at the adaptive idle policy's pre-warm point (trigger predicted).",
                "counter",
                &["function"],
            ),
            predicted_hits: Family::new(
                "synwake_predicted_prewarm_hits_total",
                "Predicted pre-warms whose instance served a request.",
                "counter",
                &["function"],
            ),
            predicted_wasted: Family::new(
                "synwake_predicted_prewarms_wasted_total",
                "Predicted pre-warms stopped at the keep-alive point without serving a request.",
                "counter",
                &["function"],
            ),
            wake_lead: HistogramFamily::new(
                "synwake_wake_lead_seconds",
                "From a packet wake to the arrival of the request it served: the head start the SYN bought.",
                &["function"],
                LATENCY,
            ),
            pool_starts: Family::new(
                "synwake_pool_starts_total",
                "Instance starts served from a pre-created container (oci pool).",
                "counter",
                &["function"],
            ),
            wake_to_start: HistogramFamily::new(
                "synwake_wake_to_start_seconds",
                "From the wake (the SYN's arrival, for probe triggers) to the runtime's start call.",
                &["function", "trigger"],
                &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1],
            ),
            idle_instance_seconds: Family::new(
                "synwake_idle_instance_seconds_total",
                "Seconds instances were ready with no request in flight (the memory an idle policy costs), counted when an instance stops.",
                "counter",
                &["function"],
            ),
            affinity_syns: Family::new(
                "synwake_affinity_syns_total",
                "SYNs to a shared port seen with affinity on, by outcome: woke (the client's only recent function was cold), warm, suppressed (rate limit), no_single_function.",
                "counter",
                &["outcome"],
            ),
            probe_counters: std::sync::Mutex::new(None),
        }
    }

    /// Drops every series of a removed function.
    pub fn forget_function(&self, function: &str) {
        for f in [
            &self.invocations,
            &self.cold_starts,
            &self.instances,
            &self.start_failures,
            &self.wakes,
            &self.wakes_suppressed,
            &self.prewarms_wasted,
            &self.predicted_prewarms,
            &self.predicted_hits,
            &self.predicted_wasted,
            &self.pool_starts,
            &self.idle_instance_seconds,
        ] {
            f.forget_function(function);
        }
        for h in [
            &self.request_duration,
            &self.cold_start_wait,
            &self.instance_start,
            &self.wake_lead,
            &self.wake_to_start,
        ] {
            h.forget_function(function);
        }
    }

    /// Where the probe's counters come from; read on each render, off the SYN's path.
    pub fn set_probe_counters(&self, f: ProbeCounters) {
        *self.probe_counters.lock().unwrap() = Some(f);
    }

    /// The whole registry in Prometheus text format.
    pub fn render(&self) -> String {
        // Read from the kernel now; 0 when the probe is off.
        let (events, lost) = self
            .probe_counters
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|f| f())
            .unwrap_or((0, 0));
        let mut out = String::with_capacity(8192);
        self.invocations.render(&mut out);
        self.request_duration.render(&mut out);
        self.cold_starts.render(&mut out);
        self.cold_start_wait.render(&mut out);
        self.instance_start.render(&mut out);
        self.instances.render(&mut out);
        self.start_failures.render(&mut out);
        self.wakes.render(&mut out);
        self.wakes_suppressed.render(&mut out);
        self.prewarms_wasted.render(&mut out);
        self.predicted_prewarms.render(&mut out);
        self.predicted_hits.render(&mut out);
        self.predicted_wasted.render(&mut out);
        self.wake_lead.render(&mut out);
        self.idle_instance_seconds.render(&mut out);
        self.affinity_syns.render(&mut out);
        self.pool_starts.render(&mut out);
        self.wake_to_start.render(&mut out);
        for (name, help, v) in [
            (
                "synwake_probe_events_total",
                "SYN events the probe delivered to userspace.",
                events,
            ),
            (
                "synwake_probe_lost_events_total",
                "SYN events lost because the ring buffer was full.",
                lost,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.invocations.inc(&["hello", "200"]);
        m.invocations.inc(&["hello", "200"]);
        m.cold_start_wait.observe(&["hello"], 0.003);
        let text = m.render();
        assert!(
            text.contains("synwake_function_invocations_total{function=\"hello\",code=\"200\"} 2")
        );
        assert!(text.contains(
            "synwake_cold_start_wait_seconds_bucket{function=\"hello\",le=\"0.0025\"} 0"
        ));
        assert!(text
            .contains("synwake_cold_start_wait_seconds_bucket{function=\"hello\",le=\"0.005\"} 1"));
        assert!(text.contains("synwake_cold_start_wait_seconds_count{function=\"hello\"} 1"));
        m.forget_function("hello");
        assert!(!m.render().contains("function=\"hello\""));
    }
}
