//! `synwake up`: wires config, state, runtimes, lifecycle, gateway and API together, and
//! shuts them down in order on SIGINT/SIGTERM.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::Api;
use crate::config::Config;
use crate::gateway::tls::{CertStore, TlsEdge};
use crate::gateway::{listeners, PortListeners, Proxy, Route};
use crate::lifecycle::Lifecycle;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::Runtime;
use crate::spec::{RuntimeKind, Source};
use crate::state::StateDir;

/// Runs until SIGINT/SIGTERM; returns once every instance has stopped.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Checked before anything is set up, so a bad value leaves nothing behind.
    let serving_threads = serving_threads(config.gateway.serving_threads)?;
    let state = StateDir::new(&config.gateway.state_dir)
        .with_context(|| "preparing gateway.state_dir (set it to a writable directory)")?;
    let swept = state.sweep_temp_files();
    if swept > 0 {
        tracing::warn!(
            "removed {swept} temp file(s) an interrupted write left in {}",
            state.root().display()
        );
    }
    let metrics = Arc::new(Metrics::new());
    let logs = Arc::new(LogStore::new());
    let fd_budget = match crate::fdlimit::raise_nofile() {
        Ok(limit) => {
            let budget = crate::fdlimit::ConnectionBudget::for_soft_limit(limit.soft);
            tracing::info!(
                "file descriptors: soft limit {} (hard {}); public listeners hold at most {} connections, the API {}",
                limit.soft,
                limit.hard,
                budget.public,
                budget.api
            );
            budget
        }
        Err(e) => {
            tracing::warn!("reading RLIMIT_NOFILE: {e}; connections are not capped by it");
            crate::fdlimit::ConnectionBudget::unlimited()
        }
    };

    let process = ProcessRuntime::new(state.run_dir())
        .map(|p| p.with_secrets(state.secrets()))
        .with_context(|| format!("creating {}", state.run_dir().display()))?;
    let killed = process.cleanup_orphans();
    if killed > 0 {
        tracing::warn!(
            "cleaned up {killed} instance(s) left by an earlier synwake that did not shut down"
        );
    }
    let mut runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(process)];
    let mut unavailable = HashMap::new();
    match crate::runtime::oci::setup(&config, &state, logs.clone()).await {
        Ok(Some(rt)) => runtimes.push(rt),
        Ok(None) => {
            unavailable.insert(
                RuntimeKind::Oci,
                "not set up (no function uses it)".to_string(),
            );
        }
        Err(e) => {
            tracing::warn!("oci runtime unavailable: {e:#}");
            unavailable.insert(RuntimeKind::Oci, format!("{e:#}"));
        }
    }
    let orchestration = if runtimes.len() > 1 { "oci" } else { "process" };
    let lifecycle = Lifecycle::new(runtimes, unavailable, metrics.clone(), logs);
    // A corrupt history only costs what was learned: warn and start over.
    match state.load_idle_history() {
        Ok(h) => lifecycle.restore_idle_histories(h),
        Err(e) => tracing::warn!("idle policy history not restored: {e}"),
    }

    // Config functions first; API-deployed ones from the state dir after, unless shadowed.
    let config_names: Vec<String> = config.functions.iter().map(|f| f.name.clone()).collect();
    for spec in config.functions.clone() {
        let name = spec.name.clone();
        lifecycle
            .restore(spec)
            .await
            .with_context(|| format!("function {name} from the config"))?;
    }
    for mut spec in state.load_functions()? {
        if config_names.contains(&spec.name) {
            tracing::warn!(
                "function {} from {} is shadowed by the config file",
                spec.name,
                state.functions_file().display()
            );
            continue;
        }
        spec.source = Source::Api;
        let name = spec.name.clone();
        if let Err(e) = lifecycle.restore(spec).await {
            tracing::error!(
                "function {name} from {}: {e}",
                state.functions_file().display()
            );
        }
    }

    let idle_saver = {
        let (lifecycle, state) = (lifecycle.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_HISTORY_SAVE_EVERY);
            loop {
                tick.tick().await;
                save_idle_history(&lifecycle, &state);
            }
        })
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The fd limit caps max_connections, so a flood leaves descriptors for the API
    // and instance starts.
    let mut limits = config.gateway.limits.clone();
    limits.max_connections = limits.max_connections.min(fd_budget.public);
    let mut conns = listeners::Connections::new(limits);
    if serving_threads > 0 {
        let serving = listeners::Serving::start(serving_threads)
            .context("starting the threads that serve client connections")?;
        tracing::info!("client connections are served on {serving_threads} thread(s)");
        conns = conns.served_on(serving);
    } else {
        tracing::info!("client connections are served on the daemon's multi-threaded runtime");
    }
    let proxy = Proxy::new(
        lifecycle.clone(),
        config.gateway.limits.upstream_idle_timeout,
    );
    if !config.certificates.is_empty() {
        let certs = CertStore::load(config.certificates.clone())
            .context("loading [[certificate]] (fix the file, or remove the table)")?;
        proxy.set_tls(TlsEdge::new(certs, config.gateway.tls_handshake_timeout));
    }
    let tls_listener = match config.gateway.tls_listen {
        Some(addr) => Some(
            listeners::bind(addr)
                .with_context(|| format!("listening on gateway.tls_listen {addr}"))?,
        ),
        None => None,
    };

    let shared = listeners::bind(config.gateway.listen)
        .with_context(|| format!("listening on gateway.listen {}", config.gateway.listen))?;
    let api_listener = listeners::bind(config.gateway.api_listen).with_context(|| {
        format!(
            "listening on gateway.api_listen {}",
            config.gateway.api_listen
        )
    })?;
    let auth = crate::api::auth::load_or_generate(
        config.gateway.api_password_file.as_deref(),
        state.root(),
    )?;
    if let Some(password) = &auth.generated {
        // Shown once, like OpenFaaS's generated basic-auth secret; root reads it from the file.
        eprintln!(
            "synwake: generated the management API password for user {} in {} (mode 0600; shown only now): {password}\n\
             synwake: root's `synwake` CLI reads it from there; faas-cli: `faas-cli login -u {} --password-stdin < {}`",
            crate::api::auth::USER,
            auth.path.display(),
            crate::api::auth::USER,
            auth.path.display(),
        );
    }
    // The probe watches, and functions' own ports listen, before the API answers /healthz.
    let probe = crate::probe::start(&config, lifecycle.clone(), metrics.clone());
    let mut ports = PortListeners::new(
        proxy.clone(),
        config.gateway.wake_on_accept,
        config.gateway.listen.ip(),
        shutdown_rx.clone(),
        conns.clone(),
    );
    ports.sync().await;
    let async_queue = crate::api::async_call::AsyncQueue::start(
        &state.async_dir(),
        proxy.clone(),
        config.async_calls.clone(),
        crate::api::callback::CallbackPolicy::new(
            config.gateway.callback_allow.clone(),
            config.gateway.listener_ports(),
            Some(lifecycle.clone()),
        ),
    )
    .with_context(|| format!("opening the async queue in {}", state.async_dir().display()))?;
    let api = Api::new(
        proxy.clone(),
        ports.synced(),
        state.clone(),
        config.defaults.clone(),
        config.gateway.listener_ports(),
        auth.credential,
        orchestration,
        async_queue,
    );
    tracing::info!(
        "synwake {} up: functions on {}, management API on {}, state in {}",
        env!("CARGO_PKG_VERSION"),
        config.gateway.listen,
        config.gateway.api_listen,
        state.root().display()
    );
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(listeners::serve_listener(
        shared,
        listeners::proxy_handler(proxy.clone(), Route::Shared),
        None,
        shutdown_rx.clone(),
        conns.clone(),
    )));
    let api_handler = listeners::Handler::new(move |req, conn| -> listeners::HandlerFuture {
        let api = api.clone();
        Box::pin(async move { api.handle(req, conn.peer).await })
    });
    tasks.push(tokio::spawn(listeners::serve_listener(
        api_listener,
        api_handler,
        None,
        shutdown_rx.clone(),
        conns.with_own_limit(config.gateway.limits.max_connections.min(fd_budget.api)),
    )));
    tasks.push(tokio::spawn(ports.run()));
    if let Some(edge) = proxy.tls().cloned() {
        if let Some(listener) = tls_listener {
            tracing::info!(
                "HTTPS on {} (tls_handshake_timeout {:?})",
                config.gateway.tls_listen.expect("bound"),
                edge.handshake_timeout
            );
            tasks.push(tokio::spawn(listeners::serve_transport(
                listener,
                listeners::Transport::Tls {
                    edge: edge.clone(),
                    proxy: proxy.clone(),
                    wake_by_sni: true,
                },
                listeners::proxy_handler(proxy.clone(), Route::Shared),
                None,
                shutdown_rx.clone(),
                conns.clone(),
            )));
        }
        tasks.push(tokio::spawn(edge.certs.clone().watch_files()));
        let certs = edge.certs.clone();
        let mut hup = signal(SignalKind::hangup())?;
        tasks.push(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let certs = certs.clone();
                let n = tokio::task::spawn_blocking(move || certs.reload(true))
                    .await
                    .unwrap_or(0);
                tracing::info!("SIGHUP: {n} certificate(s) reloaded");
            }
        }));
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        "{sig}: no new connections; draining in-flight requests (up to {:?})",
        config.gateway.drain_timeout
    );
    let _ = shutdown_tx.send(true);
    for t in &tasks {
        t.abort();
    }
    let drain_until = tokio::time::Instant::now() + config.gateway.drain_timeout;
    let left = conns.drain(config.gateway.drain_timeout).await;
    // Upgraded connections (WebSocket) left their HTTP connection behind: drained apart.
    let tunnels = proxy
        .drain_tunnels(drain_until.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left + tunnels > 0 {
        tracing::warn!(
            "{} connection(s) still open after drain_timeout; closing them",
            left + tunnels
        );
    }
    drop(probe);
    idle_saver.abort();
    save_idle_history(&lifecycle, &state);
    lifecycle.shutdown().await;
    tracing::info!("all instances stopped; bye");
    Ok(())
}

