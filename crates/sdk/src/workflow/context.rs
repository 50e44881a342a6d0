//! What workflow code sees: [`WorkflowContext`] and the futures it hands out (activities,
//! timers, signals, sessions), the errors a workflow fails with, and the per-run bookkeeping
//! those futures resolve against.

use crate::client::ActivityOptions;
use crate::codec::{self, ConvertError};
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tether_wire::pb::{self, command};

/// How an activity ended, as a workflow sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivityFailureKind {
    /// The activity returned an error (after retries, if any).
    Failed,
    /// A timeout ended it.
    TimedOut,
    /// It was cancelled.
    Cancelled,
    /// It ran in a session that ended without the workflow completing it (its worker died or
    /// shut down, its GPUs vanished, an operator terminated it): not retried anywhere else. The
    /// workflow decides, e.g. with [`WorkflowContext::recreate_session`].
    SessionFailed,
}

/// An activity's final failure, delivered to the workflow.
#[derive(Debug, Clone, thiserror::Error)]
#[error("activity {activity_type} {}: {message}", match kind { ActivityFailureKind::Failed => "failed", ActivityFailureKind::TimedOut => "timed out", ActivityFailureKind::Cancelled => "was cancelled", ActivityFailureKind::SessionFailed => "lost its session" })]
pub struct ActivityFailure {
    /// How it ended.
    pub kind: ActivityFailureKind,
    /// The activity type.
    pub activity_type: String,
    /// The message of the last failure.
    pub message: String,
    /// The error type of the last failure.
    pub error_type: String,
    /// For timeouts: which one.
    pub timeout_type: String,
    /// Attempts made.
    pub attempt: u32,
}

/// Why a workflow failed (or stopped).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkflowError {
    /// Workflow code decided to fail.
    #[error("{message}")]
    Failed {
        /// Why.
        message: String,
        /// A type name for callers to match on.
        error_type: String,
    },
    /// The workflow accepted a cancellation request.
    #[error("workflow cancelled")]
    Cancelled,
    /// An activity failed and the workflow passed the failure on.
    #[error(transparent)]
    Activity(#[from] ActivityFailure),
    /// A value could not be converted.
    #[error("{0}")]
    Convert(String),
    /// Signalling another workflow failed.
    #[error("signal not delivered: {0}")]
    Signal(String),
    /// A session could not be created.
    #[error("{0}")]
    Session(String),
}

impl WorkflowError {
    /// Whether the error is a session's end: an activity in it failed with
    /// [`ActivityFailureKind::SessionFailed`], or the session could not be created.
    pub fn is_session_failure(&self) -> bool {
        match self {
            WorkflowError::Activity(f) => f.kind == ActivityFailureKind::SessionFailed,
            WorkflowError::Session(_) => true,
            _ => false,
        }
    }

    /// An application failure with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        WorkflowError::Failed {
            message: message.into(),
            error_type: String::new(),
        }
    }

    pub(crate) fn to_failure(&self) -> pb::Failure {
        let (error_type, kind) = match self {
            WorkflowError::Failed { error_type, .. } => {
                (error_type.clone(), pb::FailureKind::Application)
            }
            WorkflowError::Cancelled => (String::new(), pb::FailureKind::Canceled),
            WorkflowError::Activity(a) => (a.error_type.clone(), pb::FailureKind::Application),
            WorkflowError::Convert(_) => ("ConvertError".into(), pb::FailureKind::Application),
            WorkflowError::Signal(_) => ("SignalFailed".into(), pb::FailureKind::Application),
            WorkflowError::Session(_) => ("SessionFailed".into(), pb::FailureKind::Application),
        };
        pb::Failure {
            message: self.to_string(),
            error_type,
            kind: kind as i32,
            ..Default::default()
        }
    }
}

impl From<ConvertError> for WorkflowError {
    fn from(e: ConvertError) -> Self {
        WorkflowError::Convert(e.to_string())
    }
}

/// Requirements written in a workflow (`Requirements::parse(..)?`) that do not parse fail the
/// workflow with the parser's message (column and caret included).
impl From<crate::caps::ParseError> for WorkflowError {
    fn from(e: crate::caps::ParseError) -> Self {
        WorkflowError::Failed {
            message: e.to_string(),
            error_type: "InvalidRequirements".into(),
        }
    }
}

