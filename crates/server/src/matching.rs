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

use foldhash::{HashMap, HashMapExt};
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tether_core::requirements::Requirements;
use tether_wire::pb::Capabilities;
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

pub use tether_wire::{host_queue_name, HOST_QUEUE_PREFIX};

/// What a parked poll receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Handover {
    /// A task reference: the poll's caller dispatches it (and makes the dispatch durable).
    Task(TaskRef),
    /// An activity attempt already handed out to this poll, durably, in the transaction that
    /// created the task (no second commit on the way to an idle worker).
    Dispatched(Box<tether_wire::pb::PollActivityTaskResponse>),
}

/// Index of an interned requirement class; 0 is "no requirements".
type ClassId = usize;

struct Class {
    text: String,
    reqs: Requirements,
}

/// The sending half of a parked poll, shared by every queue the poll waits on: the first queue
/// to hand over a task takes it, and the others then see the poll as gone.
type SharedSender = Arc<parking_lot::Mutex<Option<oneshot::Sender<(Handover, ClassId, QueueKey)>>>>;

struct Waiter {
    identity: String,
    /// The polling process (see `RegisterWorkerRequest.instance_id`).
    instance: String,
    tx: SharedSender,
}

/// A parked poll taken off its queues to receive an attempt dispatched in a transaction, once
/// that transaction commits.
pub struct ClaimedPoll {
    /// The poller's worker identity.
    pub identity: String,
    /// The poller's process.
    pub instance: String,
    key: QueueKey,
    class: ClassId,
    sender: oneshot::Sender<(Handover, ClassId, QueueKey)>,
    /// Where the sender came from: shared with the poll's entries on its other queues, which
    /// see it again should the claim be undone.
    shared: SharedSender,
}

impl ClaimedPoll {
    /// Hands the dispatched attempt over; gives it back if the poll ended meanwhile (its caller
    /// then never sees it: the dispatch must be taken back).
    pub fn hand_over(
        self,
        response: tether_wire::pb::PollActivityTaskResponse,
    ) -> Result<(), Box<tether_wire::pb::PollActivityTaskResponse>> {
        match self.sender.send((
            Handover::Dispatched(Box::new(response)),
            self.class,
            self.key,
        )) {
            Ok(()) => Ok(()),
            Err((Handover::Dispatched(r), _, _)) => Err(r),
            Err(_) => unreachable!("sent a dispatched attempt"),
        }
    }
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
    /// False once it missed the liveness timeout, or stopped.
    pub alive: bool,
    /// It shut down and deregistered (never revived by a stray poll; only a new registration
    /// brings it back).
    pub stopped: bool,
    /// Why it stopped.
    pub stop_reason: String,
    /// The process that holds the identity.
    pub instance_id: String,
    /// That process's id on its host.
    pub pid: u32,
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

/// Registered workers by namespace, then identity: looked up with borrowed names, so that the
/// checks on every poll and dispatch allocate nothing.
#[derive(Default)]
struct Workers(HashMap<String, HashMap<String, WorkerRecord>>);

impl Workers {
    fn get(&self, namespace: &str, identity: &str) -> Option<&WorkerRecord> {
        self.0.get(namespace)?.get(identity)
    }

    fn get_mut(&mut self, namespace: &str, identity: &str) -> Option<&mut WorkerRecord> {
        self.0.get_mut(namespace)?.get_mut(identity)
    }

    fn insert(&mut self, record: WorkerRecord) {
        self.0
            .entry(record.namespace.clone())
            .or_default()
            .insert(record.identity.clone(), record);
    }

    fn remove(&mut self, namespace: &str, identity: &str) {
        if let Some(of) = self.0.get_mut(namespace) {
            of.remove(identity);
        }
    }

