//! Dev-only fixtures for synwake's integration tests, shared by every crate of the
//! workspace (a `[dev-dependencies]` entry, never a normal one; `publish = false`).
//!
//! - [`gate`]: the privileged-test rule (run under `CI=true`, skip loudly elsewhere).
//! - [`proc`]: free ports, waiting, pid liveness, signals, concurrency helpers.
//! - [`http`]: a tiny blocking HTTP/1.1 client.
//! - [`metrics`]: reading Prometheus text.
//! - [`bins`]: the workspace's binaries (`synwake`, `synwake-fn`) for this test run.
//! - [`daemon`]: `synwake up` on loopback with its own config and state dir.
//! - [`netns`]: two network namespaces joined by a veth pair, removed in `Drop`.
//! - [`packets`]: hand-built Ethernet/IPv4/IPv6/TCP frames and a raw-socket sender.
//! - [`probe`]: the probe tests' topology and the daemon running inside it.
//! - [`oci`]: prerequisites of the runc tests.
//! - [`cgroup_trace`]: counting cgroup migrations (tracefs `cgroup:cgroup_attach_task`).
//!
//! The crate root re-exports what `crates/synwake/tests/common` used to hold, so a test
//! may `use synwake_test_support::*;`.

pub mod bins;
pub mod cgroup_trace;
pub mod daemon;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod oci;
pub mod packets;
pub mod probe;
pub mod proc;
pub mod receiver;

pub use bins::{fn_bin, function, synwake_bin};
pub use daemon::Daemon;
pub use http::{basic_auth, generated_password, get, request, request_on, Resp};
pub use metrics::metric;
pub use proc::{
    alive, concurrently, free_port, loopback, random_bytes, signal, wait_listening, wait_until,
};
pub use receiver::{Received, Receiver};
