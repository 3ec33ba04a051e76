//! synwake-bench: measures what a cold start costs the client under each wake mode, with
//! network round-trip time emulated between a client and a server namespace.
//!
//! The CLI entry point is [`run`] with [`BenchArgs`] (`synwake bench ...`). The pieces:
//! [`netns::Topology`] (client/router/server namespaces), [`delay::DelayLine`] (NFQUEUE
//! delay in the router), [`daemon`] (synwake under test and its API), [`client`] (the timed
//! request), [`stats`] and [`report`] (percentiles, JSON, markdown, SVG).

pub mod client;
pub mod daemon;
pub mod delay;
pub mod interrupt;
pub mod netns;
pub mod replay;
pub mod report;
pub mod stats;
mod sweep;
pub mod tls;
pub mod trace;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sweep::{
    check_emulation, resolve_function, resolve_synwake, EmulationCheck, EmulationError,
};

/// How the function is woken (what is measured).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No probe; the gateway starts the function once the HTTP request is parsed (what
    /// OpenFaaS, Knative and KEDA do).
    Request,
    /// No probe; the function's own port wakes it when the connection is accepted.
    Accept,
    /// eBPF probe on the server's interface wakes it on the client's SYN.
    Syn,
    /// With `--tls`/`--tls12`: no probe; the shared HTTPS port wakes the function claiming
    /// the ClientHello's server name before it answers the handshake.
    Sni,
    /// The instance is already ready: the reference.
    Warm,
    /// eBPF probe, shared port: the client runs under the sockops tagger (what
    /// `synwake tag` attaches), so its SYN carries the function's id (`tcp_option`).
    Tagged,
    /// eBPF probe with `[probe] affinity_window`, shared port: the client called this
    /// function (and no other) just before, so its untagged SYN wakes it (`affinity`).
    Affinity,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Request => "request",
            Mode::Accept => "accept",
            Mode::Syn => "syn",
            Mode::Sni => "sni",
            Mode::Warm => "warm",
            Mode::Tagged => "tagged",
            Mode::Affinity => "affinity",
        })
    }
}

/// How instances run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    /// Local process (the synthetic `synwake-fn` with an exact init time).
    Process,
    /// OCI container via runc, created on demand.
    Oci,
    /// OCI container from a pool of created-but-not-started containers.
    OciPool,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Oci => "oci",
            RuntimeKind::OciPool => "oci-pool",
        })
    }
}

/// What the timed client speaks to the function's port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Protocol {
    /// Plain HTTP/1.1.
    #[default]
    #[serde(rename = "http")]
    Http,
    /// HTTPS, TLS 1.3, a full handshake per request (no resumption).
    #[serde(rename = "tls1.3")]
    Tls13,
    /// HTTPS, TLS 1.2, a full handshake per request (no resumption).
    #[serde(rename = "tls1.2")]
    Tls12,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tls13 => "tls1.3",
            Protocol::Tls12 => "tls1.2",
        })
    }
}

/// Flags of `synwake bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Emulated round-trip times in ms (half is added each way, SYN included).
    #[arg(long, value_delimiter = ',', default_value = "0,5,10,20,50,100")]
    pub rtt: Vec<u64>,
    /// Function init times in ms (the synthetic function sleeps this long, then listens).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,100,200")]
    pub init: Vec<u64>,
    /// Runtime the function runs on.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Process)]
    pub runtime: RuntimeKind,
    /// Wake modes to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "request,accept,syn,warm"
    )]
    pub modes: Vec<Mode>,
    /// Speak HTTPS with TLS 1.3 to the functions' own TLS ports (and the shared HTTPS port
    /// for `sni`), verifying a test CA the harness makes.
    #[arg(long, conflicts_with = "tls12")]
    pub tls: bool,
    /// As `--tls`, with TLS 1.2.
    #[arg(long)]
    pub tls12: bool,
    /// Requests per cell (mode x RTT x init).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Also write the JSON records here (always written to OUT/results.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory for results.md, results.json, the SVG plots, daemon configs and logs.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// synwake binary to run in the server namespace. Default: this executable if it is
    /// `synwake`, else `synwake` next to it.
    #[arg(long)]
    pub synwake_bin: Option<PathBuf>,
    /// Test function binary (process runtime). Default: `synwake-fn` next to the synwake binary.
    #[arg(long)]
    pub function_bin: Option<PathBuf>,
    /// OCI image tar for `--runtime oci|oci-pool`.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Connects timed per RTT when checking the emulation.
    #[arg(long, default_value_t = 7, hide = true)]
    pub check_connects: usize,
    /// Go on when the emulation check is outside tolerance, marking the report "NOT
    /// PUBLISHABLE" (for harness tests on a loaded machine; never for published figures).
    #[arg(long, hide = true)]
    pub allow_emulation_drift: bool,
}

impl BenchArgs {
    pub fn protocol(&self) -> Protocol {
        match (self.tls, self.tls12) {
            (_, true) => Protocol::Tls12,
            (true, false) => Protocol::Tls13,
            (false, false) => Protocol::Http,
        }
    }
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            rtt: vec![0, 5, 10, 20, 50, 100],
            init: vec![0, 25, 50, 100, 200],
            runtime: RuntimeKind::Process,
            modes: vec![Mode::Request, Mode::Accept, Mode::Syn, Mode::Warm],
            tls: false,
            tls12: false,
            runs: 20,
            json: None,
            out: PathBuf::from("bench-results"),
            synwake_bin: None,
            function_bin: None,
            image: None,
            check_connects: 7,
            allow_emulation_drift: false,
        }
    }
}

/// Runs the whole sweep and writes the results to `args.out` (and `args.json`).
///
/// Blocking; call it outside an async runtime (or from `spawn_blocking`). Installs SIGINT
/// and SIGTERM handlers; on a signal or any error, everything it created (namespaces,
/// iptables rules, the daemon and its instances) is removed before it returns.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    sweep::run(args)
}

/// Builds the topology with a delay line of `rtt_ms`, prints `READY <prefix>` on stdout and
/// holds it until SIGINT/SIGTERM, then cleans up. Used by the cleanup tests.
pub fn hold_topology(rtt_ms: u64) -> anyhow::Result<()> {
    interrupt::install();
    let topo = netns::Topology::create()?;
    let line = delay::DelayLine::start(
        &topo.router,
        &[netns::QUEUE_TO_SERVER, netns::QUEUE_TO_CLIENT],
        Duration::from_micros(rtt_ms * 500),
    )?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", topo.prefix)?;
        out.flush()?;
    }
    while !interrupt::interrupted() {
        interrupt::sleep(Duration::from_millis(100));
    }
    drop(line);
    drop(topo);
    Err(interrupt::Interrupted.into())
}
