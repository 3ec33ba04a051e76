//! The probe tests' fixtures now live in `synwake_test_support::probe` (and packets,
//! netns); this module keeps the old `probe_support::...` paths working.

#![allow(unused_imports)] // the tests and the #[ignore] benchmarks use different parts

pub use synwake_test_support::gate::skip_or_fail;
pub use synwake_test_support::metrics::Metrics;
pub use synwake_test_support::netns::{enter_ns, in_ns};
pub use synwake_test_support::packets::{function_id, syn_packet, synwake_option, RawSender};
pub use synwake_test_support::probe::*;
pub use synwake_test_support::proc::percentile;
pub use synwake_test_support::{function, synwake_bin, wait_until, Resp};