    fn values(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.0.values().flat_map(|m| m.values())
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut WorkerRecord> {
        self.0.values_mut().flat_map(|m| m.values_mut())
    }

    fn in_namespace(&self, namespace: &str) -> impl Iterator<Item = &WorkerRecord> {
        self.0.get(namespace).into_iter().flat_map(|m| m.values())
    }

    fn len(&self) -> usize {
        self.0.values().map(|m| m.len()).sum()
    }

    fn retain(&mut self, mut keep: impl FnMut(&WorkerRecord) -> bool) {
        for of in self.0.values_mut() {
            of.retain(|_, w| keep(w));
        }
        self.0.retain(|_, of| !of.is_empty());
    }
}

struct State {
    queues: HashMap<QueueKey, Queue>,
    workers: Workers,
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
            workers: Workers::default(),
            classes: vec![Class {
                text: String::new(),
                reqs: Requirements::default(),
            }],
            class_ids: [(String::new(), 0)].into_iter().collect(),
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
        let worker = self.workers.get_mut(namespace, identity);
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

/// A worker's registration, as the registry takes it.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Namespace.
    pub namespace: String,
    /// Identity.
    pub identity: String,
    /// The registering process.
    pub instance_id: String,
    /// The process it replaces, if it knows the old one is gone.
    pub previous_instance_id: String,
    /// Its process id.
    pub pid: u32,
    /// Capabilities.
    pub caps: Capabilities,
    /// Task queues it polls.
    pub task_queues: Vec<String>,
    /// Session slots.
    pub max_sessions: u32,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The identity was unknown here.
    New,
    /// The same process registered again (after a server restart, or a missed heartbeat).
    Again,
    /// A new process took the identity over from a gone one (`previous`).
    Replaced {
        /// The instance it replaced.
        previous: String,
        /// The previous instance shut down gracefully and may still be finishing its running
        /// attempts (nothing says it is gone): those stay its own until they report or time
        /// out.
        previous_draining: bool,
    },
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
    /// Attempts handed to polls that ended before taking them: the engine takes them back.
    returned: Mutex<Vec<tether_wire::pb::PollActivityTaskResponse>>,
    returned_notify: tokio::sync::Notify,
}

/// A parked poll. Dropping it (timeout, or the caller went away) puts back any task that was
/// handed to it but not taken, so no task is lost between the hand-over and the caller.
struct ParkedPoll<'a> {
    rx: Option<oneshot::Receiver<(Handover, ClassId, QueueKey)>>,
    matcher: &'a Matcher,
}

impl Drop for ParkedPoll<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            match rx.try_recv() {
                Ok((Handover::Task(task), class, key)) => {
                    let mut st = self.matcher.state.lock();
                    Matcher::offer(&mut st, &key, task, class, true);
                }
                Ok((Handover::Dispatched(response), _, _)) => {
                    self.matcher.give_back(response);
                }
                Err(_) => {}
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

    /// Takes the parked poll that a task with `requirements` would be handed to (the best
    /// eligible one) off its queues, without handing anything over yet: the caller dispatches
    /// the task to it inside its transaction and hands the result over after the commit.
    pub fn claim_waiter(&self, key: &QueueKey, requirements: &str) -> Option<ClaimedPoll> {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::claim_locked(&mut st, key, class)
    }

    /// Like [`Matcher::claim_waiter`], and when no parked poll can take the task, puts it in
    /// the backlog (one lock, one look at the waiting polls). Only for tasks whose every
    /// hand-out is made durable before the worker sees it (activity attempts): such a task may
    /// be visible before the transaction that created it commits, since its hand-out commits
    /// after it.
    pub fn claim_or_enqueue(
        &self,
        key: &QueueKey,
        task: TaskRef,
        requirements: &str,
    ) -> Option<(ClaimedPoll, TaskRef)> {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        match Self::claim_locked(&mut st, key, class) {
            Some(claimed) => Some((claimed, task)),
            None => {
                Self::offer(&mut st, key, task, class, false);
                None
            }
        }
    }

    fn claim_locked(st: &mut State, key: &QueueKey, class: ClassId) -> Option<ClaimedPoll> {
        loop {
            let index = Self::best_waiter(st, key, class)?;
            let queue = st.queues.get_mut(key).expect("queue exists");
            let waiter = queue.waiting.remove(index).expect("index valid");
            let sender = waiter.tx.lock().take();
            if let Some(sender) = sender.filter(|s| !s.is_closed()) {
                return Some(ClaimedPoll {
                    identity: waiter.identity,
                    instance: waiter.instance,
                    key: key.clone(),
                    class,
                    sender,
                    shared: waiter.tx,
                });
            }
        }
    }

