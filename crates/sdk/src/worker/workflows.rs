//! The workflow poller: takes workflow tasks (sticky queue first), activates cached or replayed runs, answers with their commands.

use super::inner::{poll_backoff, Inner};
use crate::workflow::{panic_failure, WorkflowInfo, WorkflowInstance};
use std::sync::Arc;
use tether_wire::pb::{self};
use tokio::sync::watch;

impl Inner {
    pub(super) async fn workflow_poller(
        self: Arc<Self>,
        queue: String,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut failures = 0;
        loop {
            let request = pb::PollWorkflowTaskRequest {
                namespace: self.namespace.clone(),
                task_queue: queue.clone(),
                identity: self.options.identity.clone(),
                sticky_queue: self.sticky_queue.clone(),
                poll_timeout_ms: tether_core::types::duration_ms(self.options.poll_timeout),
                instance_id: self.instance_id.clone(),
            };
            let mut rpc = self.rpc.clone();
            let polled = tokio::select! {
                r = rpc.poll_workflow_task(request) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match polled {
                Ok(resp) => {
                    failures = 0;
                    let task = resp.into_inner();
                    if !task.task_token.is_empty() {
                        // The slot is taken after the poll, not before: a poll parked on the
                        // sticky queue must not hold a slot the normal queue's poller needs.
                        let _permit = self
                            .workflow_slots
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("never closed");
                        // Then the tasks handed back with each completion, under the same slot.
                        let mut next = Some(task);
                        while let Some(task) = next.take() {
                            next = self.handle_workflow_task(task).await;
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(queue, error = %status.message(), code = ?status.code(), "workflow poll failed; retrying");
                    poll_backoff(&mut failures).await;
                }
            }
        }
    }

    pub(super) async fn fetch_history(
        &self,
        task: &pb::PollWorkflowTaskResponse,
    ) -> Result<Vec<pb::HistoryEvent>, tonic::Status> {
        Ok(self
            .rpc
            .clone()
            .get_workflow_history(pb::GetWorkflowHistoryRequest {
                namespace: task.namespace.clone(),
                workflow_id: task.workflow_id.clone(),
                run_id: task.run_id.clone(),
            })
            .await?
            .into_inner()
            .events)
    }

    /// Runs one workflow task; returns the next one if the server handed one back with the
    /// completion.
    pub(super) async fn handle_workflow_task(
        &self,
        mut task: pb::PollWorkflowTaskResponse,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        let cached = self.cache.lock().take(&task.run_id);
        let mut instance = match cached {
            Some(inst)
                if !task.full_history
                    && task.events.first().map(|e| e.event_id) == Some(inst.last_event_id + 1) =>
            {
                Some(inst)
            }
            _ => None,
        };
        if instance.is_none() && !task.full_history {
            // Our cache lost the run (evicted, or this is another process with our sticky
            // queue): replay from the full history.
            match self.fetch_history(&task).await {
                Ok(events) => task.events = events,
                Err(status) => {
                    tracing::warn!(run_id = task.run_id, error = %status.message(), "could not fetch history");
                    self.fail_workflow_task(
                        &task,
                        "cache_miss",
                        format!("could not fetch history: {}", status.message()),
                    )
                    .await;
                    return None;
                }
            }
        }
        let mut instance = match instance.take() {
            Some(i) => i,
            None => {
                let Some(factory) = self.workflows.get(&task.workflow_type) else {
                    let mut known: Vec<&str> = self.workflows.keys().map(|s| s.as_str()).collect();
                    known.sort();
                    let message = format!(
                        "worker {} has no workflow registered as {:?} (registered: {})",
                        self.options.identity,
                        task.workflow_type,
                        known.join(", ")
                    );
                    self.fail_workflow_task(&task, "unknown_workflow_type", message)
                        .await;
                    return None;
                };
                let info = WorkflowInfo {
                    namespace: task.namespace.clone().into(),
                    workflow_id: task.workflow_id.clone().into(),
                    run_id: task.run_id.clone().into(),
                    workflow_type: task.workflow_type.clone(),
                    task_queue: self.options.task_queue.clone(),
                };
                // Code registered from another language may panic as it is made: that fails
                // the task, as a panic while it runs does.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory(info))) {
                    Ok(code) => WorkflowInstance::new(code),
                    Err(panic) => {
                        let failure = panic_failure(panic);
                        self.fail_workflow_task(&task, failure.cause, failure.message)
                            .await;
                        return None;
                    }
                }
            }
        };
        if let Err(e) = self.dc.decode_events(&mut task.events) {
            self.fail_workflow_task(&task, "codec", e.to_string()).await;
            return None;
        }
        match instance.process(&task.events) {
            Ok(mut commands) => {
                if let Err(e) = self.dc.encode_commands(&mut commands) {
                    self.fail_workflow_task(&task, "codec", e.to_string()).await;
                    return None;
                }
                let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
                let request = pb::CompleteWorkflowTaskRequest {
                    task_token: task.task_token.clone(),
                    commands,
                    identity: self.options.identity.clone(),
                    sticky_queue: self.sticky_queue.clone(),
                    // The sticky queue first: its runs are cached here.
                    next_task: (!stopping).then(|| pb::NextWorkflowTaskRequest {
                        namespace: self.namespace.clone(),
                        task_queues: vec![
                            self.sticky_queue.clone(),
                            self.options.task_queue.clone().into(),
                        ],
                    }),
                };
                match self.rpc.clone().complete_workflow_task(request).await {
                    Ok(reply) => {
                        if !instance.finished() {
                            self.cache.lock().put(task.run_id.clone(), instance);
                        }
                        return reply
                            .into_inner()
                            .next_task
                            .filter(|t| !t.task_token.is_empty());
                    }
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        // New events arrived while this task closed the run; the server kept
                        // nothing of it and sends a new task, which this worker replays from the
                        // full history (the instance is not cached back: it ran ahead).
                        tracing::debug!(run_id = task.run_id, reason = %status.message(), "workflow task superseded by new events");
                    }
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        self.fail_workflow_task(&task, "bad_command", status.message().to_string())
                            .await;
                    }
                    Err(status) => {
                        tracing::warn!(run_id = task.run_id, error = %status.message(), "workflow task completion refused");
                    }
                }
            }
            Err(failure) => {
                tracing::warn!(
                    run_id = task.run_id,
                    cause = failure.cause,
                    message = failure.message,
                    "workflow task failed"
                );
                self.fail_workflow_task(&task, failure.cause, failure.message)
                    .await;
            }
        }
        None
    }

    pub(super) async fn fail_workflow_task(
        &self,
        task: &pb::PollWorkflowTaskResponse,
        cause: &str,
        message: String,
    ) {
        let _ = self
            .rpc
            .clone()
            .fail_workflow_task(pb::FailWorkflowTaskRequest {
                task_token: task.task_token.clone(),
                cause: cause.into(),
                failure: Some(pb::Failure {
                    message,
                    kind: pb::FailureKind::Server as i32,
                    ..Default::default()
                }),
                identity: self.options.identity.clone(),
            })
            .await;
    }
}
