//! The per-run state machine: what happens to one execution's history and mutable state when a
//! start, a workflow-task completion, an activity outcome, a signal or a timer arrives.
//!
//! It does no I/O. Every method mutates a [`RunEntry`] and records what the runner must do after
//! the commit (tasks to put on queues, timers to arm, waiters to wake) in [`Effects`]. The engine
//! persists the entry and then applies the effects.

mod activities;
mod control;
mod session_events;
mod start;
mod workflow_tasks;

use crate::error::EngineError;
use crate::matching::{QueueKey, TaskKind, TaskRef};
use crate::state::{ActivityState, RunState, TimerState, WorkflowTaskState};
use crate::timers::TimerKey;
use foldhash::HashMap;
use tether_core::types::{RunId, SessionId};
use tether_wire::pb::{
    self, command, history_event::Attributes, ActivityOptions, ExecutionStatus, Failure,
    FailureKind, HistoryEvent, Payload, RetryPolicy,
};

/// The attempt timeout of an activity that sets neither start-to-close nor schedule-to-close
/// (the SDKs' default too, so every language gets the same).
pub const DEFAULT_START_TO_CLOSE_MS: u64 = 60_000;
/// Default workflow-task start-to-close timeout.
pub const DEFAULT_WORKFLOW_TASK_TIMEOUT_MS: u64 = 10_000;
/// How long a workflow task waits on a sticky queue before any worker may take it.
pub const STICKY_SCHEDULE_TO_START_MS: i64 = 5_000;
/// Longest wait before a failed workflow task is offered again.
const MAX_WORKFLOW_TASK_RETRY_MS: i64 = 10_000;

/// A number for each hand-out of a task, unique and increasing across restarts of the server:
/// it starts from the wall clock in microseconds, which no earlier process could have counted
/// up to. Tokens carry it, so a completion of an earlier hand-out never passes for a later one.
pub fn next_dispatch() -> u64 {
    dispatch_counter().fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Makes every later [`next_dispatch`] number greater than `seen` (one recovered from the
/// store): should the wall clock have stepped back since an earlier server counted, numbers
/// still only grow.
pub fn dispatch_after(seen: u64) {
    dispatch_counter().fetch_max(seen.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
}

fn dispatch_counter() -> &'static std::sync::atomic::AtomicU64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        std::sync::atomic::AtomicU64::new(micros)
    })
}

/// An activity attempt that a worker is running. Its hand-out is durable (the attempt's
/// `started_*` fields); this keeps what only matters while this server runs.
#[derive(Debug, Clone)]
pub struct StartedActivity {
    /// Which attempt.
    pub attempt: u32,
    /// Worker identity.
    pub worker: String,
    /// The worker process (its instance id).
    pub instance: String,
    /// When it was handed out.
    pub started_ms: i64,
    /// Last heartbeat (or start, or this server's start for an attempt recovered as running).
    pub last_heartbeat_ms: i64,
    /// Which hand-out (see [`next_dispatch`]).
    pub dispatch: u64,
}

/// A workflow task that a worker is running.
#[derive(Debug, Clone)]
pub struct StartedWorkflowTask {
    /// Dispatch number in this server's lifetime; the token carries it.
    pub dispatch: u64,
    /// Worker identity.
    pub identity: String,
    /// The sticky queue of the worker that took it.
    pub sticky_queue: String,
}

/// In-memory bookkeeping of a run that need not survive a restart.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Running activity attempts by scheduled event id.
    pub started_activities: HashMap<u64, StartedActivity>,
    /// The running workflow task, if any.
    pub workflow_task: Option<StartedWorkflowTask>,
    /// Counter for workflow-task enqueues (fences sticky timeouts).
    pub enqueues: u64,
    /// Last event id sent to the sticky worker (0 = it has nothing cached that we know of).
    pub sticky_sent_up_to: u64,
    /// Whether the store may hold hand-out rows that are this run's alone (not shared with an
    /// open session, which deletes those itself when it closes): when false, closing the run
    /// skips the delete. Set by a hand-out outside a session, by a take-back once its session
    /// is closed, when a session closes while the run is open, and for every recovered run.
    pub may_own_started: bool,
}

