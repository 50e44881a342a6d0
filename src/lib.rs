//! tether: a durable-execution server and Rust worker SDK for fleets of unlike machines.
//!
//! This package is a facade over the workspace's crates (see ARCHITECTURE.md); the paths below
//! are the ones applications use:
//! - [`api`]: the wire contract generated from `proto/` (`tether-wire`).
//! - [`types`]: typed ids, limits and name validation (`tether-core`).
//! - [`caps`]: capability detection (NVML, sysinfo, declared inventories) and requirements.
//! - [`codec`]: the data converter (JSON payloads), used by clients and workers only.
//! - [`client`]: start, signal, cancel, terminate, describe workflows; standalone activities.
//! - [`worker`]: the worker: pollers, the activity executor and the sticky workflow cache.
//! - [`workflow`]: the deterministic workflow runtime and `WorkflowContext`.
//! - [`activity`]: `ActivityContext` and typed activity errors.
//! - [`tls`]: mTLS configuration (and, with the `cli` feature, development certificates).
//! - [`server`] and [`store`] (feature `server`, on by default): the gRPC frontend, the engine
//!   and the embedded SQLite store (`tether-server`).
//!
//! An application that only starts and hosts work can depend on `tether-sdk` alone, or on this
//! package with `default-features = false`: neither compiles the server, the store, HTTP or
//! the CLI.
#![warn(missing_docs)]

pub use tether_core::types;
pub use tether_sdk::{activity, caps, client, codec, fuzz_checks, worker, workflow};
pub use tether_wire as api;

/// mTLS configuration: the certificate files servers, clients and workers load, and (with the
/// `cli` feature) development certificates.
pub mod tls {
    #[cfg(feature = "cli")]
    pub use tether_cli::{write_dev_certs, DevCa};
    pub use tether_core::tls::*;
}

#[cfg(feature = "server")]
pub use tether_server as server;

/// The `Store` trait and the embedded SQLite store (WAL, group commit).
#[cfg(feature = "server")]
pub use tether_server::store;

// The README's Rust examples are whole programs; compiling them with the doctests keeps what a
// reader pastes building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;
