//! The `oci` runtime adapter (wired to crates/synwake-oci).

use std::sync::Arc;

use crate::config::Config;
use crate::spec::RuntimeKind;
use crate::state::StateDir;

use super::Runtime;

/// Sets up the OCI runtime when any configured function needs it.
pub async fn setup(config: &Config, _state: &StateDir) -> anyhow::Result<Option<Arc<dyn Runtime>>> {
    if config
        .functions
        .iter()
        .any(|f| f.runtime == RuntimeKind::Oci)
    {
        anyhow::bail!("the oci runtime is not wired into this build yet");
    }
    Ok(None)
}
