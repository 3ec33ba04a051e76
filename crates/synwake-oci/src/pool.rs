//! Pre-created containers per function: `runc create` done ahead, so a cold start costs
//! only the start and the function's own readiness. A pool holds containers of one spec
//! per function: an update (other image, env, command, limits) replaces them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::runtime::{Container, ContainerSpec, OciRuntime};

/// Up to N created-but-not-started containers per function. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    rt: OciRuntime,
    inner: Arc<Mutex<HashMap<String, Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// What the containers were created from ([`pool_key`]).
    spec: Option<ContainerSpec>,
    ready: VecDeque<Container>,
    /// Creations in flight.
    pending: usize,
    /// Bumped by `drain`: creations started before it are discarded.
    generation: u64,
}

/// The spec a pooled container is interchangeable for: everything but the instance number.
fn pool_key(spec: &ContainerSpec) -> ContainerSpec {
    ContainerSpec {
        instance: 0,
        ..spec.clone()
    }
}

impl Pool {
    /// An empty pool creating its containers with `rt`.
    pub fn new(rt: OciRuntime) -> Self {
        Pool {
            rt,
            inner: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Takes a ready (created, not started) container made from `spec` (any instance
    /// number), if any. Containers whose init died while waiting are skipped (and removed
    /// in the background).
    pub fn take(&self, spec: &ContainerSpec) -> Option<Container> {
        let mut dead = Vec::new();
        let found = {
            let mut map = self.inner.lock().expect("pool lock");
            let slot = map.get_mut(&spec.function)?;
            if slot.spec.as_ref() != Some(&pool_key(spec)) {
                return None;
            }
            let mut found = None;
            while let Some(c) = slot.ready.pop_front() {
                if c.exited().is_some() {
                    dead.push(c);
                } else {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        for c in dead {
            let rt = self.rt.clone();
            tokio::spawn(async move {
                let _ = rt.stop(c, Duration::ZERO).await;
            });
        }
        found
    }

    /// How many containers of `function` are ready now.
    pub fn ready(&self, function: &str) -> usize {
        self.inner
            .lock()
            .expect("pool lock")
            .get(function)
            .map_or(0, |s| s.ready.len())
    }

    /// Creates containers from `spec` in the background until `n` are ready or being
    /// created for `spec.function`. Returns at once. Failures are logged. Containers of
    /// the function made from another spec are removed (creations in flight discarded).
    pub fn refill(&self, spec: ContainerSpec, n: usize) {
        let key = pool_key(&spec);
        let (missing, generation, stale) = {
            let mut map = self.inner.lock().expect("pool lock");
            let slot = map.entry(spec.function.clone()).or_default();
            let mut stale = Vec::new();
            if slot.spec.as_ref() != Some(&key) {
                slot.generation += 1;
                slot.pending = 0;
                stale = slot.ready.drain(..).collect();
                slot.spec = Some(key);
            }
            let missing = n.saturating_sub(slot.ready.len() + slot.pending);
            slot.pending += missing;
            (missing, slot.generation, stale)
        };
        if !stale.is_empty() {
            let rt = self.rt.clone();
            tokio::spawn(async move {
                for c in stale {
                    let _ = rt.stop(c, Duration::ZERO).await;
                }
            });
        }
        for _ in 0..missing {
            let pool = self.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                let created = pool.rt.create(&spec).await;
                let leftover = {
                    let mut map = pool.inner.lock().expect("pool lock");
                    let slot = map.entry(spec.function.clone()).or_default();
                    if slot.generation == generation {
                        slot.pending = slot.pending.saturating_sub(1);
                    }
                    match created {
                        Ok(c) if slot.generation == generation => {
                            tracing::debug!(function = %spec.function, container = c.id(), "pooled");
                            slot.ready.push_back(c);
                            None
                        }
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::warn!(function = %spec.function, "pool refill failed: {e}");
                            None
                        }
                    }
                };
                if let Some(c) = leftover {
                    let _ = pool.rt.stop(c, Duration::ZERO).await;
                }
            });
        }
    }

    /// Removes every pooled container of `function`; creations in flight are discarded
    /// when they finish.
    pub async fn drain(&self, function: &str) {
        let ready: Vec<Container> = {
            let mut map = self.inner.lock().expect("pool lock");
            let Some(slot) = map.get_mut(function) else {
                return;
            };
            slot.generation += 1;
            slot.pending = 0;
            slot.ready.drain(..).collect()
        };
        for c in ready {
            let _ = self.rt.stop(c, Duration::ZERO).await;
        }
    }

    /// Waits until `n` containers of `function` are ready or `timeout` passes; returns
    /// how many are ready.
    pub async fn wait_ready(&self, function: &str, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = self.ready(function);
            if ready >= n || tokio::time::Instant::now() >= deadline {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
