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

mod queues;
mod workers;

use foldhash::{HashMap, HashMapExt};
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tether_core::requirements::Requirements;
use tether_core::types::RunId;
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
        run_id: RunId,
    },
    /// One attempt of an activity.
    Activity {
        /// Run.
        run_id: RunId,
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
    async fn deregistering_answers_that_process_parked_polls_at_once_and_no_one_elses() {
        let m = Arc::new(Matcher::default());
        for (identity, instance) in [("leaving", "p1"), ("staying", "p2")] {
            m.register_instance(
                Registration {
                    namespace: "default".into(),
                    identity: identity.into(),
                    instance_id: instance.into(),
                    max_sessions: 1,
                    ..Default::default()
                },
                0,
                Duration::MAX,
            )
            .expect("registers");
        }
        let park = |identity: &'static str, instance: &'static str| {
            let m = m.clone();
            tokio::spawn(async move {
                m.poll_many(&[key()], identity, instance, 0, Duration::from_secs(60))
                    .await
            })
        };
        let (leaving, staying) = (park("leaving", "p1"), park("staying", "p2"));
        while m.stats(&key()).pollers.len() < 2 {
            tokio::task::yield_now().await;
        }
        assert!(m.deregister("default", "leaving", "p1", "shut down"));
        let answered = tokio::time::timeout(Duration::from_secs(5), leaving)
            .await
            .expect("the stopping process's poll is answered, not left for its timeout")
            .unwrap();
        assert!(answered.is_none(), "answered empty");
        // The other worker's poll is still parked: a task reaches it.
        m.add(&key(), task(1), "");
        let got = tokio::time::timeout(Duration::from_secs(5), staying)
            .await
            .expect("the other poll is still parked")
            .unwrap();
        assert!(matches!(got, Some((Handover::Task(_), _))), "{got:?}");
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
