//! The workflows suite (`tests/workflows.rs`: workflows: activities, retries, timeouts, cancellation, signals, timers) again, on PostgreSQL: the
//! same file, and the one harness in `tests/common` runs this target's servers on a throwaway
//! PostgreSQL cluster because of the target's name.

#[path = "workflows.rs"]
mod suite;
