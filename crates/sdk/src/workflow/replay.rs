//! Replay, without Rust futures: the boundary between a workflow task and the code of a
//! workflow. A task's events go in; the replayer splits them into activations (the events
//! between two `WorkflowTaskCompleted` markers), hands each to the code that has not run it yet,
//! and matches every command the code issues, in order, against the command event history
//! recorded for it; the commands history has not seen yet go out. A mismatch is
//! non-determinism, reported as a failed workflow task rather than run.
//!
//! The code behind the boundary is a [`WorkflowCode`]: a Rust `async fn` (see
//! `future_code.rs`), or code in another language driven the same way (activation in,
//! commands out), which is how an SDK for another language reuses this worker.

use std::collections::{HashMap, VecDeque};
use tether_wire::pb::{self, command, history_event::Attributes};

/// Workflow code, as the replayer drives it. One value per workflow run.
pub trait WorkflowCode: Send {
    /// Before the activations of a task: the values of side effects its events record (by
    /// sequence number), for code that runs again from before they were recorded; replaced at
    /// each task (and emptied after it).
    fn recorded_side_effects(&mut self, recorded: HashMap<u32, Option<pb::Payload>>);

    /// Runs one activation: applies `events` (what happened since the code last ran: the
    /// run's start, results, fired timers, signals...) and runs the code until it can make no
    /// more progress. Returns the commands it issued, in order; once the code has returned,
    /// the last of them completes, fails or cancels the run.
    fn activate(&mut self, events: &[&pb::HistoryEvent]) -> Result<Vec<pb::Command>, TaskFailure>;
}

/// Why a workflow task could not be completed.
#[derive(Debug, Clone)]
pub struct TaskFailure {
    /// `nondeterminism`, `panic`, or a cause of the code's own (`unknown_workflow_type`...).
    pub cause: &'static str,
    /// What happened.
    pub message: String,
}

/// A workflow run in the worker's cache: its code and where replay stands.
pub(crate) struct WorkflowInstance {
    code: Box<dyn WorkflowCode>,
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

pub(crate) fn describe_command(c: &pb::Command) -> String {
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
    pub(crate) fn new(code: Box<dyn WorkflowCode>) -> Self {
        WorkflowInstance {
            code,
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
        let recorded: HashMap<u32, Option<pb::Payload>> = events
            .iter()
            .filter(|e| e.event_id > self.last_event_id)
            .filter_map(|e| match &e.attributes {
                Some(Attributes::MarkerRecorded(m)) => Some((m.seq, m.data.clone())),
                _ => None,
            })
            .collect();
        self.code.recorded_side_effects(recorded);
        let outcome = self.replay(events);
        self.code.recorded_side_effects(HashMap::new());
        outcome
    }

    fn replay(&mut self, events: &[pb::HistoryEvent]) -> Result<Vec<pb::Command>, TaskFailure> {
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

    /// Runs one activation of the code (none once it has returned).
    fn activate(&mut self, events: &[&pb::HistoryEvent]) -> Result<(), TaskFailure> {
        self.activations += 1;
        if self.finished {
            return Ok(());
        }
        // Whatever the code is written in, a panic in it fails the task (and the run is
        // replayed from history next time) instead of unwinding through the worker's poller.
        let code = &mut self.code;
        let issued =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| code.activate(events)))
                .map_err(panic_failure)??;
        self.finished = issued.iter().any(is_terminal);
        self.unmatched.extend(issued);
        Ok(())
    }
}

/// The task failure for a panic in workflow code, with the panic's message when it has one.
pub(crate) fn panic_failure(panic: Box<dyn std::any::Any + Send>) -> TaskFailure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "workflow code panicked".into());
    TaskFailure {
        cause: "panic",
        message: format!("workflow code panicked: {message}"),
    }
}

