//! Placing sessions: a new one at once, and the waiting ones when resources free or the fleet
//! changes, oldest first.

use super::*;
use crate::matching::WorkerRecord;

impl Engine {
    /// Tries to place a creating session now. Returns whether it was placed.
    pub(super) fn try_place(
        &self,
        st: &mut EngineState,
        session_id: &SessionId,
        now: i64,
        txn: &mut Txn,
    ) -> bool {
        let Some(namespace) = st
            .sessions
            .get(session_id)
            .and_then(|s| s.info.as_ref())
            .map(|i| i.namespace.clone())
        else {
            return false;
        };
        let workers = self.matcher.workers_in(&namespace);
        Self::try_place_among(st, session_id, &workers, now, txn) == Placed::Yes
    }

    /// Tries to place a creating session on one of `workers` (its namespace's).
    fn try_place_among(
        st: &mut EngineState,
        session_id: &SessionId,
        workers: &[WorkerRecord],
        now: i64,
        txn: &mut Txn,
    ) -> Placed {
        let Some(session) = st.sessions.get(session_id) else {
            return Placed::NotCreating;
        };
        let info = session.info.clone().unwrap_or_default();
        let Some(Ok(open)) = SessionPhase::of(&info).map(SessionPhase::place) else {
            return Placed::NotCreating;
        };
        let options = info.options.clone().unwrap_or_default();
        let request = sessions::request_of(&options);
        let candidates = sessions::candidates(&options, workers, now);
        let session = st.sessions.get_mut(session_id).expect("checked");
        let info_mut = session.info.as_mut().expect("has info");
        match sessions::place(&info.namespace, &request, &candidates, &st.reservations) {
            Ok(placement) => {
                st.reservations.reserve(&info.namespace, &placement);
                let hostname = workers
                    .iter()
                    .find(|w| w.identity == placement.identity)
                    .and_then(|w| w.caps.host.as_ref())
                    .map(|h| h.hostname.clone())
                    .unwrap_or_default();
                sessions::record_placement(info_mut, open, &placement, hostname, now);
                tracing::info!(session_id = session_id.as_str(), worker = placement.identity, gpus = ?info_mut.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), "session placed");
                let placed = info_mut.clone();
                txn.fx.sessions_settled.push(placed.clone());
                txn.touched_sessions.insert(session_id.to_string().into());
                Self::notify_session_owner(st, &placed, Ok(()), now, txn);
                Placed::Yes
            }
            Err(reason) => {
                Self::note_waiting_reason(st, session_id, &reason, txn);
                Placed::No(reason)
            }
        }
    }

    /// Records why a creating session still waits, when that changed.
    fn note_waiting_reason(
        st: &mut EngineState,
        session_id: &SessionId,
        reason: &str,
        txn: &mut Txn,
    ) {
        let Some(info) = st
            .sessions
            .get_mut(session_id)
            .and_then(|s| s.info.as_mut())
            .filter(|i| sessions::is_in(i, SessionPhase::Creating))
        else {
            return;
        };
        if info.reason != reason {
            info.reason = reason.to_string();
            txn.touched_sessions.insert(session_id.to_string().into());
        }
    }

    /// Puts a creating session that could not be placed at once among the waiting ones.
    pub(super) fn enqueue_waiting(waiting: &mut WaitingSessions, info: &pb::SessionInfo) {
        let class = placement_class(&info.namespace, info.options.as_ref());
        waiting.insert(
            (info.created_ms, SessionId::from(&info.session_id)),
            Waiting {
                namespace: info.namespace.clone(),
                class,
                reason: info.reason.clone(),
            },
        );
    }

    /// Tries every creating session, oldest first, after something freed resources or changed
    /// the fleet.
    pub(super) fn try_place_pending(&self, st: &mut EngineState, now: i64, txn: &mut Txn) {
        if st.waiting_sessions.is_empty() {
            return;
        }
        // Taken out for the pass: placing needs the rest of the state, and a pass adds no
        // waiting session.
        let mut waiting = std::mem::take(&mut st.waiting_sessions);
        // Within one pass placements only take resources, so a request refused once is refused
        // again for every later session of its class: those are not tried, and are told the
        // reason only when it changed (with thousands waiting, trying each on every release
        // made a release cost as much as the queue).
        let mut workers_by_namespace: HashMap<String, Vec<WorkerRecord>> = HashMap::new();
        let mut refused: HashMap<String, String> = HashMap::new();
        waiting.retain(|(created_ms, session_id), w| {
            let refused_reason = refused.get(&w.class);
            if refused_reason.is_some_and(|r| *r == w.reason) {
                // Nothing to try and nothing to tell: the session is not even looked up.
                return true;
            }
            // (`close_session` removes its entry; this only guards against one left behind.)
            let still_waiting = st
                .sessions
                .get(session_id)
                .and_then(|s| s.info.as_ref())
                .is_some_and(|i| {
                    i.created_ms == *created_ms && sessions::is_in(i, SessionPhase::Creating)
                });
            if !still_waiting {
                return false;
            }
            if let Some(reason) = refused_reason {
                Self::note_waiting_reason(st, session_id, reason, txn);
                w.reason = reason.clone();
                return true;
            }
            let workers = workers_by_namespace
                .entry(w.namespace.clone())
                .or_insert_with(|| self.matcher.workers_in(&w.namespace));
            match Self::try_place_among(st, session_id, workers, now, txn) {
                Placed::No(reason) => {
                    w.reason = reason.clone();
                    refused.insert(w.class.clone(), reason);
                    true
                }
                Placed::Yes | Placed::NotCreating => false,
            }
        });
        debug_assert!(
            st.waiting_sessions.is_empty(),
            "a pass adds no waiting session"
        );
        st.waiting_sessions = waiting;
    }
}

/// The creating sessions by (created, id): oldest first, so that an early large request is not
/// starved by later small ones. Kept beside `sessions` so that a
/// release reads only these: scanning, keying and sorting every session at each release cost
/// more than the release once thousands were open or waiting.
pub(super) type WaitingSessions = BTreeMap<(i64, SessionId), Waiting>;

/// A session waiting to be placed.
pub(super) struct Waiting {
    namespace: String,
    /// See `placement_class`.
    class: String,
    /// The reason the session last recorded for waiting, kept here so that an unchanged reason
    /// costs no look-up of the session.
    reason: String,
}

/// What came of one try to place a session.
#[derive(Debug, PartialEq, Eq)]
enum Placed {
    Yes,
    /// It waits, for this reason.
    No(String),
    /// It is not (or no longer) creating.
    NotCreating,
}

/// The namespace and everything of a session's options that its placement depends on: two
/// sessions of one class fit exactly where the other would.
fn placement_class(namespace: &str, options: Option<&pb::SessionOptions>) -> String {
    let Some(options) = options else {
        return namespace.to_string();
    };
    let mut resources: Vec<(&String, &u64)> = options.resources.iter().collect();
    resources.sort();
    format!(
        "{namespace}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
        options.task_queue,
        options.worker,
        options.requirements,
        options.gpus,
        options.packing,
        options.liveness_timeout_ms,
        resources
    )
}
