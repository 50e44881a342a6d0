//! The per-run state machine: what happens to one execution's history and mutable state when a
//! start, a workflow-task completion, an activity outcome, a signal or a timer arrives.
//!
//! It does no I/O. Every method mutates a [`RunEntry`] and records what the runner must do after
//! the commit (tasks to put on queues, timers to arm, waiters to wake) in [`Effects`]. The engine
//! persists the entry and then applies the effects.

use super::matching::{QueueKey, TaskKind, TaskRef};
use super::timers::TimerKey;
use crate::error::EngineError;
use crate::state::{ActivityState, RunState, TimerState, WorkflowTaskState};
use foldhash::HashMap;
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
    pub run_id: String,
    /// Its outcome.
    pub outcome: pb::GetWorkflowResultResponse,
}

/// A signal a workflow asked to deliver to another workflow.
#[derive(Debug, Clone)]
pub struct OutgoingSignal {
    /// Sending run.
    pub from_run: String,
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
    /// Sessions that left the `creating` state (their waiters are answered after the commit).
    pub sessions_settled: Vec<pb::SessionInfo>,
    /// Sessions a workflow asked for: (run id, seq, session id, options).
    pub session_requests: Vec<(String, u32, String, pb::SessionOptions)>,
    /// Sessions a workflow completed.
    pub session_completions: Vec<String>,
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
        o.task_queue = super::matching::host_queue_name(&o.worker);
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
    run_id: &str,
    attempt: (u64, u32, u64),
    start_to_close_at: i64,
    options: &ActivityOptions,
    now: i64,
) {
    let (scheduled_event_id, attempt, dispatch) = attempt;
    fx.timers.push((
        start_to_close_at,
        TimerKey::ActivityStartToClose {
            run_id: run_id.to_string(),
            scheduled_event_id,
            attempt,
            dispatch,
        },
    ));
    if options.heartbeat_timeout_ms > 0 {
        fx.timers.push((
            deadline(now, options.heartbeat_timeout_ms),
            TimerKey::ActivityHeartbeat {
                run_id: run_id.to_string(),
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
            run_id: run_id.to_string(),
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

    /// Creates a new workflow run with its first workflow task.
    pub fn start_workflow(
        req: &pb::StartWorkflowRequest,
        run_id: String,
        now: i64,
        fx: &mut Effects,
    ) -> RunEntry {
        let task_timeout_ms = if req.task_timeout_ms == 0 {
            DEFAULT_WORKFLOW_TASK_TIMEOUT_MS
        } else {
            req.task_timeout_ms
        };
        let state = RunState {
            namespace: req.namespace.clone(),
            workflow_id: req.workflow_id.clone(),
            run_id: run_id.clone(),
            workflow_type: req.workflow_type.clone(),
            task_queue: req.task_queue.clone(),
            status: ExecutionStatus::Running as i32,
            start_ms: now,
            next_event_id: 1,
            run_timeout_ms: req.run_timeout_ms,
            task_timeout_ms,
            start_request_id: req.request_id.clone(),
            ..Default::default()
        };
        let mut entry = RunEntry::new(state, Vec::new());
        entry.persisted_events = 0;
        entry.append(
            Attributes::WorkflowExecutionStarted(pb::WorkflowExecutionStarted {
                workflow_type: req.workflow_type.clone(),
                task_queue: req.task_queue.clone(),
                input: req.input.clone(),
                workflow_id: req.workflow_id.clone(),
                run_id,
                run_timeout_ms: req.run_timeout_ms,
                task_timeout_ms,
                identity: req.identity.clone(),
            }),
            now,
        );
        if req.run_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, req.run_timeout_ms),
                TimerKey::RunTimeout {
                    run_id: entry.state.run_id.clone(),
                },
            ));
        }
        entry.schedule_workflow_task(now, fx);
        entry
    }

    /// Creates a standalone activity execution: one activity, no workflow code.
    pub fn start_standalone_activity(
        req: &pb::StartActivityRequest,
        options: ActivityOptions,
        run_id: String,
        now: i64,
        fx: &mut Effects,
    ) -> RunEntry {
        let state = RunState {
            namespace: req.namespace.clone(),
            workflow_id: req.activity_id.clone(),
            run_id,
            workflow_type: req.activity_type.clone(),
            task_queue: options.task_queue.clone(),
            standalone_activity: true,
            status: ExecutionStatus::Running as i32,
            start_ms: now,
            next_event_id: 1,
            start_request_id: req.request_id.clone(),
            ..Default::default()
        };
        let mut entry = RunEntry::new(state, Vec::new());
        entry.persisted_events = 0;
        entry.schedule_activity(
            pb::ScheduleActivityCommand {
                seq: 1,
                activity_id: req.activity_id.clone(),
                activity_type: req.activity_type.clone(),
                input: req.input.clone(),
                options: Some(options),
            },
            now,
            fx,
        );
        entry
    }

    /// Puts a workflow task on the queue unless one is already pending.
    fn schedule_workflow_task(&mut self, now: i64, fx: &mut Effects) {
        if self.state.standalone_activity || !self.is_open() || self.state.workflow_task.is_some() {
            return;
        }
        self.state.workflow_task = Some(WorkflowTaskState {
            attempt: 1,
            scheduled_ms: now,
        });
        self.enqueue_workflow_task(now, fx);
    }

    fn enqueue_workflow_task(&mut self, now: i64, fx: &mut Effects) {
        self.rt.enqueues += 1;
        let task = TaskRef::Workflow {
            run_id: self.state.run_id.clone(),
        };
        if !self.state.sticky_queue.is_empty() && self.rt.sticky_sent_up_to > 0 {
            let key = QueueKey::new(
                &self.state.namespace,
                &self.state.sticky_queue,
                TaskKind::Workflow,
            );
            fx.tasks.push((key, task, String::new()));
            fx.timers.push((
                now.saturating_add(STICKY_SCHEDULE_TO_START_MS),
                TimerKey::StickyScheduleToStart {
                    run_id: self.state.run_id.clone(),
                    enqueue: self.rt.enqueues,
                },
            ));
        } else {
            fx.tasks.push((self.workflow_queue(), task, String::new()));
        }
    }

    /// Re-offers whatever was pending when the server stopped (start-up only).
    pub fn recover(&mut self, now: i64, fx: &mut Effects) {
        // Which hand-out rows the store holds is not looked at here: assume some are its own.
        self.rt.may_own_started = true;
        // A workflow task that was running when the server stopped is gone with the process:
        // whatever arrived meanwhile belongs in the history now.
        self.flush_buffered();
        if self.state.workflow_task.is_some() {
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.state.run_id.clone(),
                },
                String::new(),
            ));
        }
        let run_id = self.state.run_id.clone();
        for a in self.state.activities.values() {
            let options = a.options.clone().unwrap_or_default();
            if a.started_ms > 0 {
                // Handed out before the restart: its worker may well still run it, so it is not
                // handed out again. It ends as any running attempt does: an outcome, a timeout,
                // or its worker coming back as a new process (then it was lost, and retried).
                let dispatch = a.started_dispatch;
                self.rt.started_activities.insert(
                    a.scheduled_event_id,
                    StartedActivity {
                        attempt: a.attempt,
                        worker: a.started_worker.clone(),
                        instance: a.started_instance.clone(),
                        started_ms: a.started_ms,
                        last_heartbeat_ms: now,
                        dispatch,
                    },
                );
                // Start-to-close counts from the hand-out; heartbeats from now (none could
                // arrive while the server was down).
                arm_attempt_timers(
                    fx,
                    &run_id,
                    (a.scheduled_event_id, a.attempt, dispatch),
                    deadline(a.started_ms, options.start_to_close_timeout_ms),
                    &options,
                    now,
                );
            } else if a.backoff_until_ms > 0 {
                fx.timers.push((
                    a.backoff_until_ms,
                    TimerKey::ActivityRetry {
                        run_id: run_id.clone(),
                        scheduled_event_id: a.scheduled_event_id,
                        attempt: a.attempt,
                    },
                ));
            } else {
                fx.tasks
                    .push(activity_task(&self.state.namespace, &run_id, a, a.attempt));
                if options.schedule_to_start_timeout_ms > 0 {
                    fx.timers.push((
                        deadline(a.attempt_scheduled_ms, options.schedule_to_start_timeout_ms),
                        TimerKey::ActivityScheduleToStart {
                            run_id: run_id.clone(),
                            scheduled_event_id: a.scheduled_event_id,
                            attempt: a.attempt,
                        },
                    ));
                }
            }
            if options.schedule_to_close_timeout_ms > 0 {
                fx.timers.push((
                    deadline(a.scheduled_ms, options.schedule_to_close_timeout_ms),
                    TimerKey::ActivityScheduleToClose {
                        run_id: run_id.clone(),
                        scheduled_event_id: a.scheduled_event_id,
                    },
                ));
            }
        }
        for t in self.state.timers.values() {
            fx.timers.push((
                t.fire_at_ms,
                TimerKey::WorkflowTimer {
                    run_id: run_id.clone(),
                    seq: t.seq,
                },
            ));
        }
        if self.state.run_timeout_ms > 0 {
            fx.timers.push((
                deadline(self.state.start_ms, self.state.run_timeout_ms),
                TimerKey::RunTimeout { run_id },
            ));
        }
    }

    // ------------------------------------------------------------------------------------------
    // Workflow tasks
    // ------------------------------------------------------------------------------------------

    /// Hands the pending workflow task to a poller. Returns None if the task is stale.
    pub fn dispatch_workflow_task(
        &mut self,
        identity: &str,
        poller_sticky_queue: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        if !self.is_open() || self.rt.workflow_task.is_some() {
            return None;
        }
        let attempt = self.state.workflow_task.as_ref()?.attempt;
        self.flush_buffered();
        let dispatch = next_dispatch();
        self.rt.workflow_task = Some(StartedWorkflowTask {
            dispatch,
            identity: identity.to_string(),
            sticky_queue: poller_sticky_queue.to_string(),
        });
        fx.timers.push((
            deadline(now, self.state.task_timeout_ms),
            TimerKey::WorkflowTaskTimeout {
                run_id: self.state.run_id.clone(),
                dispatch,
            },
        ));
        let partial = !poller_sticky_queue.is_empty()
            && poller_sticky_queue == self.state.sticky_queue
            && self.rt.sticky_sent_up_to > 0;
        let events: Vec<HistoryEvent> = if partial {
            let from = self.rt.sticky_sent_up_to;
            self.history
                .iter()
                .filter(|e| e.event_id > from)
                .cloned()
                .collect()
        } else {
            self.history.clone()
        };
        self.rt.sticky_sent_up_to = self.state.next_event_id.saturating_sub(1);
        let token = pb::TaskToken {
            namespace: self.state.namespace.clone(),
            run_id: self.state.run_id.clone(),
            scheduled_event_id: 0,
            attempt,
            dispatch,
        };
        Some(pb::PollWorkflowTaskResponse {
            task_token: prost::Message::encode_to_vec(&token),
            workflow_id: self.state.workflow_id.clone(),
            run_id: self.state.run_id.clone(),
            workflow_type: self.state.workflow_type.clone(),
            events,
            full_history: !partial,
            attempt,
            namespace: self.state.namespace.clone(),
        })
    }

    fn check_workflow_task(&self, token: &pb::TaskToken) -> Result<(), EngineError> {
        if !self.is_open() {
            return Err(EngineError::StaleTask(format!(
                "workflow run {} is already closed",
                self.state.run_id
            )));
        }
        match &self.rt.workflow_task {
            Some(started) if started.dispatch == token.dispatch => Ok(()),
            _ => Err(EngineError::StaleTask(format!(
                "workflow task (dispatch {}) of run {} is no longer current; it timed out or was \
                 handed to another worker",
                token.dispatch, self.state.run_id
            ))),
        }
    }

    /// Checks a completion's commands before anything is applied, so that bad commands change
    /// nothing.
    pub fn validate_commands(
        &self,
        commands: &[pb::Command],
        max_payload: usize,
    ) -> Result<(), EngineError> {
        let bad =
            |i: usize, msg: String| EngineError::InvalidArgument(format!("command #{i}: {msg}"));
        let mut seen_terminal = false;
        // Each seq names one command of its kind: a second one would make its outcome
        // ambiguous, so the completion is refused whole.
        let mut seqs: std::collections::HashSet<(&'static str, u32)> = Default::default();
        let mut unique = |i: usize, kind: &'static str, seq: u32| {
            if seqs.insert((kind, seq)) {
                Ok(())
            } else {
                Err(bad(
                    i,
                    format!("{kind} seq {seq} appears twice in this completion; give each command its own seq"),
                ))
            }
        };
        for (i, c) in commands.iter().enumerate() {
            let Some(kind) = &c.kind else {
                return Err(bad(i, "command has no kind".into()));
            };
            match kind {
                command::Kind::ScheduleActivity(a) => unique(i, "activity", a.seq)?,
                command::Kind::StartTimer(t) => unique(i, "timer", t.seq)?,
                command::Kind::RecordMarker(m) => unique(i, "marker", m.seq)?,
                command::Kind::SignalExternal(sig) => unique(i, "signal", sig.seq)?,
                command::Kind::CreateSession(c) => unique(i, "session", c.seq)?,
                command::Kind::CompleteSession(c) => unique(i, "session completion", c.seq)?,
                command::Kind::CancelTimer(t) => unique(i, "timer cancellation", t.seq)?,
                command::Kind::RequestCancelActivity(r) => {
                    unique(i, "activity cancellation", r.seq)?
                }
                command::Kind::CompleteWorkflow(_)
                | command::Kind::FailWorkflow(_)
                | command::Kind::CancelWorkflow(_) => {}
            }
            if seen_terminal {
                return Err(bad(
                    i,
                    "no command may follow complete/fail/cancel workflow".into(),
                ));
            }
            match kind {
                command::Kind::ScheduleActivity(a) => {
                    tether_core::types::validate_name("activity type", &a.activity_type)
                        .map_err(|e| bad(i, e.to_string()))?;
                    normalize_activity_options(a.options.clone(), &self.state.task_queue)
                        .map_err(|e| bad(i, e.to_string()))?;
                    check_payload("activity input", a.input.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                    if self.state.activities.values().any(|x| x.seq == a.seq) {
                        return Err(bad(i, format!("activity seq {} is already in use", a.seq)));
                    }
                }
                command::Kind::StartTimer(t) => {
                    if self.state.timers.contains_key(&t.seq) {
                        return Err(bad(i, format!("timer seq {} is already in use", t.seq)));
                    }
                    check_duration("duration_ms", t.duration_ms)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::RecordMarker(m) => {
                    check_payload("marker data", m.data.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::SignalExternal(s) => {
                    tether_core::types::validate_name("signal name", &s.signal_name)
                        .map_err(|e| bad(i, e.to_string()))?;
                    tether_core::types::validate_name("workflow id", &s.workflow_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                    check_payload("signal input", s.input.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CompleteWorkflow(c) => {
                    seen_terminal = true;
                    check_payload("workflow result", c.result.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::FailWorkflow(_) | command::Kind::CancelWorkflow(_) => {
                    seen_terminal = true;
                }
                command::Kind::CreateSession(c) => {
                    tether_core::types::validate_name("session id", &c.session_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                    let o = c.options.clone().unwrap_or_default();
                    tether_core::requirements::Requirements::parse(&o.requirements)
                        .map_err(|e| bad(i, e.to_string()))?;
                    super::sessions::Packing::parse(&o.packing).map_err(|e| bad(i, e))?;
                    check_session_durations(&o).map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CompleteSession(c) => {
                    tether_core::types::validate_name("session id", &c.session_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CancelTimer(_) | command::Kind::RequestCancelActivity(_) => {}
            }
        }
        Ok(())
    }

    /// Applies a workflow task completion: marks the activation, records the commands as events
    /// and acts on them.
    pub fn complete_workflow_task(
        &mut self,
        token: &pb::TaskToken,
        commands: Vec<pb::Command>,
        identity: &str,
        sticky_queue: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<WorkflowTaskCompletion, EngineError> {
        self.check_workflow_task(token)?;
        let closes = commands.iter().any(|c| {
            matches!(
                c.kind,
                Some(
                    command::Kind::CompleteWorkflow(_)
                        | command::Kind::FailWorkflow(_)
                        | command::Kind::CancelWorkflow(_)
                )
            )
        });
        if closes && !self.state.buffered.is_empty() {
            // The workflow decided to close without seeing what arrived meanwhile (a signal, an
            // activity outcome): closing now would drop an acknowledged signal. Nothing of this
            // task is applied; a new task carries the new events, replayed from full history
            // because the worker's cached state ran ahead of it.
            let arrived = self.state.buffered.len();
            self.rt.workflow_task = None;
            self.rt.sticky_sent_up_to = 0;
            self.state.workflow_task = None;
            self.flush_buffered();
            self.schedule_workflow_task(now, fx);
            return Ok(WorkflowTaskCompletion::Rejected(format!(
                "{arrived} new event(s) arrived while the workflow task that closes the run was \
                 running; the completion was not applied and a new workflow task delivers them"
            )));
        }
        self.rt.workflow_task = None;
        self.state.workflow_task = None;
        self.state.last_workflow_task_failure = None;
        self.state.sticky_queue = sticky_queue.to_string();
        self.push_history(HistoryEvent {
            event_id: 0,
            time_ms: now,
            attributes: Some(Attributes::WorkflowTaskCompleted(
                pb::WorkflowTaskCompleted {
                    identity: identity.to_string(),
                },
            )),
        });
        // Outcomes produced by the commands themselves (an activity cancelled before it started)
        // go after all command events, as the next activation's input.
        let mut deferred: Vec<Attributes> = Vec::new();
        let mut terminal: Option<(ExecutionStatus, Attributes)> = None;
        for c in commands {
            let Some(kind) = c.kind else { continue };
            match kind {
                command::Kind::ScheduleActivity(a) => self.schedule_activity(a, now, fx),
                command::Kind::StartTimer(t) => {
                    let id = self.push_attr(
                        Attributes::TimerStarted(pb::TimerStarted {
                            seq: t.seq,
                            duration_ms: t.duration_ms,
                        }),
                        now,
                    );
                    let fire_at_ms = deadline(now, t.duration_ms);
                    self.state.timers.insert(
                        t.seq,
                        TimerState {
                            seq: t.seq,
                            fire_at_ms,
                            started_event_id: id,
                        },
                    );
                    fx.timers.push((
                        fire_at_ms,
                        TimerKey::WorkflowTimer {
                            run_id: self.state.run_id.clone(),
                            seq: t.seq,
                        },
                    ));
                }
                command::Kind::CancelTimer(t) => {
                    self.state.timers.remove(&t.seq);
                    self.push_attr(
                        Attributes::TimerCanceled(pb::TimerCanceled { seq: t.seq }),
                        now,
                    );
                }
                command::Kind::RequestCancelActivity(r) => {
                    self.push_attr(
                        Attributes::ActivityCancelRequested(pb::ActivityCancelRequested {
                            seq: r.seq,
                        }),
                        now,
                    );
                    if let Some(outcome) = self.request_activity_cancel(r.seq) {
                        deferred.push(outcome);
                    }
                }
                command::Kind::RecordMarker(m) => {
                    self.push_attr(
                        Attributes::MarkerRecorded(pb::MarkerRecorded {
                            seq: m.seq,
                            marker_name: m.marker_name,
                            data: m.data,
                        }),
                        now,
                    );
                }
                command::Kind::SignalExternal(s) => {
                    self.push_attr(
                        Attributes::SignalExternalInitiated(pb::SignalExternalInitiated {
                            seq: s.seq,
                            namespace: s.namespace.clone(),
                            workflow_id: s.workflow_id.clone(),
                            signal_name: s.signal_name.clone(),
                            input: s.input.clone(),
                        }),
                        now,
                    );
                    fx.signals.push(OutgoingSignal {
                        from_run: self.state.run_id.clone(),
                        seq: s.seq,
                        namespace: if s.namespace.is_empty() {
                            self.state.namespace.clone()
                        } else {
                            s.namespace
                        },
                        workflow_id: s.workflow_id,
                        signal_name: s.signal_name,
                        input: s.input,
                    });
                }
                command::Kind::CreateSession(c) => {
                    let mut options = c.options.unwrap_or_default();
                    if options.task_queue.is_empty() {
                        options.task_queue = self.state.task_queue.clone();
                    }
                    self.push_attr(
                        Attributes::SessionCreateRequested(pb::SessionCreateRequested {
                            seq: c.seq,
                            session_id: c.session_id.clone(),
                            options: Some(options.clone()),
                        }),
                        now,
                    );
                    fx.session_requests.push((
                        self.state.run_id.clone(),
                        c.seq,
                        c.session_id,
                        options,
                    ));
                }
                command::Kind::CompleteSession(c) => {
                    self.push_attr(
                        Attributes::SessionCompleteRequested(pb::SessionCompleteRequested {
                            seq: c.seq,
                            session_id: c.session_id.clone(),
                        }),
                        now,
                    );
                    fx.session_completions.push(c.session_id);
                }
                command::Kind::CompleteWorkflow(c) => {
                    terminal = Some((
                        ExecutionStatus::Completed,
                        Attributes::WorkflowExecutionCompleted(pb::WorkflowExecutionCompleted {
                            result: c.result,
                        }),
                    ));
                }
                command::Kind::FailWorkflow(f) => {
                    terminal = Some((
                        ExecutionStatus::Failed,
                        Attributes::WorkflowExecutionFailed(pb::WorkflowExecutionFailed {
                            failure: f.failure,
                        }),
                    ));
                }
                command::Kind::CancelWorkflow(c) => {
                    terminal = Some((
                        ExecutionStatus::Canceled,
                        Attributes::WorkflowExecutionCanceled(pb::WorkflowExecutionCanceled {
                            details: c.details,
                        }),
                    ));
                }
            }
        }
        let had_buffered = self.flush_buffered();
        for attrs in &deferred {
            self.push_attr(attrs.clone(), now);
        }
        if let Some((status, attrs)) = terminal {
            self.close(status, attrs, now, fx);
            return Ok(WorkflowTaskCompletion::Applied);
        }
        if had_buffered || !deferred.is_empty() {
            self.schedule_workflow_task(now, fx);
        }
        Ok(WorkflowTaskCompletion::Applied)
    }

    fn push_attr(&mut self, attrs: Attributes, now: i64) -> u64 {
        self.push_history(HistoryEvent {
            event_id: 0,
            time_ms: now,
            attributes: Some(attrs),
        })
    }

    /// Records a failed workflow task (e.g. non-determinism) and offers it again after a backoff,
    /// so a fixed worker can continue the run.
    pub fn fail_workflow_task(
        &mut self,
        token: &pb::TaskToken,
        cause: &str,
        failure: Option<Failure>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_workflow_task(token)?;
        let message = failure.map(|f| f.message).unwrap_or_default();
        tracing::warn!(run_id = %self.state.run_id, cause, %message, identity, "workflow task failed");
        self.retry_workflow_task(cause, message, identity, now, fx);
        Ok(())
    }

    fn retry_workflow_task(
        &mut self,
        cause: &str,
        message: String,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        self.rt.workflow_task = None;
        self.rt.sticky_sent_up_to = 0;
        self.state.sticky_queue.clear();
        self.flush_buffered();
        let task = self
            .state
            .workflow_task
            .get_or_insert_with(Default::default);
        task.attempt += 1;
        task.scheduled_ms = now;
        let attempt = task.attempt;
        self.state.workflow_task_failures += 1;
        self.state.last_workflow_task_failure = Some(pb::WorkflowTaskFailureInfo {
            cause: cause.to_string(),
            message,
            attempt: attempt - 1,
            identity: identity.to_string(),
            time_ms: now,
        });
        let delay = (250i64 << (attempt.saturating_sub(2)).min(10)).min(MAX_WORKFLOW_TASK_RETRY_MS);
        fx.timers.push((
            now + delay,
            TimerKey::WorkflowTaskRetry {
                run_id: self.state.run_id.clone(),
                attempt,
            },
        ));
    }

    /// A workflow task's start-to-close timeout fired.
    pub fn workflow_task_timed_out(&mut self, dispatch: u64, now: i64, fx: &mut Effects) -> bool {
        match &self.rt.workflow_task {
            Some(t) if t.dispatch == dispatch && self.is_open() => {
                let identity = t.identity.clone();
                self.retry_workflow_task(
                    "timeout",
                    format!(
                        "workflow task timed out after {} ms on worker {identity}",
                        self.state.task_timeout_ms
                    ),
                    &identity,
                    now,
                    fx,
                );
                true
            }
            _ => false,
        }
    }

    /// The retry backoff of a failed workflow task ended.
    pub fn workflow_task_retry_due(&mut self, attempt: u32, fx: &mut Effects) -> bool {
        let pending = self.state.workflow_task.as_ref().map(|t| t.attempt) == Some(attempt);
        if pending && self.rt.workflow_task.is_none() && self.is_open() {
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.state.run_id.clone(),
                },
                String::new(),
            ));
        }
        false
    }

    /// Nobody took the task from the sticky queue in time: any worker may now have it.
    pub fn sticky_timed_out(&mut self, enqueue: u64, fx: &mut Effects) -> bool {
        if self.rt.enqueues == enqueue
            && self.rt.workflow_task.is_none()
            && self.state.workflow_task.is_some()
            && self.is_open()
        {
            self.rt.sticky_sent_up_to = 0;
            self.state.sticky_queue.clear();
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.state.run_id.clone(),
                },
                String::new(),
            ));
            return true;
        }
        false
    }

    // ------------------------------------------------------------------------------------------
    // Signals, cancellation, termination, timers
    // ------------------------------------------------------------------------------------------

    /// Whether a signal with this request id was delivered already.
    pub fn has_signal_request(&self, request_id: &str) -> bool {
        !request_id.is_empty()
            && self
                .state
                .signal_request_ids
                .iter()
                .any(|r| r == request_id)
    }

    /// Delivers a signal (`request_id` non-empty: remembered, so a retry is not delivered
    /// again; check [`RunEntry::has_signal_request`] first).
    pub fn signal(
        &mut self,
        signal_name: &str,
        input: Option<Payload>,
        identity: &str,
        request_id: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        if !request_id.is_empty() {
            let ids = &mut self.state.signal_request_ids;
            if ids.len() >= REMEMBERED_SIGNAL_REQUESTS {
                ids.remove(0);
            }
            ids.push(request_id.to_string());
        }
        self.append(
            Attributes::WorkflowSignaled(pb::WorkflowSignaled {
                signal_name: signal_name.to_string(),
                input,
                identity: identity.to_string(),
            }),
            now,
        );
        self.schedule_workflow_task(now, fx);
    }

    /// Tells the workflow how its session request ended.
    pub fn session_resolved(
        &mut self,
        seq: u32,
        outcome: Result<pb::SessionInfo, (String, String)>,
        now: i64,
        fx: &mut Effects,
    ) {
        if !self.is_open() {
            return;
        }
        let attrs = match outcome {
            Ok(info) => Attributes::SessionCreated(pb::SessionCreated {
                seq,
                session: Some(info),
            }),
            Err((session_id, reason)) => Attributes::SessionCreateFailed(pb::SessionCreateFailed {
                seq,
                session_id,
                reason,
            }),
        };
        self.append(attrs, now);
        self.schedule_workflow_task(now, fx);
    }

    /// Tells the workflow that a session it owns ended without it completing it.
    pub fn session_ended(
        &mut self,
        session_id: &str,
        state: &str,
        reason: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        if !self.is_open() {
            return;
        }
        self.append(
            Attributes::SessionEnded(pb::SessionEnded {
                session_id: session_id.to_string(),
                state: state.to_string(),
                reason: reason.to_string(),
            }),
            now,
        );
        self.schedule_workflow_task(now, fx);
    }

    /// Records the outcome of a signal this run sent to another workflow.
    pub fn signal_external_resolved(
        &mut self,
        seq: u32,
        failure: Option<Failure>,
        now: i64,
        fx: &mut Effects,
    ) {
        self.append(
            Attributes::SignalExternalResolved(pb::SignalExternalResolved { seq, failure }),
            now,
        );
        self.schedule_workflow_task(now, fx);
    }

    /// Asks the workflow to cancel: it sees the request and decides; running activities are told
    /// through their heartbeat responses.
    pub fn request_cancel(&mut self, reason: &str, identity: &str, now: i64, fx: &mut Effects) {
        if self.state.cancel_requested {
            return;
        }
        self.state.cancel_requested = true;
        if self.state.standalone_activity {
            if let Some(sched) = self.state.activities.keys().next().copied() {
                let seq = self.state.activities[&sched].seq;
                if let Some(outcome) = self.request_activity_cancel(seq) {
                    self.push_attr(outcome, now);
                    self.close_with_last_event(ExecutionStatus::Canceled, now, fx);
                }
            }
            return;
        }
        let seqs: Vec<u32> = self.state.activities.values().map(|a| a.seq).collect();
        for seq in seqs {
            if let Some(a) = self.state.activities.values_mut().find(|a| a.seq == seq) {
                a.cancel_requested = true;
            }
        }
        self.append(
            Attributes::WorkflowCancelRequested(pb::WorkflowCancelRequested {
                reason: reason.to_string(),
                identity: identity.to_string(),
            }),
            now,
        );
        self.schedule_workflow_task(now, fx);
    }

    /// Marks an activity cancel-requested. If it is not running, it is cancelled at once and the
    /// outcome event is returned for the caller to append.
    fn request_activity_cancel(&mut self, seq: u32) -> Option<Attributes> {
        let sched = self
            .state
            .activities
            .values()
            .find(|a| a.seq == seq)
            .map(|a| a.scheduled_event_id)?;
        if self.rt.started_activities.contains_key(&sched) {
            if let Some(a) = self.state.activities.get_mut(&sched) {
                a.cancel_requested = true;
            }
            return None;
        }
        let a = self.state.activities.remove(&sched)?;
        Some(Attributes::ActivityTaskCanceled(pb::ActivityTaskCanceled {
            seq: a.seq,
            scheduled_event_id: sched,
            details: None,
        }))
    }

    /// Ends the run at once; nothing of the workflow runs any more.
    pub fn terminate(&mut self, reason: &str, identity: &str, now: i64, fx: &mut Effects) {
        self.rt.workflow_task = None;
        self.flush_buffered();
        self.close(
            ExecutionStatus::Terminated,
            Attributes::WorkflowExecutionTerminated(pb::WorkflowExecutionTerminated {
                reason: reason.to_string(),
                identity: identity.to_string(),
            }),
            now,
            fx,
        );
    }

    /// A workflow timer fired.
    pub fn timer_fired(&mut self, seq: u32, now: i64, fx: &mut Effects) -> bool {
        if !self.is_open() || self.state.timers.remove(&seq).is_none() {
            return false;
        }
        self.append(Attributes::TimerFired(pb::TimerFired { seq }), now);
        self.schedule_workflow_task(now, fx);
        true
    }

    /// The run's own timeout fired.
    pub fn run_timed_out(&mut self, now: i64, fx: &mut Effects) -> bool {
        if !self.is_open() {
            return false;
        }
        self.rt.workflow_task = None;
        self.flush_buffered();
        self.close(
            ExecutionStatus::TimedOut,
            Attributes::WorkflowExecutionTimedOut(pb::WorkflowExecutionTimedOut {}),
            now,
            fx,
        );
        true
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
        self.rt = Runtime::default();
        fx.closed.push(Closed {
            run_id: self.state.run_id.clone(),
            outcome,
        });
    }

    // ------------------------------------------------------------------------------------------
    // Activities
    // ------------------------------------------------------------------------------------------

    fn schedule_activity(&mut self, a: pb::ScheduleActivityCommand, now: i64, fx: &mut Effects) {
        // Validated before (validate_commands / the frontend), so defaults apply cleanly here.
        let options = normalize_activity_options(a.options.clone(), &self.state.task_queue)
            .unwrap_or_default();
        let activity_id = if a.activity_id.is_empty() {
            a.seq.to_string()
        } else {
            a.activity_id.clone()
        };
        let scheduled_event_id = self.push_attr(
            Attributes::ActivityTaskScheduled(pb::ActivityTaskScheduled {
                seq: a.seq,
                activity_id: activity_id.clone(),
                activity_type: a.activity_type.clone(),
                input: a.input.clone(),
                options: Some(options.clone()),
            }),
            now,
        );
        let state = ActivityState {
            seq: a.seq,
            scheduled_event_id,
            activity_id,
            activity_type: a.activity_type,
            task_queue: options.task_queue.clone(),
            input: a.input,
            options: Some(options.clone()),
            attempt: 1,
            scheduled_ms: now,
            attempt_scheduled_ms: now,
            cancel_requested: self.state.cancel_requested && self.state.standalone_activity,
            ..Default::default()
        };
        let run_id = self.state.run_id.clone();
        fx.tasks
            .push(activity_task(&self.state.namespace, &run_id, &state, 1));
        self.state.activities.insert(scheduled_event_id, state);
        if options.schedule_to_start_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, options.schedule_to_start_timeout_ms),
                TimerKey::ActivityScheduleToStart {
                    run_id: run_id.clone(),
                    scheduled_event_id,
                    attempt: 1,
                },
            ));
        }
        if options.schedule_to_close_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, options.schedule_to_close_timeout_ms),
                TimerKey::ActivityScheduleToClose {
                    run_id,
                    scheduled_event_id,
                },
            ));
        }
    }

    /// Hands an activity attempt to a poller (worker `identity`, process `instance`). None if
    /// the task is stale. The hand-out is recorded in the attempt's persisted state: the caller
    /// makes it durable before the worker gets the task.
    pub fn dispatch_activity(
        &mut self,
        scheduled_event_id: u64,
        attempt: u32,
        identity: &str,
        instance: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Option<pb::PollActivityTaskResponse> {
        if !self.is_open() || self.rt.started_activities.contains_key(&scheduled_event_id) {
            return None;
        }
        let a = self.state.activities.get_mut(&scheduled_event_id)?;
        if a.attempt != attempt || a.backoff_until_ms > 0 || a.started_ms > 0 {
            return None;
        }
        a.last_worker = identity.to_string();
        a.started_ms = now;
        a.started_worker = identity.to_string();
        a.started_instance = instance.to_string();
        let options = a.options.clone().unwrap_or_default();
        let mut attempt_deadline = deadline(now, options.start_to_close_timeout_ms);
        if options.schedule_to_close_timeout_ms > 0 {
            attempt_deadline = attempt_deadline.min(deadline(
                a.scheduled_ms,
                options.schedule_to_close_timeout_ms,
            ));
        }
        let run_id = self.state.run_id.clone();
        let dispatch = next_dispatch();
        a.started_dispatch = dispatch;
        arm_attempt_timers(
            fx,
            &run_id,
            (scheduled_event_id, attempt, dispatch),
            deadline(now, options.start_to_close_timeout_ms),
            &options,
            now,
        );
        let token = pb::TaskToken {
            namespace: self.state.namespace.clone(),
            run_id: run_id.clone(),
            scheduled_event_id,
            attempt,
            dispatch,
        };
        let response = pb::PollActivityTaskResponse {
            task_token: prost::Message::encode_to_vec(&token),
            activity_id: a.activity_id.clone(),
            activity_type: a.activity_type.clone(),
            input: a.input.clone(),
            attempt,
            heartbeat_details: a.heartbeat_details.clone(),
            workflow_id: if self.state.standalone_activity {
                String::new()
            } else {
                self.state.workflow_id.clone()
            },
            run_id,
            start_to_close_timeout_ms: options.start_to_close_timeout_ms,
            heartbeat_timeout_ms: options.heartbeat_timeout_ms,
            scheduled_ms: a.attempt_scheduled_ms,
            deadline_ms: attempt_deadline,
            namespace: self.state.namespace.clone(),
            workflow_type: if self.state.standalone_activity {
                String::new()
            } else {
                self.state.workflow_type.clone()
            },
            session: None,
            task_queue: a.task_queue.clone(),
        };
        self.rt.started_activities.insert(
            scheduled_event_id,
            StartedActivity {
                attempt,
                worker: identity.to_string(),
                instance: instance.to_string(),
                started_ms: now,
                last_heartbeat_ms: now,
                dispatch,
            },
        );
        Some(response)
    }

    /// The task of attempt `attempt` of an activity, when that attempt waits to be handed out
    /// (to offer it again after a poll took it but could not be given it).
    pub fn waiting_activity_task(
        &self,
        scheduled_event_id: u64,
        attempt: u32,
    ) -> Option<(QueueKey, TaskRef, String)> {
        if !self.is_open() || self.rt.started_activities.contains_key(&scheduled_event_id) {
            return None;
        }
        let a = self.state.activities.get(&scheduled_event_id)?;
        if a.attempt != attempt || a.backoff_until_ms > 0 || a.started_ms > 0 {
            return None;
        }
        Some(activity_task(
            &self.state.namespace,
            &self.state.run_id,
            a,
            attempt,
        ))
    }

    /// Takes back a hand-out the worker never received (its poll ended before the reply went
    /// out): the attempt waits in its queue again, with the same number, since it never ran.
    /// Returns whether anything changed.
    pub fn undispatch_activity(
        &mut self,
        scheduled_event_id: u64,
        attempt: u32,
        dispatch: u64,
        fx: &mut Effects,
    ) -> bool {
        let current = self
            .rt
            .started_activities
            .get(&scheduled_event_id)
            .is_some_and(|s| s.attempt == attempt && s.dispatch == dispatch);
        if !current || !self.is_open() {
            return false;
        }
        self.rt.started_activities.remove(&scheduled_event_id);
        let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
            return false;
        };
        clear_started(a);
        fx.tasks.push(activity_task(
            &self.state.namespace,
            &self.state.run_id,
            a,
            attempt,
        ));
        true
    }

    /// Checks that a token names the current attempt of a pending activity, as handed out to
    /// this worker (`identity`; empty skips that check).
    fn check_activity(&self, token: &pb::TaskToken, identity: &str) -> Result<(), EngineError> {
        if !self.is_open() {
            return Err(EngineError::StaleTask(format!(
                "run {} is already closed",
                self.state.run_id
            )));
        }
        let Some(a) = self.state.activities.get(&token.scheduled_event_id) else {
            return Err(EngineError::StaleTask(format!(
                "activity (scheduled event {}) of run {} is no longer pending",
                token.scheduled_event_id, self.state.run_id
            )));
        };
        if a.attempt != token.attempt {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} is no longer current (attempt {} is)",
                token.attempt, a.activity_id, a.attempt
            )));
        }
        let Some(started) = self.rt.started_activities.get(&token.scheduled_event_id) else {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} is not handed out to any worker (it waits in its \
                 queue or in a retry backoff)",
                token.attempt, a.activity_id
            )));
        };
        // Tokens from before hand-outs were numbered carry 0: accepted by attempt alone.
        if token.dispatch != 0 && started.dispatch != token.dispatch {
            return Err(EngineError::StaleTask(format!(
                "this hand-out of attempt {} of activity {} is no longer current (it was handed \
                 out again)",
                token.attempt, a.activity_id
            )));
        }
        if !identity.is_empty() && !started.worker.is_empty() && started.worker != identity {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} was handed to worker {}, not to {identity}",
                token.attempt, a.activity_id, started.worker
            )));
        }
        Ok(())
    }

    /// An activity attempt succeeded.
    pub fn activity_completed(
        &mut self,
        token: &pb::TaskToken,
        result: Option<Payload>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        // The event's size, near enough: its payload and identity, and room for its numbers.
        let size = result
            .as_ref()
            .map_or(0, |r| prost::Message::encoded_len(r) as u64)
            + identity.len() as u64
            + 64;
        if !self.history_has_room(size) {
            // Refusing the report would only make the worker run the activity again and again:
            // the workflow hears of it as a failure it can act on instead.
            let message = self.history_full("the activity's result", size).to_string();
            let failure = Failure {
                message,
                error_type: "HistorySizeLimit".into(),
                non_retryable: true,
                kind: FailureKind::Application as i32,
                ..Default::default()
            };
            self.attempt_failed(token.scheduled_event_id, failure, identity, now, fx);
            return Ok(());
        }
        let a = self.remove_activity(token.scheduled_event_id);
        self.append(
            Attributes::ActivityTaskCompleted(pb::ActivityTaskCompleted {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                result,
                attempt: token.attempt,
                identity: identity.to_string(),
            }),
            now,
        );
        self.after_activity_outcome(ExecutionStatus::Completed, now, fx);
        Ok(())
    }

    fn remove_activity(&mut self, scheduled_event_id: u64) -> ActivityState {
        self.rt.started_activities.remove(&scheduled_event_id);
        self.state
            .activities
            .remove(&scheduled_event_id)
            .unwrap_or_default()
    }

    fn after_activity_outcome(&mut self, status: ExecutionStatus, now: i64, fx: &mut Effects) {
        if self.state.standalone_activity {
            self.close_with_last_event(status, now, fx);
        } else {
            self.schedule_workflow_task(now, fx);
        }
    }

    /// An activity attempt failed: retry per policy, or record the failure.
    pub fn activity_failed(
        &mut self,
        token: &pb::TaskToken,
        failure: Failure,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        let mut failure = failure;
        let size = prost::Message::encoded_len(&failure) as u64 + 64;
        if !self.history_has_room(size) {
            // Keep what the workflow needs to decide; the details would not fit.
            failure.details = None;
            failure.encoded_attributes = None;
            failure.cause = None;
            failure.message = tether_core::types::quote_prefix(&failure.message, 256);
        }
        self.attempt_failed(token.scheduled_event_id, failure, identity, now, fx);
        Ok(())
    }

    /// Shared by failures and attempt timeouts: schedule the next attempt or give up.
    fn attempt_failed(
        &mut self,
        scheduled_event_id: u64,
        failure: Failure,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        self.rt.started_activities.remove(&scheduled_event_id);
        let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
            return;
        };
        clear_started(a);
        let options = a.options.clone().unwrap_or_default();
        let policy = options.retry_policy.clone().unwrap_or_default();
        let non_retryable = failure.non_retryable
            || failure.kind == FailureKind::Canceled as i32
            || (!failure.error_type.is_empty()
                && policy
                    .non_retryable_error_types
                    .iter()
                    .any(|t| t == &failure.error_type));
        let attempts_left = policy.maximum_attempts == 0 || a.attempt < policy.maximum_attempts;
        let next_attempt = a.attempt + 1;
        let delay = backoff_ms(&policy, next_attempt);
        let within_deadline = options.schedule_to_close_timeout_ms == 0
            || now.saturating_add(delay)
                < deadline(a.scheduled_ms, options.schedule_to_close_timeout_ms);
        if !non_retryable && attempts_left && within_deadline && !a.cancel_requested {
            a.attempt = next_attempt;
            a.backoff_until_ms = now.saturating_add(delay).max(1);
            a.last_failure = Some(failure);
            a.last_worker = identity.to_string();
            fx.timers.push((
                a.backoff_until_ms,
                TimerKey::ActivityRetry {
                    run_id: self.state.run_id.clone(),
                    scheduled_event_id,
                    attempt: next_attempt,
                },
            ));
            return;
        }
        let a = self.remove_activity(scheduled_event_id);
        let attrs = if failure.kind == FailureKind::Timeout as i32 {
            Attributes::ActivityTaskTimedOut(pb::ActivityTaskTimedOut {
                seq: a.seq,
                scheduled_event_id,
                failure: Some(failure),
                attempt: a.attempt,
            })
        } else {
            Attributes::ActivityTaskFailed(pb::ActivityTaskFailed {
                seq: a.seq,
                scheduled_event_id,
                failure: Some(failure),
                attempt: a.attempt,
                identity: identity.to_string(),
            })
        };
        let status = if matches!(attrs, Attributes::ActivityTaskTimedOut(_)) {
            ExecutionStatus::TimedOut
        } else {
            ExecutionStatus::Failed
        };
        self.append(attrs, now);
        self.after_activity_outcome(status, now, fx);
    }

    /// The worker confirms a cancel-requested activity stopped.
    pub fn activity_canceled(
        &mut self,
        token: &pb::TaskToken,
        details: Option<Payload>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        let a = &self.state.activities[&token.scheduled_event_id];
        if !a.cancel_requested {
            return Err(EngineError::InvalidArgument(format!(
                "activity {} was not asked to cancel; report a failure instead",
                a.activity_id
            )));
        }
        let a = self.remove_activity(token.scheduled_event_id);
        self.append(
            Attributes::ActivityTaskCanceled(pb::ActivityTaskCanceled {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                details,
            }),
            now,
        );
        self.after_activity_outcome(ExecutionStatus::Canceled, now, fx);
        Ok(())
    }

    /// Records a heartbeat; returns whether cancellation was requested.
    pub fn activity_heartbeat(
        &mut self,
        token: &pb::TaskToken,
        details: Option<Payload>,
        identity: &str,
        now: i64,
    ) -> Result<bool, EngineError> {
        self.check_activity(token, identity)?;
        if let Some(started) = self
            .rt
            .started_activities
            .get_mut(&token.scheduled_event_id)
        {
            started.last_heartbeat_ms = now;
        }
        let a = self
            .state
            .activities
            .get_mut(&token.scheduled_event_id)
            .expect("checked above");
        if details.is_some() {
            a.heartbeat_details = details;
        }
        Ok(a.cancel_requested)
    }

    /// An activity timer fired. Returns whether anything changed. `placement_note` explains,
    /// for a schedule-to-start timeout, why no worker could take the task.
    pub fn activity_timer(
        &mut self,
        key: &TimerKey,
        placement_note: &str,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        match *key {
            TimerKey::ActivityRetry {
                scheduled_event_id,
                attempt,
                ..
            } => {
                let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
                    return false;
                };
                if a.attempt != attempt || a.backoff_until_ms == 0 {
                    return false;
                }
                a.backoff_until_ms = 0;
                a.attempt_scheduled_ms = now;
                let options = a.options.clone().unwrap_or_default();
                fx.tasks.push(activity_task(
                    &self.state.namespace,
                    &self.state.run_id,
                    a,
                    attempt,
                ));
                if options.schedule_to_start_timeout_ms > 0 {
                    fx.timers.push((
                        deadline(now, options.schedule_to_start_timeout_ms),
                        TimerKey::ActivityScheduleToStart {
                            run_id: self.state.run_id.clone(),
                            scheduled_event_id,
                            attempt,
                        },
                    ));
                }
                true
            }
            TimerKey::ActivityScheduleToStart {
                scheduled_event_id,
                attempt,
                ..
            } => {
                let waiting = self
                    .state
                    .activities
                    .get(&scheduled_event_id)
                    .is_some_and(|a| a.attempt == attempt && a.backoff_until_ms == 0)
                    && !self.rt.started_activities.contains_key(&scheduled_event_id);
                if !waiting {
                    return false;
                }
                let mut f = timeout_failure("schedule_to_start", None);
                if !placement_note.is_empty() {
                    f.message = format!("{}: no worker could take it: {placement_note}", f.message);
                }
                f.non_retryable = true;
                self.attempt_failed(scheduled_event_id, f, "", now, fx);
                true
            }
            TimerKey::ActivityStartToClose {
                scheduled_event_id,
                attempt,
                dispatch,
                ..
            } => {
                let running = self
                    .rt
                    .started_activities
                    .get(&scheduled_event_id)
                    .is_some_and(|s| s.attempt == attempt && s.dispatch == dispatch);
                if !running {
                    return false;
                }
                let worker = self.rt.started_activities[&scheduled_event_id]
                    .worker
                    .clone();
                self.attempt_failed(
                    scheduled_event_id,
                    timeout_failure("start_to_close", None),
                    &worker,
                    now,
                    fx,
                );
                true
            }
            TimerKey::ActivityHeartbeat {
                ref run_id,
                scheduled_event_id,
                attempt,
                dispatch,
            } => {
                let Some(started) = self.rt.started_activities.get(&scheduled_event_id) else {
                    return false;
                };
                if started.attempt != attempt || started.dispatch != dispatch {
                    return false;
                }
                let timeout = self
                    .state
                    .activities
                    .get(&scheduled_event_id)
                    .and_then(|a| a.options.as_ref())
                    .map(|o| o.heartbeat_timeout_ms as i64)
                    .unwrap_or(0);
                let due = started.last_heartbeat_ms.saturating_add(timeout);
                if due > now {
                    fx.timers.push((
                        due,
                        TimerKey::ActivityHeartbeat {
                            run_id: run_id.clone(),
                            scheduled_event_id,
                            attempt,
                            dispatch,
                        },
                    ));
                    return false;
                }
                let worker = started.worker.clone();
                self.attempt_failed(
                    scheduled_event_id,
                    timeout_failure("heartbeat", None),
                    &worker,
                    now,
                    fx,
                );
                true
            }
            TimerKey::ActivityScheduleToClose {
                scheduled_event_id, ..
            } => {
                let Some(a) = self.state.activities.get(&scheduled_event_id) else {
                    return false;
                };
                let last = a.last_failure.clone();
                let mut f = timeout_failure("schedule_to_close", last.as_ref());
                f.non_retryable = true;
                self.attempt_failed(scheduled_event_id, f, "", now, fx);
                true
            }
            _ => false,
        }
    }

    /// Worker `identity` is now process `keep[0]`: attempts other processes of it (but those
    /// in `keep`) were running are lost with them, and retried now (as new attempts).
    pub fn worker_restarted(
        &mut self,
        identity: &str,
        keep: &[&str],
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        let lost: Vec<u64> = self
            .rt
            .started_activities
            .iter()
            .filter(|(_, s)| s.worker == identity && !keep.contains(&s.instance.as_str()))
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            let failure = Failure {
                message: format!("worker {identity} restarted while running this attempt"),
                error_type: "WorkerRestarted".into(),
                kind: FailureKind::Server as i32,
                ..Default::default()
            };
            self.attempt_failed(*id, failure, identity, now, fx);
        }
        !lost.is_empty()
    }

    /// Fails every pending activity of a session that failed: not retried anywhere else.
    /// Returns whether anything changed.
    pub fn fail_session_activities(
        &mut self,
        session_id: &str,
        reason: &str,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        self.fail_activities_in_session(session_id, reason, false, now, fx)
    }

    /// Fails the activities of a session that closed before they were handed out: they can
    /// never run (the ones running may still finish). Returns whether anything changed.
    pub fn fail_waiting_session_activities(
        &mut self,
        session_id: &str,
        reason: &str,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        self.fail_activities_in_session(session_id, reason, true, now, fx)
    }

    fn fail_activities_in_session(
        &mut self,
        session_id: &str,
        reason: &str,
        waiting_only: bool,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        let started = &self.rt.started_activities;
        let ids: Vec<u64> = self
            .state
            .activities
            .values()
            .filter(|a| {
                a.options
                    .as_ref()
                    .is_some_and(|o| o.session_id == session_id)
                    && !(waiting_only && started.contains_key(&a.scheduled_event_id))
            })
            .map(|a| a.scheduled_event_id)
            .collect();
        for id in &ids {
            let failure = Failure {
                message: format!("session {session_id} failed: {reason}"),
                error_type: "SessionFailed".into(),
                non_retryable: true,
                kind: FailureKind::Application as i32,
                ..Default::default()
            };
            self.attempt_failed(*id, failure, "", now, fx);
        }
        !ids.is_empty()
    }

    /// What `describe` shows about pending activities.
    pub fn pending_activities(&self) -> Vec<pb::PendingActivityInfo> {
        self.state
            .activities
            .values()
            .map(|a| {
                let started = self.rt.started_activities.get(&a.scheduled_event_id);
                let state = if started.is_some() {
                    if a.cancel_requested {
                        "cancel_requested"
                    } else {
                        "started"
                    }
                } else if a.backoff_until_ms > 0 {
                    "backoff"
                } else {
                    "scheduled"
                };
                pb::PendingActivityInfo {
                    seq: a.seq,
                    scheduled_event_id: a.scheduled_event_id,
                    activity_id: a.activity_id.clone(),
                    activity_type: a.activity_type.clone(),
                    state: state.into(),
                    attempt: a.attempt,
                    last_failure: a.last_failure.clone(),
                    last_worker: started
                        .map(|s| s.worker.clone())
                        .unwrap_or_else(|| a.last_worker.clone()),
                    last_heartbeat_ms: started.map(|s| s.last_heartbeat_ms).unwrap_or(0),
                    next_attempt_ms: a.backoff_until_ms,
                    task_queue: a.task_queue.clone(),
                }
            })
            .collect()
    }
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
