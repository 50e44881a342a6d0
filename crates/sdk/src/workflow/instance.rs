//! One workflow run held by a worker: its future, its context and the replay bookkeeping.

use super::context::{WorkflowContext, WorkflowError, WorkflowInfo};
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use tether_wire::pb::{self, command, history_event::Attributes};

/// Builds the future of a registered workflow from its context and input.
pub(crate) type WorkflowFactory = Arc<
    dyn Fn(WorkflowContext, Option<pb::Payload>) -> BoxFuture<'static, WorkflowOutcome>
        + Send
        + Sync,
>;

/// What a workflow function returns, already encoded.
pub(crate) type WorkflowOutcome = Result<Option<pb::Payload>, WorkflowError>;

/// Why a workflow task could not be completed.
#[derive(Debug, Clone)]
pub(crate) struct TaskFailure {
    /// `nondeterminism`, `panic` or `unknown_workflow_type`.
    pub cause: &'static str,
    /// What happened.
    pub message: String,
}

struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A workflow run in the worker's cache.
pub(crate) struct WorkflowInstance {
    ctx: WorkflowContext,
    factory: WorkflowFactory,
    future: Option<BoxFuture<'static, WorkflowOutcome>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
    /// Commands issued by the code that history has not echoed yet.
    unmatched: VecDeque<pb::Command>,
    /// The last event this instance has processed.
    pub last_event_id: u64,
    /// The code returned; its terminal command was issued.
    finished: bool,
    /// Activations this instance has run. Each WorkflowTaskCompleted event in history closes
    /// one activation; the ones this instance ran live are already done when their event comes.
    activations: u64,
    /// WorkflowTaskCompleted events seen.
    completions_seen: u64,
}

fn describe_command(c: &pb::Command) -> String {
    match &c.kind {
        Some(command::Kind::ScheduleActivity(a)) => {
            format!(
                "ScheduleActivity(seq {}, type {:?})",
                a.seq, a.activity_type
            )
        }
        Some(command::Kind::StartTimer(t)) => format!("StartTimer(seq {})", t.seq),
        Some(command::Kind::CancelTimer(t)) => format!("CancelTimer(seq {})", t.seq),
        Some(command::Kind::RequestCancelActivity(r)) => {
            format!("RequestCancelActivity(seq {})", r.seq)
        }
        Some(command::Kind::RecordMarker(m)) => format!("SideEffect(seq {})", m.seq),
        Some(command::Kind::SignalExternal(s)) => {
            format!(
                "SignalWorkflow(seq {}, {:?} -> {:?})",
                s.seq, s.signal_name, s.workflow_id
            )
        }
        Some(command::Kind::CreateSession(c)) => format!("CreateSession(seq {})", c.seq),
        Some(command::Kind::CompleteSession(c)) => format!("CompleteSession(seq {})", c.seq),
        Some(command::Kind::CompleteWorkflow(_)) => "CompleteWorkflow".into(),
        Some(command::Kind::FailWorkflow(_)) => "FailWorkflow".into(),
        Some(command::Kind::CancelWorkflow(_)) => "CancelWorkflow".into(),
        None => "empty command".into(),
    }
}

fn describe_event(a: &Attributes) -> String {
    match a {
        Attributes::ActivityTaskScheduled(e) => {
            format!(
                "ActivityTaskScheduled(seq {}, type {:?})",
                e.seq, e.activity_type
            )
        }
        Attributes::TimerStarted(e) => format!("TimerStarted(seq {})", e.seq),
        Attributes::TimerCanceled(e) => format!("TimerCanceled(seq {})", e.seq),
        Attributes::ActivityCancelRequested(e) => format!("ActivityCancelRequested(seq {})", e.seq),
        Attributes::MarkerRecorded(e) => format!("MarkerRecorded(seq {})", e.seq),
        Attributes::SessionCreateRequested(e) => format!("SessionCreateRequested(seq {})", e.seq),
        Attributes::SessionCompleteRequested(e) => {
            format!("SessionCompleteRequested(seq {})", e.seq)
        }
        Attributes::SignalExternalInitiated(e) => format!(
            "SignalExternalInitiated(seq {}, {:?} -> {:?})",
            e.seq, e.signal_name, e.workflow_id
        ),
        other => pb::HistoryEvent {
            event_id: 0,
            time_ms: 0,
            attributes: Some(other.clone()),
        }
        .kind_name()
        .to_string(),
    }
}

