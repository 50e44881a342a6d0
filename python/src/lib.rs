//! `tether._core`: the native half of tether's Python SDK. The Rust SDK's client and worker do
//! the work (connections and their retries, polling, slots, heartbeats, batched reports,
//! capability detection, TLS, the codec chain); Python code sees values. Payloads cross this
//! boundary as bytes with their encoding, which the Python package (`python/tether`) converts.
//!
//! Everything async here runs on the tokio runtime of pyo3-async-runtimes and is awaited from
//! asyncio; Python callables (activities) are run on the asyncio loop of the worker that
//! registered them. Both directions cross through `bridge`, whose completions run on the
//! loop's own thread, batched.

mod bridge;
mod client;
mod convert;
mod worker;
mod workflow;

use pyo3::prelude::*;

// Only Rust's allocations: Python's objects are Python's own (a payload is copied into bytes).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(new_id, m)?)?;
    // A debug build runs several times slower: benchmarks refuse one rather than mislead.
    m.add("DEBUG_BUILD", cfg!(debug_assertions))?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<client::PySession>()?;
    m.add_class::<worker::PyWorker>()?;
    m.add_class::<worker::PyActivityContext>()?;
    Ok(())
}

/// Sends the core's logs to stderr, filtered by `filter` (RUST_LOG syntax, e.g. "info" or
/// "tether_sdk=debug"). Once per process; later calls change nothing.
#[pyfunction]
fn init_logging(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A fresh id that sorts by time (a UUIDv7), for the ids the client makes up: the store indexes
/// runs by id, and random ids put every insert on a page of its own (Python 3.11's `uuid` has
/// no v7).
#[pyfunction]
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
