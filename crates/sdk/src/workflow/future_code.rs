//! Workflow code written in Rust: an `async fn` driven as a [`WorkflowCode`]. The future is
//! polled with its own waker (never with tokio), one activation at a time: the activation's
//! events are applied to the context, the future is polled until no branch can make progress,
//! and the commands it issued through the context go back to the replayer.

use super::context::{WorkflowContext, WorkflowError, WorkflowInfo};
use super::replay::{TaskFailure, WorkflowCode};
use futures::future::BoxFuture;
use std::collections::HashMap;
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

struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One run of a Rust workflow: its context and its future (made at the run's start event).
pub(crate) struct FutureCode {
    ctx: WorkflowContext,
    factory: WorkflowFactory,
    future: Option<BoxFuture<'static, WorkflowOutcome>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
    /// The future returned (it is never polled again).
    finished: bool,
}

impl FutureCode {
    pub(crate) fn new(info: WorkflowInfo, factory: WorkflowFactory) -> Self {
        let flag = Arc::new(WakeFlag(AtomicBool::new(false)));
        FutureCode {
            ctx: WorkflowContext::new(info),
            factory,
            future: None,
            waker: Waker::from(flag.clone()),
            flag,
            finished: false,
        }
    }
}

impl WorkflowCode for FutureCode {
    fn recorded_side_effects(&mut self, recorded: HashMap<u32, Option<pb::Payload>>) {
        self.ctx.inner.lock().recorded_markers = recorded;
    }

    fn activate(&mut self, events: &[&pb::HistoryEvent]) -> Result<Vec<pb::Command>, TaskFailure> {
        self.run_activation(events)?;
        Ok(std::mem::take(&mut self.ctx.inner.lock().commands))
    }
}

impl FutureCode {
    /// Applies the events of one activation and runs the code until it can make no progress.
    fn run_activation(&mut self, events: &[&pb::HistoryEvent]) -> Result<(), TaskFailure> {
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
                // A panic unwinds to the replayer, which fails the task with it.
                match fut.as_mut().poll(&mut cx) {
                    Poll::Pending => {}
                    Poll::Ready(outcome) => {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ActivityOptions;
    use crate::codec;
    use crate::workflow::replay::WorkflowInstance;
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
        WorkflowInstance::new(Box::new(FutureCode::new(info, factory)))
    }

    fn kinds(commands: &[pb::Command]) -> Vec<String> {
        commands
            .iter()
            .map(crate::workflow::replay::describe_command)
            .collect()
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
        let mut wf = WorkflowInstance::new(Box::new(FutureCode::new(info, factory)));
        let err = wf.process(&[started(1)]).expect_err("must fail");
        assert_eq!(err.cause, "panic");
        assert!(err.message.contains("boom"));
    }
}
