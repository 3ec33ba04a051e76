//! `synwake bench trace`: simulate idle policies on a generated or recorded trace.

use std::path::PathBuf;
use std::time::Duration;

use synwake_bench::trace::{self, Shape, Trace};

use super::sim::{self, PolicySpec, Record, SimParams};

/// Flags of `synwake bench trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Generate a synthetic trace of this shape (the default when no --trace is given).
    #[arg(long, value_enum)]
    pub generate: Option<Shape>,
    /// Functions in the generated trace.
    #[arg(long, default_value_t = 100)]
    pub functions: usize,
    /// Hours the generated trace covers.
    #[arg(long, default_value_t = 24.0)]
    pub hours: f64,
    /// Seed of the generator: the same seed gives the same trace.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// CSV trace (header `timestamp,function,client`). Read from here without
    /// --generate; with --generate the generated trace is written here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Policies to compare: fixed-<duration>, adaptive, each optionally +affinity.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixed-60s,fixed-10m,adaptive,adaptive+affinity"
    )]
    pub policies: Vec<String>,
    /// Write the records as a JSON list here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replay the trace in real time against the daemon in the bench's namespaces (root),
    /// compressed into --replay-duration, and compare it with the simulation.
    #[arg(long)]
    pub replay: bool,
    /// Wall time the replay compresses the trace into.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub replay_duration: Duration,
    /// Init time of the replay's test function (ms).
    #[arg(long, default_value_t = 20)]
    pub replay_init_ms: u64,
    /// Replay: the synwake binary to run (default: this one).
    #[arg(long)]
    pub synwake_bin: Option<PathBuf>,
    /// Replay: the test function binary (default: synwake-fn next to synwake).
    #[arg(long)]
    pub function_bin: Option<PathBuf>,
    /// Replay: directory for the daemon's config, log and state.
    #[arg(long, default_value = "bench-results/replay")]
    pub out: PathBuf,
    /// Round trip between a client's SYN and its request (what an affinity wake hides).
    #[arg(long, default_value_t = 20.0)]
    pub rtt_ms: f64,
    /// Start time of every function in ms; default: 50 ms to 1 s per function, from its name.
    #[arg(long)]
    pub start_ms: Option<f64>,
    /// The adaptive policy's fallback keep-alive (idle_timeout).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How recently a client must have called its only function for an affinity wake.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub affinity_window: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceCmdError {
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    #[error(transparent)]
    Policy(#[from] sim::SimError),
    #[error("--{flag} {value} is out of range ({range})")]
    Range {
        flag: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("replay: {0}")]
    Replay(String),
}

impl TraceArgs {
    /// The trace the flags name.
    pub fn load_trace(&self) -> Result<Trace, TraceCmdError> {
        match (&self.generate, &self.trace) {
            (None, Some(path)) => Ok(trace::read_csv(path)?),
            (shape, out) => {
                let t = trace::generate(
                    shape.unwrap_or(Shape::Mixed),
                    self.functions,
                    self.hours,
                    self.seed,
                )?;
                if let Some(path) = out {
                    trace::write_csv(&t, path)?;
                }
                Ok(t)
            }
        }
    }

    pub fn params(&self) -> Result<SimParams, TraceCmdError> {
        if !(0.0..=10_000.0).contains(&self.rtt_ms) {
            return Err(TraceCmdError::Range {
                flag: "rtt-ms",
                value: self.rtt_ms.to_string(),
                range: "0 to 10000",
            });
        }
        if let Some(s) = self.start_ms {
            if !(0.0..=600_000.0).contains(&s) {
                return Err(TraceCmdError::Range {
                    flag: "start-ms",
                    value: s.to_string(),
                    range: "0 to 600000",
                });
            }
        }
        Ok(SimParams {
            rtt_ms: self.rtt_ms,
            start_ms: self.start_ms,
            idle_timeout: self.idle_timeout,
            affinity_window: self.affinity_window,
            ..SimParams::default()
        })
    }

    pub fn policy_specs(&self) -> Result<Vec<PolicySpec>, TraceCmdError> {
        Ok(self
            .policies
            .iter()
            .map(|p| PolicySpec::parse(p.trim()))
            .collect::<Result<_, _>>()?)
    }
}

/// Runs the simulation for every policy and prints a table; writes `--json`.
pub fn simulate(args: &TraceArgs) -> Result<Vec<Record>, TraceCmdError> {
    let policies = args.policy_specs()?;
    let params = args.params()?;
    let trace = args.load_trace()?;
    let records: Vec<Record> = policies
        .iter()
        .map(|p| sim::simulate(&trace, p, &params))
        .collect();
    write_json(args, &records)?;
    Ok(records)
}

pub fn write_json(args: &TraceArgs, records: &[Record]) -> Result<(), TraceCmdError> {
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(records).expect("records serialize");
        std::fs::write(path, text + "\n").map_err(|source| TraceCmdError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// `--replay`: runs it, prints the comparison table, writes `--json`.
pub fn replay(args: &TraceArgs) -> anyhow::Result<Vec<super::replay::ReplayRecord>> {
    if !(0..=60_000).contains(&args.replay_init_ms) {
        return Err(TraceCmdError::Range {
            flag: "replay-init-ms",
            value: args.replay_init_ms.to_string(),
            range: "0 to 60000",
        }
        .into());
    }
    let records = super::replay::run(args)?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&records).expect("records serialize");
        std::fs::write(path, text + "\n").map_err(|source| TraceCmdError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(records)
}

/// The table printed by `synwake bench trace`.
pub fn table(records: &[Record]) -> String {
    sim::table(records)
}
