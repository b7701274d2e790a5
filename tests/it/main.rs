//! staybound's integration tests, built as one test binary.
//!
//! why: each file under `tests/` used to be a binary of its own, and each compiled `support/` and linked
//! the library again; one binary compiles and links them once. Run one file's tests with a filter on its
//! module, e.g. `cargo test --test it neighbor_lab::` (nextest: the same arguments).
//!
//! Loopback tests drive staybound in this process ([`support::proxy`]) or as a child process
//! ([`support::process`]); the `*_lab` tests build network namespaces ([`support::lab`]) and need root.

mod support;

mod admin;
mod cli;
mod client_gone_lab;
mod connect_hook_lab;
mod demo;
mod deploy;
mod dns_lab;
mod failover_lab;
mod faults_lab;
mod floods;
mod guard_lab;
mod herd_lab;
mod intercept_lab;
mod lab_smoke;
mod monitoring;
mod neighbor_lab;
mod neighbor_netns;
mod operate;
mod preset_lab;
mod redis;
mod reload;
mod ride_out;
mod rideout_lab;
mod tcp_proxy;
mod udp_lab;
mod udp_proxy;
mod upgrade;
