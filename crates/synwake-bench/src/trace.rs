//! Invocation traces for `synwake bench trace`: the CSV format (`timestamp,function,client`)
//! and a seeded generator of the call patterns production traces show (Shahrad et al.,
//! USENIX ATC 2020: most functions are called less than once an hour, a few dominate;
//! timers with jitter, Poisson arrivals, on/off bursts, office hours).

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::path::Path;

/// Largest trace read from a file (invocations), so a bad file cannot exhaust memory.
pub const MAX_INVOCATIONS: usize = 20_000_000;
/// Longest function name or client address accepted in a trace.
const MAX_FIELD: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write trace {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
    #[error("generator: {0}")]
    Generate(String),
}

/// One call: `t` seconds from the trace start.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub t: f64,
    /// Index into [`Trace::functions`].
    pub function: usize,
    /// Index into [`Trace::clients`], when the trace names one.
    pub client: Option<usize>,
}

/// A trace sorted by time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub functions: Vec<String>,
    pub clients: Vec<String>,
    pub invocations: Vec<Invocation>,
    /// Length of the observed period in seconds (at least the last timestamp).
    pub duration: f64,
}

/// The call patterns the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// A population like the paper's: mostly rare, some timers, bursts and office hours,
    /// a few hot functions.
    Mixed,
    /// Timers (1 min to 2 h) with a little jitter.
    Periodic,
    /// Poisson arrivals, rates log-uniform from one a day to one every few seconds.
    Poisson,
    /// Quiet periods broken by short bursts of calls.
    Bursty,
    /// Poisson arrivals whose rate follows the time of day.
    Diurnal,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Shape::Mixed => "mixed",
            Shape::Periodic => "periodic",
            Shape::Poisson => "poisson",
            Shape::Bursty => "bursty",
            Shape::Diurnal => "diurnal",
        })
    }
}

/// SplitMix64: tiny, and its output for a seed never changes with a dependency update, so
/// a published trace can always be regenerated from its seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp()
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// Clients shared by many functions (a frontend calling several), so affinity has to tell.
const SHARED_CLIENTS: usize = 5;

