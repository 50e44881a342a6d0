//! The routing suite (`tests/routing.rs`: capability routing: requirements, preferences, host queues) again, on PostgreSQL: the
//! same file, and the one harness in `tests/common` runs this target's servers on a throwaway
//! PostgreSQL cluster because of the target's name.

#[path = "routing.rs"]
mod suite;
