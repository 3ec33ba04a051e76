//! The request path's metric updates, measured: synwake's own registry (a Mutex per family,
//! label values hashed in place) against prometheus-client (families behind a read lock,
//! atomics per series), one counter increment plus one histogram observation per request,
//! as `Proxy::handle` does. Prints ns per request for 1 and 2 threads.
//!
//!   cargo run --release -p synwake --example metrics_compare

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    function: Arc<String>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Function {
    function: Arc<String>,
}

const N: u64 = 2_000_000;
/// The same buckets as synwake's latency histograms.
const BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

fn run(threads: usize, f: impl Fn(u64) + Sync) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| (0..N).for_each(&f));
        }
    });
    t0.elapsed().as_nanos() as f64 / N as f64
}

fn main() {
    let ours = synwake::metrics::Metrics::new();
    let inv: Family<Code, Counter> = Family::default();
    let dur: Family<Function, Histogram> =
        Family::new_with_constructor(|| Histogram::new(BUCKETS.iter().copied()));
    let names: Vec<Arc<String>> = (0..8).map(|i| Arc::new(format!("fn-{i}"))).collect();
    for threads in [1, 2] {
        let a = run(threads, |i| {
            let f = names[(i & 7) as usize].as_str();
            ours.invocations.inc(&[f, "200"]);
            ours.request_duration
                .observe(&[f], 0.0001 * (i & 63) as f64);
        });
        let b = run(threads, |i| {
            let f = names[(i & 7) as usize].clone();
            inv.get_or_create(&Code {
                function: f.clone(),
                code: "200",
            })
            .inc();
            dur.get_or_create(&Function { function: f })
                .observe(0.0001 * (i & 63) as f64);
        });
        println!(
            "{threads} thread(s): synwake registry {a:.0} ns/request, prometheus-client {b:.0} ns/request"
        );
    }
}
