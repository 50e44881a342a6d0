//! Durable timers and timeouts. Deadlines live in the runs' persisted state; this module only
//! keeps them in memory in deadline order (rebuilt at start-up) and tells the engine when they are
//! due. Every firing is checked against the current state, so a stale timer does nothing.

use foldhash::HashMap;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use tether_core::types::{RunId, SessionId};
use tokio::sync::Notify;

/// What a timer is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A workflow's durable timer (`ctx.sleep`).
    WorkflowTimer {
        /// Run.
        run_id: RunId,
        /// Timer sequence number.
        seq: u32,
    },
    /// The whole run's timeout.
    RunTimeout {
        /// Run.
        run_id: RunId,
    },
    /// A running workflow task took too long.
    WorkflowTaskTimeout {
        /// Run.
        run_id: RunId,
        /// Which dispatch.
        dispatch: u64,
    },
    /// A failed workflow task may be offered again.
    WorkflowTaskRetry {
        /// Run.
        run_id: RunId,
        /// The attempt to offer.
        attempt: u32,
    },
    /// Nobody took a task from a sticky queue in time.
    StickyScheduleToStart {
        /// Run.
        run_id: RunId,
        /// Which enqueue.
        enqueue: u64,
    },
    /// An activity attempt waited too long on its queue.
    ActivityScheduleToStart {
        /// Run.
        run_id: RunId,
        /// Activity.
        scheduled_event_id: u64,
        /// Attempt.
        attempt: u32,
    },
    /// An activity attempt ran too long.
    ActivityStartToClose {
        /// Run.
        run_id: RunId,
        /// Activity.
        scheduled_event_id: u64,
        /// Attempt.
        attempt: u32,
        /// Which hand-out of the attempt (one that was handed back and out again keeps its
        /// attempt number, and the old hand-out's timer must not end the new one).
        dispatch: u64,
    },
    /// An activity attempt stopped heartbeating.
    ActivityHeartbeat {
        /// Run.
        run_id: RunId,
        /// Activity.
        scheduled_event_id: u64,
        /// Attempt.
        attempt: u32,
        /// Which hand-out of the attempt (one that was handed back and out again keeps its
        /// attempt number, and the old hand-out's timer must not end the new one).
        dispatch: u64,
    },
    /// The activity as a whole ran out of time.
    ActivityScheduleToClose {
        /// Run.
        run_id: RunId,
        /// Activity.
        scheduled_event_id: u64,
    },
    /// A session still has no placement at its creation deadline.
    SessionCreation {
        /// The session.
        session_id: SessionId,
    },
    /// A session reached its execution timeout.
    SessionExpiry {
        /// The session.
        session_id: SessionId,
    },
    /// The retry backoff of an activity ended.
    ActivityRetry {
        /// Run.
        run_id: RunId,
        /// Activity.
        scheduled_event_id: u64,
        /// The attempt to offer.
        attempt: u32,
    },
}

/// What a timer belongs to, and goes with: a run's timers when the run closes, a session's
/// when the session does. Apart, because a session id is the caller's choice and may read like
/// a run id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerOwner<'a> {
    /// A run, by id.
    Run(&'a str),
    /// A session, by id.
    Session(&'a str),
}

impl TimerKey {
    /// What the timer belongs to.
    pub fn owner(&self) -> TimerOwner<'_> {
        match self {
            TimerKey::SessionCreation { session_id } | TimerKey::SessionExpiry { session_id } => {
                TimerOwner::Session(session_id.as_str())
            }
            _ => TimerOwner::Run(self.run_id().map(RunId::as_str).unwrap_or_default()),
        }
    }

    /// The run the timer belongs to (none for a session's timers).
    pub fn run_id(&self) -> Option<&RunId> {
        Some(match self {
            TimerKey::WorkflowTimer { run_id, .. }
            | TimerKey::RunTimeout { run_id }
            | TimerKey::WorkflowTaskTimeout { run_id, .. }
            | TimerKey::WorkflowTaskRetry { run_id, .. }
            | TimerKey::StickyScheduleToStart { run_id, .. }
            | TimerKey::ActivityScheduleToStart { run_id, .. }
            | TimerKey::ActivityStartToClose { run_id, .. }
            | TimerKey::ActivityHeartbeat { run_id, .. }
            | TimerKey::ActivityScheduleToClose { run_id, .. }
            | TimerKey::ActivityRetry { run_id, .. } => run_id,
            TimerKey::SessionCreation { .. } | TimerKey::SessionExpiry { .. } => return None,
        })
    }
}

#[derive(Default)]
struct Armed {
    by_time: BTreeSet<(i64, TimerKey)>,
    /// Armed deadlines per run, so a run that closes takes its timers with it instead of leaving
    /// them to fire uselessly (and to pile up under load).
    by_run: ByOwner,
    /// The same per session.
    by_session: ByOwner,
}

