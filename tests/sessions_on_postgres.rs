//! The sessions suite (`tests/sessions.rs`: sessions: placement, pinning, reservations, failure and recovery) again, on PostgreSQL: the
//! same file, and the one harness in `tests/common` runs this target's servers on a throwaway
//! PostgreSQL cluster because of the target's name.

#[path = "sessions.rs"]
mod suite;