/// Facts about the running workflow.
#[derive(Debug, Clone)]
pub struct WorkflowInfo {
    /// Namespace.
    pub namespace: tether_core::types::Namespace,
    /// Workflow id.
    pub workflow_id: tether_core::types::WorkflowId,
    /// Run id.
    pub run_id: tether_core::types::RunId,
    /// Workflow type.
    pub workflow_type: String,
    /// Task queue.
    pub task_queue: tether_core::types::TaskQueue,
}

/// Activity outcome delivered by history.
type ActivityOutcome = Result<Option<pb::Payload>, ActivityFailure>;

#[derive(Default)]
pub(crate) struct RunCtx {
    next_seq: u32,
    /// Commands issued since the runtime last collected them.
    pub(crate) commands: Vec<pb::Command>,
    activity_types: HashMap<u32, String>,
    activity_results: HashMap<u32, ActivityOutcome>,
    fired_timers: HashSet<u32>,
    signals: HashMap<String, VecDeque<Option<pb::Payload>>>,
    signal_results: HashMap<u32, Option<pb::Failure>>,
    session_results: HashMap<u32, Result<pb::SessionInfo, String>>,
    /// Sessions that ended without the workflow completing them: id -> (state, reason).
    ended_sessions: HashMap<String, (String, String)>,
    pub(crate) cancel_requested: bool,
    pub(crate) now_ms: i64,
    rng: u64,
    /// Side-effect values recorded in history, by seq (replay only).
    pub(crate) recorded_markers: HashMap<u32, Option<pb::Payload>>,
    wakers: Vec<Waker>,
}

impl RunCtx {
    fn seq(&mut self) -> u32 {
        self.next_seq += 1;
        self.next_seq
    }

    pub(crate) fn wake_all(&mut self) {
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }

    pub(crate) fn apply(&mut self, attrs: &pb::history_event::Attributes) {
        use pb::history_event::Attributes as A;
        let failure = |kind, f: &Option<pb::Failure>, types: &HashMap<u32, String>, seq: u32| {
            let f = f.clone().unwrap_or_default();
            ActivityFailure {
                kind,
                activity_type: types.get(&seq).cloned().unwrap_or_default(),
                message: f.message,
                error_type: f.error_type,
                timeout_type: f.timeout_type,
                attempt: 0,
            }
        };
        match attrs {
            A::ActivityTaskCompleted(e) => {
                self.activity_results.insert(e.seq, Ok(e.result.clone()));
            }
            A::ActivityTaskFailed(e) => {
                let session_failed = e
                    .failure
                    .as_ref()
                    .is_some_and(|f| f.error_type == "SessionFailed");
                let mut f = failure(
                    if session_failed {
                        ActivityFailureKind::SessionFailed
                    } else {
                        ActivityFailureKind::Failed
                    },
                    &e.failure,
                    &self.activity_types,
                    e.seq,
                );
                f.attempt = e.attempt;
                self.activity_results.insert(e.seq, Err(f));
            }
            A::ActivityTaskTimedOut(e) => {
                let mut f = failure(
                    ActivityFailureKind::TimedOut,
                    &e.failure,
                    &self.activity_types,
                    e.seq,
                );
                f.attempt = e.attempt;
                self.activity_results.insert(e.seq, Err(f));
            }
            A::ActivityTaskCanceled(e) => {
                let f = ActivityFailure {
                    kind: ActivityFailureKind::Cancelled,
                    activity_type: self.activity_types.get(&e.seq).cloned().unwrap_or_default(),
                    message: "cancelled".into(),
                    error_type: String::new(),
                    timeout_type: String::new(),
                    attempt: 0,
                };
                self.activity_results.insert(e.seq, Err(f));
            }
            A::TimerFired(e) => {
                self.fired_timers.insert(e.seq);
            }
            A::WorkflowSignaled(e) => {
                self.signals
                    .entry(e.signal_name.clone())
                    .or_default()
                    .push_back(e.input.clone());
            }
            A::WorkflowCancelRequested(_) => self.cancel_requested = true,
            A::SignalExternalResolved(e) => {
                self.signal_results.insert(e.seq, e.failure.clone());
            }
            A::SessionCreated(e) => {
                self.session_results
                    .insert(e.seq, Ok(e.session.clone().unwrap_or_default()));
            }
            A::SessionEnded(e) => {
                self.ended_sessions
                    .insert(e.session_id.clone(), (e.state.clone(), e.reason.clone()));
            }
            A::SessionCreateFailed(e) => {
                self.session_results.insert(
                    e.seq,
                    Err(format!(
                        "session {} could not be created: {}",
                        e.session_id, e.reason
                    )),
                );
            }
            _ => {}
        }
    }

