//! One state machine per function: cold -> starting -> ready -> stopping -> cold.
//!
//! Everything that wants an instance goes through here: packets and accepted connections
//! call [`Lifecycle::wake`], requests call [`Lifecycle::acquire`]. A start is single flight:
//! every wake and request during a start shares it. Idle instances stop after
//! `idle_timeout`; a packet-woken instance that no request used within `prewarm_ttl` stops
//! and counts as wasted.

mod idle;
mod limiter;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::logs::{LogStore, OutputSink};
use crate::metrics::{ByFunction, ByOutcome, ByRuntime, ByTrigger, FunctionName, Metrics};
use crate::policy::affinity::Affinity;
use crate::policy::{IdleHistory, IdlePolicyKind};
use crate::runtime::{self, Instance, Runtime, StartError};
use crate::spec::{FunctionSpec, RuntimeKind};
use idle::IdleState;

/// Handles the probe events that are buffered but not read yet (see
/// [`Lifecycle::set_probe`]).
pub type BufferedWakes = Box<dyn Fn(&Lifecycle) + Send + Sync>;
pub use idle::IdleView;
pub use limiter::TokenBucket;

/// What caused a wake or a start (design.md, "Wake triggers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    Syn,
    TcpOption,
    Sni,
    Accept,
    Request,
    Api,
    /// The adaptive idle policy's pre-warm point (no packet yet).
    Predicted,
    /// A SYN to a shared port from a client whose only recent function this is.
    Affinity,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Syn => "syn",
            Trigger::TcpOption => "tcp_option",
            Trigger::Sni => "sni",
            Trigger::Accept => "accept",
            Trigger::Request => "request",
            Trigger::Api => "api",
            Trigger::Predicted => "predicted",
            Trigger::Affinity => "affinity",
        }
    }

    /// Wakes from packets are rate limited and may be wasted (no request follows).
    pub fn is_speculative(self) -> bool {
        matches!(
            self,
            Trigger::Syn | Trigger::TcpOption | Trigger::Sni | Trigger::Accept | Trigger::Affinity
        )
    }
}

/// What a wake did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    Started,
    AlreadyUp,
    Suppressed,
    UnknownFunction,
    AtCapacity,
}

/// Why a request could not get an instance. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("function {function} not found")]
    UnknownFunction { function: String },
    #[error("{0}")]
    StartFailed(StartError),
    #[error("function {function}: {pending} requests already wait for its start (max_pending)")]
    Overloaded { function: String, pending: usize },
    #[error("function {function} was removed while the request waited")]
    Removed { function: String },
    #[error("function {function}: synwake is shutting down")]
    ShuttingDown { function: String },
    /// Every instance is at max_concurrency and max_instances are running: the request
    /// waited for a free instance, not for a start.
    #[error("function {function}: no instance free within {waited:?} (all {instances} at max_concurrency, max_instances reached)")]
    Saturated {
        function: String,
        instances: usize,
        waited: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("function {function} not found")]
    UnknownFunction { function: String },
    #[error("function {function}: replicas {replicas} exceeds max_instances {max}")]
    TooMany {
        function: String,
        replicas: u32,
        max: u32,
    },
    #[error("function {function}: synwake is shutting down")]
    ShuttingDown { function: String },
}

/// Counts and state of one function, for the API.
#[derive(Debug, Clone)]
pub struct FunctionStatus {
    pub spec: Arc<FunctionSpec>,
    /// Starting or ready.
    pub replicas: usize,
    pub available: usize,
    pub invocations: u64,
    /// When the function was first deployed (kept across updates).
    pub created_at: std::time::SystemTime,
    /// The idle policy's current windows and why.
    pub idle: IdleView,
}

enum Phase {
    Starting,
    Ready(Arc<dyn Instance>),
    Stopping,
}

struct Slot {
    id: u64,
    phase: Phase,
    inflight: usize,
    last_used: Instant,
    trigger: Trigger,
    /// When the wake that started it happened (packet arrival for probe wakes).
    woke_at: Instant,
    ready_at: Option<Instant>,
    served: u64,
    /// Since when a request has been in flight (None while idle).
    busy_since: Option<Instant>,
    /// Time with a request in flight, over finished busy periods.
    busy: Duration,
}

impl Slot {
    fn ready(&self) -> Option<&Arc<dyn Instance>> {
        match &self.phase {
            Phase::Ready(i) => Some(i),
            _ => None,
        }
    }

    fn lease_taken(&mut self, now: Instant) {
        if self.inflight == 0 {
            self.busy_since = Some(now);
        }
        self.inflight += 1;
        self.last_used = now;
    }

    fn lease_dropped(&mut self, now: Instant) {
        self.inflight -= 1;
        self.last_used = now;
        if self.inflight == 0 {
            if let Some(b) = self.busy_since.take() {
                self.busy += now.saturating_duration_since(b);
            }
        }
    }

    /// Seconds it was ready with nothing in flight, up to `now`.
    fn idle_seconds(&self, now: Instant) -> f64 {
        let Some(ready_at) = self.ready_at else {
            return 0.0;
        };
        let busy = self.busy + self.busy_since.map_or(Duration::ZERO, |b| now - b);
        now.saturating_duration_since(ready_at)
            .saturating_sub(busy)
            .as_secs_f64()
    }
}

#[derive(Default)]
struct FnState {
    slots: Vec<Slot>,
    pending: usize,
    fail_epoch: u64,
    last_failure: Option<StartError>,
    removed: bool,
}

impl FnState {
    fn count(&self, f: impl Fn(&Phase) -> bool) -> usize {
        self.slots.iter().filter(|s| f(&s.phase)).count()
    }
    fn live(&self) -> usize {
        self.count(|p| !matches!(p, Phase::Stopping))
    }
}

/// A deployed function and its instances.
pub struct Function {
    spec: Arc<FunctionSpec>,
    /// The name as a metric label, shared so the request path's series lookups allocate nothing.
    metric_name: FunctionName,
    state: Mutex<FnState>,
    changed: watch::Sender<u64>,
    limiter: Mutex<TokenBucket>,
    /// Requests served, over every version of the function (an update carries it on).
    invocations: AtomicU64,
    /// First deploy of this name (an update carries it on).
    created_at: std::time::SystemTime,
    /// Whether it had a starting or ready instance at the last change.
    was_live: AtomicBool,
    idle: Mutex<IdleState>,
    /// Spawn -> ready of the last successful start in us (0: none yet): where the
    /// readiness probe steps finely.
    last_ready_us: AtomicU64,
}