    /// Puts a claimed poll back on its queue (its task turned out to be stale).
    pub fn unclaim(&self, claimed: ClaimedPoll) {
        let mut st = self.state.lock();
        *claimed.shared.lock() = Some(claimed.sender);
        let queue = st.queues.entry(claimed.key).or_default();
        queue.waiting.push_front(Waiter {
            identity: claimed.identity,
            instance: claimed.instance,
            tx: claimed.shared,
        });
    }

    /// Records an attempt handed to a poll (or caller) that ended before taking it.
    pub fn give_back(&self, response: Box<tether_wire::pb::PollActivityTaskResponse>) {
        self.returned.lock().push(*response);
        self.returned_notify.notify_one();
    }

    /// Takes the attempts given back so far, without waiting.
    pub fn take_returned(&self) -> Vec<tether_wire::pb::PollActivityTaskResponse> {
        std::mem::take(&mut *self.returned.lock())
    }

    /// Waits for attempts handed to polls that ended before taking them, and takes them.
    pub async fn returned(&self) -> Vec<tether_wire::pb::PollActivityTaskResponse> {
        loop {
            let taken = self.take_returned();
            if !taken.is_empty() {
                return taken;
            }
            self.returned_notify.notified().await;
        }
    }

    /// Index of the parked poll a task of `class` goes to: the first eligible one, or the
    /// best-scoring one when the class has preferences.
    fn best_waiter(st: &mut State, key: &QueueKey, class: ClassId) -> Option<usize> {
        let has_preferences = !st.classes[class].reqs.soft.is_empty();
        let candidates: Vec<(usize, String)> = match st.queues.get(key) {
            Some(q) if !q.waiting.is_empty() => q
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.is_closed())
                .map(|(i, w)| (i, w.identity.clone()))
                .collect(),
            _ => return None,
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
        chosen.map(|(i, _)| i)
    }

