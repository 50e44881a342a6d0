//! Durable timers and timeouts. Deadlines live in the runs' persisted state; this module only
//! keeps them in memory in deadline order (rebuilt at start-up) and tells the engine when they are
//! due. Every firing is checked against the current state, so a stale timer does nothing.

use foldhash::HashMap;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use tokio::sync::Notify;

/// What a timer is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A workflow's durable timer (`ctx.sleep`).
    WorkflowTimer {
        /// Run.
        run_id: String,
        /// Timer sequence number.
        seq: u32,
    },
    /// The whole run's timeout.
    RunTimeout {
        /// Run.
        run_id: String,
    },
    /// A running workflow task took too long.
    WorkflowTaskTimeout {
        /// Run.
        run_id: String,
        /// Which dispatch.
        dispatch: u64,
    },
    /// A failed workflow task may be offered again.
    WorkflowTaskRetry {
        /// Run.
        run_id: String,
        /// The attempt to offer.
        attempt: u32,
    },
    /// Nobody took a task from a sticky queue in time.
    StickyScheduleToStart {
        /// Run.
        run_id: String,
        /// Which enqueue.
        enqueue: u64,
    },
    /// An activity attempt waited too long on its queue.
    ActivityScheduleToStart {
        /// Run.
        run_id: String,
        /// Activity.
        scheduled_event_id: u64,
        /// Attempt.
        attempt: u32,
    },
    /// An activity attempt ran too long.
    ActivityStartToClose {
        /// Run.
        run_id: String,
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
        run_id: String,
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
        run_id: String,
        /// Activity.
        scheduled_event_id: u64,
    },
    /// A session still has no placement at its creation deadline.
    SessionCreation {
        /// Session id (in the run id slot, so lookups by run find nothing).
        run_id: String,
    },
    /// A session reached its execution timeout.
    SessionExpiry {
        /// Session id.
        run_id: String,
    },
    /// The retry backoff of an activity ended.
    ActivityRetry {
        /// Run.
        run_id: String,
        /// Activity.
        scheduled_event_id: u64,
        /// The attempt to offer.
        attempt: u32,
    },
}

impl TimerKey {
    /// The run the timer belongs to.
    pub fn run_id(&self) -> &str {
        match self {
            TimerKey::WorkflowTimer { run_id, .. }
            | TimerKey::RunTimeout { run_id }
            | TimerKey::WorkflowTaskTimeout { run_id, .. }
            | TimerKey::WorkflowTaskRetry { run_id, .. }
            | TimerKey::StickyScheduleToStart { run_id, .. }
            | TimerKey::ActivityScheduleToStart { run_id, .. }
            | TimerKey::ActivityStartToClose { run_id, .. }
            | TimerKey::ActivityHeartbeat { run_id, .. }
            | TimerKey::ActivityScheduleToClose { run_id, .. }
            | TimerKey::SessionCreation { run_id }
            | TimerKey::SessionExpiry { run_id }
            | TimerKey::ActivityRetry { run_id, .. } => run_id,
        }
    }
}

#[derive(Default)]
struct Armed {
    by_time: BTreeSet<(i64, TimerKey)>,
    /// Armed deadlines per run, so a run that closes takes its timers with it instead of leaving
    /// them to fire uselessly (and to pile up under load).
    by_run: HashMap<String, Vec<(i64, TimerKey)>>,
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
            armed
                .by_run
                .entry(key.run_id().to_string())
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
    pub fn cancel_run(&self, run_id: &str) {
        let mut armed = self.armed.lock();
        if let Some(list) = armed.by_run.remove(run_id) {
            for entry in list {
                armed.by_time.remove(&entry);
            }
        }
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
            if let Some(list) = armed.by_run.get_mut(key.run_id()) {
                list.retain(|(t, k)| !(*t == at && *k == key));
                if list.is_empty() {
                    armed.by_run.remove(key.run_id());
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
        q.cancel_run("a");
        assert_eq!(q.len(), 1);
        assert_eq!(q.take_due(100), vec![k("b", 1)]);
        assert!(q.is_empty());
    }
}
