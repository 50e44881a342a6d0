//! Visits every payload inside the messages the SDK exchanges with the server, so the codec
//! chain can be applied at the SDK's edge.

use super::converter::DataConverter;
use super::payload::{from_payload, to_payload, CodecError};
use tether_wire::pb::{self, command, history_event::Attributes};

fn apply(
    p: &mut Option<pb::Payload>,
    f: &impl Fn(pb::Payload) -> Result<pb::Payload, CodecError>,
) -> Result<(), CodecError> {
    if let Some(payload) = p.take() {
        *p = Some(f(payload)?);
    }
    Ok(())
}

fn failure(
    fl: &mut Option<pb::Failure>,
    f: &impl Fn(pb::Payload) -> Result<pb::Payload, CodecError>,
) -> Result<(), CodecError> {
    let mut current = fl.as_mut();
    while let Some(x) = current {
        apply(&mut x.details, f)?;
        current = x.cause.as_deref_mut();
    }
    Ok(())
}

fn event(
    e: &mut pb::HistoryEvent,
    f: &impl Fn(pb::Payload) -> Result<pb::Payload, CodecError>,
) -> Result<(), CodecError> {
    match e.attributes.as_mut() {
        Some(Attributes::WorkflowExecutionStarted(a)) => apply(&mut a.input, f),
        Some(Attributes::ActivityTaskScheduled(a)) => apply(&mut a.input, f),
        Some(Attributes::ActivityTaskCompleted(a)) => apply(&mut a.result, f),
        Some(Attributes::ActivityTaskFailed(a)) => failure(&mut a.failure, f),
        Some(Attributes::ActivityTaskTimedOut(a)) => failure(&mut a.failure, f),
        Some(Attributes::ActivityTaskCanceled(a)) => apply(&mut a.details, f),
        Some(Attributes::WorkflowSignaled(a)) => apply(&mut a.input, f),
        Some(Attributes::MarkerRecorded(a)) => apply(&mut a.data, f),
        Some(Attributes::SignalExternalInitiated(a)) => apply(&mut a.input, f),
        Some(Attributes::SignalExternalResolved(a)) => failure(&mut a.failure, f),
        Some(Attributes::WorkflowExecutionCompleted(a)) => apply(&mut a.result, f),
        Some(Attributes::WorkflowExecutionFailed(a)) => failure(&mut a.failure, f),
        Some(Attributes::WorkflowExecutionCanceled(a)) => apply(&mut a.details, f),
        _ => Ok(()),
    }
}

/// Message text shown in place of an encoded failure's message.
pub const ENCODED_FAILURE_MESSAGE: &str = "encoded failure";

#[derive(serde::Serialize, serde::Deserialize)]
struct FailureAttributes {
    message: String,
    error_type: String,
}

impl DataConverter {
    /// Moves the message and error type of every failure in the chain into an encoded payload.
    fn seal_failure_attrs(&self, f: &mut Option<pb::Failure>) -> Result<(), CodecError> {
        if !self.encode_failures {
            return Ok(());
        }
        let mut current = f.as_mut();
        while let Some(x) = current {
            if x.encoded_attributes.is_none() {
                let attrs = FailureAttributes {
                    message: std::mem::replace(&mut x.message, ENCODED_FAILURE_MESSAGE.into()),
                    error_type: std::mem::take(&mut x.error_type),
                };
                let json = to_payload(&attrs).map_err(|e| CodecError::Corrupt(e.to_string()))?;
                x.encoded_attributes = Some(self.encode(json)?);
            }
            current = x.cause.as_deref_mut();
        }
        Ok(())
    }

    /// Restores encoded failure messages and error types (whatever this converter's setting,
    /// so failures from an encoding worker read back everywhere that has the keys).
    fn open_failure_attrs(&self, f: &mut Option<pb::Failure>) -> Result<(), CodecError> {
        let mut current = f.as_mut();
        while let Some(x) = current {
            if let Some(sealed) = x.encoded_attributes.take() {
                let plain = self.decode(sealed)?;
                let attrs: FailureAttributes = from_payload(Some(&plain))
                    .map_err(|e| CodecError::Corrupt(format!("encoded failure attributes: {e}")))?;
                x.message = attrs.message;
                x.error_type = attrs.error_type;
            }
            current = x.cause.as_deref_mut();
        }
        Ok(())
    }

