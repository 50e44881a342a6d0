//! Python workflows on the Rust worker: each run's code is a Python object (made by
//! `tether/workflow.py`) driven one activation at a time through the core's `WorkflowCode`.
//! Events go to Python as dicts, commands come back as tuples; replay, command matching (and
//! so non-determinism detection), the sticky cache and task completion are the Rust worker's,
//! as for Rust workflows.

use crate::client::{activity_options, session_options};
use crate::convert::{self, failure_to_py, payload_to_py, session_to_py};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::collections::HashMap;
use tether_sdk::workflow::{TaskFailure, WorkflowCode, WorkflowInfo};
use tether_wire::pb::{self, command::Kind, history_event::Attributes as A};

/// One run of a Python workflow: `run.activate(events) -> commands`.
pub(crate) struct PyWorkflowCode {
    /// The run's object, or why the factory could not make it.
    run: Result<Py<PyAny>, String>,
}

impl PyWorkflowCode {
    pub(crate) fn new(factory: &Py<PyAny>, info: WorkflowInfo) -> Self {
        let run = Python::attach(|py| -> PyResult<Py<PyAny>> {
            let d = PyDict::new(py);
            d.set_item("namespace", info.namespace.to_string())?;
            d.set_item("workflow_id", info.workflow_id.to_string())?;
            d.set_item("run_id", info.run_id.to_string())?;
            d.set_item("workflow_type", &info.workflow_type)?;
            d.set_item("task_queue", info.task_queue.to_string())?;
            Ok(factory.bind(py).call1((d,))?.unbind())
        })
        .map_err(|e| format!("the Python workflow could not be made: {e}"));
        PyWorkflowCode { run }
    }
}

impl WorkflowCode for PyWorkflowCode {
    fn recorded_side_effects(&mut self, recorded: HashMap<u32, Option<pb::Payload>>) {
        let Ok(run) = &self.run else { return };
        let handed = Python::attach(|py| -> PyResult<()> {
            let d = PyDict::new(py);
            for (seq, payload) in &recorded {
                d.set_item(seq, payload_to_py(py, payload.as_ref())?)?;
            }
            run.bind(py).call_method1("recorded", (d,))?;
            Ok(())
        });
        if let Err(e) = handed {
            // The code then runs its side effects again; the command matching tells if that
            // changed what it does.
            tracing::warn!(error = %e, "the recorded side effects could not be handed to the Python workflow");
        }
    }

    fn activate(&mut self, events: &[&pb::HistoryEvent]) -> Result<Vec<pb::Command>, TaskFailure> {
        let run = self.run.as_ref().map_err(|message| TaskFailure {
            cause: "panic",
            message: message.clone(),
        })?;
        Python::attach(|py| -> PyResult<Vec<pb::Command>> {
            let list = PyList::empty(py);
            for e in events {
                list.append(event_to_py(py, e)?)?;
            }
            let answer = run.bind(py).call_method1("activate", (list,))?;
            let mut commands = Vec::new();
            for c in answer.try_iter()? {
                commands.push(command_from_py(&c?.cast_into::<PyTuple>()?)?);
            }
            Ok(commands)
        })
        .map_err(|e| TaskFailure {
            // What the workflow's code raised (other than ApplicationError, which fails the
            // run): the task is failed and tried again, as for a panic in a Rust workflow.
            cause: "panic",
            message: Python::attach(|py| describe_exception(py, &e)),
        })
    }
}

/// An exception with its Python traceback, for the task failure a user reads.
fn describe_exception(py: Python<'_>, e: &PyErr) -> String {
    let traceback = e
        .traceback(py)
        .and_then(|t| t.format().ok())
        .unwrap_or_default();
    format!("{traceback}{e}")
}

