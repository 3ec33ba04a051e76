//! Packet wake signals: the eBPF probe (crates/synwake-ebpf) feeding the lifecycle.

use std::sync::Arc;

use crate::config::{Config, ProbeMode};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

/// A running probe; dropping it detaches.
pub struct ProbeHandle;

/// Starts the probe as configured; `None` when it is off or cannot attach (logged once).
pub fn start(
    config: &Config,
    _lifecycle: Lifecycle,
    _metrics: Arc<Metrics>,
) -> Option<ProbeHandle> {
    if config.probe.mode != ProbeMode::Off {
        tracing::warn!("probe not available in this build; waking on accept and request only");
    }
    None
}

/// Probe section of `synwake doctor`.
pub fn doctor() -> String {
    "  probe not built in\n".into()
}
