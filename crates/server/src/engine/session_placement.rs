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
        else {
            return;
        };
        if info.reason != reason {
            info.reason = reason.to_string();
            txn.touched_sessions.insert(session_id.to_string().into());
        }
    }

    /// Tries every creating session, oldest first, after something freed resources or changed
    /// the fleet.
    pub(super) fn try_place_pending(&self, st: &mut EngineState, now: i64, txn: &mut Txn) {
        let mut pending: Vec<(i64, String, String, String)> = st
            .sessions
            .values()
            .filter_map(|s| s.info.as_ref())
            .filter(|i| sessions::is_in(i, SessionPhase::Creating))
            .map(|i| {
                let class = i.options.as_ref().map(placement_class).unwrap_or_default();
                (
                    i.created_ms,
                    i.session_id.clone(),
                    i.namespace.clone(),
                    class,
                )
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        // Oldest first, so an early large request is not starved by later small ones.
        pending.sort();
        // Within one pass placements only take resources, so a request refused once is refused
        // again for every later session asking the same: those are not tried (with thousands
        // waiting, trying each on every release made a release cost as much as the queue).
        let mut workers_by_namespace: HashMap<String, Vec<WorkerRecord>> = HashMap::new();
        let mut refused: HashMap<(String, String), String> = HashMap::new();
        for (_, id, namespace, class) in pending {
            let session_id = SessionId::from(&id);
            let key = (namespace, class);
            if let Some(reason) = refused.get(&key) {
                Self::note_waiting_reason(st, &session_id, reason, txn);
                continue;
            }
            let workers = workers_by_namespace
                .entry(key.0.clone())
                .or_insert_with(|| self.matcher.workers_in(&key.0));
            if let Placed::No(reason) = Self::try_place_among(st, &session_id, workers, now, txn) {
                refused.insert(key, reason);
            }
        }
    }
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

/// Everything of a session's options that its placement depends on: two sessions of one class
/// fit exactly where the other would.
fn placement_class(options: &pb::SessionOptions) -> String {
    let mut resources: Vec<(&String, &u64)> = options.resources.iter().collect();
    resources.sort();
    format!(
        "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
        options.task_queue,
        options.worker,
        options.requirements,
        options.gpus,
        options.packing,
        options.liveness_timeout_ms,
        resources
    )
}
