//! synwake's OCI runtime: functions as real runc containers.
//!
//! - [`image`]: oci-archive / docker-archive import and registry pulls into a shared,
//!   content-addressed store of unpacked layers, with garbage collection.
//! - [`net`]: bridge `synwake0`, one netns + veth + address per container, isolation.
//! - [`runtime`]: [`OciRuntime`] creates (`runc create`), starts, watches and stops
//!   containers, and removes a crashed run's leftovers at startup.
//! - [`pool`]: created-but-not-started containers per function, so a cold start is only
//!   the start plus readiness.
//! - [`fixture`]: tiny busybox images written from Rust, for tests and benchmarks.
//!
//! # How the daemon uses it
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use synwake_oci::{ContainerSpec, OciConfig, OciRuntime, Pool};
//!
//! // Once at startup: removes a crashed run's containers, netns and veths.
//! let rt = OciRuntime::new(OciConfig::default()).await?;
//! let pool = Pool::new(rt.clone());
//!
//! // Deploy: import once (cached by digest), then keep `pool` containers created.
//! let image = rt.import_image("images/resize.tar".as_ref()).await?;
//! let spec = ContainerSpec {
//!     function: "resize".into(),
//!     instance: 0,
//!     image,
//!     command: None,
//!     env: Default::default(),
//!     container_port: 8080,
//!     memory_bytes: Some(128 << 20),
//!     cpus: Some(0.5),
//!     pids: Some(256),
//!     mounts: Vec::new(),
//! };
//! pool.refill(spec.clone(), 1);
//!
//! // Cold start: a pooled container if there is one, else create one now.
//! let c = match pool.take(&spec) {
//!     Some(c) => c,
//!     None => rt.create(&spec).await?,
//! };
//! pool.refill(spec.clone(), 1); // prepare the next cold start in the background
//! rt.start(&c).await?;
//! // ... probe c.addr() until it answers, then proxy to it. If c.wait_exit() resolves
//! // first, answer 502 with c.output_tail(20).
//!
//! // Scale to zero / undeploy / shutdown.
//! rt.stop(c, Duration::from_secs(5)).await?;
//! pool.drain("resize").await; // on undeploy only
//! rt.cleanup_all().await; // on daemon shutdown
//! # Ok(()) }
//! ```
//!
//! # Host requirements and side effects
//!
//! Root, `runc` (1.1), `ip` (iproute2), `iptables`, cgroup v1 memory/cpu/pids
//! controllers (cgroupfs, no systemd). Every name created on the host starts with `swk`
//! and a tag derived from the state directory (containers `swk-<tag>-<function>-<n>`,
//! netns `swk-<tag>-n<hex>`, veths `swkv<tag><hex>`, cgroups `synwake/swk-<tag>-*`), and
//! startup removes exactly those. Runtimes with different state dirs can share a host if
//! their subnets differ (the bridge `synwake0` is shared).
//!
//! [`OciRuntime::new`] makes the calling process a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`): container init processes, orphaned when `runc create`
//! exits, become its children so their exit status can be collected. Other orphaned
//! descendants of the daemon are then reparented to it as well.

#![deny(missing_docs)]

pub mod fixture;
pub mod image;
pub mod net;
pub mod pool;
pub mod runtime;
pub mod spec;
mod sys;
pub mod tools;

pub use image::{
    is_registry_reference, Image, ImageConfig, ImageError, ImageStore, Progress, PruneReport,
    PullError, PullReport, RegistryConfig, StoreUsage,
};
pub use pool::Pool;
pub use runtime::{
    BindMount, Container, ContainerSpec, ExitInfo, OciConfig, OciError, OciRuntime, OutputHook,
    Recovered,
};
/// Reaping a child by pidfd (the process runtime reaps orphans the same way).
pub use sys::{waitid_pidfd, WaitStatus};
