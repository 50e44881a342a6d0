//! Task queues and the worker registry.
//!
//! Per (namespace, queue, kind): tasks grouped by requirement class (FIFO inside a class, and
//! across classes by arrival), and a list of parked long polls. A task added while a poll that
//! can take it is parked is handed over at once (sync match); otherwise it waits. "Can take" is
//! decided per (worker, class) once and cached until the worker's capabilities change, so a
//! dispatch does not re-evaluate requirements. Among parked polls that can take a task with
//! preferences, the highest-scoring worker wins.
//!
//! Entries are only references: the engine checks on dispatch that the task is still current, so
//! a stale entry (a run that closed, an attempt that timed out) is skipped.

use crate::api::pb::Capabilities;
use crate::caps::Requirements;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
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

/// The name of a worker's own queue.
pub fn host_queue_name(identity: &str) -> String {
    format!("{HOST_QUEUE_PREFIX}{identity}")
}

/// Host queues are named with this prefix.
pub const HOST_QUEUE_PREFIX: &str = "host/";

/// Index of an interned requirement class; 0 is "no requirements".
type ClassId = usize;

struct Class {
    text: String,
    reqs: Requirements,
}

/// The sending half of a parked poll, shared by every queue the poll waits on: the first queue
/// to hand over a task takes it, and the others then see the poll as gone.
type SharedSender = Arc<parking_lot::Mutex<Option<oneshot::Sender<(TaskRef, ClassId, QueueKey)>>>>;

struct Waiter {
    identity: String,
    tx: SharedSender,
}

impl Waiter {
    fn is_closed(&self) -> bool {
        self.tx.lock().as_ref().is_none_or(|s| s.is_closed())
    }
}

#[derive(Default)]
struct Queue {
    by_class: HashMap<ClassId, VecDeque<(u64, TaskRef)>>,
    /// Arrival number of the oldest task of each non-empty class.
    fronts: BTreeMap<u64, ClassId>,
    len: usize,
    waiting: VecDeque<Waiter>,
    pollers: HashMap<String, i64>,
}

/// What the server knows about a registered worker.
#[derive(Debug, Clone)]
pub struct WorkerRecord {
    /// Namespace it registered in.
    pub namespace: String,
    /// Identity.
    pub identity: String,
    /// Its capabilities.
    pub caps: Arc<Capabilities>,
    /// Task queues it said it polls.
    pub task_queues: Vec<String>,
    /// When it registered.
    pub registered_ms: i64,
    /// Last heartbeat or poll.
    pub last_seen_ms: i64,
    /// False once it missed the liveness timeout.
    pub alive: bool,
    /// Most sessions it hosts at once.
    pub max_sessions: u32,
    /// (class -> Some(score) if it satisfies the class, None if not), valid until caps change.
    class_cache: HashMap<ClassId, Option<u64>>,
    /// Classes below this id are in `class_cache`.
    evaluated: ClassId,
    /// The classes it satisfies (those below `evaluated`).
    eligible: Vec<ClassId>,
}

impl WorkerRecord {
    /// Evaluates the classes interned since the last call (each (worker, class) pair once).
    fn catch_up(&mut self, classes: &[Class]) {
        while self.evaluated < classes.len() {
            let id = self.evaluated;
            let reqs = &classes[id].reqs;
            let result = reqs
                .satisfied_by(&self.caps)
                .then(|| reqs.score(&self.caps));
            self.class_cache.insert(id, result);
            if result.is_some() {
                self.eligible.push(id);
            }
            self.evaluated += 1;
        }
    }

    fn forget_classes(&mut self) {
        self.class_cache.clear();
        self.eligible.clear();
        self.evaluated = 0;
    }
}

struct State {
    queues: HashMap<QueueKey, Queue>,
    workers: HashMap<(String, String), WorkerRecord>,
    classes: Vec<Class>,
    class_ids: HashMap<String, ClassId>,
    /// Arrival numbers of new tasks count up from the middle of the range; tasks put back at the
    /// head of their queue count down from it, so they sort before everything that arrived.
    next_seq: u64,
    front_seq: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            queues: HashMap::new(),
            workers: HashMap::new(),
            classes: vec![Class {
                text: String::new(),
                reqs: Requirements::default(),
            }],
            class_ids: [(String::new(), 0)].into(),
            next_seq: 1 << 62,
            front_seq: 1 << 62,
        }
    }
}