impl Function {
    fn new(
        spec: FunctionSpec,
        history: Option<IdleHistory>,
        created_at: std::time::SystemTime,
    ) -> Arc<Self> {
        let rate = spec.policy.max_wakes_per_second;
        Arc::new(Function {
            idle: Mutex::new(IdleState::new(&spec.policy, history)),
            metric_name: FunctionName::from(spec.name.as_str()),
            spec: Arc::new(spec),
            state: Mutex::new(FnState::default()),
            changed: watch::channel(0).0,
            limiter: Mutex::new(TokenBucket::new(rate)),
            invocations: AtomicU64::new(0),
            created_at,
            was_live: AtomicBool::new(false),
            last_ready_us: AtomicU64::new(0),
        })
    }

    pub fn spec(&self) -> &Arc<FunctionSpec> {
        &self.spec
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn has_capacity(&self, s: &Slot) -> bool {
        s.ready().is_some()
            && (self.spec.max_concurrency == 0 || s.inflight < self.spec.max_concurrency as usize)
    }
}

/// A request's hold on one ready instance; dropping it frees the slot.
pub struct Lease {
    function: Arc<Function>,
    slot: u64,
    pub instance: Arc<dyn Instance>,
    /// The request waited for a start.
    pub cold: bool,
    /// How long it waited.
    pub waited: Duration,
}

impl Lease {
    pub fn spec(&self) -> &Arc<FunctionSpec> {
        &self.function.spec
    }

    pub fn metric_name(&self) -> &FunctionName {
        &self.function.metric_name
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.function.state.lock().unwrap();
        if let Some(s) = st.slots.iter_mut().find(|s| s.id == self.slot) {
            s.lease_dropped(Instant::now());
        }
        let someone_waits = st.pending > 0;
        let all_done = st.slots.iter().all(|s| s.inflight == 0);
        drop(st);
        // Only the adaptive policy learns from idle times; fixed ones pay no lock here.
        let policy = &self.function.spec.policy;
        if all_done && policy.idle_policy == IdlePolicyKind::Adaptive {
            self.function.idle.lock().unwrap().on_done(policy);
        }
        if someone_waits {
            self.function.notify();
        }
    }
}

/// Decrements the pending count however the wait ends (also when the client goes away).
struct PendingGuard<'a>(&'a Function);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().pending -= 1;
    }
}

/// Where a start's first step runs.
#[derive(Clone, Copy)]
enum StartOn {
    NewTask,
    Caller,
}

/// Polls `start` once on this thread, then hands what is left of it to a task. The poll
/// uses a no-op waker: the task polls the future again as soon as it is spawned, which
/// registers the task's own waker, and every resource keeps its readiness as state, so a
/// wake-up that arrives in between is seen by that poll, not lost.
fn first_step_here(start: impl Future<Output = ()> + Send + 'static) {
    let mut start = Box::pin(start);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if start.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(start);
    }
}

/// The lifecycle of every function. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    functions: RwLock<HashMap<String, Arc<Function>>>,
    runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    unavailable: HashMap<RuntimeKind, String>,
    metrics: Arc<Metrics>,
    logs: Arc<LogStore>,
    next_instance: AtomicU64,
    shutting_down: AtomicBool,
    /// Set once the probe is attached: hands its buffered events to their wakes.
    probe: OnceLock<BufferedWakes>,
    set_changed: watch::Sender<u64>,
    warmth_changed: watch::Sender<u64>,
    /// Idle histories loaded from the state dir, taken by each function's first deploy.
    restored: Mutex<HashMap<String, IdleHistory>>,
    /// Which functions each client called on the shared ports (`[probe] affinity_window`);
    /// `None` while affinity is off. Times are seconds since `origin`.
    affinity: Mutex<Option<Affinity<IpAddr, Arc<str>>>>,
    affinity_on: AtomicBool,
    origin: Instant,
    /// Passes of the idle reaper (tests check it sleeps while nothing is up).
    #[cfg(test)]
    reaper_passes: AtomicU64,
}

/// Clients remembered for affinity wakes; beyond it the least recently seen are forgotten.
pub const AFFINITY_MAX_CLIENTS: usize = 65_536;

