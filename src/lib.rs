//! tether: a durable-execution server and Rust worker SDK for fleets of unlike machines.
//!
//! The map of the crate:
//! - [`api`]: the wire contract generated from `proto/` (the only place that knows the wire).
//! - [`types`]: typed ids, limits and name validation.
//! - [`caps`]: capability detection (NVML, sysinfo, declared inventories) and requirements.
//! - [`codec`]: the data converter (JSON payloads), used by clients and workers only.
//! - [`store`]: the `Store` trait and the embedded SQLite store (WAL, group commit).
//! - [`server`]: the gRPC frontend, the engine (history state machine, matching, timers).
//! - [`client`]: start, signal, cancel, terminate, describe workflows; standalone activities.
//! - [`worker`]: the worker: pollers, the activity executor and the sticky workflow cache.
//! - [`workflow`]: the deterministic workflow runtime and `WorkflowContext`.
//! - [`activity`]: `ActivityContext` and typed activity errors.
//! - [`tls`]: mTLS configuration and development certificates.
#![warn(missing_docs)]

pub mod activity;
pub mod api;
pub mod caps;
pub mod client;
pub mod codec;
pub mod fuzz_checks;
pub mod server;
pub mod store;
pub mod tls;
pub mod types;
pub mod worker;
pub mod workflow;

// The README's Rust examples are whole programs; compiling them with the doctests keeps what a
// reader pastes building.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;