/// Whether the event records a command (as opposed to something that happened to the workflow).
fn is_command_event(a: &Attributes) -> bool {
    matches!(
        a,
        Attributes::ActivityTaskScheduled(_)
            | Attributes::TimerStarted(_)
            | Attributes::TimerCanceled(_)
            | Attributes::ActivityCancelRequested(_)
            | Attributes::MarkerRecorded(_)
            | Attributes::SignalExternalInitiated(_)
            | Attributes::SessionCreateRequested(_)
            | Attributes::SessionCompleteRequested(_)
            | Attributes::WorkflowExecutionCompleted(_)
            | Attributes::WorkflowExecutionFailed(_)
            | Attributes::WorkflowExecutionCanceled(_)
    )
}

fn command_matches(c: &pb::Command, a: &Attributes) -> bool {
    match (&c.kind, a) {
        (Some(command::Kind::ScheduleActivity(c)), Attributes::ActivityTaskScheduled(e)) => {
            c.seq == e.seq && c.activity_type == e.activity_type
        }
        (Some(command::Kind::StartTimer(c)), Attributes::TimerStarted(e)) => c.seq == e.seq,
        (Some(command::Kind::CancelTimer(c)), Attributes::TimerCanceled(e)) => c.seq == e.seq,
        (Some(command::Kind::RequestCancelActivity(c)), Attributes::ActivityCancelRequested(e)) => {
            c.seq == e.seq
        }
        (Some(command::Kind::RecordMarker(c)), Attributes::MarkerRecorded(e)) => c.seq == e.seq,
        (Some(command::Kind::SignalExternal(c)), Attributes::SignalExternalInitiated(e)) => {
            c.seq == e.seq && c.workflow_id == e.workflow_id && c.signal_name == e.signal_name
        }
        (Some(command::Kind::CreateSession(c)), Attributes::SessionCreateRequested(e)) => {
            c.seq == e.seq && c.session_id == e.session_id
        }
        (Some(command::Kind::CompleteSession(c)), Attributes::SessionCompleteRequested(e)) => {
            c.seq == e.seq && c.session_id == e.session_id
        }
        (Some(command::Kind::CompleteWorkflow(_)), Attributes::WorkflowExecutionCompleted(_))
        | (Some(command::Kind::FailWorkflow(_)), Attributes::WorkflowExecutionFailed(_))
        | (Some(command::Kind::CancelWorkflow(_)), Attributes::WorkflowExecutionCanceled(_)) => {
            true
        }
        _ => false,
    }
}

fn nondeterminism(message: String) -> TaskFailure {
    TaskFailure {
        cause: "nondeterminism",
        message,
    }
}

impl WorkflowInstance {
    pub(crate) fn new(info: WorkflowInfo, factory: WorkflowFactory) -> Self {
        let flag = Arc::new(WakeFlag(AtomicBool::new(false)));
        WorkflowInstance {
            ctx: WorkflowContext::new(info),
            factory,
            future: None,
            waker: Waker::from(flag.clone()),
            flag,
            unmatched: VecDeque::new(),
            last_event_id: 0,
            finished: false,
            activations: 0,
            completions_seen: 0,
        }
    }

    /// Whether the workflow code has returned.
    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// Processes the events of one workflow task (a full history or only new events) and
    /// returns the new commands.
    pub(crate) fn process(
        &mut self,
        events: &[pb::HistoryEvent],
    ) -> Result<Vec<pb::Command>, TaskFailure> {
        {
            let mut ctx = self.ctx.inner.lock();
            for e in events {
                if let Some(Attributes::MarkerRecorded(m)) = &e.attributes {
                    if e.event_id > self.last_event_id {
                        ctx.recorded_markers.insert(m.seq, m.data.clone());
                    }
                }
            }
        }
        let mut pending: Vec<&pb::HistoryEvent> = Vec::new();
        for event in events {
            if event.event_id <= self.last_event_id {
                continue;
            }
            self.last_event_id = event.event_id;
            let Some(attrs) = &event.attributes else {
                continue;
            };
            match attrs {
                Attributes::WorkflowTaskCompleted(_) => {
                    self.completions_seen += 1;
                    if self.completions_seen > self.activations {
                        // Replaying an activation this instance has not run yet.
                        self.check_all_matched()?;
                        self.activate(&pending)?;
                    }
                    pending.clear();
                }
                a if is_command_event(a) => {
                    let Some(cmd) = self.unmatched.pop_front() else {
                        return Err(nondeterminism(format!(
                            "history has {} (event {}) but the workflow code did not issue it",
                            describe_event(a),
                            event.event_id
                        )));
                    };
                    if !command_matches(&cmd, a) {
                        return Err(nondeterminism(format!(
                            "history has {} (event {}) where the workflow code now issues {}",
                            describe_event(a),
                            event.event_id,
                            describe_command(&cmd)
                        )));
                    }
                }
                _ => pending.push(event),
            }
        }
        self.check_all_matched()?;
        let before = self.unmatched.len();
        self.activate(&pending)?;
        self.ctx.inner.lock().recorded_markers.clear();
        Ok(self.unmatched.iter().skip(before).cloned().collect())
    }