/// One execution held in memory: its persisted state, its history and runtime bookkeeping.
#[derive(Debug)]
pub struct RunEntry {
    /// Persisted mutable state.
    pub state: RunState,
    /// The history so far.
    pub history: Vec<HistoryEvent>,
    /// Events from `history[persisted_events..]` have not been handed to the store yet.
    pub persisted_events: usize,
    /// In-memory bookkeeping.
    pub rt: Runtime,
    /// The number of the last store batch that wrote this run: a read waits until it is
    /// durable, so nobody sees state that might never be written.
    pub last_write_seq: u64,
    /// Largest encoded size the history may reach (see `ServerConfig::max_history_bytes`).
    pub max_history_bytes: u64,
}

/// Encoded size of one event as it travels in a repeated field (tag and length prefix
/// included): what the history byte limit counts.
pub fn event_size(event: &HistoryEvent) -> u64 {
    let len = prost::Message::encoded_len(event);
    (len + prost::length_delimiter_len(len) + 1) as u64
}

/// Most signal request ids a run remembers: enough for any client's retries of recent
/// signals, small enough to keep the run's state small.
const REMEMBERED_SIGNAL_REQUESTS: usize = 1_000;

/// A run that closed in this transaction, with what its result waiters get.
#[derive(Debug, Clone)]
pub struct Closed {
    /// The run.
    pub run_id: RunId,
    /// Its outcome.
    pub outcome: pb::GetWorkflowResultResponse,
}

/// A signal a workflow asked to deliver to another workflow.
#[derive(Debug, Clone)]
pub struct OutgoingSignal {
    /// Sending run.
    pub from_run: RunId,
    /// Sequence number of the command.
    pub seq: u32,
    /// Target.
    pub namespace: String,
    /// Target workflow id.
    pub workflow_id: String,
    /// Signal name.
    pub signal_name: String,
    /// Signal input.
    pub input: Option<Payload>,
}

/// What the runner must do once the transaction is durable.
#[derive(Debug, Default)]
pub struct Effects {
    /// Tasks to offer to pollers, with their canonical requirements ("" for none).
    pub tasks: Vec<(QueueKey, TaskRef, String)>,
    /// Timers to arm (deadline ms, key).
    pub timers: Vec<(i64, TimerKey)>,
    /// Runs that closed.
    pub closed: Vec<Closed>,
    /// Signals to other workflows (applied by the engine in the same transaction).
    pub signals: Vec<OutgoingSignal>,
    /// Signals to workflows of namespaces another engine serves (a cluster replica's engine
    /// holds one namespace): delivered once the transaction is durable, then resolved in the
    /// sender's history.
    pub foreign_signals: Vec<OutgoingSignal>,
    /// Sessions that left the `creating` state (their waiters are answered after the commit).
    pub sessions_settled: Vec<pb::SessionInfo>,
    /// Sessions a workflow asked for: (run id, seq, session id, options).
    pub session_requests: Vec<(RunId, u32, SessionId, pb::SessionOptions)>,
    /// Sessions a workflow completed.
    pub session_completions: Vec<SessionId>,
}

