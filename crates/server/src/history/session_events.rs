//! Sessions as a run sees them: placement results and ends recorded as events, and the activities of a session that is gone failed.

use super::*;

impl RunEntry {
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
        session_id: &SessionId,
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

    /// Fails every pending activity of a session that failed: not retried anywhere else.
    /// Returns whether anything changed.
    pub fn fail_session_activities(
        &mut self,
        session_id: &SessionId,
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
        session_id: &SessionId,
        reason: &str,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        self.fail_activities_in_session(session_id, reason, true, now, fx)
    }

    pub(super) fn fail_activities_in_session(
        &mut self,
        session_id: &SessionId,
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
                    .is_some_and(|o| o.session_id == *session_id)
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
}