    fn check_all_matched(&self) -> Result<(), TaskFailure> {
        match self.unmatched.front() {
            None => Ok(()),
            Some(cmd) => Err(nondeterminism(format!(
                "the workflow code issues {} which history does not have at this point",
                describe_command(cmd)
            ))),
        }
    }

    /// Applies the events of one activation and runs the code until it can make no progress.
    fn activate(&mut self, events: &[&pb::HistoryEvent]) -> Result<(), TaskFailure> {
        self.activations += 1;
        {
            let mut ctx = self.ctx.inner.lock();
            for e in events {
                ctx.now_ms = ctx.now_ms.max(e.time_ms);
                if let Some(a) = &e.attributes {
                    ctx.apply(a);
                }
            }
            ctx.wake_all();
        }
        for e in events {
            if let Some(Attributes::WorkflowExecutionStarted(s)) = &e.attributes {
                if self.future.is_none() {
                    self.future = Some((self.factory)(self.ctx.clone(), s.input.clone()));
                }
            }
        }
        if let (Some(fut), false) = (self.future.as_mut(), self.finished) {
            self.flag.0.store(true, Ordering::SeqCst);
            let mut cx = Context::from_waker(&self.waker);
            // A workflow future only advances on events, so this loop ends once every branch waits
            // on something that has not happened yet; the bound guards against a future that
            // wakes itself forever.
            for _ in 0..100_000 {
                if !self.flag.0.swap(false, Ordering::SeqCst) {
                    break;
                }
                let polled =
                    std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
                match polled {
                    Err(panic) => {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "workflow code panicked".into());
                        return Err(TaskFailure {
                            cause: "panic",
                            message: format!("workflow code panicked: {message}"),
                        });
                    }
                    Ok(Poll::Pending) => {}
                    Ok(Poll::Ready(outcome)) => {
                        self.finished = true;
                        let cancel_requested = self.ctx.inner.lock().cancel_requested;
                        let kind = match outcome {
                            Ok(result) => {
                                command::Kind::CompleteWorkflow(pb::CompleteWorkflowCommand {
                                    result,
                                })
                            }
                            Err(WorkflowError::Cancelled) if cancel_requested => {
                                command::Kind::CancelWorkflow(pb::CancelWorkflowCommand {
                                    details: None,
                                })
                            }
                            Err(e) => command::Kind::FailWorkflow(pb::FailWorkflowCommand {
                                failure: Some(e.to_failure()),
                            }),
                        };
                        self.ctx
                            .inner
                            .lock()
                            .commands
                            .push(pb::Command { kind: Some(kind) });
                        break;
                    }
                }
            }
        }
        let issued: Vec<pb::Command> = std::mem::take(&mut self.ctx.inner.lock().commands);
        self.unmatched.extend(issued);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ActivityOptions;
    use crate::codec;
    use futures::FutureExt;

    fn ev(id: u64, attrs: Attributes) -> pb::HistoryEvent {
        pb::HistoryEvent {
            event_id: id,
            time_ms: 1_000 + id as i64,
            attributes: Some(attrs),
        }
    }

    fn started(id: u64) -> pb::HistoryEvent {
        ev(
            id,
            Attributes::WorkflowExecutionStarted(pb::WorkflowExecutionStarted {
                workflow_type: "wf".into(),
                input: Some(codec::to_payload(&()).unwrap()),
                ..Default::default()
            }),
        )
    }

    fn wtc(id: u64) -> pb::HistoryEvent {
        ev(id, Attributes::WorkflowTaskCompleted(Default::default()))
    }

    fn scheduled(id: u64, seq: u32, ty: &str) -> pb::HistoryEvent {
        ev(
            id,
            Attributes::ActivityTaskScheduled(pb::ActivityTaskScheduled {
                seq,
                activity_type: ty.into(),
                ..Default::default()
            }),
        )
    }

    fn completed(id: u64, seq: u32, value: u32) -> pb::HistoryEvent {
        ev(
            id,
            Attributes::ActivityTaskCompleted(pb::ActivityTaskCompleted {
                seq,
                result: Some(codec::to_payload(&value).unwrap()),
                ..Default::default()
            }),
        )
    }