    fn offer(st: &mut State, key: &QueueKey, task: TaskRef, class: ClassId, front: bool) {
        let mut task = task;
        while let Some(index) = Self::best_waiter(st, key, class) {
            let queue = st.queues.get_mut(key).expect("queue exists");
            let waiter = queue.waiting.remove(index).expect("index valid");
            // None: another queue of the same poll handed it something a moment ago.
            let Some(sender) = waiter.tx.lock().take() else {
                continue;
            };
            match sender.send((Handover::Task(task), class, key.clone())) {
                Ok(()) => return,
                Err((Handover::Task(returned), _, _)) => task = returned,
                Err(_) => unreachable!("sent a task"),
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

    /// Puts a task taken with [`Matcher::try_take`] back at the head of its queue (it could not
    /// be dispatched after all).
    pub fn put_back(&self, key: &QueueKey, task: TaskRef, requirements: &str) {
        let mut st = self.state.lock();
        let class = st.class_id(requirements);
        Self::offer(&mut st, key, task, class, true)
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
        // A poll is a sign of life (of the process that holds the identity: the engine refuses
        // polls from any other before they get here), but a stopped worker stays stopped.
        if let Some(w) = st.workers.get_mut(&key.namespace, identity) {
            if !w.stopped {
                w.last_seen_ms = now_ms;
                w.alive = true;
            }
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
        let worker = workers.get_mut(&key.namespace, identity);
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
                    Some(s) => {
                        s.send((Handover::Task(task), class, key.clone()))
                            .map_err(|(t, c, _)| match t {
                                Handover::Task(t) => (t, c),
                                Handover::Dispatched(_) => unreachable!("sent a task"),
                            })
                    }
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
    ) -> Option<Handover> {
        self.poll_many(std::slice::from_ref(key), identity, "", now_ms, timeout)
            .await
            .map(|(task, _)| task)
    }

    /// Like [`Matcher::poll`] over several queues at once (the earlier ones are tried first),
    /// for process `instance`; returns what it got and the queue it came from.
    pub async fn poll_many(
        &self,
        keys: &[QueueKey],
        identity: &str,
        instance: &str,
        now_ms: i64,
        timeout: Duration,
    ) -> Option<(Handover, QueueKey)> {
        let rx = {
            let mut st = self.state.lock();
            for key in keys {
                Self::touch(&mut st, key, identity, now_ms);
            }
            for key in keys {
                if let Some((task, _)) = Self::take_locked(&mut st, key, identity) {
                    return Some((Handover::Task(task), key.clone()));
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
                    instance: instance.to_string(),
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

    /// Registers a worker unconditionally (benchmarks and tests; the server uses
    /// [`Matcher::register_instance`], which keeps identities to one process).
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
        st.workers.remove(namespace, identity);
        drop(st);
        let _ = self.register_instance(
            Registration {
                namespace: namespace.into(),
                identity: identity.into(),
                caps,
                task_queues,
                max_sessions,
                ..Default::default()
            },
            now_ms,
            Duration::MAX,
        );
    }

    /// Registers a worker process. Refused (with a description of the holder) while another
    /// live process holds the identity: alive, seen within `liveness`, and not the instance
    /// the registration says it replaces.
    pub fn register_instance(
        &self,
        r: Registration,
        now_ms: i64,
        liveness: Duration,
    ) -> Result<Registered, String> {
        let mut st = self.state.lock();
        let outcome = match st.workers.get(&r.namespace, &r.identity) {
            None => Registered::New,
            Some(w) if w.instance_id == r.instance_id => Registered::Again,
            Some(w) => {
                let silent_ms = now_ms.saturating_sub(w.last_seen_ms);
                let live = w.alive && (silent_ms as u128) <= liveness.as_millis();
                let replaces =
                    !r.previous_instance_id.is_empty() && r.previous_instance_id == w.instance_id;
                if live && !replaces {
                    let host = w
                        .caps
                        .host
                        .as_ref()
                        .map(|h| h.hostname.as_str())
                        .filter(|h| !h.is_empty())
                        .unwrap_or("an unknown host");
                    return Err(format!(
                        "worker identity {:?} is held by a live worker process (instance {}, \
                         pid {} on {host}, last seen {} ms ago); stop that process, or give \
                         this worker another identity",
                        r.identity, w.instance_id, w.pid, silent_ms
                    ));
                }
                Registered::Replaced {
                    previous: w.instance_id.clone(),
                    previous_draining: w.stopped && !replaces,
                }
            }
        };
        if let Registered::Replaced { previous, .. } = &outcome {
            // The replaced process's parked polls end now (empty): work under this identity
            // is for the new process, and their next call is refused.
            let (identity, previous) = (r.identity.as_str(), previous.as_str());
            for (key, queue) in st.queues.iter_mut() {
                if key.namespace != r.namespace {
                    continue;
                }
                queue.waiting.retain(|w| {
                    let theirs = w.identity == identity && w.instance == previous;
                    if theirs {
                        w.tx.lock().take();
                    }
                    !theirs
                });
            }
        }
        st.workers.insert(WorkerRecord {
            namespace: r.namespace,
            identity: r.identity.clone(),
            caps: Arc::new(r.caps),
            task_queues: r.task_queues,
            registered_ms: now_ms,
            last_seen_ms: now_ms,
            alive: true,
            stopped: false,
            stop_reason: String::new(),
            instance_id: r.instance_id,
            pid: r.pid,
            max_sessions: r.max_sessions,
            class_cache: HashMap::new(),
            evaluated: 0,
            eligible: Vec::new(),
        });
        Ok(outcome)
    }

    /// Marks a worker stopped (it shut down): it gets nothing more until it registers again.
    /// False when the identity is unknown or held by another instance.
    pub fn deregister(
        &self,
        namespace: &str,
        identity: &str,
        instance: &str,
        reason: &str,
    ) -> bool {
        let mut st = self.state.lock();
        let Some(w) = st.workers.get_mut(namespace, identity) else {
            return false;
        };
        if w.instance_id != instance {
            return false;
        }
        w.alive = false;
        w.stopped = true;
        w.stop_reason = reason.to_string();
        true
    }

    /// Whether process `instance` may take work under `identity`: it holds it, or nobody has
    /// registered it (a worker that polls before it registers, as after a server restart).
    pub fn may_hold(&self, namespace: &str, identity: &str, instance: &str) -> bool {
        let st = self.state.lock();
        st.workers
            .get(namespace, identity)
            .is_none_or(|w| w.instance_id == instance)
    }

    /// The instance that holds a registered identity, if any.
    pub fn instance_of(&self, namespace: &str, identity: &str) -> Option<String> {
        self.state
            .lock()
            .workers
            .get(namespace, identity)
            .map(|w| w.instance_id.clone())
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
        let Some(w) = st.workers.get_mut(namespace, identity) else {
            return false;
        };
        if w.stopped {
            // A stopped worker registers again to come back.
            return false;
        }
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
        st.workers.retain(|w| {
            w.alive || w.last_seen_ms >= before_ms || in_use(&w.namespace, &w.identity)
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
            .filter(|(k, _)| !k.queue.starts_with(tether_wire::STICKY_QUEUE_PREFIX))
            .map(|(k, q)| (k.clone(), q.len))
            .collect()
    }

    /// Registered workers of a namespace.
    pub fn workers_in(&self, namespace: &str) -> Vec<WorkerRecord> {
        let st = self.state.lock();
        let mut out: Vec<WorkerRecord> = st.workers.in_namespace(namespace).cloned().collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// When a registered worker was last heard from (without copying its record, which holds
    /// its whole class cache: the session liveness check asks for every open session).
    pub fn last_seen(&self, namespace: &str, identity: &str) -> Option<i64> {
        self.state
            .lock()
            .workers
            .get(namespace, identity)
            .map(|w| w.last_seen_ms)
    }

    /// One registered worker.
    pub fn worker(&self, namespace: &str, identity: &str) -> Option<WorkerRecord> {
        self.state.lock().workers.get(namespace, identity).cloned()
    }

    /// Why work just put on `queue` waits instead of being taken: no live worker satisfies its
    /// requirements, or none polls the queue at all ("" when a live worker can take it).
    pub fn placement_note(
        &self,
        namespace: &str,
        queue: &str,
        requirements: &str,
        now_ms: i64,
        liveness: Duration,
    ) -> String {
        if !requirements.is_empty() {
            let explained = self.explain(namespace, queue, requirements);
            if !explained.is_empty() {
                return explained;
            }
        }
        let st = self.state.lock();
        let key = QueueKey::new(namespace, queue, TaskKind::Activity);
        let live_poller = st.queues.get(&key).is_some_and(|q| {
            q.pollers.iter().any(|(identity, seen)| {
                let recent = (now_ms.saturating_sub(*seen) as u128) <= liveness.as_millis();
                let registered = st.workers.get(namespace, identity);
                recent && registered.is_none_or(|w| w.alive)
            })
        });
        if live_poller {
            String::new()
        } else {
            format!(
                "no live worker polls task queue {queue:?}; the activity waits until one does \
                 (or until its schedule-to-start timeout, if it has one)"
            )
        }
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
            .in_namespace(namespace)
            .filter(|w| w.alive)
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
    use tether_wire::pb::GpuDevice;

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
            Some(Handover::Task(task(1)))
        );
    }

    #[tokio::test]
    async fn backlog_is_fifo() {
        let m = Matcher::default();
        m.add(&key(), task(1), "");
        m.add(&key(), task(2), "");
        assert_eq!(
            m.poll(&key(), "w", 0, Duration::ZERO).await,
            Some(Handover::Task(task(1)))
        );
        assert_eq!(
            m.poll(&key(), "w", 0, Duration::ZERO).await,
            Some(Handover::Task(task(2)))
        );
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
        assert_eq!(poll.await.unwrap(), Some(Handover::Task(task(7))));
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
        assert_eq!(
            m.poll(&k, "w", 0, Duration::ZERO).await,
            Some(Handover::Task(task(3)))
        );
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
            Some(Handover::Task(task(9))),
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
        assert_eq!(got.unwrap(), Some(Handover::Task(task(1))));
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
