//! The resilience suite (`tests/resilience.rs`: resilience: restarts, retries, idempotence, dead workers) again, on PostgreSQL: the
//! same file, and the one harness in `tests/common` runs this target's servers on a throwaway
//! PostgreSQL cluster because of the target's name.

#[path = "resilience.rs"]
mod suite;
