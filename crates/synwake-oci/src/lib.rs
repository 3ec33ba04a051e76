//! synwake's OCI runtime: functions as real runc containers.
//!
//! - [`image`]: oci-archive / docker-archive import into a rootfs cache keyed by digest.
//! - [`net`]: bridge `synwake0`, one netns + veth + address per container, isolation.
//! - [`runtime`]: [`OciRuntime`] creates (`runc create`), starts, watches and stops
//!   containers, and removes a crashed run's leftovers at startup.
//! - [`pool`]: created-but-not-started containers per function, so a cold start is only
//!   the start plus readiness.
//! - [`fixture`]: tiny busybox images written from Rust, for tests and benchmarks.
//!
//! Requires root, runc, iproute2 and iptables. Every name created on the host starts with
//! `swk` (containers and netns `swk-*`, veths `swkv*`, cgroups under `synwake/`).

pub mod fixture;
pub mod image;
pub mod net;
pub mod pool;
pub mod runtime;
pub mod spec;
mod sys;

pub use image::{Image, ImageConfig, ImageError, ImageStore};
pub use pool::Pool;
pub use runtime::{Container, ContainerSpec, ExitInfo, OciConfig, OciError, OciRuntime, Recovered};