/// Threads serving client connections (0: served on the daemon's multi-threaded runtime,
/// as before these threads existed): `SYNWAKE_SERVING_THREADS` when set (it overrides the
/// config, for benchmarks), else `[gateway] serving_threads`, else one per CPU.
fn serving_threads(configured: Option<usize>) -> anyhow::Result<usize> {
    const VAR: &str = "SYNWAKE_SERVING_THREADS";
    let max = crate::config::MAX_SERVING_THREADS;
    match std::env::var(VAR) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n <= max => Ok(n),
            _ => {
                // Bounded: the variable could hold anything.
                let shown: String = v.chars().take(32).collect();
                anyhow::bail!("{VAR}={shown:?} is not a number of threads from 0 to {max}")
            }
        },
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{VAR} is not a number of threads from 0 to {max}")
        }
        Err(std::env::VarError::NotPresent) => {
            Ok(configured.unwrap_or_else(default_serving_threads))
        }
    }
}

/// One per CPU: with the upstream idle lists kept per runtime, two threads on 2 CPUs gave
/// the most requests/s (docs/benchmarks.md, helper h1rt).
fn default_serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How often the idle policy's history is written when it changed (and once at shutdown).
const IDLE_HISTORY_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn save_idle_history(lifecycle: &Lifecycle, state: &StateDir) {
    if let Some(h) = lifecycle.idle_histories_if_changed() {
        if let Err(e) = state.save_idle_history(&h) {
            tracing::warn!("saving the idle policy history: {e}");
        }
    }
}