/// Generates `functions` functions over `hours` hours. Same arguments, same trace.
pub fn generate(
    shape: Shape,
    functions: usize,
    hours: f64,
    seed: u64,
) -> Result<Trace, TraceError> {
    if functions == 0 || functions > 100_000 {
        return Err(TraceError::Generate(format!(
            "--functions {functions} must be 1 to 100000"
        )));
    }
    if !(hours > 0.0 && hours <= 24.0 * 31.0) {
        return Err(TraceError::Generate(format!(
            "--hours {hours} must be above 0 and at most 744 (31 days)"
        )));
    }
    let duration = hours * 3600.0;
    let mut rng = Rng(seed);
    let mut trace = Trace {
        duration,
        ..Trace::default()
    };
    for c in 0..SHARED_CLIENTS {
        trace.clients.push(format!("10.7.0.{}", c + 1));
    }
    let mut calls: Vec<(f64, usize, usize)> = Vec::new();
    for f in 0..functions {
        let kind = match shape {
            Shape::Mixed => {
                let r = rng.unit();
                if r < 0.05 {
                    Kind::Hot
                } else if r < 0.45 {
                    Kind::Rare
                } else if r < 0.70 {
                    Kind::Periodic
                } else if r < 0.85 {
                    Kind::Bursty
                } else {
                    Kind::Diurnal
                }
            }
            Shape::Periodic => Kind::Periodic,
            Shape::Poisson => Kind::Poisson,
            Shape::Bursty => Kind::Bursty,
            Shape::Diurnal => Kind::Diurnal,
        };
        trace.functions.push(format!("{}-{f}", kind.prefix()));
        // Each function has a few clients of its own; timers have exactly one.
        let own = if kind == Kind::Periodic {
            1
        } else {
            1 + rng.below(3)
        };
        let first = trace.clients.len();
        for c in 0..own {
            let n = first + c;
            trace
                .clients
                .push(format!("10.7.{}.{}", 1 + n / 250, 1 + n % 250));
        }
        let shared_share = if kind == Kind::Periodic { 0.0 } else { 0.1 };
        let mut push = |rng: &mut Rng, t: f64| {
            if t >= 0.0 && t < duration {
                let client = if rng.unit() < shared_share {
                    rng.below(SHARED_CLIENTS)
                } else {
                    first + rng.below(own)
                };
                calls.push((t, f, client));
            }
        };
        match kind {
            Kind::Periodic => {
                const PERIODS: [f64; 7] = [60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0];
                let period = PERIODS[rng.below(PERIODS.len())];
                let jitter = 0.01 * period + 1.0;
                let mut t = rng.range(0.0, period);
                while t < duration {
                    let at = t + rng.range(-jitter, jitter);
                    push(&mut rng, at);
                    t += period;
                }
            }
            Kind::Poisson | Kind::Rare | Kind::Hot => {
                let mean = match kind {
                    Kind::Hot => rng.log_uniform(1.0, 10.0),
                    Kind::Rare => rng.log_uniform(3600.0, 86_400.0),
                    _ => rng.log_uniform(5.0, 86_400.0),
                };
                let mut t = rng.exp(mean);
                while t < duration {
                    push(&mut rng, t);
                    t += rng.exp(mean);
                }
            }
            Kind::Bursty => {
                let quiet = rng.log_uniform(1200.0, 4.0 * 3600.0);
                let burst = rng.range(60.0, 300.0);
                let gap = rng.log_uniform(0.5, 20.0);
                let mut t = rng.exp(quiet);
                while t < duration {
                    let end = t + rng.exp(burst);
                    while t < end.min(duration) {
                        push(&mut rng, t);
                        t += rng.exp(gap);
                    }
                    t = end + rng.exp(quiet);
                }
            }
            Kind::Diurnal => {
                // Thinning: candidates at the peak rate, kept with the rate of their hour.
                let peak = rng.log_uniform(30.0, 1800.0);
                let phase = rng.range(0.0, 86_400.0);
                let mut t = rng.exp(peak);
                while t < duration {
                    let day = ((t + phase) / 86_400.0 * std::f64::consts::TAU).sin();
                    let rate = 0.5 * (1.0 + day).powi(2) / 2.0; // 0..1, busy half the day
                    if rng.unit() < rate {
                        push(&mut rng, t);
                    }
                    t += rng.exp(peak);
                }
            }
        }
    }
    calls.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    trace.invocations = calls
        .into_iter()
        .map(|(t, function, client)| Invocation {
            // Millisecond resolution, so the CSV round-trips exactly.
            t: (t * 1000.0).round() / 1000.0,
            function,
            client: Some(client),
        })
        .collect();
    Ok(trace)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hot,
    Rare,
    Periodic,
    Poisson,
    Bursty,
    Diurnal,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Hot => "hot",
            Kind::Rare => "rare",
            Kind::Periodic => "timer",
            Kind::Poisson => "poisson",
            Kind::Bursty => "bursty",
            Kind::Diurnal => "diurnal",
        }
    }
}

/// Reads a CSV trace with the header `timestamp,function,client` (client may be empty).
pub fn read_csv(path: &Path) -> Result<Trace, TraceError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TraceError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_csv(std::io::BufReader::new(file), &shown)
}

/// Parses CSV trace text; `path` names it in errors (which never echo field contents
/// beyond their length).
pub fn parse_csv(reader: impl BufRead, path: &str) -> Result<Trace, TraceError> {
    let invalid = |line: usize, message: String| TraceError::Invalid {
        path: path.to_string(),
        line,
        message,
    };
    let mut trace = Trace::default();
    let mut fn_index: HashMap<String, usize> = HashMap::new();
    let mut client_index: HashMap<String, usize> = HashMap::new();
    let mut header_seen = false;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|source| TraceError::Read {
            path: path.to_string(),
            source,
        })?;
        let line = line.trim_end_matches('\r');
        if !header_seen {
            if line.trim() != "timestamp,function,client" {
                return Err(invalid(
                    n,
                    "the first line must be the header timestamp,function,client".into(),
                ));
            }
            header_seen = true;
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split(',');
        let (Some(ts), Some(name), client, None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(invalid(n, "expected 2 or 3 comma-separated fields".into()));
        };
        let t: f64 = ts
            .trim()
            .parse()
            .ok()
            .filter(|t: &f64| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| {
                invalid(
                    n,
                    "timestamp must be a non-negative decimal number of seconds".into(),
                )
            })?;
        if let Some(prev) = trace.invocations.last() {
            if t < prev.t {
                return Err(invalid(
                    n,
                    format!("timestamp {t} is earlier than the line before ({})", prev.t),
                ));
            }
        }
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_FIELD {
            return Err(invalid(
                n,
                format!("function name must be 1 to {MAX_FIELD} characters"),
            ));
        }
        let client = client.map(str::trim).filter(|c| !c.is_empty());
        if client.is_some_and(|c| c.len() > MAX_FIELD) {
            return Err(invalid(
                n,
                format!("client must be at most {MAX_FIELD} characters"),
            ));
        }
        if trace.invocations.len() == MAX_INVOCATIONS {
            return Err(invalid(
                n,
                format!("more than {MAX_INVOCATIONS} invocations"),
            ));
        }
        let function = *fn_index.entry(name.to_string()).or_insert_with(|| {
            trace.functions.push(name.to_string());
            trace.functions.len() - 1
        });
        let client = client.map(|c| {
            *client_index.entry(c.to_string()).or_insert_with(|| {
                trace.clients.push(c.to_string());
                trace.clients.len() - 1
            })
        });
        trace.invocations.push(Invocation {
            t,
            function,
            client,
        });
        trace.duration = t;
    }
    if !header_seen {
        return Err(invalid(
            1,
            "empty file: expected the header timestamp,function,client".into(),
        ));
    }
    Ok(trace)
}

