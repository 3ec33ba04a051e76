//! The `synwake` binary: a thin CLI over the library.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use synwake::cli::ApiClient;

#[derive(Parser)]
#[command(
    name = "synwake",
    version,
    about = "Scale-to-zero functions that wake on the client's TCP SYN"
)]
struct Cli {
    /// Management API URL for the client commands.
    #[arg(
        long,
        global = true,
        env = "SYNWAKE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    gateway: String,
    /// Password of the API's user admin. Without it the client commands read the
    /// password file of the state dir (--state-dir, else the config's), as root can.
    #[arg(long, global = true, env = "SYNWAKE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// The daemon's state dir, where its generated API password is (`api-password`).
    #[arg(long, global = true, env = "SYNWAKE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Config file: `up` runs on it (default ./synwake.toml), `doctor` tries its probe
    /// interfaces, `tag` runs as a daemon on it, client commands take the API password
    /// location from it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform.
    Up,
    /// List deployed functions.
    List,
    /// Show one function: replicas, invocations and its idle policy's current pre-warm and
    /// keep-alive windows and why.
    Describe { name: String },
    /// Deploy or update a function (PUT, then POST if it is new).
    Deploy {
        /// Function name.
        #[arg(long)]
        name: String,
        /// Command line (process runtime), e.g. "python3 app.py".
        #[arg(long)]
        command: Option<String>,
        /// Image archive path readable by the synwake host (oci runtime).
        #[arg(long)]
        image: Option<String>,
        /// A port of its own.
        #[arg(long)]
        port: Option<u16>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// com.synwake.* or other annotations as KEY=VALUE, repeatable.
        #[arg(long = "annotation")]
        annotations: Vec<String>,
        /// Memory limit (oci), e.g. 128Mi.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit (oci), e.g. 0.5.
        #[arg(long)]
        cpus: Option<String>,
    },
    /// Remove a function.
    Remove { name: String },
    /// Set the number of running instances (0 stops them all).
    Scale { name: String, replicas: u32 },
    /// Call a function; with --data (or --data - for stdin) it is a POST.
    Invoke {
        name: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        data: Option<String>,
        /// Print status, time and whether it was a cold start to stderr.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Print a function's recent output.
    Logs {
        name: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
    },
    /// The oci runtime's image store: what it holds and its disk use (`images list`), or
    /// remove every image, layer and blob no function and no container uses (`images prune`).
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// What this machine supports and what `up` would enable. Attach modes are tried on
    /// the config's `[probe] interfaces` when --config is given (attaching for real, then
    /// detaching), else on every interface that is up.
    Doctor,
    /// Measure cold-start latency per wake mode under emulated network latency (root);
    /// `bench trace` compares idle policies on an invocation trace (no root).
    Bench(Box<BenchCli>),
    /// Put a function's id into the SYNs sent to the given destinations (trigger
    /// `tcp_option`): `synwake tag --function NAME --dest ADDR:PORT -- COMMAND ARGS...`
    /// runs COMMAND in a fresh cgroup v2 and exits with its status; `synwake tag --config
    /// FILE` tags a cgroup until SIGINT/SIGTERM (root).
    Tag {
        /// The function the SYNs name.
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        function: Option<String>,
        /// ADDR:PORT, ADDR/PREFIX:PORT, [V6]:PORT or [V6/PREFIX]:PORT; repeatable.
        #[arg(long = "dest", value_name = "ADDR:PORT", conflicts_with = "config")]
        dest: Vec<synwake_ebpf::TagDestination>,
        /// The command to run tagged (after `--`).
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Stored images, the functions using each, and the store's disk use.
    List,
    /// Remove what no deployed function and no container uses.
    Prune,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCli {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    args: synwake_bench::BenchArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Simulate idle policies (fixed, adaptive, +affinity) on a generated or CSV trace;
    /// with --replay, replay it in real time against the daemon (root).
    Trace(synwake::policy::bench::TraceArgs),
}

fn run_bench(bench: BenchCli) -> anyhow::Result<()> {
    match bench.command {
        None => synwake_bench::run(bench.args),
        Some(BenchCommand::Trace(args)) => {
            if args.replay {
                let records = synwake::policy::bench::replay(&args)?;
                print!("{}", synwake::policy::replay::table(&records));
                return Ok(());
            }
            let records = synwake::policy::bench::simulate(&args)?;
            print!("{}", synwake::policy::bench::table(&records));
            Ok(())
        }
    }
}

fn kv(items: &[String], what: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{what} {s:?} is not KEY=VALUE"))?;
            Ok((k.to_string(), serde_json::Value::String(v.to_string())))
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    // The benchmark drives its own threads and namespaces; it needs no async runtime here.
    if matches!(cli.command, Command::Bench(_)) {
        let Command::Bench(bench) = std::mem::replace(&mut cli.command, Command::List) else {
            unreachable!()
        };
        return match run_bench(*bench) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("synwake bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // The tagger waits for its command and for signals on this, the only thread.
    // `--config` (global) is the tag daemon's config: destinations -> function names and
    // the cgroup to tag (see the README).
    if let Command::Tag {
        function,
        dest,
        command,
    } = &cli.command
    {
        return run_tag(function.as_deref(), dest, cli.config.as_deref(), command);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("SYNWAKE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("synwake: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synwake: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_tag(
    function: Option<&str>,
    dest: &[synwake_ebpf::TagDestination],
    config: Option<&std::path::Path>,
    command: &[std::ffi::OsString],
) -> std::process::ExitCode {
    use synwake::tag;
    let result = match (config, function) {
        (Some(path), _) => {
            if !command.is_empty() {
                eprintln!("synwake tag: --config runs as a daemon; it takes no COMMAND");
                return std::process::ExitCode::from(2);
            }
            tag::TagConfig::load(path)
                .and_then(|config| tag::run_daemon(&config))
                .map(|()| 0)
        }
        (None, Some(function)) => tag::run_command(function, dest, command),
        (None, None) => unreachable!("clap requires --function or --config"),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("synwake tag: {}", synwake::error_chain(&e));
            std::process::ExitCode::from(125)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client_commands = !matches!(cli.command, Command::Up | Command::Doctor);
    let client = if client_commands {
        let found = synwake::cli::find_password(
            cli.password.clone(),
            cli.state_dir.as_deref(),
            cli.config.as_deref(),
        );
        ApiClient::new(&cli.gateway, found)
    } else {
        ApiClient::new(&cli.gateway, synwake::cli::FoundPassword::none())
    };
    match cli.command {
        Command::Up => {
            let config = cli.config.unwrap_or_else(|| PathBuf::from("synwake.toml"));
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("SYNWAKE_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let config = synwake::config::Config::load(&config)?;
            synwake::daemon::run(config).await
        }
        Command::List => client.list().await,
        Command::Describe { name } => client.describe(&name).await,
        Command::Deploy {
            name,
            command,
            image,
            port,
            env,
            annotations,
            memory,
            cpus,
        } => {
            let mut ann = kv(&annotations, "annotation")?;
            if let Some(p) = port {
                ann.insert("com.synwake.port".into(), p.to_string().into());
            }
            let mut d = serde_json::json!({
                "service": name,
                "envProcess": command,
                "image": image,
                "envVars": kv(&env, "env")?,
                "annotations": ann,
            });
            if memory.is_some() || cpus.is_some() {
                d["limits"] = serde_json::json!({ "memory": memory, "cpu": cpus });
            }
            println!("{}", client.deploy(&d).await?);
            Ok(())
        }
        Command::Remove { name } => {
            println!("{}", client.remove(&name).await?);
            Ok(())
        }
        Command::Scale { name, replicas } => {
            println!("{}", client.scale(&name, replicas).await?);
            Ok(())
        }
        Command::Invoke {
            name,
            path,
            data,
            verbose,
        } => {
            let body = match data.as_deref() {
                None => None,
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("reading stdin")?;
                    Some(b)
                }
                Some(s) => Some(s.as_bytes().to_vec()),
            };
            client.invoke(&name, &path, body, verbose).await
        }
        Command::Logs { name, follow, tail } => client.logs(&name, follow, tail).await,
        Command::Images { command } => match command {
            ImagesCommand::List => client.images_list().await,
            ImagesCommand::Prune => client.images_prune().await,
        },
        Command::Doctor => {
            let interfaces = match cli.config {
                Some(path) => synwake::config::Config::load(&path)?.probe.interfaces,
                None => None,
            };
            print!("{}", synwake::doctor::report(interfaces.as_deref()));
            Ok(())
        }
        Command::Bench(_) | Command::Tag { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}