/// Armed deadlines per owner id.
type ByOwner = HashMap<String, Vec<(i64, TimerKey)>>;

impl Armed {
    /// The per-owner index a timer is in, and its owner's id there.
    fn index_of<'k>(&mut self, key: &'k TimerKey) -> (&mut ByOwner, &'k str) {
        match key.owner() {
            TimerOwner::Run(id) => (&mut self.by_run, id),
            TimerOwner::Session(id) => (&mut self.by_session, id),
        }
    }

    /// Drops every timer one owner's index lists.
    fn cancel(&mut self, owner: TimerOwner<'_>) {
        let list = match owner {
            TimerOwner::Run(id) => self.by_run.remove(id),
            TimerOwner::Session(id) => self.by_session.remove(id),
        };
        for entry in list.into_iter().flatten() {
            self.by_time.remove(&entry);
        }
    }
}

/// The deadlines, ordered by time.
#[derive(Default)]
pub struct TimerQueue {
    armed: Mutex<Armed>,
    changed: Notify,
}

impl TimerQueue {
    /// Adds deadlines; wakes the timer loop if one is earlier than what it waits for.
    pub fn arm(&self, timers: impl IntoIterator<Item = (i64, TimerKey)>) {
        let mut armed = self.armed.lock();
        let before = armed.by_time.first().map(|(t, _)| *t);
        for (at, key) in timers {
            let (index, owner) = armed.index_of(&key);
            index
                .entry(owner.to_string())
                .or_default()
                .push((at, key.clone()));
            armed.by_time.insert((at, key));
        }
        let after = armed.by_time.first().map(|(t, _)| *t);
        drop(armed);
        if after != before {
            self.changed.notify_one();
        }
    }

    /// Drops every timer of a run (it closed).
    pub fn cancel_run(&self, run_id: &RunId) {
        self.armed.lock().cancel(TimerOwner::Run(run_id));
    }

    /// Drops every timer of a session (it closed).
    pub fn cancel_session(&self, session_id: &SessionId) {
        self.armed.lock().cancel(TimerOwner::Session(session_id));
    }

    /// Removes and returns every timer due at `now_ms`.
    pub fn take_due(&self, now_ms: i64) -> Vec<TimerKey> {
        let mut armed = self.armed.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = armed.by_time.first() {
            if *at > now_ms {
                break;
            }
            let (at, key) = armed.by_time.pop_first().expect("checked");
            let (index, owner) = armed.index_of(&key);
            if let Some(list) = index.get_mut(owner) {
                list.retain(|(t, k)| !(*t == at && *k == key));
                if list.is_empty() {
                    index.remove(owner);
                }
            }
            due.push(key);
        }
        due
    }

    /// The next deadline, if any.
    pub fn next_deadline(&self) -> Option<i64> {
        self.armed.lock().by_time.first().map(|(t, _)| *t)
    }

    /// Resolves when a deadline earlier than the current one was armed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Number of armed timers.
    pub fn len(&self) -> usize {
        self.armed.lock().by_time.len()
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_in_order() {
        let q = TimerQueue::default();
        let k = |seq| TimerKey::WorkflowTimer {
            run_id: "r".into(),
            seq,
        };
        q.arm([(30, k(3)), (10, k(1)), (20, k(2))]);
        assert_eq!(q.next_deadline(), Some(10));
        assert_eq!(q.take_due(20), vec![k(1), k(2)]);
        assert_eq!(q.take_due(25), Vec::<TimerKey>::new());
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_closed_run_takes_its_timers_with_it() {
        let q = TimerQueue::default();
        let k = |run: &str, seq| TimerKey::WorkflowTimer {
            run_id: run.into(),
            seq,
        };
        q.arm([(10, k("a", 1)), (20, k("a", 2)), (15, k("b", 1))]);
        q.cancel_run(&RunId::from("a"));
        assert_eq!(q.len(), 1);
        assert_eq!(q.take_due(100), vec![k("b", 1)]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_session_and_a_run_of_the_same_id_keep_their_timers_apart() {
        let q = TimerQueue::default();
        let run = TimerKey::RunTimeout { run_id: "x".into() };
        let session = TimerKey::SessionExpiry {
            session_id: "x".into(),
        };
        q.arm([(10, run.clone()), (20, session.clone())]);
        q.cancel_session(&SessionId::from("x"));
        assert_eq!(q.take_due(100), vec![run.clone()]);
        q.arm([(10, run), (20, session.clone())]);
        q.cancel_run(&RunId::from("x"));
        assert_eq!(q.take_due(100), vec![session]);
        assert!(q.is_empty());
    }
}
