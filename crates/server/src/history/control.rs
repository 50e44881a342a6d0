//! What is done to a run from outside: signals, cancellation, termination, its timers and run timeout.

use super::*;

impl RunEntry {
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

    /// Whether the signal sent by command `seq` is resolved in the history already.
    pub fn signal_external_is_resolved(&self, seq: u32) -> bool {
        self.history.iter().any(|e| {
            matches!(&e.attributes, Some(Attributes::SignalExternalResolved(r)) if r.seq == seq)
        })
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
    pub(super) fn request_activity_cancel(&mut self, seq: u32) -> Option<Attributes> {
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
}
