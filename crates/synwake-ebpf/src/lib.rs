//! synwake's eBPF probe: sees a client's TCP SYN at XDP or TC ingress and reports it, so
//! the daemon can start a function while the handshake and the request are still on the wire.
//!
//! The kernel side is `bpf/probe.bpf.c` (compiled with clang by `build.rs`); the event
//! record is defined once in `bpf/synwake.h` and mirrored by [`RawEvent`].
//!
//! How the daemon uses it:
//!
//! ```no_run
//! # async fn run() -> Result<(), synwake_ebpf::ProbeError> {
//! use synwake_ebpf::{function_id, AttachMode, Probe, ProbeConfig};
//!
//! let config = ProbeConfig { mode: AttachMode::Auto, interfaces: Some(vec!["lo".into()]) };
//! let mut probe = Probe::attach(&config)?;   // on Err: warn once, wake on accept/request
//! let maps = probe.maps();                   // cloneable; follow deploys and removals live
//! maps.watch_port(8081)?;
//! maps.watch_id(function_id("hello"))?;
//! let mut events = probe.take_events()?;
//! loop {
//!     let event = events.next().await?;      // woken by epoll, no polling delay
//!     let waited_ns = synwake_ebpf::ktime_now_ns() - event.ktime_ns;
//!     # let _ = waited_ns;
//! }
//! # }
//! ```
//!
//! Everything the probe attaches is held by file descriptors (bpf_link) on kernels that
//! support it, so it disappears when the process exits, even on `kill -9`. Only the netlink
//! clsact fallback (kernels without TCX) can outlive a crash: [`Probe::detach_stale`]
//! removes it.

pub mod cgroup;
mod config;
mod doctor;
mod event;
mod probe;
mod sys;
mod tagger;

pub use config::{AttachMode, ProbeConfig};
pub use doctor::{doctor, doctor_interfaces, DoctorCheck, DoctorReport, InterfaceReport};
pub use event::{EventError, ProbeEvent, ProbeEvents, ProbeTrigger, RawEvent};
pub use probe::{Hook, Probe, ProbeError, ProbeMaps, ProbeStats, RunStats, TestRun};
pub use tagger::{DestinationError, OptionFiller, TagDestination, TagError, TagStats, Tagger};

/// For the benchmark only: an XDP program that just passes packets, whose cost is the
/// floor of what BPF run-time statistics can measure.
#[doc(hidden)]
pub static BASELINE_XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline.bpf.o"));
#[doc(hidden)]
pub const BASELINE_XDP_PROGRAM: &str = "synwake_nop";

/// Constants generated from `bpf/synwake.h` by `build.rs`.
pub mod header {
    include!(concat!(env!("OUT_DIR"), "/synwake_h.rs"));
}

/// The function id that the synwake TCP option carries: FNV-1a 32-bit of the name's UTF-8
/// bytes. Stable across releases; two functions whose ids collide must not both be deployed.
pub fn function_id(name: &str) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    name.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    })
}

/// Now on CLOCK_MONOTONIC in nanoseconds: the clock of [`ProbeEvent::ktime_ns`]
/// (`bpf_ktime_get_ns`), so `ktime_now_ns() - event.ktime_ns` is the time since the SYN.
pub fn ktime_now_ns() -> u64 {
    sys::monotonic_ns()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_id_is_fnv1a_32() {
        // Reference vectors of FNV-1a 32-bit.
        assert_eq!(function_id(""), 0x811c_9dc5);
        assert_eq!(function_id("a"), 0xe40c_292c);
        assert_eq!(function_id("foobar"), 0xbf9c_f968);
        assert_ne!(function_id("hello"), function_id("hellp"));
    }

    #[test]
    fn ktime_is_monotonic() {
        let a = ktime_now_ns();
        let b = ktime_now_ns();
        assert!(a > 0 && b >= a);
    }
}
