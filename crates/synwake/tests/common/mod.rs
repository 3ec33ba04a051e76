//! The shared fixtures now live in the dev-only `synwake-test-support` crate; this module
//! keeps the old `common::...` paths working.

#![allow(unused_imports)] // each test binary uses a different part

pub use synwake_test_support::*;