    /// Decodes every payload in history events (received with a workflow task).
    pub fn decode_events(&self, events: &mut [pb::HistoryEvent]) -> Result<(), CodecError> {
        if self.is_plain() {
            return Ok(());
        }
        let f = |p| self.decode(p);
        for e in events.iter_mut() {
            event(e, &f)?;
            match e.attributes.as_mut() {
                Some(Attributes::ActivityTaskFailed(a)) => {
                    self.open_failure_attrs(&mut a.failure)?
                }
                Some(Attributes::ActivityTaskTimedOut(a)) => {
                    self.open_failure_attrs(&mut a.failure)?
                }
                Some(Attributes::SignalExternalResolved(a)) => {
                    self.open_failure_attrs(&mut a.failure)?
                }
                Some(Attributes::WorkflowExecutionFailed(a)) => {
                    self.open_failure_attrs(&mut a.failure)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Encodes every payload in workflow commands (sent with a workflow task completion).
    pub fn encode_commands(&self, commands: &mut [pb::Command]) -> Result<(), CodecError> {
        if self.is_plain() {
            return Ok(());
        }
        let f = |p| self.encode(p);
        for c in commands {
            match c.kind.as_mut() {
                Some(command::Kind::ScheduleActivity(a)) => apply(&mut a.input, &f)?,
                Some(command::Kind::RecordMarker(m)) => apply(&mut m.data, &f)?,
                Some(command::Kind::SignalExternal(s)) => apply(&mut s.input, &f)?,
                Some(command::Kind::CompleteWorkflow(w)) => apply(&mut w.result, &f)?,
                Some(command::Kind::FailWorkflow(w)) => {
                    failure(&mut w.failure, &f)?;
                    self.seal_failure_attrs(&mut w.failure)?;
                }
                Some(command::Kind::CancelWorkflow(w)) => apply(&mut w.details, &f)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Decodes the payloads of an activity task.
    pub fn decode_activity_task(
        &self,
        task: &mut pb::PollActivityTaskResponse,
    ) -> Result<(), CodecError> {
        if self.is_plain() {
            return Ok(());
        }
        let f = |p| self.decode(p);
        apply(&mut task.input, &f)?;
        apply(&mut task.heartbeat_details, &f)
    }

    /// Encodes an optional payload.
    pub fn encode_opt(&self, p: Option<pb::Payload>) -> Result<Option<pb::Payload>, CodecError> {
        p.map(|p| self.encode(p)).transpose()
    }

    /// Decodes an optional payload.
    pub fn decode_opt(&self, p: Option<pb::Payload>) -> Result<Option<pb::Payload>, CodecError> {
        p.map(|p| self.decode(p)).transpose()
    }

    /// Encodes the payloads of a failure (and its causes).
    pub fn encode_failure(
        &self,
        mut f: Option<pb::Failure>,
    ) -> Result<Option<pb::Failure>, CodecError> {
        if !self.is_plain() {
            failure(&mut f, &|p| self.encode(p))?;
            self.seal_failure_attrs(&mut f)?;
        }
        Ok(f)
    }

    /// Decodes the payloads of a failure (and its causes).
    pub fn decode_failure(
        &self,
        mut f: Option<pb::Failure>,
    ) -> Result<Option<pb::Failure>, CodecError> {
        if !self.is_plain() {
            failure(&mut f, &|p| self.decode(p))?;
            self.open_failure_attrs(&mut f)?;
        }
        Ok(f)
    }
}

fn push_failure<'a>(out: &mut Vec<&'a mut pb::Payload>, mut f: Option<&'a mut pb::Failure>) {
    while let Some(x) = f {
        if let Some(p) = x.details.as_mut() {
            out.push(p);
        }
        f = x.cause.as_deref_mut();
    }
}

/// Every payload inside history events, for tools that decode them for display (e.g. through a
/// codec server, in one call).
pub fn event_payloads_mut(events: &mut [pb::HistoryEvent]) -> Vec<&mut pb::Payload> {
    let mut out: Vec<&mut pb::Payload> = Vec::new();
    for e in events {
        match e.attributes.as_mut() {
            Some(Attributes::WorkflowExecutionStarted(a)) => out.extend(a.input.as_mut()),
            Some(Attributes::ActivityTaskScheduled(a)) => out.extend(a.input.as_mut()),
            Some(Attributes::ActivityTaskCompleted(a)) => out.extend(a.result.as_mut()),
            Some(Attributes::ActivityTaskFailed(a)) => push_failure(&mut out, a.failure.as_mut()),
            Some(Attributes::ActivityTaskTimedOut(a)) => push_failure(&mut out, a.failure.as_mut()),
            Some(Attributes::ActivityTaskCanceled(a)) => out.extend(a.details.as_mut()),
            Some(Attributes::WorkflowSignaled(a)) => out.extend(a.input.as_mut()),
            Some(Attributes::MarkerRecorded(a)) => out.extend(a.data.as_mut()),
            Some(Attributes::SignalExternalInitiated(a)) => out.extend(a.input.as_mut()),
            Some(Attributes::SignalExternalResolved(a)) => {
                push_failure(&mut out, a.failure.as_mut())
            }
            Some(Attributes::WorkflowExecutionCompleted(a)) => out.extend(a.result.as_mut()),
            Some(Attributes::WorkflowExecutionFailed(a)) => {
                push_failure(&mut out, a.failure.as_mut())
            }
            Some(Attributes::WorkflowExecutionCanceled(a)) => out.extend(a.details.as_mut()),
            _ => {}
        }
    }
    out
}
