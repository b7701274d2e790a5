//! staybound keeps legacy clients working while the highly-available service behind them fails over.
//!
//! # Layout, in the order data flows
//! * [`config`]: the TOML file, validated into typed settings.
//! * [`listener`]: accept loops; a client over `max_connections` is refused at once.
//! * [`session`]: one client session: [`session::ride_out`] rides out a takeover to get an upstream,
//!   [`session::relay`] moves the bytes, and the session ends with its epoch.
//! * [`upstream`]: the connector (the only place that dials out, and the one that counts attempts), DNS,
//!   retries.
//! * [`sockopt`]: every socket option, on both legs of a session, listeners and UDP sockets;
//!   [`oserror`]: the one function that reads an errno.
//! * [`udp`]: `protocol = "udp"` services: flows, replies from the address the client used.
//! * [`failover`]: the detector of each service: probe connection, TCP and UDP probes, host state, epochs.
//! * [`intercept`]: transparent mode: nftables rules send this host's connections to the upstream into the
//!   listener; the original destination says whether a connection was meant for the service.
//! * [`guard`]: guard mode: no listener; at an epoch's end this host's sockets to the upstream are destroyed.
//! * [`service`]: what a session needs of its service, in one place.
//! * [`metrics`] and [`admin`]: what operators see; [`admin`]'s guard decides who may ask; [`registry`]:
//!   what the server shows them of itself.
//! * [`limits`]: the open-file limit, raised at start, and the sessions it allows; `ratelog`: log lines
//!   that cannot flood; `label`: metric label enums.
//! * [`server`]: starts, reloads and drains all of the above; [`upgrade`] hands its sockets to a new binary.
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod failover;
pub(crate) mod guard;
pub mod intercept;
mod label;
pub mod limits;
pub(crate) mod listener;
pub mod metrics;
pub mod oserror;
pub(crate) mod pace;
pub(crate) mod ratelog;
pub(crate) mod registry;
pub mod server;
pub(crate) mod service;
pub(crate) mod session;
pub mod sockopt;
pub mod status;
pub mod udp;
pub mod upgrade;
pub mod upstream;
