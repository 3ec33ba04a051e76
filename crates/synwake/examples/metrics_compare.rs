//! The request path's metric updates, measured: what `Proxy::invoke` does per request (one
//! invocation counter increment plus one duration observation through synwake's
//! `metrics::Metrics`, label sets built from the lease's shared `FunctionName`), next to the
//! bare prometheus-client families with an `Arc<String>` name: the floor the wrapper could
//! reach. Prints ns per request for 1 and 2 threads.
//!
//!   cargo run --release -p synwake --example metrics_compare
//!
//! Before the migration this compared the hand-written registry (a Mutex per family) with
//! prometheus-client: 179-240 vs 115-122 ns at 1 thread (docs/benchmarks.md).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use synwake::metrics::{ByCode, ByFunction, FunctionName, Metrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    function: Arc<String>,
    code: u16,
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
    let ours = Metrics::new();
    let inv: Family<Code, Counter> = Family::default();
    let dur: Family<Function, Histogram> =
        Family::new_with_constructor(|| Histogram::new(BUCKETS.iter().copied()));
    let names: Vec<Arc<String>> = (0..8).map(|i| Arc::new(format!("fn-{i}"))).collect();
    // What a lease carries (built once per deployed function).
    let shared: Vec<FunctionName> = names.iter().map(|n| n.as_str().into()).collect();
    for threads in [1, 2] {
        let a = run(threads, |i| {
            let f = &shared[(i & 7) as usize];
            ours.invocations.inc(&ByCode::new(f, 200));
            ours.request_duration
                .observe(&ByFunction::new(f), 0.0001 * (i & 63) as f64);
        });
        let b = run(threads, |i| {
            let f = names[(i & 7) as usize].clone();
            inv.get_or_create(&Code {
                function: f.clone(),
                code: 200,
            })
            .inc();
            dur.get_or_create(&Function { function: f })
                .observe(0.0001 * (i & 63) as f64);
        });
        println!(
            "{threads} thread(s): synwake metrics {a:.0} ns/request, bare prometheus-client {b:.0} ns/request"
        );
    }
}
