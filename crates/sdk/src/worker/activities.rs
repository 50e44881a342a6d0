//! The activity executor: polls (and takes next tasks handed back with reports), runs each attempt in a slot with its heartbeats, cancellation and timeout.

use super::inner::{poll_backoff, Inner, PendingOutcome, RunningActivity};
use crate::activity::{ActivityContext, ActivityError, ActivityInfo, CancelReason};
use crate::codec;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb;
use tokio::sync::{oneshot, watch};

/// Sends the attempt's heartbeats, throttled, until `stop` is told (or dropped). It stops only
/// between calls, so the details it took are sent: a failed attempt then sends what is left
/// (see `flush_heartbeat`) after, never beside, a call of this loop.
pub(super) async fn heartbeat_loop(
    mut rpc: crate::client::Rpc,
    dc: codec::DataConverter,
    ctx: ActivityContext,
    token: Vec<u8>,
    identity: String,
    heartbeat_timeout_ms: u64,
    mut stop: oneshot::Receiver<()>,
) {
    // Send at most every 80% of the heartbeat timeout (30 s when there is none).
    let throttle = if heartbeat_timeout_ms > 0 {
        Duration::from_millis(heartbeat_timeout_ms * 4 / 5)
    } else {
        Duration::from_secs(30)
    };
    loop {
        tokio::select! {
            _ = ctx.shared.heartbeat_wanted.notified() => {}
            _ = &mut stop => return,
        }
        let details = ctx.shared.pending_details.lock().take();
        let details = match dc.encode_opt(details) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat details could not be encoded");
                None
            }
        };
        let reply = rpc
            .heartbeat_activity(pb::HeartbeatActivityRequest {
                task_token: token.clone(),
                details,
                identity: identity.clone(),
            })
            .await;
        match reply {
            Ok(r) if r.get_ref().cancel_requested => ctx.cancel(CancelReason::Requested),
            Ok(_) => {}
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                ctx.cancel(CancelReason::NotCurrent)
            }
            Err(status) => tracing::debug!(error = %status.message(), "heartbeat failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(throttle) => {}
            _ = &mut stop => return,
        }
    }
}

/// How long the end of an attempt waits for a heartbeat call already on its way.
const HEARTBEAT_FINISH: Duration = Duration::from_secs(2);

/// Sends the details of the attempt's last heartbeat if the heartbeat loop has not (one call,
/// its failure only logged: the attempt's outcome goes out whatever happens to it).
async fn flush_heartbeat(
    rpc: &mut crate::client::Rpc,
    dc: &codec::DataConverter,
    ctx: &ActivityContext,
    token: &[u8],
    identity: &str,
) {
    let Some(details) = ctx.shared.pending_details.lock().take() else {
        return;
    };
    let details = match dc.encode(details) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat details could not be encoded");
            return;
        }
    };
    let sent = rpc
        .heartbeat_activity(pb::HeartbeatActivityRequest {
            task_token: token.to_vec(),
            details: Some(details),
            identity: identity.to_string(),
        })
        .await;
    if let Err(status) = sent {
        tracing::debug!(error = %status.message(), "the last heartbeat of a failed attempt was not recorded");
    }
}

