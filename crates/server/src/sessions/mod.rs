//! Sessions without I/O: their phases and transitions (`phase`), who owns one (`owner`), where
//! one is placed and what it reserves (`placement`), and what placing writes into its record
//! (`record`). The engine fetches workers and stores results; every decision is made here.
//!
//! A session is placed by the server, not by whichever worker wins a race: among live workers
//! polling the session's task queue that satisfy its hard requirements, have a free session slot
//! and enough unreserved GPUs (passing the per-GPU predicates) and resource units, the one with the
//! highest preference score wins, then the packing policy decides: `tightest` leaves the fewest
//! free GPUs behind (keeping large free blocks for large requests), `spread` the most. Concrete
//! GPU indices and resource units are reserved, and reservations never overlap.

mod owner;
mod phase;
mod placement;
mod record;

pub use owner::SessionOwner;
pub use phase::{is_in, is_live, Ending, NotLive, OwnerNotice, SessionEnd, SessionPhase};
pub use placement::{place, Candidate, Held, Packing, Placement, Request, Reservations};
pub use record::{candidates, placement_of, record_placement, request_of, DEFAULT_MAX_SESSIONS};