    /// A workflow that runs the given activity types one after another and sums their results.
    fn instance(types: &'static [&'static str]) -> WorkflowInstance {
        let factory: WorkflowFactory = Arc::new(move |ctx: WorkflowContext, _input| {
            async move {
                let mut sum = 0u32;
                for ty in types {
                    let v: u32 = ctx
                        .execute_activity(ty, &(), ActivityOptions::default())
                        .await?;
                    sum += v;
                }
                Ok(Some(codec::to_payload(&sum).unwrap()))
            }
            .boxed()
        });
        let info = WorkflowInfo {
            namespace: "default".into(),
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "wf".into(),
            task_queue: "q".into(),
        };
        WorkflowInstance::new(info, factory)
    }

    fn kinds(commands: &[pb::Command]) -> Vec<String> {
        commands.iter().map(describe_command).collect()
    }

    #[test]
    fn first_activation_schedules_the_first_activity() {
        let mut wf = instance(&["a", "b"]);
        let cmds = wf.process(&[started(1)]).unwrap();
        assert_eq!(kinds(&cmds), vec!["ScheduleActivity(seq 1, type \"a\")"]);
    }

    #[test]
    fn full_history_replays_to_the_next_command() {
        let mut wf = instance(&["a", "b"]);
        let history = [started(1), wtc(2), scheduled(3, 1, "a"), completed(4, 1, 5)];
        let cmds = wf.process(&history).unwrap();
        assert_eq!(kinds(&cmds), vec!["ScheduleActivity(seq 2, type \"b\")"]);
    }

    #[test]
    fn sticky_instance_continues_from_new_events_only() {
        let mut wf = instance(&["a", "b"]);
        wf.process(&[started(1)]).unwrap();
        // The server echoes our commands after the completion marker, then the new result.
        let cmds = wf
            .process(&[wtc(2), scheduled(3, 1, "a"), completed(4, 1, 5)])
            .unwrap();
        assert_eq!(kinds(&cmds), vec!["ScheduleActivity(seq 2, type \"b\")"]);
        let cmds = wf
            .process(&[wtc(5), scheduled(6, 2, "b"), completed(7, 2, 6)])
            .unwrap();
        assert_eq!(kinds(&cmds), vec!["CompleteWorkflow"]);
        match &cmds[0].kind {
            Some(command::Kind::CompleteWorkflow(c)) => {
                let sum: u32 = codec::from_payload(c.result.as_ref()).unwrap();
                assert_eq!(sum, 11);
            }
            other => panic!("{other:?}"),
        }
        assert!(wf.finished());
    }

    #[test]
    fn changed_activity_type_is_non_determinism() {
        let mut wf = instance(&["b"]);
        let history = [started(1), wtc(2), scheduled(3, 1, "a"), completed(4, 1, 5)];
        let err = wf.process(&history).expect_err("must fail");
        assert_eq!(err.cause, "nondeterminism");
        assert!(
            err.message.contains("type \"a\"") && err.message.contains("type \"b\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn missing_command_is_non_determinism() {
        // The code now returns without calling any activity, but history scheduled one.
        let mut wf = instance(&[]);
        let history = [started(1), wtc(2), scheduled(3, 1, "a"), completed(4, 1, 5)];
        let err = wf.process(&history).expect_err("must fail");
        assert_eq!(err.cause, "nondeterminism");
        assert!(
            err.message.contains("CompleteWorkflow") || err.message.contains("did not issue"),
            "{}",
            err.message
        );
    }

    #[test]
    fn extra_command_is_non_determinism() {
        // History recorded one activation that scheduled nothing, then completed.
        let mut wf = instance(&["a"]);
        let history = [started(1), wtc(2)];
        let err = wf.process(&history).expect_err("must fail");
        assert!(
            err.message.contains("which history does not have"),
            "{}",
            err.message
        );
    }

    #[test]
    fn panicking_workflow_code_fails_the_task() {
        let factory: WorkflowFactory = Arc::new(|_ctx, _input| {
            async move {
                panic!("boom");
            }
            .boxed()
        });
        let info = WorkflowInfo {
            namespace: "default".into(),
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "wf".into(),
            task_queue: "q".into(),
        };
        let mut wf = WorkflowInstance::new(info, factory);
        let err = wf.process(&[started(1)]).expect_err("must fail");
        assert_eq!(err.cause, "panic");
        assert!(err.message.contains("boom"));
    }
}