/// An event as the Python run reads it: `{"type": ..., "time_ms": ..., ...}`.
fn event_to_py<'py>(py: Python<'py>, event: &pb::HistoryEvent) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("time_ms", event.time_ms)?;
    let kind = match &event.attributes {
        Some(A::WorkflowExecutionStarted(s)) => {
            d.set_item("input", payload_to_py(py, s.input.as_ref())?)?;
            "started"
        }
        Some(A::ActivityTaskCompleted(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item("result", payload_to_py(py, e.result.as_ref())?)?;
            "activity_completed"
        }
        Some(A::ActivityTaskFailed(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item("attempt", e.attempt)?;
            d.set_item("status", "failed")?;
            d.set_item(
                "failure",
                failure_to_py(py, &e.failure.clone().unwrap_or_default())?,
            )?;
            "activity_failed"
        }
        Some(A::ActivityTaskTimedOut(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item("attempt", e.attempt)?;
            d.set_item("status", "timed_out")?;
            d.set_item(
                "failure",
                failure_to_py(py, &e.failure.clone().unwrap_or_default())?,
            )?;
            "activity_failed"
        }
        Some(A::ActivityTaskCanceled(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item("attempt", 0)?;
            d.set_item("status", "canceled")?;
            let canceled = pb::Failure {
                message: "cancelled".into(),
                ..Default::default()
            };
            d.set_item("failure", failure_to_py(py, &canceled)?)?;
            "activity_failed"
        }
        Some(A::TimerFired(e)) => {
            d.set_item("seq", e.seq)?;
            "timer_fired"
        }
        Some(A::WorkflowSignaled(e)) => {
            d.set_item("name", &e.signal_name)?;
            d.set_item("input", payload_to_py(py, e.input.as_ref())?)?;
            "signal"
        }
        Some(A::WorkflowCancelRequested(e)) => {
            d.set_item("reason", &e.reason)?;
            "cancel_requested"
        }
        Some(A::SessionCreated(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item(
                "session",
                session_to_py(py, &e.session.clone().unwrap_or_default())?,
            )?;
            "session_created"
        }
        Some(A::SessionCreateFailed(e)) => {
            d.set_item("seq", e.seq)?;
            d.set_item("session_id", &e.session_id)?;
            d.set_item("reason", &e.reason)?;
            "session_create_failed"
        }
        Some(A::SessionEnded(e)) => {
            d.set_item("session_id", &e.session_id)?;
            d.set_item("state", &e.state)?;
            d.set_item("reason", &e.reason)?;
            "session_ended"
        }
        // The rest (tasks, the echoes of commands) only moves the clock for the code.
        _ => "other",
    };
    d.set_item("type", kind)?;
    Ok(d)
}

/// A command the Python run issued: `("activity", seq, type, data, encoding, options)`,
/// `("timer", seq, ms)`, `("side_effect", seq, data, encoding)`, `("session", seq, session_id,
/// options)`, `("complete_session", seq,
/// session_id)`, `("complete", data, encoding)`, `("fail", message, type, non_retryable)` or
/// `("cancel",)`.
fn command_from_py(c: &Bound<'_, PyTuple>) -> PyResult<pb::Command> {
    let kind: String = c.get_item(0)?.extract()?;
    let kind = match kind.as_str() {
        "activity" => {
            let seq: u32 = c.get_item(1)?.extract()?;
            let options = c.get_item(5)?;
            let options = activity_options(Some(options.cast::<PyDict>()?))?;
            Kind::ScheduleActivity(pb::ScheduleActivityCommand {
                seq,
                activity_id: seq.to_string(),
                activity_type: c.get_item(2)?.extract()?,
                input: convert::payload(
                    c.get_item(3)?.extract()?,
                    &c.get_item(4)?.extract::<String>()?,
                ),
                options: Some(options.to_proto()),
            })
        }
        "timer" => Kind::StartTimer(pb::StartTimerCommand {
            seq: c.get_item(1)?.extract()?,
            duration_ms: c.get_item(2)?.extract()?,
        }),
        "complete" => Kind::CompleteWorkflow(pb::CompleteWorkflowCommand {
            result: convert::payload(
                c.get_item(1)?.extract()?,
                &c.get_item(2)?.extract::<String>()?,
            ),
        }),
        "fail" => Kind::FailWorkflow(pb::FailWorkflowCommand {
            failure: Some(pb::Failure {
                message: c.get_item(1)?.extract()?,
                error_type: c.get_item(2)?.extract()?,
                non_retryable: c.get_item(3)?.extract()?,
                kind: pb::FailureKind::Application as i32,
                ..Default::default()
            }),
        }),
        "cancel" => Kind::CancelWorkflow(pb::CancelWorkflowCommand { details: None }),
        "session" => {
            let options = c.get_item(3)?;
            Kind::CreateSession(pb::CreateSessionCommand {
                seq: c.get_item(1)?.extract()?,
                session_id: c.get_item(2)?.extract()?,
                options: Some(session_options(options.cast::<PyDict>()?)?.to_proto()),
            })
        }
        "side_effect" => Kind::RecordMarker(pb::RecordMarkerCommand {
            seq: c.get_item(1)?.extract()?,
            marker_name: "side_effect".into(),
            data: convert::payload(
                c.get_item(2)?.extract()?,
                &c.get_item(3)?.extract::<String>()?,
            ),
        }),
        "complete_session" => Kind::CompleteSession(pb::CompleteSessionCommand {
            seq: c.get_item(1)?.extract()?,
            session_id: c.get_item(2)?.extract()?,
        }),
        other => {
            return Err(convert::invalid(format!(
                "unknown workflow command {other:?}"
            )))
        }
    };
    Ok(pb::Command { kind: Some(kind) })
}