/// `from` plus `ms`, saturating: a deadline far in the future stays far in the future instead of
/// wrapping into the past (durations on the wire are checked against
/// [`tether_core::types::MAX_DURATION_MS`], but stored state from before that check is not).
pub fn deadline(from: i64, ms: u64) -> i64 {
    from.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn check_duration(field: &str, ms: u64) -> Result<(), EngineError> {
    tether_core::types::check_duration_ms(field, ms).map_err(EngineError::InvalidArgument)
}

/// Fills in the documented defaults and checks an activity's options.
pub fn normalize_activity_options(
    options: Option<ActivityOptions>,
    default_queue: &str,
) -> Result<ActivityOptions, EngineError> {
    let mut o = options.unwrap_or_default();
    if !o.worker.is_empty() {
        tether_core::types::validate_name("worker", &o.worker)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        o.task_queue = crate::matching::host_queue_name(&o.worker);
    }
    if o.task_queue.is_empty() {
        o.task_queue = default_queue.to_string();
    }
    // Canonical text, so equal requirements share one class however they were written.
    o.requirements = tether_core::requirements::Requirements::parse(&o.requirements)
        .map_err(|e| EngineError::InvalidArgument(e.to_string()))?
        .to_string();
    tether_core::types::validate_name("activity task queue", &o.task_queue)
        .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    check_duration("start_to_close_timeout_ms", o.start_to_close_timeout_ms)?;
    check_duration(
        "schedule_to_close_timeout_ms",
        o.schedule_to_close_timeout_ms,
    )?;
    check_duration(
        "schedule_to_start_timeout_ms",
        o.schedule_to_start_timeout_ms,
    )?;
    check_duration("heartbeat_timeout_ms", o.heartbeat_timeout_ms)?;
    if let Some(r) = &o.retry_policy {
        check_duration("retry_policy.initial_interval_ms", r.initial_interval_ms)?;
        check_duration("retry_policy.maximum_interval_ms", r.maximum_interval_ms)?;
    }
    if o.start_to_close_timeout_ms == 0 && o.schedule_to_close_timeout_ms == 0 {
        o.start_to_close_timeout_ms = DEFAULT_START_TO_CLOSE_MS;
    }
    if o.start_to_close_timeout_ms == 0 {
        o.start_to_close_timeout_ms = o.schedule_to_close_timeout_ms;
    }
    let mut r = o.retry_policy.take().unwrap_or_default();
    if r.initial_interval_ms == 0 {
        r.initial_interval_ms = 1_000;
    }
    if r.backoff_coefficient == 0.0 {
        r.backoff_coefficient = 2.0;
    }
    if !(r.backoff_coefficient >= 1.0 && r.backoff_coefficient.is_finite()) {
        return Err(EngineError::InvalidArgument(format!(
            "retry_policy.backoff_coefficient is {}; it must be a number >= 1.0",
            r.backoff_coefficient
        )));
    }
    if r.maximum_interval_ms == 0 {
        r.maximum_interval_ms = r.initial_interval_ms.saturating_mul(100);
    }
    if r.maximum_interval_ms < r.initial_interval_ms {
        return Err(EngineError::InvalidArgument(format!(
            "retry_policy.maximum_interval_ms ({}) is below initial_interval_ms ({})",
            r.maximum_interval_ms, r.initial_interval_ms
        )));
    }
    o.retry_policy = Some(r);
    Ok(o)
}

/// The backoff before attempt `next_attempt` (2, 3, ...).
fn backoff_ms(policy: &RetryPolicy, next_attempt: u32) -> i64 {
    let exp = next_attempt.saturating_sub(2) as i32;
    let raw = policy.initial_interval_ms as f64 * policy.backoff_coefficient.powi(exp.min(1000));
    raw.min(policy.maximum_interval_ms as f64) as i64
}

/// Arms the timers of a running attempt (`attempt`: scheduled event id, attempt, hand-out):
/// start-to-close at `start_to_close_at`, and the heartbeat timeout from `now` if it has one.
fn arm_attempt_timers(
    fx: &mut Effects,
    run_id: &RunId,
    attempt: (u64, u32, u64),
    start_to_close_at: i64,
    options: &ActivityOptions,
    now: i64,
) {
    let (scheduled_event_id, attempt, dispatch) = attempt;
    fx.timers.push((
        start_to_close_at,
        TimerKey::ActivityStartToClose {
            run_id: run_id.clone(),
            scheduled_event_id,
            attempt,
            dispatch,
        },
    ));
    if options.heartbeat_timeout_ms > 0 {
        fx.timers.push((
            deadline(now, options.heartbeat_timeout_ms),
            TimerKey::ActivityHeartbeat {
                run_id: run_id.clone(),
                scheduled_event_id,
                attempt,
                dispatch,
            },
        ));
    }
}

/// The task that offers attempt `attempt` of activity `a` of run `run_id` to its queue, with
/// its (canonical) requirements.
fn activity_task(
    namespace: &str,
    run_id: &str,
    a: &ActivityState,
    attempt: u32,
) -> (QueueKey, TaskRef, String) {
    (
        QueueKey::new(namespace, &a.task_queue, TaskKind::Activity),
        TaskRef::Activity {
            run_id: RunId::from(run_id),
            scheduled_event_id: a.scheduled_event_id,
            attempt,
        },
        a.options
            .as_ref()
            .map(|o| o.requirements.clone())
            .unwrap_or_default(),
    )
}

/// Forgets who runs an attempt (it ended, or goes back to its queue).
fn clear_started(a: &mut ActivityState) {
    a.started_ms = 0;
    a.started_dispatch = 0;
    a.started_worker.clear();
    a.started_instance.clear();
}

fn timeout_failure(timeout_type: &str, last: Option<&Failure>) -> Failure {
    Failure {
        message: format!("activity {timeout_type} timeout"),
        kind: FailureKind::Timeout as i32,
        timeout_type: timeout_type.to_string(),
        cause: last.map(|f| Box::new(f.clone())),
        ..Default::default()
    }
}

impl RunEntry {
    /// The run's id, typed.
    pub fn run_id(&self) -> RunId {
        RunId::from(self.state.run_id.as_str())
    }
}

impl RunEntry {
    /// Wraps a recovered (or new) state.
    pub fn new(mut state: RunState, history: Vec<HistoryEvent>) -> Self {
        let persisted_events = history.len();
        if state.history_bytes == 0 {
            // Stored before the byte count existed (or new): count it now.
            state.history_bytes = history
                .iter()
                .chain(state.buffered.iter())
                .map(event_size)
                .sum();
        }
        RunEntry {
            state,
            history,
            persisted_events,
            rt: Runtime::default(),
            last_write_seq: 0,
            max_history_bytes: u64::MAX,
        }
    }

    /// Whether `extra` more bytes of events fit under the history byte limit.
    pub fn history_has_room(&self, extra: u64) -> bool {
        self.state.history_bytes.saturating_add(extra) <= self.max_history_bytes
    }

    /// The error for an append that would not fit.
    pub fn history_full(&self, what: &str, extra: u64) -> EngineError {
        EngineError::ResourceExhausted(format!(
            "{what} ({extra} bytes) would take the history of {} {} to {} bytes; the limit is {} \
             bytes (start a new run to continue)",
            if self.state.standalone_activity {
                "activity"
            } else {
                "workflow"
            },
            self.state.workflow_id,
            self.state.history_bytes.saturating_add(extra),
            self.max_history_bytes
        ))
    }

    /// Whether the run is still open.
    pub fn is_open(&self) -> bool {
        self.state.status == ExecutionStatus::Running as i32
    }

    fn workflow_queue(&self) -> QueueKey {
        QueueKey::new(
            &self.state.namespace,
            &self.state.task_queue,
            TaskKind::Workflow,
        )
    }

    /// Appends an event to the history, or buffers it while a workflow task is running so that
    /// the history keeps "what the workflow saw" separate from "what arrived meanwhile". Nothing
    /// is appended to a closed run: its terminal event stays the last one.
    fn append(&mut self, attrs: Attributes, now: i64) -> u64 {
        if !self.is_open() {
            tracing::debug!(run_id = %self.state.run_id, "event for a closed run dropped");
            return 0;
        }
        let event = HistoryEvent {
            event_id: 0,
            time_ms: now,
            attributes: Some(attrs),
        };
        if self.rt.workflow_task.is_some() && !self.state.standalone_activity {
            self.state.history_bytes += event_size(&event);
            self.state.buffered.push(event);
            0
        } else {
            self.push_history(event)
        }
    }

    fn push_history(&mut self, mut event: HistoryEvent) -> u64 {
        if self.state.next_event_id == 0 {
            self.state.next_event_id = 1;
        }
        event.event_id = self.state.next_event_id;
        self.state.next_event_id += 1;
        let id = event.event_id;
        self.state.history_bytes += event_size(&event);
        self.history.push(event);
        id
    }

    /// Moves buffered events into the history (after a workflow task ended).
    fn flush_buffered(&mut self) -> bool {
        let buffered = std::mem::take(&mut self.state.buffered);
        let any = !buffered.is_empty();
        for event in buffered {
            // Counted when it was buffered; the id it gets now adds at most a few bytes.
            self.state.history_bytes = self.state.history_bytes.saturating_sub(event_size(&event));
            self.push_history(event);
        }
        any
    }

    fn push_attr(&mut self, attrs: Attributes, now: i64) -> u64 {
        self.push_history(HistoryEvent {
            event_id: 0,
            time_ms: now,
            attributes: Some(attrs),
        })
    }

    fn close(&mut self, status: ExecutionStatus, attrs: Attributes, now: i64, fx: &mut Effects) {
        let mut outcome = pb::GetWorkflowResultResponse {
            run_id: self.state.run_id.clone(),
            status: status as i32,
            ..Default::default()
        };
        match &attrs {
            Attributes::WorkflowExecutionCompleted(c) => outcome.result = c.result.clone(),
            Attributes::WorkflowExecutionFailed(f) => outcome.failure = f.failure.clone(),
            Attributes::WorkflowExecutionTerminated(t) => {
                outcome.failure = Some(Failure {
                    message: format!("terminated: {}", t.reason),
                    kind: FailureKind::Terminated as i32,
                    ..Default::default()
                })
            }
            Attributes::WorkflowExecutionCanceled(_) => {
                outcome.failure = Some(Failure {
                    message: "workflow was cancelled".into(),
                    kind: FailureKind::Canceled as i32,
                    ..Default::default()
                })
            }
            Attributes::WorkflowExecutionTimedOut(_) => {
                outcome.failure = Some(Failure {
                    message: format!(
                        "workflow run timed out after {} ms",
                        self.state.run_timeout_ms
                    ),
                    kind: FailureKind::Timeout as i32,
                    timeout_type: "run".into(),
                    ..Default::default()
                })
            }
            _ => {}
        }
        self.push_attr(attrs, now);
        self.finish(outcome, now, fx);
    }

    /// Closes a standalone activity whose final event is already in the history.
    fn close_with_last_event(&mut self, status: ExecutionStatus, now: i64, fx: &mut Effects) {
        let mut outcome = pb::GetWorkflowResultResponse {
            run_id: self.state.run_id.clone(),
            status: status as i32,
            ..Default::default()
        };
        match self.history.last().and_then(|e| e.attributes.as_ref()) {
            Some(Attributes::ActivityTaskCompleted(c)) => outcome.result = c.result.clone(),
            Some(Attributes::ActivityTaskFailed(f)) => outcome.failure = f.failure.clone(),
            Some(Attributes::ActivityTaskTimedOut(t)) => outcome.failure = t.failure.clone(),
            Some(Attributes::ActivityTaskCanceled(_)) => {
                outcome.failure = Some(Failure {
                    message: "activity was cancelled".into(),
                    kind: FailureKind::Canceled as i32,
                    ..Default::default()
                })
            }
            _ => {}
        }
        self.finish(outcome, now, fx);
    }

    fn finish(&mut self, outcome: pb::GetWorkflowResultResponse, now: i64, fx: &mut Effects) {
        self.state.status = outcome.status;
        self.state.close_ms = now;
        self.state.result = outcome.result.clone();
        self.state.failure = outcome.failure.clone();
        self.state.activities.clear();
        self.state.timers.clear();
        self.state.workflow_task = None;
        self.state.buffered.clear();
        // What ran is over, but the write of this close must still take the run's own
        // hand-out rows with it: forgetting that it may have some left them in the store for
        // good (every attempt handed out by a poll or a completion's next task).
        self.rt = Runtime {
            may_own_started: self.rt.may_own_started,
            ..Runtime::default()
        };
        fx.closed.push(Closed {
            run_id: self.run_id(),
            outcome,
        });
    }

    // ------------------------------------------------------------------------------------------
    // Activities
    // ------------------------------------------------------------------------------------------
}

/// What became of a workflow task's completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkflowTaskCompletion {
    /// Its commands were applied.
    Applied,
    /// Nothing was applied (why is given); a new workflow task was scheduled.
    Rejected(String),
}