impl Lifecycle {
    /// `unavailable` names runtimes that could not be set up and why (their starts fail with that reason).
    pub fn new(
        runtimes: Vec<Arc<dyn Runtime>>,
        unavailable: HashMap<RuntimeKind, String>,
        metrics: Arc<Metrics>,
        logs: Arc<LogStore>,
    ) -> Self {
        let lc = Lifecycle {
            inner: Arc::new(Inner {
                functions: RwLock::new(HashMap::new()),
                runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
                unavailable,
                metrics,
                logs,
                next_instance: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                probe: OnceLock::new(),
                set_changed: watch::channel(0).0,
                warmth_changed: watch::channel(0).0,
                restored: Mutex::new(HashMap::new()),
                affinity: Mutex::new(None),
                affinity_on: AtomicBool::new(false),
                origin: Instant::now(),
                #[cfg(test)]
                reaper_passes: AtomicU64::new(0),
            }),
        };
        // The idle reaper: every 50 ms while any instance exists or a predicted pre-warm
        // is due later; otherwise it sleeps until an instance starts or the functions
        // change (a daemon scaled to zero does not wake up 20 times a second).
        let weak = Arc::downgrade(&lc.inner);
        let mut warmth = lc.subscribe_warmth();
        let mut changes = lc.subscribe_changes();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let again = {
                    let Some(inner) = weak.upgrade() else { return };
                    // Seen before the pass: a change during it wakes the wait below.
                    warmth.borrow_and_update();
                    changes.borrow_and_update();
                    #[cfg(test)]
                    inner.reaper_passes.fetch_add(1, Ordering::Relaxed);
                    Lifecycle { inner }.reap_idle()
                };
                if !again {
                    // Err: the lifecycle is gone.
                    let gone = tokio::select! {
                        r = warmth.changed() => r.is_err(),
                        r = changes.changed() => r.is_err(),
                    };
                    if gone {
                        return;
                    }
                }
            }
        });
        lc
    }

    /// Turns affinity wakes on (`Some(window)`) or off.
    pub fn set_affinity(&self, window: Option<Duration>) {
        *self.inner.affinity.lock().unwrap() =
            window.map(|w| Affinity::new(w.as_secs_f64(), AFFINITY_MAX_CLIENTS));
        self.inner
            .affinity_on
            .store(window.is_some(), Ordering::Relaxed);
    }

    pub fn affinity_enabled(&self) -> bool {
        self.inner.affinity_on.load(Ordering::Relaxed)
    }

    fn affinity_now(&self) -> f64 {
        self.inner.origin.elapsed().as_secs_f64()
    }

    /// `client` called `function` on a shared port (a no-op while affinity is off).
    pub fn record_client(&self, client: IpAddr, function: &str) {
        if !self.affinity_enabled() {
            return;
        }
        let now = self.affinity_now();
        if let Some(a) = self.inner.affinity.lock().unwrap().as_mut() {
            a.record(client.to_canonical(), Arc::from(function), now);
        }
    }

    /// A SYN from `client` reached a shared port at `at`: wake the one function it called
    /// within the window, if exactly one (rate limited and undone after prewarm_ttl like
    /// every packet wake). `None` when no single function matches.
    pub fn wake_by_affinity(&self, client: IpAddr, at: Instant) -> Option<(Arc<str>, WakeOutcome)> {
        let now = self.affinity_now();
        let function = {
            let a = self.inner.affinity.lock().unwrap();
            a.as_ref()?.sole_function(&client.to_canonical(), now)
        };
        let outcome = match &function {
            Some(f) => self.wake_inline(f, Trigger::Affinity, at),
            None => WakeOutcome::UnknownFunction,
        };
        let label = match (&function, outcome) {
            (None, _) => "no_single_function",
            (_, WakeOutcome::Started) => "woke",
            (_, WakeOutcome::AlreadyUp) => "warm",
            (_, WakeOutcome::Suppressed) => "suppressed",
            (_, WakeOutcome::UnknownFunction | WakeOutcome::AtCapacity) => "no_single_function",
        };
        self.inner
            .metrics
            .affinity_syns
            .inc(&ByOutcome { outcome: label });
        function.map(|f| (f, outcome))
    }

    /// Whether the eBPF probe is attached (then accept wakes defer to it).
    pub fn probe_active(&self) -> bool {
        self.inner.probe.get().is_some()
    }

    /// The probe is attached; `buffered` handles the events in its ring that its reader
    /// has not read yet (on the caller's thread, waiting if the reader is handling some).
    pub fn set_probe(&self, buffered: BufferedWakes) {
        let _ = self.inner.probe.set(buffered);
    }

    /// A connection or request for a cold function is here. Its SYN passed the probe
    /// before the handshake did, so the SYN's event is in the ring by now, though the
    /// reader thread may not have read it yet (on a busy host it can be milliseconds
    /// late). Handling the buffered events first lets the earliest trigger start the
    /// instance whatever the reader's delay.
    fn take_buffered_wakes(&self) {
        if let Some(buffered) = self.inner.probe.get() {
            buffered(self);
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn logs(&self) -> &Arc<LogStore> {
        &self.inner.logs
    }

    /// Bumped whenever a function is deployed, updated or removed.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.inner.set_changed.subscribe()
    }

    /// Bumped whenever a function goes from cold to starting, or back to cold.
    pub fn subscribe_warmth(&self) -> watch::Receiver<u64> {
        self.inner.warmth_changed.subscribe()
    }

    /// Updates the instance gauge and tells warmth subscribers about cold <-> live edges.
    fn live_changed(&self, f: &Function, live: usize) {
        if self.live_counted(f, live) {
            self.notify_warmth();
        }
    }

    /// [`Lifecycle::live_changed`] without telling anyone: true on a cold <-> live edge,
    /// which the caller must then pass on with [`Lifecycle::notify_warmth`].
    fn live_counted(&self, f: &Function, live: usize) -> bool {
        self.inner
            .metrics
            .instances
            .set(&ByFunction::new(&f.metric_name), live as i64);
        let was = f.was_live.swap(live > 0, Ordering::Relaxed);
        was != (live > 0)
    }

    fn notify_warmth(&self) {
        self.inner
            .warmth_changed
            .send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.inner.functions.read().unwrap().get(name).cloned()
    }

    /// A snapshot of every deployed function (the map's lock is not held while they are
    /// worked on).
    fn all_functions(&self) -> Vec<Arc<Function>> {
        self.inner
            .functions
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    /// Every deployed function's spec, sorted by name.
    pub fn specs(&self) -> Vec<Arc<FunctionSpec>> {
        let mut v: Vec<_> = self
            .inner
            .functions
            .read()
            .unwrap()
            .values()
            .map(|f| f.spec.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn status(&self, name: &str) -> Option<FunctionStatus> {
        let f = self.get(name)?;
        let idle = f.idle.lock().unwrap().view(&f.spec.policy);
        let st = f.state.lock().unwrap();
        Some(FunctionStatus {
            spec: f.spec.clone(),
            replicas: st.live(),
            available: st.count(|p| matches!(p, Phase::Ready(_))),
            invocations: f.invocations.load(Ordering::Relaxed),
            created_at: f.created_at,
            idle,
        })
    }

    pub fn statuses(&self) -> Vec<FunctionStatus> {
        self.specs()
            .iter()
            .filter_map(|s| self.status(&s.name))
            .collect()
    }

    /// The runtime of a kind, when it is set up.
    pub fn runtime(&self, kind: RuntimeKind) -> Option<Arc<dyn Runtime>> {
        self.inner.runtimes.get(&kind).cloned()
    }

    fn runtime_for(&self, spec: &FunctionSpec) -> Result<Arc<dyn Runtime>, StartError> {
        match self.inner.runtimes.get(&spec.runtime) {
            Some(r) => Ok(r.clone()),
            None => Err(StartError::Unavailable {
                function: spec.name.clone(),
                runtime: spec.runtime.as_str(),
                message: self
                    .inner
                    .unavailable
                    .get(&spec.runtime)
                    .cloned()
                    .unwrap_or_else(|| "not configured".into()),
            }),
        }
    }

    /// Adds a function, or replaces one of the same name (its instances are replaced: the
    /// old ones stop, as many new ones start). Prepares the runtime first, so a bad image
    /// is refused before anything changes.
    pub async fn deploy(&self, spec: FunctionSpec) -> Result<(), StartError> {
        self.deploy_as(spec, false).await
    }

    /// Fetches (outside any API lock) what deploying `spec` needs, e.g. its image pull.
    pub async fn fetch(&self, spec: &FunctionSpec) -> Result<(), StartError> {
        spec.validate().map_err(|e| StartError::Invalid {
            function: spec.name.clone(),
            message: e.to_string(),
        })?;
        self.runtime_for(spec)?.fetch(spec).await
    }

    /// Forgets what `fetch` kept for `spec` (its deploy is over, used or not).
    pub fn unstage(&self, spec: &FunctionSpec) {
        if let Ok(rt) = self.runtime_for(spec) {
            rt.unstage(&spec.name);
        }
    }

    /// A deploy at daemon start (config file or saved state): an image whose registry is
    /// unreachable comes from the store (see `Runtime::deploy`).
    pub async fn restore(&self, spec: FunctionSpec) -> Result<(), StartError> {
        self.deploy_as(spec, true).await
    }

    async fn deploy_as(&self, spec: FunctionSpec, restore: bool) -> Result<(), StartError> {
        spec.validate().map_err(|e| StartError::Invalid {
            function: spec.name.clone(),
            message: e.to_string(),
        })?;
        let rt = self.runtime_for(&spec)?;
        rt.deploy(&spec, restore).await?;
        let name = spec.name.clone();
        // A redeploy keeps what was learned; the first deploy after a restart takes the
        // saved history.
        let history = match self.get(&name) {
            Some(old) => Some(old.idle.lock().unwrap().history.clone()),
            None => self.inner.restored.lock().unwrap().remove(&name),
        };
        let created_at = self
            .get(&name)
            .map_or_else(std::time::SystemTime::now, |old| old.created_at);
        let new = Function::new(spec, history, created_at);
        let old = self
            .inner
            .functions
            .write()
            .unwrap()
            .insert(name.clone(), new.clone());
        self.inner.set_changed.send_modify(|v| *v += 1);
        if let Some(old) = old {
            let live = old.state.lock().unwrap().live();
            self.retire(&old).await;
            // After retire nothing counts on the old version any more: carry its total on.
            new.invocations
                .fetch_add(old.invocations.load(Ordering::Relaxed), Ordering::Relaxed);
            // The same runtime already replaced what it held for the old spec in prepare.
            if old.spec.runtime != new.spec.runtime {
                if let Ok(old_rt) = self.runtime_for(&old.spec) {
                    old_rt.forget(&old.spec).await;
                }
            }
            for _ in 0..live.min(new.spec.max_instances as usize) {
                let mut st = new.state.lock().unwrap();
                self.spawn_start(&new, &mut st, Trigger::Api, Instant::now());
            }
        }
        Ok(())
    }

    /// Removes a function: waiting requests fail, instances stop. False if unknown.
    pub async fn remove(&self, name: &str) -> bool {
        let Some(f) = self.inner.functions.write().unwrap().remove(name) else {
            return false;
        };
        self.inner.set_changed.send_modify(|v| *v += 1);
        self.retire(&f).await;
        if let Ok(rt) = self.runtime_for(&f.spec) {
            rt.forget(&f.spec).await;
        }
        self.inner.metrics.forget_function(name);
        self.inner.logs.forget(name);
        true
    }

    async fn retire(&self, f: &Arc<Function>) {
        f.state.lock().unwrap().removed = true;
        f.notify();
        self.stop_all(f).await;
    }

    /// A wake signal: start the function if nothing is starting or running. Never blocks.
    pub fn wake(&self, name: &str, trigger: Trigger, at: Instant) -> WakeOutcome {
        self.wake_with(name, trigger, at, StartOn::NewTask)
    }

    /// [`Lifecycle::wake`] for a packet's event reader: a start it begins makes its first
    /// step (up to and including the spawn) here, on the caller's thread, before the call
    /// returns; only the rest (the readiness wait) goes to a task of its own. Handed to a
    /// new task, the start first waited for the reader to return to the runtime and for
    /// the worker to pick the task up.
    pub fn wake_inline(&self, name: &str, trigger: Trigger, at: Instant) -> WakeOutcome {
        self.wake_with(name, trigger, at, StartOn::Caller)
    }

    fn wake_with(&self, name: &str, trigger: Trigger, at: Instant, on: StartOn) -> WakeOutcome {
        let Some(f) = self.get(name) else {
            return WakeOutcome::UnknownFunction;
        };
        if self.inner.shutting_down.load(Ordering::Relaxed) {
            return WakeOutcome::AtCapacity;
        }
        self.inner
            .metrics
            .wakes
            .inc(&ByTrigger::new(&f.metric_name, trigger.as_str()));
        let start = {
            let mut st = f.state.lock().unwrap();
            if st.removed {
                return WakeOutcome::UnknownFunction;
            }
            if st.live() > 0 {
                return WakeOutcome::AlreadyUp;
            }
            if trigger.is_speculative() && !f.limiter.lock().unwrap().try_take() {
                drop(st);
                self.inner
                    .metrics
                    .wakes_suppressed
                    .inc(&ByFunction::new(name));
                return WakeOutcome::Suppressed;
            }
            self.begin_start(&f, &mut st, trigger, at)
        };
        // Outside the state lock: the start's first step takes it.
        if let Some((start, warmth_edge)) = start {
            match on {
                StartOn::NewTask => {
                    tokio::spawn(start);
                }
                StartOn::Caller => first_step_here(start),
            }
            // Only now: waking the warmth subscribers (the probe's map sync) from the
            // reader would hand a task to another worker before the spawn.
            if warmth_edge {
                self.notify_warmth();
            }
        }
        WakeOutcome::Started
    }

    /// A connection to the function's own port was accepted. With the probe attached, the
    /// SYN's event for a cold function may not have been read yet: it is handled first, so
    /// the start is credited to the earliest trigger (and still happens at once if the SYN
    /// came in on an interface the probe does not watch). Warm functions never wait.
    pub fn wake_on_accept(&self, name: &str, at: Instant) {
        let cold = self
            .get(name)
            .is_some_and(|f| f.state.lock().unwrap().live() == 0);
        if cold {
            self.take_buffered_wakes();
        }
        self.wake(name, Trigger::Accept, at);
    }

    /// Waits (bounded by start_timeout and max_pending) for a ready instance with capacity.
    pub async fn acquire(&self, name: &str) -> Result<Lease, AcquireError> {
        let mut f = self
            .get(name)
            .ok_or_else(|| AcquireError::UnknownFunction {
                function: name.to_string(),
            })?;
        let arrived = Instant::now();
        if f.spec.policy.idle_policy == IdlePolicyKind::Adaptive {
            f.idle.lock().unwrap().on_request(&f.spec.policy);
        }
        for _ in 0..3 {
            match self.acquire_from(&f, arrived).await {
                // An update swapped the function while we waited: wait on the new one.
                Err(AcquireError::Removed { .. }) => match self.get(name) {
                    Some(new) if !Arc::ptr_eq(&new, &f) => f = new,
                    _ => break,
                },
                other => return other,
            }
        }
        Err(AcquireError::Removed {
            function: name.to_string(),
        })
    }

    async fn acquire_from(
        &self,
        f: &Arc<Function>,
        arrived: Instant,
    ) -> Result<Lease, AcquireError> {
        let name = &f.spec.name;
        let deadline = arrived + f.spec.policy.start_timeout;
        let mut guard: Option<PendingGuard> = None;
        let mut epoch_at_wait = 0;
        let mut took_buffered = false;
        loop {
            let mut rx = {
                let mut st = f.state.lock().unwrap();
                if st.removed {
                    return Err(AcquireError::Removed {
                        function: name.clone(),
                    });
                }
                if self.inner.shutting_down.load(Ordering::Relaxed) {
                    return Err(AcquireError::ShuttingDown {
                        function: name.clone(),
                    });
                }
                let best = st
                    .slots
                    .iter_mut()
                    .filter(|s| f.has_capacity(s))
                    .min_by_key(|s| s.inflight);
                if let Some(slot) = best {
                    let now = Instant::now();
                    slot.lease_taken(now);
                    slot.served += 1;
                    let waited = now - arrived;
                    // Cold only if this instance became ready after the request came: a
                    // wait for a busy warm instance is not a cold start.
                    let cold = guard.is_some() && slot.ready_at.is_none_or(|r| r > arrived);
                    if slot.served == 1 {
                        self.first_request(name, slot, arrived, cold, waited);
                        if slot.trigger == Trigger::Predicted {
                            self.inner
                                .metrics
                                .predicted_hits
                                .inc(&ByFunction::new(name));
                        }
                    }
                    let lease = Lease {
                        function: f.clone(),
                        slot: slot.id,
                        instance: slot.ready().cloned().expect("ready slot"),
                        cold,
                        waited,
                    };
                    drop(st);
                    drop(guard);
                    f.invocations.fetch_add(1, Ordering::Relaxed);
                    if cold {
                        self.inner
                            .metrics
                            .cold_start_wait
                            .observe(&ByFunction::new(name), waited.as_secs_f64());
                    }
                    return Ok(lease);
                }
                if guard.is_some()
                    && st.fail_epoch != epoch_at_wait
                    && st.count(|p| matches!(p, Phase::Starting | Phase::Ready(_))) == 0
                {
                    let err = st.last_failure.clone().expect("failure recorded");
                    return Err(AcquireError::StartFailed(err));
                }
                if guard.is_none() {
                    if st.pending >= f.spec.policy.max_pending {
                        return Err(AcquireError::Overloaded {
                            function: name.clone(),
                            pending: st.pending,
                        });
                    }
                    st.pending += 1;
                    epoch_at_wait = st.fail_epoch;
                    guard = Some(PendingGuard(f));
                }
                if st.live() == 0 && !took_buffered && self.probe_active() {
                    // Outside the state lock: a buffered event's start takes it.
                    took_buffered = true;
                    drop(st);
                    self.take_buffered_wakes();
                    continue;
                }
                self.maybe_start(f, &mut st, Trigger::Request, arrived);
                f.changed.subscribe()
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(_) => continue,
                Err(_) => {
                    let st = f.state.lock().unwrap();
                    let ready = st.count(|p| matches!(p, Phase::Ready(_)));
                    if ready > 0 && st.count(|p| matches!(p, Phase::Starting)) == 0 {
                        return Err(AcquireError::Saturated {
                            function: name.clone(),
                            instances: ready,
                            waited: arrived.elapsed(),
                        });
                    }
                    drop(st);
                    self.inner
                        .metrics
                        .start_failures
                        .inc(&ByFunction::new(name));
                    return Err(AcquireError::StartFailed(StartError::Timeout {
                        function: name.clone(),
                        after: f.spec.policy.start_timeout,
                    }));
                }
            }
        }
    }

    fn first_request(
        &self,
        name: &str,
        slot: &Slot,
        arrived: Instant,
        cold: bool,
        waited: Duration,
    ) {
        if slot.trigger.is_speculative() {
            let lead = arrived.saturating_duration_since(slot.woke_at);
            self.inner
                .metrics
                .wake_lead
                .observe(&ByFunction::new(name), lead.as_secs_f64());
        }
        let start_ms = slot
            .ready_at
            .map(|r| (r - slot.woke_at).as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        tracing::info!(
            "cold start of {name}: started by {} ({:.1} ms from wake to ready); first request {} {:.2} ms",
            slot.trigger.as_str(),
            start_ms,
            if cold { "still waited" } else { "waited" },
            if cold { waited.as_secs_f64() * 1e3 } else { 0.0 },
        );
    }

    /// Starts another instance if no ready one has capacity and the starts already in
    /// flight cannot absorb the waiting requests.
    fn maybe_start(&self, f: &Arc<Function>, st: &mut FnState, trigger: Trigger, at: Instant) {
        if st.slots.iter().any(|s| f.has_capacity(s)) {
            return;
        }
        if st.live() >= f.spec.max_instances as usize {
            return;
        }
        let starting = st.count(|p| matches!(p, Phase::Starting));
        let need = starting == 0
            || (f.spec.max_concurrency > 0
                && st.pending > starting * f.spec.max_concurrency as usize);
        if need {
            self.spawn_start(f, st, trigger, at);
        }
    }

    /// Starts one instance unless the function is removed or synwake is shutting down
    /// (checked under the state lock, so no start slips past a removal or shutdown that
    /// is collecting the slots to stop).
    fn spawn_start(&self, f: &Arc<Function>, st: &mut FnState, trigger: Trigger, at: Instant) {
        if let Some((start, warmth_edge)) = self.begin_start(f, st, trigger, at) {
            tokio::spawn(start);
            if warmth_edge {
                self.notify_warmth();
            }
        }
    }

    /// Books the start's slot (under the state lock, as [`Lifecycle::spawn_start`]) and
    /// returns the start to run, and whether the function just went from cold to live (for
    /// [`Lifecycle::notify_warmth`], left to the caller); `None` if no start may begin.
    fn begin_start(
        &self,
        f: &Arc<Function>,
        st: &mut FnState,
        trigger: Trigger,
        at: Instant,
    ) -> Option<(impl Future<Output = ()> + Send + 'static, bool)> {
        if st.removed || self.inner.shutting_down.load(Ordering::Relaxed) {
            return None;
        }
        let id = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        st.slots.push(Slot {
            id,
            phase: Phase::Starting,
            inflight: 0,
            last_used: now,
            trigger,
            woke_at: at.min(now),
            ready_at: None,
            served: 0,
            busy_since: None,
            busy: Duration::ZERO,
        });
        let warmth_edge = self.live_counted(f, st.live());
        let lc = self.clone();
        let f = f.clone();
        let woke_at = at.min(now);
        Some((
            async move { lc.run_start(f, id, trigger, woke_at).await },
            warmth_edge,
        ))
    }

    async fn run_start(&self, f: Arc<Function>, id: u64, trigger: Trigger, woke_at: Instant) {
        let spec = f.spec.clone();
        let t0 = Instant::now();
        self.inner.metrics.wake_to_start.observe(
            &ByTrigger::new(&spec.name, trigger.as_str()),
            t0.saturating_duration_since(woke_at).as_secs_f64(),
        );
        let output = OutputSink {
            store: self.inner.logs.clone(),
            function: spec.name.clone(),
            instance: format!("{}-{id}", spec.name),
        };
        let deadline = t0 + spec.policy.start_timeout;
        let result = async {
            let rt = self.runtime_for(&spec)?;
            let inst = rt.start(&spec, id, output.clone()).await?;
            let spawned = Instant::now();
            tracing::debug!(
                "{} instance {id} ({}): start call {:.0} us after the wake, spawned in {:.2} ms",
                spec.name,
                trigger.as_str(),
                t0.saturating_duration_since(woke_at).as_secs_f64() * 1e6,
                t0.elapsed().as_secs_f64() * 1e3
            );
            let expected = match f.last_ready_us.load(Ordering::Relaxed) {
                0 => None,
                us => Some(Duration::from_micros(us)),
            };
            let ready = tokio::select! {
                r = runtime::wait_ready(&spec, inst.as_ref(), &output, deadline, expected) => r,
                _ = Self::stop_requested(&f, id) => Err(StartError::Cancelled {
                    function: spec.name.clone(),
                }),
            };
            match ready {
                Ok(()) => {
                    let took = spawned.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
                    f.last_ready_us.store(took, Ordering::Relaxed);
                    Ok(inst)
                }
                Err(e) => {
                    inst.stop(spec.policy.stop_grace).await;
                    Err(e)
                }
            }
        }
        .await;
        let elapsed = t0.elapsed();
        match result {
            Ok(inst) => {
                // None: nobody wants this instance any more (scaled to zero, removed).
                let warm_before = {
                    let mut st = f.state.lock().unwrap();
                    let warm_before = st.count(|p| matches!(p, Phase::Ready(_))) > 0;
                    match st.slots.iter_mut().find(|s| s.id == id) {
                        Some(slot) if !matches!(slot.phase, Phase::Stopping) => {
                            let now = Instant::now();
                            slot.phase = Phase::Ready(inst.clone());
                            slot.ready_at = Some(now);
                            slot.last_used = now;
                            Some(warm_before)
                        }
                        _ => None,
                    }
                };
                let Some(warm_before) = warm_before else {
                    inst.stop(spec.policy.stop_grace).await;
                    self.drop_slot(&f, id);
                    return;
                };
                let m = &self.inner.metrics;
                m.instance_start.observe(
                    &ByRuntime::new(&spec.name, spec.runtime.as_str()),
                    elapsed.as_secs_f64(),
                );
                if !warm_before {
                    m.cold_starts
                        .inc(&ByTrigger::new(&spec.name, trigger.as_str()));
                }
                if inst.pooled() {
                    m.pool_starts.inc(&ByFunction::new(&spec.name));
                }
                tracing::debug!(
                    "{} instance {id} ({}) ready in {:.2} ms",
                    spec.name,
                    inst.describe(),
                    elapsed.as_secs_f64() * 1e3
                );
                f.notify();
                let lc = self.clone();
                tokio::spawn(async move {
                    let exit = inst.wait_exit().await;
                    lc.on_exit(&f, id, exit);
                });
            }
            Err(StartError::Cancelled { .. }) if Self::stopping(&f, id) => {
                // Stopped on purpose (scale to zero, removal, shutdown) while starting.
                self.drop_slot(&f, id);
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.inner
                    .metrics
                    .start_failures
                    .inc(&ByFunction::new(&spec.name));
                let mut st = f.state.lock().unwrap();
                st.slots.retain(|s| s.id != id);
                st.fail_epoch += 1;
                st.last_failure = Some(e);
                self.live_changed(&f, st.live());
                drop(st);
                f.notify();
            }
        }
    }

    /// Whether slot `id` is marked stopping (or already gone).
    fn stopping(f: &Function, id: u64) -> bool {
        let st = f.state.lock().unwrap();
        st.slots
            .iter()
            .find(|s| s.id == id)
            .is_none_or(|s| matches!(s.phase, Phase::Stopping))
    }

    /// Resolves once slot `id` is marked stopping or gone.
    async fn stop_requested(f: &Function, id: u64) {
        let mut rx = f.changed.subscribe();
        while !Self::stopping(f, id) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once slot `id` is gone (its start or stop task finished).
    async fn slot_gone(f: &Function, id: u64) {
        let mut rx = f.changed.subscribe();
        while f.state.lock().unwrap().slots.iter().any(|s| s.id == id) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The proxy saw the instance behind `lease` die: stop routing to it now, not when its
    /// exit watcher gets to run.
    pub fn instance_exited(&self, lease: &Lease, exit: runtime::ExitInfo) {
        self.on_exit(&lease.function, lease.slot, exit);
    }

    fn on_exit(&self, f: &Arc<Function>, id: u64, exit: runtime::ExitInfo) {
        let mut st = f.state.lock().unwrap();
        let Some(pos) = st.slots.iter().position(|s| s.id == id) else {
            return;
        };
        if matches!(st.slots[pos].phase, Phase::Stopping) {
            return; // an intended stop; stop_slot cleans up
        }
        let slot = st.slots.remove(pos);
        self.count_idle(f, &slot);
        tracing::warn!(
            "{} instance {id} exited unexpectedly ({}) with {} request(s) in flight",
            f.spec.name,
            exit.status,
            slot.inflight
        );
        self.live_changed(f, st.live());
        let now_cold = st.live() == 0;
        drop(st);
        f.notify();
        if now_cold {
            self.after_scale_to_zero(f);
        }
    }

    /// Adds a ready slot's idle time to the metric, once: when it stops being ready.
    fn count_idle(&self, f: &Function, slot: &Slot) {
        if slot.ready().is_some() {
            self.inner.metrics.idle_instance_seconds.add(
                &ByFunction::new(&f.metric_name),
                slot.idle_seconds(Instant::now()),
            );
        }
    }

    fn drop_slot(&self, f: &Arc<Function>, id: u64) {
        let mut st = f.state.lock().unwrap();
        st.slots.retain(|s| s.id != id);
        self.live_changed(f, st.live());
        let now_cold = st.slots.is_empty() && !st.removed;
        drop(st);
        f.notify();
        if now_cold {
            self.after_scale_to_zero(f);
        }
    }

    /// Lets the runtime get ready for the next cold start (refill a container pool).
    fn after_scale_to_zero(&self, f: &Arc<Function>) {
        if let Ok(rt) = self.runtime_for(&f.spec) {
            let spec = f.spec.clone();
            tokio::spawn(async move {
                if let Err(e) = rt.prepare(&spec).await {
                    tracing::warn!("preparing {} after scale to zero: {e}", spec.name);
                }
            });
        }
    }

    /// Marks the slot stopping and returns its instance, if it is ready (and idle, when
    /// `only_idle`). A slot still starting is marked too; its start task stops it.
    fn begin_stop(&self, f: &Arc<Function>, id: u64, only_idle: bool) -> Option<Arc<dyn Instance>> {
        let mut st = f.state.lock().unwrap();
        let slot = st.slots.iter_mut().find(|s| s.id == id)?;
        if only_idle && (slot.inflight > 0 || slot.ready().is_none()) {
            return None;
        }
        if slot.ready().is_some() {
            self.count_idle(f, slot);
        }
        let prev = std::mem::replace(&mut slot.phase, Phase::Stopping);
        let live = st.live();
        drop(st);
        self.live_changed(f, live);
        f.notify();
        match prev {
            Phase::Ready(i) => Some(i),
            _ => None,
        }
    }

    async fn finish_stop(&self, f: &Arc<Function>, id: u64, inst: Arc<dyn Instance>) {
        inst.stop(f.spec.policy.stop_grace).await;
        self.drop_slot(f, id);
    }

    /// Stops one slot and returns once its instance is gone. A slot still starting is
    /// marked stopping; its start task stops what the runtime made, and this waits for
    /// it, so nothing started survives a removal or shutdown.
    async fn stop_slot(&self, f: &Arc<Function>, id: u64) {
        if let Some(inst) = self.begin_stop(f, id, false) {
            self.finish_stop(f, id, inst).await;
            return;
        }
        let policy = &f.spec.policy;
        let bound = policy
            .start_timeout
            .saturating_add(policy.stop_grace)
            .saturating_add(Duration::from_secs(5));
        if tokio::time::timeout(bound, Self::slot_gone(f, id))
            .await
            .is_err()
        {
            tracing::warn!(
                "{}: instance {id} still starting {bound:?} after it was told to stop",
                f.spec.name
            );
        }
    }

    async fn stop_all(&self, f: &Arc<Function>) {
        let ids: Vec<u64> = f.state.lock().unwrap().slots.iter().map(|s| s.id).collect();
        futures_util::future::join_all(ids.into_iter().map(|id| self.stop_slot(f, id))).await;
    }

    /// OpenFaaS-style scale: 0 stops every instance, N starts instances up to N.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<(), ScaleError> {
        let f = self.get(name).ok_or_else(|| ScaleError::UnknownFunction {
            function: name.to_string(),
        })?;
        self.scale_function(&f, replicas).await
    }

    async fn scale_function(&self, f: &Arc<Function>, replicas: u32) -> Result<(), ScaleError> {
        let name = &f.spec.name;
        if replicas > f.spec.max_instances {
            return Err(ScaleError::TooMany {
                function: name.to_string(),
                replicas,
                max: f.spec.max_instances,
            });
        }
        let to_stop: Vec<u64> = {
            let mut st = f.state.lock().unwrap();
            // A scale racing a DELETE or shutdown must not start what nobody will stop.
            if st.removed {
                return Err(ScaleError::UnknownFunction {
                    function: name.to_string(),
                });
            }
            if self.inner.shutting_down.load(Ordering::Relaxed) {
                return Err(ScaleError::ShuttingDown {
                    function: name.to_string(),
                });
            }
            let live = st.live();
            if (replicas as usize) > live {
                for _ in live..replicas as usize {
                    self.spawn_start(f, &mut st, Trigger::Api, Instant::now());
                }
                Vec::new()
            } else {
                // Stop the least busy first.
                let mut live_slots: Vec<(usize, u64)> = st
                    .slots
                    .iter()
                    .filter(|s| !matches!(s.phase, Phase::Stopping))
                    .map(|s| (s.inflight, s.id))
                    .collect();
                live_slots.sort();
                live_slots
                    .into_iter()
                    .take(live - replicas as usize)
                    .map(|(_, id)| id)
                    .collect()
            }
        };
        futures_util::future::join_all(to_stop.into_iter().map(|id| self.stop_slot(f, id))).await;
        Ok(())
    }

    /// One pass of the idle reaper: stops idle instances and unused prewarms. True when a
    /// later pass may have work (an instance exists, or a predicted pre-warm is to come).
    fn reap_idle(&self) -> bool {
        let now = Instant::now();
        let functions = self.all_functions();
        let mut again = false;
        for f in functions {
            if f.spec.policy.idle_policy == IdlePolicyKind::Adaptive {
                again |= self.reap_adaptive(&f, now);
                continue;
            }
            let victims: Vec<(u64, bool)> = {
                let st = f.state.lock().unwrap();
                again |= !st.slots.is_empty();
                st.slots
                    .iter()
                    .filter(|s| s.ready().is_some() && s.inflight == 0)
                    .filter_map(|s| {
                        let ready_at = s.ready_at.unwrap_or(now);
                        if s.served == 0
                            && s.trigger.is_speculative()
                            && now - ready_at >= f.spec.policy.prewarm_ttl
                        {
                            Some((s.id, true))
                        } else if now - s.last_used >= f.spec.policy.idle_timeout {
                            Some((s.id, false))
                        } else {
                            None
                        }
                    })
                    .collect()
            };
            for (id, wasted) in victims {
                let name = &f.spec.name;
                let Some(inst) = self.begin_stop(&f, id, true) else {
                    continue;
                };
                if wasted {
                    self.inner
                        .metrics
                        .prewarms_wasted
                        .inc(&ByFunction::new(name));
                    tracing::info!("{name}: instance {id} woken by a packet was not used within prewarm_ttl; stopping (wasted)");
                } else {
                    tracing::info!(
                        "{name}: instance {id} idle for {:?}; stopping",
                        f.spec.policy.idle_timeout
                    );
                }
                // Marked stopping under the lock, so no request picks it from here on.
                let lc = self.clone();
                let f = f.clone();
                tokio::spawn(async move { lc.finish_stop(&f, id, inst).await });
            }
        }
        again
    }

    /// The adaptive policy's side of [`Self::reap_idle`]: stop at the keep-alive point (or
    /// right after the last request when a pre-warm point is set), start at the pre-warm
    /// point, and undo packet wakes after prewarm_ttl as for fixed functions. True when a
    /// later pass may have work for it.
    fn reap_adaptive(&self, f: &Arc<Function>, now: Instant) -> bool {
        let name = &f.spec.name;
        let (window, idle) = {
            let s = f.idle.lock().unwrap();
            (s.window, s.idle(now))
        };
        enum Why {
            PacketWasted,
            PredictedWasted,
            KeepAlive,
            Unload,
        }
        let (victims, up): (Vec<(u64, Why)>, bool) = {
            let st = f.state.lock().unwrap();
            let busy = st.slots.iter().any(|s| s.inflight > 0) || st.pending > 0;
            let victims = st
                .slots
                .iter()
                .filter(|s| s.ready().is_some() && s.inflight == 0 && !busy)
                .filter_map(|s| {
                    let ready_at = s.ready_at.unwrap_or(now);
                    let idle = idle.unwrap_or(now - ready_at).min(now - s.last_used);
                    if s.served == 0 && s.trigger == Trigger::Predicted {
                        (idle >= window.keep_alive).then_some((s.id, Why::PredictedWasted))
                    } else if s.served == 0
                        && s.trigger.is_speculative()
                        && now - ready_at >= f.spec.policy.prewarm_ttl
                    {
                        Some((s.id, Why::PacketWasted))
                    } else if idle >= window.keep_alive {
                        Some((s.id, Why::KeepAlive))
                    } else if s.served > 0 && !window.prewarm_after.is_zero() {
                        Some((s.id, Why::Unload))
                    } else {
                        None
                    }
                })
                .collect();
            (victims, !st.slots.is_empty())
        };
        for (id, why) in victims {
            let Some(inst) = self.begin_stop(f, id, true) else {
                continue;
            };
            let m = &self.inner.metrics;
            match why {
                Why::PacketWasted => {
                    m.prewarms_wasted.inc(&ByFunction::new(name));
                    tracing::info!("{name}: instance {id} woken by a packet was not used within prewarm_ttl; stopping (wasted)");
                }
                Why::PredictedWasted => {
                    m.predicted_wasted.inc(&ByFunction::new(name));
                    tracing::info!("{name}: predicted pre-warm {id} not used by the keep-alive point; stopping (wasted)");
                }
                Why::KeepAlive => tracing::info!(
                    "{name}: instance {id} idle past the keep-alive point ({:?}); stopping",
                    window.keep_alive
                ),
                Why::Unload => tracing::info!(
                    "{name}: instance {id} stops until the pre-warm point ({:?} after the last request)",
                    window.prewarm_after
                ),
            }
            let lc = self.clone();
            let f = f.clone();
            tokio::spawn(async move { lc.finish_stop(&f, id, inst).await });
        }
        let prewarm = {
            let st = f.state.lock().unwrap();
            st.live() == 0 && !st.removed && f.idle.lock().unwrap().take_prewarm(now)
        };
        if prewarm && !self.inner.shutting_down.load(Ordering::Relaxed) {
            self.inner
                .metrics
                .predicted_prewarms
                .inc(&ByFunction::new(name));
            tracing::info!(
                "{name}: predicted pre-warm ({:?} after the last request, {})",
                window.prewarm_after,
                window.basis.as_str()
            );
            let mut st = f.state.lock().unwrap();
            self.spawn_start(f, &mut st, Trigger::Predicted, now);
            return true;
        }
        up || f.idle.lock().unwrap().prewarm_pending(now)
    }

    /// Hands saved idle histories to the functions deployed next (call before deploying).
    pub fn restore_idle_histories(&self, histories: HashMap<String, IdleHistory>) {
        *self.inner.restored.lock().unwrap() = histories;
    }

    /// Every adaptive function's history, when any changed since the last call (for saving).
    pub fn idle_histories_if_changed(
        &self,
    ) -> Option<std::collections::BTreeMap<String, IdleHistory>> {
        let functions = self.all_functions();
        let mut changed = false;
        let mut out = std::collections::BTreeMap::new();
        for f in functions {
            if f.spec.policy.idle_policy != IdlePolicyKind::Adaptive {
                continue;
            }
            let mut s = f.idle.lock().unwrap();
            changed |= std::mem::take(&mut s.dirty);
            out.insert(f.spec.name.clone(), s.history.clone());
        }
        changed.then_some(out)
    }

    /// Shutdown: refuse new work, stop every instance, release runtimes.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        let functions = self.all_functions();
        for f in &functions {
            f.notify();
        }
        futures_util::future::join_all(functions.iter().map(|f| self.stop_all(f))).await;
        for rt in self.inner.runtimes.values() {
            rt.shutdown().await;
        }
    }

    /// In-flight requests across all functions (for draining on shutdown).
    pub fn inflight(&self) -> usize {
        self.inner
            .functions
            .read()
            .unwrap()
            .values()
            .map(|f| {
                let st = f.state.lock().unwrap();
                st.slots.iter().map(|s| s.inflight).sum::<usize>() + st.pending
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