/// Whether the command ends the run (the code returned).
fn is_terminal(c: &pb::Command) -> bool {
    matches!(
        c.kind,
        Some(
            command::Kind::CompleteWorkflow(_)
                | command::Kind::FailWorkflow(_)
                | command::Kind::CancelWorkflow(_)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code written against the boundary alone, as another language's SDK would: each
    /// activation answers with the next commands of a script, and records what it was given.
    struct Scripted {
        script: VecDeque<Vec<pb::Command>>,
        seen: std::sync::Arc<parking_lot::Mutex<Vec<Vec<String>>>>,
        side_effects: Vec<u32>,
    }

    impl WorkflowCode for Scripted {
        fn recorded_side_effects(&mut self, recorded: HashMap<u32, Option<pb::Payload>>) {
            let mut seqs: Vec<u32> = recorded.into_keys().collect();
            seqs.sort();
            self.side_effects.extend(seqs);
        }

        fn activate(
            &mut self,
            events: &[&pb::HistoryEvent],
        ) -> Result<Vec<pb::Command>, TaskFailure> {
            let kinds = events.iter().map(|e| e.kind_name().to_string()).collect();
            self.seen.lock().push(kinds);
            Ok(self.script.pop_front().unwrap_or_default())
        }
    }

    fn ev(id: u64, attrs: Attributes) -> pb::HistoryEvent {
        pb::HistoryEvent {
            event_id: id,
            time_ms: id as i64,
            attributes: Some(attrs),
        }
    }

    fn timer(seq: u32) -> pb::Command {
        pb::Command {
            kind: Some(command::Kind::StartTimer(pb::StartTimerCommand {
                seq,
                duration_ms: 1_000,
            })),
        }
    }

    fn complete() -> pb::Command {
        pb::Command {
            kind: Some(command::Kind::CompleteWorkflow(Default::default())),
        }
    }

    fn scripted(
        script: Vec<Vec<pb::Command>>,
    ) -> (
        WorkflowInstance,
        std::sync::Arc<parking_lot::Mutex<Vec<Vec<String>>>>,
    ) {
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let code = Scripted {
            script: script.into(),
            seen: seen.clone(),
            side_effects: Vec::new(),
        };
        (WorkflowInstance::new(Box::new(code)), seen)
    }

    fn history() -> Vec<pb::HistoryEvent> {
        vec![
            ev(1, Attributes::WorkflowExecutionStarted(Default::default())),
            ev(2, Attributes::WorkflowTaskCompleted(Default::default())),
            ev(
                3,
                Attributes::TimerStarted(pb::TimerStarted {
                    seq: 1,
                    ..Default::default()
                }),
            ),
            ev(4, Attributes::TimerFired(pb::TimerFired { seq: 1 })),
        ]
    }

    #[test]
    fn a_full_history_is_replayed_one_activation_at_a_time_and_only_new_commands_go_out() {
        let (mut run, seen) = scripted(vec![vec![timer(1)], vec![complete()]]);
        let commands = run.process(&history()).unwrap();
        assert_eq!(commands.len(), 1);
        assert!(matches!(
            commands[0].kind,
            Some(command::Kind::CompleteWorkflow(_))
        ));
        assert!(run.finished());
        assert_eq!(
            *seen.lock(),
            vec![
                vec!["WorkflowExecutionStarted".to_string()],
                vec!["TimerFired".to_string()]
            ],
            "each activation gets the events since the code last ran, and no command event"
        );
    }

    #[test]
    fn a_command_history_does_not_have_is_non_determinism() {
        // The code now starts timer 2 where history recorded timer 1.
        let (mut run, _) = scripted(vec![vec![timer(2)], vec![complete()]]);
        let failure = run.process(&history()).unwrap_err();
        assert_eq!(failure.cause, "nondeterminism");
        assert!(
            failure.message.contains("TimerStarted(seq 1)")
                && failure.message.contains("StartTimer(seq 2)"),
            "{}",
            failure.message
        );
    }

    struct Panicking;

    impl WorkflowCode for Panicking {
        fn recorded_side_effects(&mut self, _recorded: HashMap<u32, Option<pb::Payload>>) {}

        fn activate(
            &mut self,
            _events: &[&pb::HistoryEvent],
        ) -> Result<Vec<pb::Command>, TaskFailure> {
            panic!("the code blew up");
        }
    }

    #[test]
    fn a_panic_in_code_that_is_no_rust_future_fails_the_task() {
        let mut run = WorkflowInstance::new(Box::new(Panicking));
        let failure = run.process(&history()[..1]).unwrap_err();
        assert_eq!(failure.cause, "panic");
        assert!(
            failure.message.contains("the code blew up"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_cached_run_continues_from_the_new_events_only() {
        let (mut run, seen) = scripted(vec![vec![timer(1)], vec![complete()]]);
        let all = history();
        let first = run.process(&all[..1]).unwrap();
        assert_eq!(first.len(), 1, "the timer");
        let second = run.process(&all[1..]).unwrap();
        assert!(matches!(
            second[0].kind,
            Some(command::Kind::CompleteWorkflow(_))
        ));
        assert_eq!(seen.lock().len(), 2, "no activation ran twice");
    }
}
