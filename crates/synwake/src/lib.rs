//! synwake: a scale-to-zero function platform that wakes functions on the client's TCP SYN.
//!
//! The hot path reads like the design's data flow:
//! packet -> [`probe`] -> wake -> [`lifecycle`] -> [`runtime`];
//! request -> [`gateway`] -> [`lifecycle`] (await ready) -> proxy.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod fdlimit;
pub mod gateway;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod runtime;
pub mod secrets;
pub mod spec;
pub mod state;
pub mod tag;

/// An error and its sources, joined with ": " (for logs and response bodies).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