impl State {
    fn class_id(&mut self, requirements: &str) -> ClassId {
        if let Some(id) = self.class_ids.get(requirements) {
            return *id;
        }
        // Requirements were validated and canonicalised when the activity was scheduled.
        let reqs = Requirements::parse(requirements).unwrap_or_default();
        let id = self.classes.len();
        self.classes.push(Class {
            text: requirements.to_string(),
            reqs,
        });
        self.class_ids.insert(requirements.to_string(), id);
        id
    }

    /// Some(score) when `identity` may take tasks of `class`.
    fn eligibility(&mut self, namespace: &str, identity: &str, class: ClassId) -> Option<u64> {
        let key = (namespace.to_string(), identity.to_string());
        let worker = self.workers.get_mut(&key);
        if class == 0 {
            // No requirements: any live poller, registered or not.
            return match worker {
                Some(w) if !w.alive => None,
                _ => Some(0),
            };
        }
        let worker = worker?;
        if !worker.alive {
            return None;
        }
        if let Some(cached) = worker.class_cache.get(&class) {
            return *cached;
        }
        worker.catch_up(&self.classes);
        worker.class_cache.get(&class).copied().flatten()
    }
}

/// Snapshot of a queue for `describe`.
#[derive(Debug, Default, Clone)]
pub struct QueueStats {
    /// Tasks waiting (may include stale entries not yet skipped).
    pub backlog: usize,
    /// Identities that polled, with the time of their last poll.
    pub pollers: Vec<(String, i64)>,
    /// (requirements text, tasks waiting) per class.
    pub classes: Vec<(String, usize)>,
}

/// All task queues and registered workers of the server.
#[derive(Default)]
pub struct Matcher {
    state: Mutex<State>,
}

/// A parked poll. Dropping it (timeout, or the caller went away) puts back any task that was
/// handed to it but not taken, so no task is lost between the hand-over and the caller.
struct ParkedPoll<'a> {
    rx: Option<oneshot::Receiver<(TaskRef, ClassId, QueueKey)>>,
    matcher: &'a Matcher,
}

impl Drop for ParkedPoll<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok((task, class, key)) = rx.try_recv() {
                let mut st = self.matcher.state.lock();
                Matcher::offer(&mut st, &key, task, class, true);
            }
        }
    }
}

impl Matcher {
    /// Offers a task with its (canonical) requirements: to the best parked poll that can take it,
    /// otherwise to the backlog.
    pub fn add(&self, key: &QueueKey, task: TaskRef, requirements: &str) {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::offer(&mut st, key, task, class, false)
    }