/// Checks a session's timeouts against the documented maximum.
pub fn check_session_durations(o: &pb::SessionOptions) -> Result<(), EngineError> {
    check_duration("creation_timeout_ms", o.creation_timeout_ms)?;
    check_duration("execution_timeout_ms", o.execution_timeout_ms)?;
    check_duration("liveness_timeout_ms", o.liveness_timeout_ms)?;
    check_duration("idle_timeout_ms", o.idle_timeout_ms)
}

/// Refuses a payload over the size limit.
pub fn check_payload(what: &str, payload: Option<&Payload>, max: usize) -> Result<(), EngineError> {
    if let Some(p) = payload {
        let size = p.data.len()
            + p.metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > max {
            return Err(EngineError::PayloadTooLarge {
                what: what.to_string(),
                size,
                limit: max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn start() -> (RunEntry, Effects) {
        let mut fx = Effects::default();
        let req = pb::StartWorkflowRequest {
            namespace: "default".into(),
            workflow_id: "w".into(),
            workflow_type: "t".into(),
            task_queue: "q".into(),
            ..Default::default()
        };
        let entry = RunEntry::start_workflow(&req, "run-1".into(), NOW, &mut fx);
        (entry, fx)
    }

    fn kinds(entry: &RunEntry) -> Vec<&'static str> {
        entry.history.iter().map(|e| e.kind_name()).collect()
    }

    fn token_of(resp: &pb::PollWorkflowTaskResponse) -> pb::TaskToken {
        prost::Message::decode(resp.task_token.as_slice()).unwrap()
    }

    fn schedule(seq: u32) -> pb::Command {
        pb::Command {
            kind: Some(command::Kind::ScheduleActivity(
                pb::ScheduleActivityCommand {
                    seq,
                    activity_type: "a".into(),
                    options: Some(ActivityOptions {
                        start_to_close_timeout_ms: 1_000,
                        retry_policy: Some(RetryPolicy {
                            maximum_attempts: 2,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        }
    }

    /// Starts a run and completes its first workflow task with one scheduled activity.
    fn with_activity() -> (RunEntry, pb::TaskToken) {
        let (mut e, _) = start();
        let mut fx = Effects::default();
        let task = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        e.complete_workflow_task(&token_of(&task), vec![schedule(1)], "w1", "", NOW, &mut fx)
            .unwrap();
        let mut fx = Effects::default();
        let resp = e.dispatch_activity(3, 1, "w1", "i1", NOW, &mut fx).unwrap();
        let token = prost::Message::decode(resp.task_token.as_slice()).unwrap();
        (e, token)
    }

    #[test]
    fn start_records_the_start_and_offers_a_workflow_task() {
        let (e, fx) = start();
        assert_eq!(kinds(&e), vec!["WorkflowExecutionStarted"]);
        assert_eq!(fx.tasks.len(), 1);
        assert_eq!(fx.tasks[0].0.kind, TaskKind::Workflow);
        assert!(e.state.workflow_task.is_some());
    }

    #[test]
    fn completion_records_marker_and_commands_and_offers_the_activity() {
        let (mut e, _) = start();
        let mut fx = Effects::default();
        let task = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        assert!(task.full_history);
        let mut fx = Effects::default();
        e.complete_workflow_task(&token_of(&task), vec![schedule(1)], "w1", "", NOW, &mut fx)
            .unwrap();
        assert_eq!(
            kinds(&e),
            vec![
                "WorkflowExecutionStarted",
                "WorkflowTaskCompleted",
                "ActivityTaskScheduled"
            ]
        );
        assert_eq!(fx.tasks.len(), 1);
        assert_eq!(fx.tasks[0].0.kind, TaskKind::Activity);
        assert!(e.state.workflow_task.is_none());
    }

    #[test]
    fn stale_workflow_task_completion_changes_nothing() {
        let (mut e, _) = start();
        let mut fx = Effects::default();
        let task = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        let mut stale = token_of(&task);
        stale.dispatch += 1;
        let before = e.history.len();
        let err = e
            .complete_workflow_task(&stale, vec![schedule(1)], "w1", "", NOW, &mut fx)
            .unwrap_err();
        assert!(matches!(err, EngineError::StaleTask(_)));
        assert_eq!(e.history.len(), before);
        assert!(e.state.activities.is_empty());
    }

    #[test]
    fn events_during_a_running_task_are_buffered_then_flushed() {
        let (mut e, _) = start();
        let mut fx = Effects::default();
        let task = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        let mut fx = Effects::default();
        e.signal("go", None, "client", "", NOW, &mut fx);
        assert_eq!(
            e.state.buffered.len(),
            1,
            "the running task did not see the signal"
        );
        assert!(fx.tasks.is_empty(), "no second task while one runs");
        let mut fx = Effects::default();
        e.complete_workflow_task(&token_of(&task), vec![], "w1", "", NOW, &mut fx)
            .unwrap();
        assert_eq!(
            kinds(&e),
            vec![
                "WorkflowExecutionStarted",
                "WorkflowTaskCompleted",
                "WorkflowSignaled"
            ]
        );
        assert_eq!(fx.tasks.len(), 1, "the signal causes a new workflow task");
    }

    #[test]
    fn closing_while_a_signal_waits_is_rejected_and_the_next_task_sees_it() {
        let complete = || pb::Command {
            kind: Some(command::Kind::CompleteWorkflow(
                pb::CompleteWorkflowCommand::default(),
            )),
        };
        let (mut e, _) = start();
        let mut fx = Effects::default();
        let task = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        e.signal("late", None, "client", "", NOW, &mut fx);
        let mut fx = Effects::default();
        let outcome = e
            .complete_workflow_task(
                &token_of(&task),
                vec![complete()],
                "w1",
                "sticky-1",
                NOW,
                &mut fx,
            )
            .unwrap();
        assert!(
            matches!(outcome, WorkflowTaskCompletion::Rejected(ref why) if why.contains("1 new event")),
            "{outcome:?}"
        );
        assert!(e.is_open(), "the run must not close over an unseen signal");
        assert_eq!(
            kinds(&e),
            vec!["WorkflowExecutionStarted", "WorkflowSignaled"]
        );
        assert_eq!(fx.tasks.len(), 1, "a new workflow task is offered");
        assert_eq!(fx.tasks[0].0.kind, TaskKind::Workflow);
        let retry = e.dispatch_workflow_task("w1", "", NOW, &mut fx).unwrap();
        assert!(
            retry.full_history,
            "the worker's cached state ran ahead: replay all"
        );
        assert!(
            retry
                .events
                .iter()
                .any(|ev| ev.kind_name() == "WorkflowSignaled"),
            "the new task carries the signal"
        );
        // The old task's token no longer counts; the new one closes the run.
        assert!(e
            .complete_workflow_task(&token_of(&task), vec![complete()], "w1", "", NOW, &mut fx)
            .is_err());
        let outcome = e
            .complete_workflow_task(&token_of(&retry), vec![complete()], "w1", "", NOW, &mut fx)
            .unwrap();
        assert_eq!(outcome, WorkflowTaskCompletion::Applied);
        assert!(!e.is_open());
    }

    #[test]
    fn activity_completion_from_an_old_attempt_is_rejected() {
        let (mut e, token) = with_activity();
        let mut fx = Effects::default();
        e.activity_failed(
            &token,
            Failure {
                message: "x".into(),
                ..Default::default()
            },
            "w1",
            NOW,
            &mut fx,
        )
        .unwrap();
        assert_eq!(e.state.activities[&3].attempt, 2);
        assert_eq!(e.state.activities[&3].backoff_until_ms, NOW + 1_000);
        assert!(matches!(
            fx.timers[0].1,
            TimerKey::ActivityRetry { attempt: 2, .. }
        ));
        let err = e
            .activity_completed(&token, None, "w1", NOW, &mut fx)
            .unwrap_err();
        assert!(err.to_string().contains("attempt 1"), "{err}");
        assert!(!kinds(&e).contains(&"ActivityTaskCompleted"));
    }

    #[test]
    fn last_allowed_attempt_failing_records_the_failure() {
        let (mut e, token) = with_activity();
        let mut fx = Effects::default();
        e.activity_failed(&token, Failure::default(), "w1", NOW, &mut fx)
            .unwrap();
        // Backoff over: attempt 2 is offered and fails too; the policy allows 2 attempts.
        e.activity_timer(
            &TimerKey::ActivityRetry {
                run_id: "run-1".into(),
                scheduled_event_id: 3,
                attempt: 2,
            },
            "",
            NOW + 1_000,
            &mut fx,
        );
        let resp = e
            .dispatch_activity(3, 2, "w1", "i1", NOW + 1_000, &mut fx)
            .unwrap();
        let token2 = prost::Message::decode(resp.task_token.as_slice()).unwrap();
        let mut fx = Effects::default();
        e.activity_failed(
            &token2,
            Failure {
                message: "again".into(),
                ..Default::default()
            },
            "w1",
            NOW,
            &mut fx,
        )
        .unwrap();
        assert_eq!(kinds(&e).last(), Some(&"ActivityTaskFailed"));
        assert!(e.state.activities.is_empty());
        assert_eq!(fx.tasks.len(), 1, "the workflow is told");
    }

    #[test]
    fn commands_after_a_terminal_command_are_invalid() {
        let (e, _) = start();
        let complete = pb::Command {
            kind: Some(command::Kind::CompleteWorkflow(Default::default())),
        };
        let err = e
            .validate_commands(&[complete, schedule(1)], 1024)
            .unwrap_err();
        assert!(err.to_string().contains("no command may follow"), "{err}");
    }

    #[test]
    fn stale_timer_does_nothing() {
        let (mut e, _) = start();
        let mut fx = Effects::default();
        assert!(!e.timer_fired(9, NOW, &mut fx), "no such timer");
        assert!(
            !e.workflow_task_timed_out(42, NOW, &mut fx),
            "no such dispatch"
        );
        assert_eq!(kinds(&e), vec!["WorkflowExecutionStarted"]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_interval_ms: 100,
            backoff_coefficient: 2.0,
            maximum_interval_ms: 500,
            ..Default::default()
        };
        assert_eq!(backoff_ms(&p, 2), 100);
        assert_eq!(backoff_ms(&p, 3), 200);
        assert_eq!(backoff_ms(&p, 4), 400);
        assert_eq!(backoff_ms(&p, 5), 500);
        assert_eq!(backoff_ms(&p, 60), 500);
    }

    #[test]
    fn options_get_defaults_and_a_timeout_when_none_is_given() {
        // Neither attempt timeout given: the same 60 s the SDKs apply.
        let o = normalize_activity_options(None, "q").unwrap();
        assert_eq!(o.start_to_close_timeout_ms, DEFAULT_START_TO_CLOSE_MS);
        assert_eq!(o.schedule_to_close_timeout_ms, 0);
        let o = normalize_activity_options(
            Some(ActivityOptions {
                schedule_to_close_timeout_ms: 5_000,
                ..Default::default()
            }),
            "q",
        )
        .unwrap();
        assert_eq!(o.task_queue, "q");
        assert_eq!(o.start_to_close_timeout_ms, 5_000);
        let r = o.retry_policy.unwrap();
        assert_eq!(
            (
                r.initial_interval_ms,
                r.backoff_coefficient,
                r.maximum_interval_ms
            ),
            (1_000, 2.0, 100_000)
        );
        let bad = normalize_activity_options(
            Some(ActivityOptions {
                start_to_close_timeout_ms: 1,
                retry_policy: Some(RetryPolicy {
                    backoff_coefficient: 0.5,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "q",
        );
        assert!(bad.unwrap_err().to_string().contains("backoff_coefficient"));
    }
}
