//! Task queues: a FIFO backlog and a list of parked long polls per (namespace, queue, kind).
//!
//! A task added while a poll is parked is handed over at once (sync match); otherwise it waits in
//! the backlog. Entries are only references: the engine checks on dispatch that the task is still
//! current, so a stale entry (a run that closed, an attempt that timed out) is skipped.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::oneshot;

/// Workflow tasks and activity tasks live on separate queues of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Workflow tasks.
    Workflow,
    /// Activity tasks.
    Activity,
}

impl TaskKind {
    /// Name used in CLI output.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Workflow => "workflow",
            TaskKind::Activity => "activity",
        }
    }
}

/// Identifies one queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueKey {
    /// Namespace.
    pub namespace: String,
    /// Queue name.
    pub queue: String,
    /// Kind of task.
    pub kind: TaskKind,
}

impl QueueKey {
    /// Builds a key.
    pub fn new(namespace: &str, queue: &str, kind: TaskKind) -> Self {
        QueueKey {
            namespace: namespace.to_string(),
            queue: queue.to_string(),
            kind,
        }
    }
}

/// A reference to a pending task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskRef {
    /// The pending workflow task of a run.
    Workflow {
        /// Run.
        run_id: String,
    },
    /// One attempt of an activity.
    Activity {
        /// Run.
        run_id: String,
        /// The activity's scheduled event id.
        scheduled_event_id: u64,
        /// Attempt.
        attempt: u32,
    },
}

#[derive(Default)]
struct Queue {
    backlog: VecDeque<TaskRef>,
    waiting: VecDeque<oneshot::Sender<TaskRef>>,
    pollers: HashMap<String, i64>,
}

/// Snapshot of a queue for `describe`.
#[derive(Debug, Default, Clone)]
pub struct QueueStats {
    /// Tasks waiting (may include stale entries not yet skipped).
    pub backlog: usize,
    /// Identities that polled, with the time of their last poll.
    pub pollers: Vec<(String, i64)>,
}

/// All task queues of the server.
#[derive(Default)]
pub struct Matcher {
    queues: Mutex<HashMap<QueueKey, Queue>>,
}

/// A parked poll. Dropping it (timeout, or the caller went away) puts back any task that was
/// handed to it but not taken, so no task is lost between the hand-over and the caller.
struct ParkedPoll<'a> {
    rx: Option<oneshot::Receiver<TaskRef>>,
    matcher: &'a Matcher,
    key: &'a QueueKey,
}

impl Drop for ParkedPoll<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(task) = rx.try_recv() {
                self.matcher.requeue_front(self.key, task);
            }
        }
    }
}

impl Matcher {
    /// Offers a task: to a parked poll if there is one, otherwise to the backlog.
    pub fn add(&self, key: &QueueKey, task: TaskRef) {
        let mut queues = self.queues.lock();
        let queue = queues.entry(key.clone()).or_default();
        let mut task = task;
        while let Some(waiter) = queue.waiting.pop_front() {
            match waiter.send(task) {
                Ok(()) => return,
                Err(returned) => task = returned,
            }
        }
        queue.backlog.push_back(task);
    }

    fn requeue_front(&self, key: &QueueKey, task: TaskRef) {
        let mut queues = self.queues.lock();
        let queue = queues.entry(key.clone()).or_default();
        let mut task = task;
        while let Some(waiter) = queue.waiting.pop_front() {
            match waiter.send(task) {
                Ok(()) => return,
                Err(returned) => task = returned,
            }
        }
        queue.backlog.push_front(task);
    }