    /// SplitMix64: small, fast, and stable across versions (unlike library RNGs), which replay
    /// needs.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Seeds the deterministic random generator from the run id.
pub(crate) fn seed_from(run_id: &str) -> u64 {
    // FNV-1a: stable and dependency-free.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What workflow code uses to act on the world deterministically.
#[derive(Clone)]
pub struct WorkflowContext {
    pub(crate) inner: Arc<Mutex<RunCtx>>,
    info: Arc<WorkflowInfo>,
}

impl WorkflowContext {
    pub(crate) fn new(info: WorkflowInfo) -> Self {
        let ctx = RunCtx {
            rng: seed_from(&info.run_id),
            ..Default::default()
        };
        WorkflowContext {
            inner: Arc::new(Mutex::new(ctx)),
            info: Arc::new(info),
        }
    }

    /// Facts about this run.
    pub fn info(&self) -> &WorkflowInfo {
        &self.info
    }

    /// Schedules an activity and returns a future of its result. The activity is scheduled when
    /// this is called, not when the future is first polled.
    pub fn execute_activity<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        activity_type: &str,
        input: &I,
        options: ActivityOptions,
    ) -> ActivityFuture<O> {
        let mut ctx = self.inner.lock();
        let seq = ctx.seq();
        match codec::to_payload(input) {
            Ok(payload) => {
                ctx.activity_types.insert(seq, activity_type.to_string());
                ctx.commands.push(pb::Command {
                    kind: Some(command::Kind::ScheduleActivity(
                        pb::ScheduleActivityCommand {
                            seq,
                            activity_id: seq.to_string(),
                            activity_type: activity_type.to_string(),
                            input: Some(payload),
                            options: Some(options.to_proto()),
                        },
                    )),
                });
                ActivityFuture {
                    ctx: self.clone(),
                    seq,
                    encode_error: None,
                    _out: PhantomData,
                }
            }
            Err(e) => ActivityFuture {
                ctx: self.clone(),
                seq,
                encode_error: Some(e.to_string()),
                _out: PhantomData,
            },
        }
    }

    /// A durable timer: resolves after `duration`, even across worker and server restarts.
    pub fn sleep(&self, duration: Duration) -> TimerFuture {
        let mut ctx = self.inner.lock();
        let seq = ctx.seq();
        ctx.commands.push(pb::Command {
            kind: Some(command::Kind::StartTimer(pb::StartTimerCommand {
                seq,
                duration_ms: tether_core::types::duration_ms(duration),
            })),
        });
        TimerFuture {
            ctx: self.clone(),
            seq,
        }
    }

    /// The signals of one name, in the order they arrived.
    pub fn signal_channel(&self, name: &str) -> SignalChannel {
        SignalChannel {
            ctx: self.clone(),
            name: name.to_string(),
        }
    }

    /// Sends a signal to another workflow (in `namespace`, or this one when `None`). Resolves
    /// once the server has delivered it, or with an error if the target is not running.
    pub fn signal_workflow<I: Serialize + ?Sized>(
        &self,
        namespace: Option<&str>,
        workflow_id: &str,
        signal_name: &str,
        input: &I,
    ) -> SignalExternalFuture {
        let mut ctx = self.inner.lock();
        let seq = ctx.seq();
        let payload = codec::to_payload(input).ok();
        ctx.commands.push(pb::Command {
            kind: Some(command::Kind::SignalExternal(pb::SignalExternalCommand {
                seq,
                namespace: namespace.unwrap_or_default().to_string(),
                workflow_id: workflow_id.to_string(),
                signal_name: signal_name.to_string(),
                input: payload,
            })),
        });
        SignalExternalFuture {
            ctx: self.clone(),
            seq,
        }
    }

    /// Runs `f` once and records its result in history; on replay returns the recorded value
    /// without running `f`. For reading things that must not change on replay (a config value,
    /// a generated name).
    pub fn side_effect<T: Serialize + DeserializeOwned>(
        &self,
        f: impl FnOnce() -> T,
    ) -> Result<T, WorkflowError> {
        let (seq, recorded) = {
            let mut ctx = self.inner.lock();
            let seq = ctx.seq();
            (seq, ctx.recorded_markers.remove(&seq))
        };
        let (value, data) = match recorded {
            Some(data) => (codec::from_payload::<T>(data.as_ref())?, data),
            None => {
                let value = f();
                let data = Some(codec::to_payload(&value)?);
                (value, data)
            }
        };
        self.inner.lock().commands.push(pb::Command {
            kind: Some(command::Kind::RecordMarker(pb::RecordMarkerCommand {
                seq,
                marker_name: "side_effect".into(),
                data,
            })),
        });
        Ok(value)
    }

    /// Asks the server to place a session (one worker, concrete GPUs and resources reserved);
    /// resolves once it is placed, or with an error when no worker could host it in time.
    pub fn create_session(&self, options: crate::client::SessionOptions) -> SessionFuture {
        let mut ctx = self.inner.lock();
        let seq = ctx.seq();
        // Derived from the run and seq, so a replay asks for the very same session.
        let session_id = format!("{}-s{seq}", self.info.run_id);
        ctx.commands.push(pb::Command {
            kind: Some(command::Kind::CreateSession(pb::CreateSessionCommand {
                seq,
                session_id,
                options: Some(options.to_proto()),
            })),
        });
        SessionFuture {
            ctx: self.clone(),
            seq,
        }
    }

    /// Creates a session like `old` again, after it failed: on the same worker only
    /// ([`RecreatePolicy::SameHost`], waiting for it to come back within the creation timeout),
    /// or on any worker that satisfies the same requirements ([`RecreatePolicy::SameHostOrFailover`]).
    pub fn recreate_session(&self, old: &SessionHandle, policy: RecreatePolicy) -> SessionFuture {
        let mut options = session_options_from(&old.info);
        if policy == RecreatePolicy::SameHost {
            options.worker = Some(old.info.worker_identity.clone());
        }
        self.create_session(options)
    }

    /// The time of the current workflow task (deterministic: the same on replay).
    pub fn now(&self) -> std::time::SystemTime {
        let ms = self.inner.lock().now_ms.max(0) as u64;
        std::time::UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// A deterministic random number (seeded from the run id).
    pub fn random_u64(&self) -> u64 {
        self.inner.lock().next_random()
    }

    /// A deterministic random number in [0, 1).
    pub fn random_f64(&self) -> f64 {
        (self.random_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A deterministic random (version 4) uuid.
    pub fn uuid(&self) -> uuid::Uuid {
        let hi = self.random_u64();
        let lo = self.random_u64();
        uuid::Builder::from_random_bytes(((hi as u128) << 64 | lo as u128).to_be_bytes())
            .into_uuid()
    }

    /// True once cancellation of this workflow was requested.
    pub fn is_cancelled(&self) -> bool {
        self.inner.lock().cancel_requested
    }

    /// Resolves when cancellation of this workflow is requested.
    pub fn cancelled(&self) -> CancelledFuture {
        CancelledFuture { ctx: self.clone() }
    }
}

/// Where a recreated session may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecreatePolicy {
    /// The same worker only.
    SameHost,
    /// Any worker that satisfies the same requirements (the same one if it can).
    SameHostOrFailover,
}

fn session_options_from(info: &pb::SessionInfo) -> crate::client::SessionOptions {
    let o = info.options.clone().unwrap_or_default();
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    crate::client::SessionOptions {
        task_queue: o.task_queue,
        requirements: crate::caps::Requirements::parse(&o.requirements).unwrap_or_default(),
        gpus: o.gpus,
        resources: o.resources.into_iter().collect(),
        packing: o.packing,
        creation_timeout: ms(o.creation_timeout_ms),
        execution_timeout: ms(o.execution_timeout_ms),
        liveness_timeout: ms(o.liveness_timeout_ms),
        worker: None,
        idle_timeout: ms(o.idle_timeout_ms),
    }
}

/// A placed session, as a workflow holds it.
#[derive(Clone)]
pub struct SessionHandle {
    ctx: WorkflowContext,
    /// Worker, host, reserved GPUs and resources.
    pub info: pb::SessionInfo,
}

impl SessionHandle {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.info.session_id
    }

    /// Schedules an activity in the session: on its worker only, seeing its reservation. If the
    /// session fails, the activity fails with error type `SessionFailed` and is not retried.
    pub fn execute_activity<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        activity_type: &str,
        input: &I,
        mut options: ActivityOptions,
    ) -> ActivityFuture<O> {
        options.session_id = Some(self.info.session_id.clone());
        self.ctx.execute_activity(activity_type, input, options)
    }

    /// The session's state as this workflow knows it: `open`, or `failed` / `timed_out` once the
    /// server told the workflow (e.g. its worker stopped heartbeating), with the reason.
    pub fn state(&self) -> (String, String) {
        let ctx = self.ctx.inner.lock();
        match ctx.ended_sessions.get(&self.info.session_id) {
            Some((state, reason)) => (state.clone(), reason.clone()),
            None => (self.info.state.clone(), String::new()),
        }
    }

    /// Ends the session and releases its reservation.
    pub fn complete(&self) {
        let mut ctx = self.ctx.inner.lock();
        let seq = ctx.seq();
        ctx.commands.push(pb::Command {
            kind: Some(command::Kind::CompleteSession(pb::CompleteSessionCommand {
                seq,
                session_id: self.info.session_id.clone(),
            })),
        });
    }
}

/// A session being placed.
pub struct SessionFuture {
    ctx: WorkflowContext,
    seq: u32,
}

impl Future for SessionFuture {
    type Output = Result<SessionHandle, WorkflowError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut ctx = self.ctx.inner.lock();
        match ctx.session_results.remove(&self.seq) {
            Some(Ok(info)) => Poll::Ready(Ok(SessionHandle {
                ctx: self.ctx.clone(),
                info,
            })),
            Some(Err(e)) => Poll::Ready(Err(WorkflowError::Session(e))),
            None => {
                ctx.wakers.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The result of an activity.
pub struct ActivityFuture<O> {
    ctx: WorkflowContext,
    seq: u32,
    encode_error: Option<String>,
    _out: PhantomData<fn() -> O>,
}

impl<O: DeserializeOwned> Future for ActivityFuture<O> {
    type Output = Result<O, WorkflowError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(e) = &self.encode_error {
            return Poll::Ready(Err(WorkflowError::Convert(e.clone())));
        }
        let mut ctx = self.ctx.inner.lock();
        match ctx.activity_results.remove(&self.seq) {
            Some(Ok(payload)) => {
                Poll::Ready(codec::from_payload(payload.as_ref()).map_err(Into::into))
            }
            Some(Err(f)) => Poll::Ready(Err(WorkflowError::Activity(f))),
            None => {
                ctx.wakers.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A durable timer.
pub struct TimerFuture {
    ctx: WorkflowContext,
    seq: u32,
}

impl Future for TimerFuture {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut ctx = self.ctx.inner.lock();
        if ctx.fired_timers.remove(&self.seq) {
            Poll::Ready(())
        } else {
            ctx.wakers.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Signals of one name.
pub struct SignalChannel {
    ctx: WorkflowContext,
    name: String,
}

impl SignalChannel {
    /// The next signal, waiting for one if none is queued.
    pub fn recv<T: DeserializeOwned>(&self) -> SignalFuture<'_, T> {
        SignalFuture {
            channel: self,
            _out: PhantomData,
        }
    }

    /// The next queued signal, if one is there now.
    pub fn try_recv<T: DeserializeOwned>(&self) -> Option<Result<T, WorkflowError>> {
        let mut ctx = self.ctx.inner.lock();
        let payload = ctx.signals.get_mut(&self.name)?.pop_front()?;
        Some(codec::from_payload(payload.as_ref()).map_err(Into::into))
    }
}

/// The next signal.
pub struct SignalFuture<'a, T> {
    channel: &'a SignalChannel,
    _out: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for SignalFuture<'_, T> {
    type Output = Result<T, WorkflowError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(v) = self.channel.try_recv() {
            return Poll::Ready(v);
        }
        self.channel
            .ctx
            .inner
            .lock()
            .wakers
            .push(cx.waker().clone());
        Poll::Pending
    }
}

/// Delivery of a signal to another workflow.
pub struct SignalExternalFuture {
    ctx: WorkflowContext,
    seq: u32,
}

impl Future for SignalExternalFuture {
    type Output = Result<(), WorkflowError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut ctx = self.ctx.inner.lock();
        match ctx.signal_results.remove(&self.seq) {
            Some(None) => Poll::Ready(Ok(())),
            Some(Some(f)) => Poll::Ready(Err(WorkflowError::Signal(f.message))),
            None => {
                ctx.wakers.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Resolves when cancellation is requested.
pub struct CancelledFuture {
    ctx: WorkflowContext,
}

impl Future for CancelledFuture {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut ctx = self.ctx.inner.lock();
        if ctx.cancel_requested {
            Poll::Ready(())
        } else {
            ctx.wakers.push(cx.waker().clone());
            Poll::Pending
        }
    }
}