/// Writes `trace` as CSV.
pub fn write_csv(trace: &Trace, path: &Path) -> Result<(), TraceError> {
    let err = |source| TraceError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    writeln!(out, "timestamp,function,client").map_err(err)?;
    for inv in &trace.invocations {
        let client = inv.client.map(|c| trace.clients[c].as_str()).unwrap_or("");
        writeln!(
            out,
            "{:.3},{},{}",
            inv.t, trace.functions[inv.function], client
        )
        .map_err(err)?;
    }
    out.flush().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_reproducible_and_seed_dependent() {
        let a = generate(Shape::Mixed, 20, 6.0, 7).unwrap();
        let b = generate(Shape::Mixed, 20, 6.0, 7).unwrap();
        let c = generate(Shape::Mixed, 20, 6.0, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.invocations, c.invocations);
        assert!(a.invocations.windows(2).all(|w| w[0].t <= w[1].t));
        assert!(a
            .invocations
            .iter()
            .all(|i| i.t >= 0.0 && i.t < 6.0 * 3600.0));
    }

    #[test]
    fn periodic_functions_have_their_period() {
        let t = generate(Shape::Periodic, 10, 24.0, 1).unwrap();
        for f in 0..10 {
            let times: Vec<f64> = t
                .invocations
                .iter()
                .filter(|i| i.function == f)
                .map(|i| i.t)
                .collect();
            assert!(times.len() >= 11, "function {f}: {} calls", times.len());
            let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            // Jitter is 1% + 1 s each way.
            assert!(
                gaps.iter().all(|g| (g - mean).abs() <= 0.021 * mean + 2.5),
                "{f}: {gaps:?}"
            );
        }
    }

    #[test]
    fn mixed_population_is_heavy_tailed() {
        let t = generate(Shape::Mixed, 200, 24.0, 42).unwrap();
        let mut per_fn = vec![0usize; 200];
        for i in &t.invocations {
            per_fn[i.function] += 1;
        }
        let rare = per_fn.iter().filter(|n| **n < 24).count();
        per_fn.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = per_fn[..10].iter().sum();
        assert!(
            rare >= 60,
            "functions called less than once an hour: {rare}"
        );
        assert!(
            top * 2 > t.invocations.len(),
            "top 5% make most calls: {top} of {}",
            t.invocations.len()
        );
    }

    #[test]
    fn csv_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        let t = generate(Shape::Bursty, 5, 2.0, 3).unwrap();
        write_csv(&t, &p).unwrap();
        let back = read_csv(&p).unwrap();
        assert_eq!(back.invocations.len(), t.invocations.len());
        for (a, b) in back.invocations.iter().zip(&t.invocations) {
            assert_eq!(a.t, b.t);
            assert_eq!(back.functions[a.function], t.functions[b.function]);
        }
        let bad = |text: &str| parse_csv(text.as_bytes(), "x.csv").unwrap_err().to_string();
        assert!(bad("time,fn\n").contains("x.csv:1: the first line must be the header"));
        assert!(bad("timestamp,function,client\n1.0,a,\nzz,a,\n").contains("x.csv:3: timestamp"));
        assert!(bad("timestamp,function,client\n2,a,\n1,a,\n").contains("x.csv:3"));
        assert!(bad("timestamp,function,client\n1,,\n").contains("function name"));
        assert!(bad("timestamp,function,client\n1,a,b,c\n").contains("fields"));
        let ok = parse_csv(
            "timestamp,function,client\n0.5,a,\n1.25,b,10.0.0.1\n".as_bytes(),
            "x",
        )
        .unwrap();
        assert_eq!(ok.invocations[0].client, None);
        assert_eq!(ok.clients, vec!["10.0.0.1".to_string()]);
        assert_eq!(ok.duration, 1.25);
    }
}