impl Inner {
    /// Polls the task queue and this worker's host queue for activity tasks. A slot is taken
    /// before polling, so the worker never holds a task it cannot start.
    pub(super) async fn activity_poller(
        self: Arc<Self>,
        host_queue: String,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut failures = 0;
        loop {
            let permit = tokio::select! {
                // A stopping worker polls no more, even with a slot free.
                biased;
                _ = stop.wait_for(|s| *s) => return,
                p = self.activity_slots.clone().acquire_owned() => p.expect("never closed"),
            };
            let request = pb::PollActivityTaskRequest {
                namespace: self.namespace.clone(),
                task_queue: self.options.task_queue.clone().into(),
                identity: self.options.identity.clone(),
                poll_timeout_ms: tether_core::types::duration_ms(self.options.poll_timeout),
                additional_task_queues: vec![host_queue.clone()],
                instance_id: self.instance_id.clone(),
            };
            let mut rpc = self.rpc.clone();
            let poll = rpc.poll_activity_task(request);
            tokio::pin!(poll);
            let polled = tokio::select! {
                r = &mut poll => r,
                // (The watch's guard is dropped before the branch awaits.)
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    // Shutdown began while this poll was out. It is not dropped: the server
                    // may have handed it a task already (the answer on its way), which would
                    // then stay started here, run by nobody, until its timeout. The
                    // deregistration that shutdown sends has the server answer this process's
                    // parked polls at once; a server that does not is waited for no longer
                    // than the grace period.
                    match tokio::time::timeout(self.options.graceful_shutdown, &mut poll).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            };
            match polled {
                Ok(resp) => {
                    failures = 0;
                    let task = resp.into_inner();
                    if task.task_token.is_empty() {
                        continue;
                    }
                    self.clone()
                        .spawn_activity(task, permit, host_queue.clone());
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "activity poll failed; retrying");
                    poll_backoff(&mut failures).await;
                }
            }
        }
    }

    pub(super) fn context_for(&self, task: &pb::PollActivityTaskResponse) -> ActivityContext {
        let info = ActivityInfo {
            namespace: task.namespace.clone().into(),
            activity_id: task.activity_id.clone().into(),
            activity_type: task.activity_type.clone(),
            attempt: task.attempt,
            workflow_id: task.workflow_id.clone().into(),
            run_id: task.run_id.clone().into(),
            task_queue: self.options.task_queue.clone(),
            heartbeat_timeout: (task.heartbeat_timeout_ms > 0)
                .then(|| Duration::from_millis(task.heartbeat_timeout_ms)),
            deadline_ms: task.deadline_ms,
            worker_identity: self.options.identity.clone().into(),
            session: task.session.clone(),
        };
        ActivityContext::new(
            info,
            task.heartbeat_details.clone(),
            Some(self.local.clone()),
        )
    }

    /// Runs a task, then keeps running the next ones the server hands back with each completion
    /// (while not shutting down), all under the one slot.
    pub(super) fn spawn_activity(
        self: Arc<Self>,
        task: pb::PollActivityTaskResponse,
        permit: tokio::sync::OwnedSemaphorePermit,
        queue: String,
    ) {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut task = task;
        let undecodable = self.dc.decode_activity_task(&mut task).err();
        let ctx = self.context_for(&task);
        let token = task.task_token.clone();
        let inner = self.clone();
        let ctx2 = ctx.clone();
        // Hold the registry lock across the spawn so the task cannot finish (and try to remove
        // itself) before it is registered.
        let mut running = self.running.lock();
        let handle = tokio::spawn(async move {
            let mut next = match undecodable {
                Some(e) => {
                    inner.fail_undecodable(task, e).await;
                    None
                }
                None => inner.execute_activity(task, ctx2, &queue).await,
            };
            while let Some(mut task) = next.take() {
                if let Err(e) = inner.dc.decode_activity_task(&mut task) {
                    inner.fail_undecodable(task, e).await;
                    break;
                }
                let ctx = inner.context_for(&task);
                if let Some(r) = inner.running.lock().get_mut(&id) {
                    r.ctx = ctx.clone();
                    r.token = task.task_token.clone();
                }
                next = inner.execute_activity(task, ctx, &queue).await;
            }
            inner.running.lock().remove(&id);
            drop(permit);
        });
        running.insert(
            id,
            RunningActivity {
                ctx,
                token,
                abort: handle.abort_handle(),
            },
        );
    }

    pub(super) fn next_task_request(&self, host_queue: &str) -> Option<pb::NextTaskRequest> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        Some(pb::NextTaskRequest {
            namespace: self.namespace.clone(),
            task_queue: self.options.task_queue.clone().into(),
            additional_task_queues: vec![host_queue.to_string()],
            instance_id: self.instance_id.clone(),
        })
    }

    /// A task whose payloads this worker cannot decode (e.g. it lacks the encryption key): fail
    /// the attempt so it is retried, perhaps by a worker that has the key.
    pub(super) async fn fail_undecodable(
        &self,
        task: pb::PollActivityTaskResponse,
        e: codec::CodecError,
    ) {
        tracing::warn!(activity_id = task.activity_id, error = %e, "activity payload could not be decoded");
        let failure = pb::Failure {
            message: format!(
                "worker {} could not decode the activity's input: {e}",
                self.options.identity
            ),
            error_type: "CodecError".into(),
            kind: pb::FailureKind::Application as i32,
            ..Default::default()
        };
        let _ = self
            .rpc
            .clone()
            .fail_activity_task(pb::FailActivityTaskRequest {
                task_token: task.task_token,
                failure: Some(failure),
                identity: self.options.identity.clone(),
                next_task: None,
            })
            .await;
    }

    /// Runs one activity task and reports its outcome; returns the next task if the server
    /// handed one back.
    pub(super) async fn execute_activity(
        &self,
        task: pb::PollActivityTaskResponse,
        ctx: ActivityContext,
        queue: &str,
    ) -> Option<pb::PollActivityTaskResponse> {
        let identity = self.options.identity.clone();
        let mut rpc = self.rpc.clone();
        let Some(f) = self.activities.get(&task.activity_type) else {
            let mut known: Vec<&str> = self.activities.keys().map(|s| s.as_str()).collect();
            known.sort();
            let failure = pb::Failure {
                message: format!(
                    "worker {identity} has no activity registered as {:?} (registered: {})",
                    task.activity_type,
                    known.join(", ")
                ),
                error_type: "ActivityTypeNotRegistered".into(),
                kind: pb::FailureKind::Application as i32,
                ..Default::default()
            };
            let _ = rpc
                .fail_activity_task(pb::FailActivityTaskRequest {
                    task_token: task.task_token,
                    failure: Some(failure),
                    identity,
                    next_task: None,
                })
                .await;
            return None;
        };
        let (stop_heartbeats, heartbeats_stop) = oneshot::channel();
        let heartbeater = tokio::spawn(heartbeat_loop(
            rpc.clone(),
            self.dc.clone(),
            ctx.clone(),
            task.task_token.clone(),
            identity.clone(),
            task.heartbeat_timeout_ms,
            heartbeats_stop,
        ));
        let outcome = AssertUnwindSafe(f(ctx.clone(), task.input.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "activity panicked".into());
                Err(
                    ActivityError::retryable(format!("activity panicked: {message}"))
                        .with_type("Panic"),
                )
            });
        // A heartbeat on its way is let finish (for a while: a server that does not answer
        // does not hold the outcome back for long).
        // (An attempt that never heartbeated has none: its loop is stopped at once.)
        if ctx
            .shared
            .heartbeated
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let _ = stop_heartbeats.send(());
            let heartbeater_abort = heartbeater.abort_handle();
            if tokio::time::timeout(HEARTBEAT_FINISH, heartbeater)
                .await
                .is_err()
            {
                heartbeater_abort.abort();
            }
        } else {
            heartbeater.abort();
        }
        if outcome.is_err() {
            // Heartbeats are throttled, so the details recorded last may not have been sent:
            // a failed attempt sends them before its failure, for the next attempt to resume
            // from. (A completed one has no next attempt.)
            flush_heartbeat(
                &mut rpc.clone(),
                &self.dc,
                &ctx,
                &task.task_token,
                &identity,
            )
            .await;
        }
        let token = task.task_token;
        // Results and failure details leave the worker encoded; a codec failure fails the attempt.
        let outcome = match outcome {
            Ok(result) => self.dc.encode_opt(result).map_err(|e| {
                ActivityError::retryable(format!("result could not be encoded: {e}"))
                    .with_type("CodecError")
            }),
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Ok(result) => {
                pb::activity_outcome::Outcome::Completed(pb::ActivityCompleted { result })
            }
            Err(ActivityError::Cancelled)
                if ctx.cancel_reason() == Some(CancelReason::Requested) =>
            {
                pb::activity_outcome::Outcome::Canceled(pb::ActivityCanceledAfterRequest {
                    details: None,
                })
            }
            Err(e) => {
                let mut failure = e.to_failure();
                if matches!(e, ActivityError::Cancelled) {
                    // Cancelled without a request (shutdown, stale): let it retry.
                    failure.kind = pb::FailureKind::Server as i32;
                }
                let failure = self
                    .dc
                    .encode_failure(Some(failure.clone()))
                    .ok()
                    .flatten()
                    .unwrap_or(failure);
                pb::activity_outcome::Outcome::Failed(failure)
            }
        };
        let (reply, next) = oneshot::channel();
        let pending = PendingOutcome {
            outcome: pb::ActivityOutcome {
                task_token: token,
                outcome: Some(outcome),
            },
            activity_id: task.activity_id,
            deadline_ms: task.deadline_ms,
            wants_next: self.next_task_request(queue).is_some(),
            reply,
        };
        if self.outcomes.send(pending).is_err() {
            // Only after the worker's main task ended (killed): nobody is left to report to.
            return None;
        }
        next.await.ok().flatten()
    }
}