    fn offer(st: &mut State, key: &QueueKey, task: TaskRef, class: ClassId, front: bool) {
        let has_preferences = !st.classes[class].reqs.soft.is_empty();
        let mut task = task;
        loop {
            // The waiter to hand to: the first eligible one, or the best-scoring one.
            let candidates: Vec<(usize, String)> = match st.queues.get(key) {
                Some(q) => q
                    .waiting
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| !w.is_closed())
                    .map(|(i, w)| (i, w.identity.clone()))
                    .collect(),
                None => Vec::new(),
            };
            let mut chosen: Option<(usize, u64)> = None;
            for (i, identity) in candidates {
                if let Some(score) = st.eligibility(&key.namespace, &identity, class) {
                    if chosen.is_none_or(|(_, best)| score > best) {
                        chosen = Some((i, score));
                    }
                    if !has_preferences {
                        break;
                    }
                }
            }
            let Some((index, _)) = chosen else { break };
            let queue = st.queues.get_mut(key).expect("queue exists");
            let waiter = queue.waiting.remove(index).expect("index valid");
            let sender = waiter.tx.lock().take();
            match sender.map(|s| s.send((task, class, key.clone()))) {
                Some(Ok(())) => return,
                Some(Err((returned, _, _))) => task = returned,
                None => unreachable!("closed waiters are filtered out above"),
            }
        }
        let seq = if front {
            st.front_seq -= 1;
            st.front_seq
        } else {
            st.next_seq += 1;
            st.next_seq
        };
        let queue = st.queues.entry(key.clone()).or_default();
        let deque = queue.by_class.entry(class).or_default();
        if front {
            if let Some((old, _)) = deque.front() {
                queue.fronts.remove(old);
            }
            deque.push_front((seq, task));
            queue.fronts.insert(seq, class);
        } else {
            deque.push_back((seq, task));
            if deque.len() == 1 {
                queue.fronts.insert(seq, class);
            }
        }
        queue.len += 1;
    }

    /// Takes the oldest task this worker can run, without waiting.
    pub fn try_take(&self, key: &QueueKey, identity: &str, now_ms: i64) -> Option<TaskRef> {
        let mut st = self.state.lock();
        Self::touch(&mut st, key, identity, now_ms);
        Self::take_locked(&mut st, key, identity).map(|(task, _)| task)
    }

    fn touch(st: &mut State, key: &QueueKey, identity: &str, now_ms: i64) {
        if identity.is_empty() {
            return;
        }
        let queue = st.queues.entry(key.clone()).or_default();
        match queue.pollers.get_mut(identity) {
            Some(seen) => *seen = now_ms,
            None => {
                queue.pollers.insert(identity.to_string(), now_ms);
            }
        }
        // A poll is a sign of life.
        if let Some(w) = st
            .workers
            .get_mut(&(key.namespace.clone(), identity.to_string()))
        {
            w.last_seen_ms = now_ms;
            w.alive = true;
        }
    }

    fn take_locked(st: &mut State, key: &QueueKey, identity: &str) -> Option<(TaskRef, ClassId)> {
        let State {
            queues,
            workers,
            classes,
            ..
        } = st;
        let queue = queues.get_mut(key)?;
        if queue.len == 0 {
            return None;
        }
        let worker = workers.get_mut(&(key.namespace.clone(), identity.to_string()));
        // The oldest task among the classes this worker satisfies. Walk whichever is shorter:
        // the worker's eligible classes, or the queue's non-empty classes in arrival order.
        let (seq, class) = match worker {
            None => {
                // Unregistered pollers know no capabilities: only work without requirements.
                let (seq, _) = queue.by_class.get(&0)?.front()?;
                (*seq, 0)
            }
            Some(w) if !w.alive => return None,
            Some(w) => {
                w.catch_up(classes);
                if w.eligible.len() < queue.fronts.len() {
                    w.eligible
                        .iter()
                        .filter_map(|c| queue.by_class.get(c)?.front().map(|(s, _)| (*s, *c)))
                        .min()?
                } else {
                    queue
                        .fronts
                        .iter()
                        .find(|(_, c)| w.class_cache.get(c).copied().flatten().is_some())
                        .map(|(s, c)| (*s, *c))?
                }
            }
        };
        queue.fronts.remove(&seq);
        let deque = queue.by_class.get_mut(&class).expect("class deque");
        let (_, task) = deque.pop_front().expect("front exists");
        if let Some((next, _)) = deque.front() {
            queue.fronts.insert(*next, class);
        }
        queue.len -= 1;
        Some((task, class))
    }

    /// After a worker's capabilities changed, hands its parked polls any waiting task it can now
    /// take (otherwise those tasks would wait until one of its polls returned).
    fn rematch(st: &mut State, namespace: &str, identity: &str) {
        let keys: Vec<QueueKey> = st
            .queues
            .iter()
            .filter(|(k, q)| {
                k.namespace == namespace
                    && q.len > 0
                    && q.waiting.iter().any(|w| w.identity == identity)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            loop {
                let queue = st.queues.get_mut(&key).expect("listed");
                queue.waiting.retain(|w| !w.is_closed());
                let Some(index) = queue.waiting.iter().position(|w| w.identity == identity) else {
                    break;
                };
                let Some((task, class)) = Self::take_locked(st, &key, identity) else {
                    break;
                };
                let queue = st.queues.get_mut(&key).expect("listed");
                let waiter = queue.waiting.remove(index).expect("found");
                let sender = waiter.tx.lock().take();
                let sent = match sender {
                    Some(s) => s
                        .send((task, class, key.clone()))
                        .map_err(|(t, c, _)| (t, c)),
                    None => Err((task, class)),
                };
                if let Err((task, class)) = sent {
                    Self::offer(st, &key, task, class, true);
                }
            }
        }
    }

    /// Takes the oldest task this worker can run, waiting up to `timeout` for one.
    pub async fn poll(
        &self,
        key: &QueueKey,
        identity: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<TaskRef> {
        self.poll_many(std::slice::from_ref(key), identity, now_ms, timeout)
            .await
            .map(|(task, _)| task)
    }

    /// Like [`Matcher::poll`] over several queues at once (the earlier ones are tried first);
    /// returns the task and the queue it came from.
    pub async fn poll_many(
        &self,
        keys: &[QueueKey],
        identity: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<(TaskRef, QueueKey)> {
        let rx = {
            let mut st = self.state.lock();
            for key in keys {
                Self::touch(&mut st, key, identity, now_ms);
            }
            for key in keys {
                if let Some((task, _)) = Self::take_locked(&mut st, key, identity) {
                    return Some((task, key.clone()));
                }
            }
            if timeout.is_zero() {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            let shared: SharedSender = Arc::new(parking_lot::Mutex::new(Some(tx)));
            for key in keys {
                let queue = st.queues.entry(key.clone()).or_default();
                // Parked polls whose callers left are dropped here so the list cannot grow.
                if queue.waiting.len() >= 64 {
                    queue.waiting.retain(|w| !w.is_closed());
                }
                queue.waiting.push_back(Waiter {
                    identity: identity.to_string(),
                    tx: shared.clone(),
                });
            }
            rx
        };
        let mut parked = ParkedPoll {
            rx: Some(rx),
            matcher: self,
        };
        let rx = parked.rx.as_mut().expect("just set");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok((task, _, key))) => {
                parked.rx = None;
                Some((task, key))
            }
            _ => None,
        }
    }

    /// Backlog, pollers and classes of one queue.
    pub fn stats(&self, key: &QueueKey) -> QueueStats {
        let st = self.state.lock();
        match st.queues.get(key) {
            None => QueueStats::default(),
            Some(q) => QueueStats {
                backlog: q.len,
                pollers: q.pollers.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                classes: q
                    .by_class
                    .iter()
                    .filter(|(_, d)| !d.is_empty())
                    .map(|(c, d)| (st.classes[*c].text.clone(), d.len()))
                    .collect(),
            },
        }
    }

    /// Every (identity, queue, kind, last poll) seen in a namespace.
    pub fn pollers_in(&self, namespace: &str) -> Vec<(String, String, TaskKind, i64)> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for (key, q) in st.queues.iter() {
            if key.namespace != namespace {
                continue;
            }
            for (identity, seen) in &q.pollers {
                out.push((identity.clone(), key.queue.clone(), key.kind, *seen));
            }
        }
        out
    }

    // ------------------------------------------------------------------------------------------
    // Worker registry
    // ------------------------------------------------------------------------------------------

    /// Registers (or re-registers) a worker with its capabilities.
    pub fn register(
        &self,
        namespace: &str,
        identity: &str,
        caps: Capabilities,
        task_queues: Vec<String>,
        max_sessions: u32,
        now_ms: i64,
    ) {
        let mut st = self.state.lock();
        st.workers.insert(
            (namespace.to_string(), identity.to_string()),
            WorkerRecord {
                namespace: namespace.to_string(),
                identity: identity.to_string(),
                caps: Arc::new(caps),
                task_queues,
                registered_ms: now_ms,
                last_seen_ms: now_ms,
                alive: true,
                max_sessions,
                class_cache: HashMap::new(),
                evaluated: 0,
                eligible: Vec::new(),
            },
        );
    }

    /// Records a heartbeat; new capabilities replace the old ones (and invalidate the cache).
    /// Returns false when the worker is not registered.
    pub fn heartbeat(
        &self,
        namespace: &str,
        identity: &str,
        caps: Option<Capabilities>,
        now_ms: i64,
    ) -> bool {
        let mut st = self.state.lock();
        let Some(w) = st
            .workers
            .get_mut(&(namespace.to_string(), identity.to_string()))
        else {
            return false;
        };
        w.last_seen_ms = now_ms;
        let revived = !w.alive;
        w.alive = true;
        let mut changed = false;
        if let Some(caps) = caps {
            if *w.caps != caps {
                w.caps = Arc::new(caps);
                w.forget_classes();
                changed = true;
            }
        }
        if changed || revived {
            Self::rematch(&mut st, namespace, identity);
        }
        true
    }

    /// Marks workers dead that were not seen within `timeout`; returns their identities.
    pub fn expire(&self, now_ms: i64, timeout: Duration) -> Vec<(String, String)> {
        let mut st = self.state.lock();
        let mut dead = Vec::new();
        for w in st.workers.values_mut() {
            if w.alive && now_ms - w.last_seen_ms > timeout.as_millis() as i64 {
                w.alive = false;
                dead.push((w.namespace.clone(), w.identity.clone()));
            }
        }
        dead
    }

    /// Forgets what only a long-gone worker would use: pollers not seen since `before_ms`,
    /// queues left with no task, no parked poll and no recent poller (each worker start makes a
    /// new sticky queue, so without this they pile up), and dead workers not seen since
    /// `before_ms` unless `in_use` says something still refers to them. Returns how many queues
    /// and workers were dropped.
    pub fn prune(&self, before_ms: i64, in_use: impl Fn(&str, &str) -> bool) -> (usize, usize) {
        let mut st = self.state.lock();
        let queues_before = st.queues.len();
        st.queues.retain(|_, q| {
            q.pollers.retain(|_, seen| *seen >= before_ms);
            q.waiting.retain(|w| !w.is_closed());
            q.by_class.retain(|_, tasks| !tasks.is_empty());
            q.len > 0 || !q.waiting.is_empty() || !q.pollers.is_empty()
        });
        let workers_before = st.workers.len();
        st.workers.retain(|(namespace, identity), w| {
            w.alive || w.last_seen_ms >= before_ms || in_use(namespace, identity)
        });
        (
            queues_before - st.queues.len(),
            workers_before - st.workers.len(),
        )
    }

    /// (namespace, alive) → how many registered workers.
    pub fn worker_counts(&self) -> HashMap<(String, bool), usize> {
        let st = self.state.lock();
        let mut counts = HashMap::new();
        for w in st.workers.values() {
            *counts.entry((w.namespace.clone(), w.alive)).or_default() += 1;
        }
        counts
    }

    /// Tasks waiting per queue (sticky queues left out: one per worker, and their backlog is
    /// the workflow's own business).
    pub fn backlogs(&self) -> Vec<(QueueKey, usize)> {
        let st = self.state.lock();
        st.queues
            .iter()
            .filter(|(k, _)| !k.queue.starts_with(crate::worker::STICKY_QUEUE_PREFIX))
            .map(|(k, q)| (k.clone(), q.len))
            .collect()
    }

    /// Registered workers of a namespace.
    pub fn workers_in(&self, namespace: &str) -> Vec<WorkerRecord> {
        let st = self.state.lock();
        let mut out: Vec<WorkerRecord> = st
            .workers
            .values()
            .filter(|w| w.namespace == namespace)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// When a registered worker was last heard from (without copying its record, which holds
    /// its whole class cache: the session liveness check asks for every open session).
    pub fn last_seen(&self, namespace: &str, identity: &str) -> Option<i64> {
        self.state
            .lock()
            .workers
            .get(&(namespace.to_string(), identity.to_string()))
            .map(|w| w.last_seen_ms)
    }

    /// One registered worker.
    pub fn worker(&self, namespace: &str, identity: &str) -> Option<WorkerRecord> {
        self.state
            .lock()
            .workers
            .get(&(namespace.to_string(), identity.to_string()))
            .cloned()
    }

    /// Why no live worker of `namespace` polling `queue` can take work with `requirements`
    /// ("" when one can).
    pub fn explain(&self, namespace: &str, queue: &str, requirements: &str) -> String {
        let Ok(reqs) = Requirements::parse(requirements) else {
            return String::new();
        };
        if reqs.hard.is_empty() {
            return String::new();
        }
        let st = self.state.lock();
        let live: Vec<&WorkerRecord> = st
            .workers
            .values()
            .filter(|w| w.namespace == namespace && w.alive)
            .collect();
        let on_queue: Vec<&WorkerRecord> = live
            .iter()
            .copied()
            .filter(|w| {
                w.task_queues.iter().any(|q| q == queue) || queue == host_queue_name(&w.identity)
            })
            .collect();
        let pool = if on_queue.is_empty() { live } else { on_queue };
        reqs.explain(pool.iter().map(|w| (w.identity.as_str(), w.caps.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::GpuDevice;

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

    fn gpus(n: usize, gib: u64) -> Capabilities {
        Capabilities {
            gpus: (0..n)
                .map(|i| GpuDevice {
                    index: i as u32,
                    name: "A100".into(),
                    memory_total_bytes: gib << 30,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn prune_forgets_idle_queues_and_long_dead_workers_only() {
        let m = Matcher::default();
        let idle = QueueKey::new("default", "sticky/old", TaskKind::Workflow);
        let backlog = QueueKey::new("default", "busy", TaskKind::Activity);
        let recent = QueueKey::new("default", "recent", TaskKind::Activity);
        // Polled long ago and empty; a task waits with no poller; polled just now.
        assert_eq!(m.poll(&idle, "old-worker", 100, Duration::ZERO).await, None);
        m.add(&backlog, task(1), "");
        assert_eq!(m.poll(&recent, "w", 5_000, Duration::ZERO).await, None);
        for (identity, seen) in [("gone", 100), ("hosting", 100), ("quiet", 4_000)] {
            m.register(
                "default",
                identity,
                Capabilities::default(),
                vec![],
                1,
                seen,
            );
        }
        m.expire(5_000, Duration::from_millis(500));
        let (queues, workers) = m.prune(1_000, |_, identity| identity == "hosting");
        assert_eq!((queues, workers), (1, 1));
        assert!(m.stats(&idle).pollers.is_empty());
        assert_eq!(m.stats(&backlog).backlog, 1, "a queue with tasks stays");
        assert_eq!(m.stats(&recent).pollers.len(), 1, "a recent poller stays");
        let left: Vec<String> = m
            .workers_in("default")
            .into_iter()
            .map(|w| w.identity)
            .collect();
        assert_eq!(
            left,
            vec!["hosting", "quiet"],
            "dead but in use, or dead recently"
        );
        assert_eq!(
            m.poll(&backlog, "w", 6_000, Duration::ZERO).await,
            Some(task(1))
        );
    }

    #[tokio::test]
    async fn backlog_is_fifo() {
        let m = Matcher::default();
        m.add(&key(), task(1), "");
        m.add(&key(), task(2), "");
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, Some(task(1)));
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, Some(task(2)));
        assert_eq!(m.poll(&key(), "w", 0, Duration::ZERO).await, None);
    }

    #[tokio::test]
    async fn parked_poll_gets_task_at_once() {
        let m = Arc::new(Matcher::default());
        let m2 = m.clone();
        let poll =
            tokio::spawn(async move { m2.poll(&key(), "w", 0, Duration::from_secs(30)).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if m.state
                .lock()
                .queues
                .get(&key())
                .is_some_and(|q| !q.waiting.is_empty())
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "poll never parked");
            tokio::task::yield_now().await;
        }
        m.add(&key(), task(7), "");
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
            let mut fut = Box::pin(m.poll(&k, "w", 0, Duration::from_secs(30)));
            assert!(futures::poll!(fut.as_mut()).is_pending());
            m.add(&k, task(3), "");
            drop(fut);
        }
        assert_eq!(m.poll(&k, "w", 0, Duration::ZERO).await, Some(task(3)));
    }

    #[tokio::test]
    async fn only_satisfying_workers_get_constrained_tasks() {
        let m = Matcher::default();
        m.register("default", "small", gpus(1, 16), vec!["q".into()], 10, 0);
        m.register("default", "big", gpus(2, 80), vec!["q".into()], 10, 0);
        m.add(&key(), task(1), "gpu.count>=2, gpu.memory>=40GiB");
        m.add(&key(), task(2), "");
        // The small worker skips the GPU task and gets the unconstrained one behind it.
        assert_eq!(m.try_take(&key(), "small", 0), Some(task(2)));
        assert_eq!(m.try_take(&key(), "small", 0), None);
        assert_eq!(m.try_take(&key(), "unregistered", 0), None);
        assert_eq!(m.try_take(&key(), "big", 0), Some(task(1)));
    }

    #[tokio::test]
    async fn highest_preference_among_parked_polls_wins() {
        let m = Arc::new(Matcher::default());
        let mut a = gpus(1, 80);
        a.labels.insert("dataset".into(), "coco".into());
        let mut b = gpus(1, 80);
        b.labels.insert("dataset".into(), "imagenet".into());
        m.register("default", "a", a, vec![], 10, 0);
        m.register("default", "b", b, vec![], 10, 0);
        let (ma, mb) = (m.clone(), m.clone());
        let pa = tokio::spawn(async move { ma.poll(&key(), "a", 0, Duration::from_secs(2)).await });
        let pb = tokio::spawn(async move { mb.poll(&key(), "b", 0, Duration::from_secs(2)).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while m
            .state
            .lock()
            .queues
            .get(&key())
            .map_or(0, |q| q.waiting.len())
            < 2
        {
            assert!(std::time::Instant::now() < deadline, "polls never parked");
            tokio::task::yield_now().await;
        }
        m.add(
            &key(),
            task(9),
            "gpu.count>=1, prefer label.dataset=imagenet:50",
        );
        assert_eq!(
            pb.await.unwrap(),
            Some(task(9)),
            "b has the preferred dataset"
        );
        assert_eq!(pa.await.unwrap(), None);
    }

    #[tokio::test]
    async fn dead_workers_get_nothing_until_seen_again() {
        let m = Matcher::default();
        m.register("default", "w", gpus(1, 80), vec![], 10, 0);
        m.add(&key(), task(1), "gpu.count>=1");
        assert_eq!(
            m.expire(20_000, Duration::from_secs(15)),
            vec![("default".into(), "w".into())]
        );
        // A heartbeat-less dead worker's parked poll is skipped: emulate with eligibility.
        assert_eq!(m.state.lock().eligibility("default", "w", 1), None);
        // Polling again is a sign of life.
        assert_eq!(m.try_take(&key(), "w", 20_001), Some(task(1)));
    }

    #[tokio::test]
    async fn parked_poll_gets_work_its_new_label_allows() {
        let m = Arc::new(Matcher::default());
        m.register("default", "w", Capabilities::default(), vec![], 10, 0);
        m.add(&key(), task(1), "label.model_loaded=llama-70b");
        let m2 = m.clone();
        let poll =
            tokio::spawn(async move { m2.poll(&key(), "w", 0, Duration::from_secs(30)).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while m
            .state
            .lock()
            .queues
            .get(&key())
            .is_none_or(|q| q.waiting.is_empty())
        {
            assert!(std::time::Instant::now() < deadline, "poll never parked");
            tokio::task::yield_now().await;
        }
        let mut caps = Capabilities::default();
        caps.labels
            .insert("model_loaded".into(), "llama-70b".into());
        m.heartbeat("default", "w", Some(caps), 1);
        let got = tokio::time::timeout(Duration::from_secs(5), poll)
            .await
            .expect("handed over at once");
        assert_eq!(got.unwrap(), Some(task(1)));
    }

    #[test]
    fn label_change_invalidates_the_cache() {
        let m = Matcher::default();
        m.register("default", "w", Capabilities::default(), vec![], 10, 0);
        m.add(&key(), task(1), "label.model_loaded=llama-70b");
        assert_eq!(m.try_take(&key(), "w", 0), None);
        let mut caps = Capabilities::default();
        caps.labels
            .insert("model_loaded".into(), "llama-70b".into());
        assert!(m.heartbeat("default", "w", Some(caps), 1));
        assert_eq!(m.try_take(&key(), "w", 1), Some(task(1)));
    }

    #[test]
    fn explanation_for_unplaceable_work() {
        let m = Matcher::default();
        m.register("default", "gpu-3", gpus(2, 40), vec!["q".into()], 10, 0);
        let text = m.explain("default", "q", "gpu.memory>=80GiB");
        assert_eq!(
            text,
            "needs gpu.memory>=80GiB; best is worker gpu-3 with 2×A100 40GiB (0 matching)"
        );
        assert_eq!(m.explain("default", "q", "gpu.memory>=40GiB"), "");
    }
}