    /// Takes the oldest task, waiting up to `timeout` for one.
    pub async fn poll(
        &self,
        key: &QueueKey,
        identity: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<TaskRef> {
        let rx = {
            let mut queues = self.queues.lock();
            let queue = queues.entry(key.clone()).or_default();
            if !identity.is_empty() {
                if let Some(seen) = queue.pollers.get_mut(identity) {
                    *seen = now_ms;
                } else {
                    queue.pollers.insert(identity.to_string(), now_ms);
                }
            }
            if let Some(task) = queue.backlog.pop_front() {
                return Some(task);
            }
            if timeout.is_zero() {
                return None;
            }
            // Parked polls whose callers left are dropped here so the list cannot grow forever.
            if queue.waiting.len() >= 64 {
                queue.waiting.retain(|w| !w.is_closed());
            }
            let (tx, rx) = oneshot::channel();
            queue.waiting.push_back(tx);
            rx
        };
        let mut parked = ParkedPoll {
            rx: Some(rx),
            matcher: self,
            key,
        };
        let rx = parked.rx.as_mut().expect("just set");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(task)) => {
                parked.rx = None;
                Some(task)
            }
            _ => None,
        }
    }

    /// Takes the oldest task without waiting.
    pub fn try_take(&self, key: &QueueKey, identity: &str, now_ms: i64) -> Option<TaskRef> {
        let mut queues = self.queues.lock();
        let queue = queues.get_mut(key)?;
        if let Some(seen) = queue.pollers.get_mut(identity) {
            *seen = now_ms;
        }
        queue.backlog.pop_front()
    }

    /// Backlog size and pollers of one queue.
    pub fn stats(&self, key: &QueueKey) -> QueueStats {
        let queues = self.queues.lock();
        match queues.get(key) {
            None => QueueStats::default(),
            Some(q) => QueueStats {
                backlog: q.backlog.len(),
                pollers: q.pollers.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            },
        }
    }

    /// Every (identity, queue, last poll) seen in a namespace.
    pub fn pollers_in(&self, namespace: &str) -> Vec<(String, String, TaskKind, i64)> {
        let queues = self.queues.lock();
        let mut out = Vec::new();
        for (key, q) in queues.iter() {
            if key.namespace != namespace {
                continue;
            }
            for (identity, seen) in &q.pollers {
                out.push((identity.clone(), key.queue.clone(), key.kind, *seen));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> QueueKey {
        QueueKey::new("default", "q", TaskKind::Activity)
    }

    fn task(n: u64) -> TaskRef {
        TaskRef::Activity {
            run_id: "r".into(),
            scheduled_event_id: n,
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn backlog_is_fifo() {
        let m = Matcher::default();
        m.add(&key(), task(1));
        m.add(&key(), task(2));
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, Some(task(1)));
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, Some(task(2)));
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, None);
    }

    #[tokio::test]
    async fn parked_poll_gets_task_at_once() {
        let m = std::sync::Arc::new(Matcher::default());
        let m2 = m.clone();
        let poll =
            tokio::spawn(async move { m2.poll(&key(), "w", 0, Duration::from_secs(30)).await });
        // Wait until the poll is parked, then add.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if m.queues
                .lock()
                .get(&key())
                .is_some_and(|q| !q.waiting.is_empty())
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "poll never parked");
            tokio::task::yield_now().await;
        }
        m.add(&key(), task(7));
        assert_eq!(poll.await.unwrap(), Some(task(7)));
        assert_eq!(m.stats(&key()).backlog, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_times_out_empty() {
        let m = Matcher::default();
        assert_eq!(m.poll(&key(), "w", 0, Duration::from_secs(60)).await, None);
    }

    #[tokio::test]
    async fn task_handed_to_abandoned_poll_is_not_lost() {
        let m = Matcher::default();
        let k = key();
        {
            let fut = m.poll(&k, "w", 0, Duration::from_secs(30));
            let mut fut = Box::pin(fut);
            // Park the poll, then abandon it after a task was handed over.
            assert!(futures::poll!(fut.as_mut()).is_pending());
            m.add(&k, task(3));
            drop(fut);
        }
        assert_eq!(m.poll(&k, "w", 0, Duration::ZERO).await, Some(task(3)));
    }
}
