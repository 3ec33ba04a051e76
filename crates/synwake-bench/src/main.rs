//! Development entry point; in the product the same library runs as `synwake bench`.

use clap::{Parser, Subcommand};
use synwake_bench::BenchArgs;

#[derive(Parser)]
#[command(
    name = "synwake-bench",
    about = "Cold-start latency per wake mode under emulated RTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sweep (same flags as `synwake bench`).
    Run(Box<BenchArgs>),
    /// Build the namespaces and delay line, print `READY <prefix>`, hold until SIGINT.
    #[command(hide = true)]
    HoldTopology {
        #[arg(long, default_value_t = 10)]
        rtt: u64,
    },
    /// Remove namespaces left by harness processes that no longer exist.
    Cleanup,
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Run(args) => synwake_bench::run(*args),
        Cmd::HoldTopology { rtt } => synwake_bench::hold_topology(rtt),
        Cmd::Cleanup => {
            for ns in synwake_bench::netns::remove_stale_netns() {
                println!("removed {ns}");
            }
            Ok(())
        }
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        let interrupted = err.is::<synwake_bench::interrupt::Interrupted>();
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
