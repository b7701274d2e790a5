//! Test harnesses shared by the integration tests.

pub mod lab;
pub mod loadclient;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod sidecar;
pub mod transparent;
pub mod wait;
