//! The running worker's shared state, and its main loop: register, start the pollers and the reporter, shut down gracefully.

use super::cache::Cache;
use super::options::WorkerOptions;
use crate::activity::{ActivityContext, ActivityError, CancelReason};
use crate::codec;
use crate::workflow::WorkflowCodeFactory;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

pub(super) type ActivityFn = Arc<
    dyn Fn(
            ActivityContext,
            Option<pb::Payload>,
        ) -> BoxFuture<'static, Result<Option<pb::Payload>, ActivityError>>
        + Send
        + Sync,
>;

pub(super) struct RunningActivity {
    pub(super) ctx: ActivityContext,
    pub(super) token: Vec<u8>,
    pub(super) abort: tokio::task::AbortHandle,
}

pub(super) struct Inner {
    pub(super) rpc: crate::client::Rpc,
    /// This process's instance id: the server serves the identity's work to it alone.
    pub(super) instance_id: String,
    /// The instance this process replaces (it held the identity's lock before).
    pub(super) previous_instance_id: String,
    pub(super) namespace: String,
    pub(super) options: WorkerOptions,
    pub(super) workflows: HashMap<String, WorkflowCodeFactory>,
    pub(super) activities: HashMap<String, ActivityFn>,
    pub(super) sticky_queue: String,
    pub(super) workflow_slots: Arc<Semaphore>,
    pub(super) activity_slots: Arc<Semaphore>,
    pub(super) cache: Mutex<Cache>,
    pub(super) running: Mutex<HashMap<u64, RunningActivity>>,
    /// Set once shutdown begins: no more tasks are taken.
    pub(super) stopping: std::sync::atomic::AtomicBool,
    pub(super) local: Arc<crate::activity::WorkerLocal>,
    /// The client's data converter: payloads are decoded on arrival and encoded on departure.
    pub(super) dc: codec::DataConverter,
    /// Finished activities queue their outcomes here; one reporter sends them in batches.
    pub(super) outcomes: mpsc::UnboundedSender<PendingOutcome>,
    pub(super) outcomes_rx: Mutex<Option<mpsc::UnboundedReceiver<PendingOutcome>>>,
}

/// An activity outcome waiting for the reporter, and where its slot waits for the reply.
pub(super) struct PendingOutcome {
    pub(super) outcome: pb::ActivityOutcome,
    pub(super) activity_id: String,
    /// When the server stops waiting for this attempt (epoch ms; 0 = not said).
    pub(super) deadline_ms: i64,
    /// The slot takes another task if the server has one waiting.
    pub(super) wants_next: bool,
    pub(super) reply: oneshot::Sender<Option<pb::PollActivityTaskResponse>>,
}

/// Aborts running activities when the worker's main task ends for any reason (including abort).
pub(super) struct AbortRunning(Arc<Inner>);

impl Drop for AbortRunning {
    fn drop(&mut self) {
        for (_, r) in self.0.running.lock().drain() {
            r.abort.abort();
        }
    }
}

/// Backs off after a failed poll so a down server is not hammered.
pub(super) async fn poll_backoff(failures: &mut u32) {
    *failures += 1;
    let ms = (100u64 << (*failures).min(6)).min(5_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Inner {
    pub(super) async fn run(
        self: Arc<Self>,
        stopper: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let _guard = AbortRunning(self.clone());
        let Some(registration) = self.register_until_done(&mut stop).await else {
            return;
        };
        let mut pollers = JoinSet::new();
        pollers.spawn(
            self.clone()
                .heartbeat_worker(registration.clone(), stopper, stop.clone()),
        );
        if !self.workflows.is_empty() {
            for queue in [
                self.options.task_queue.to_string(),
                self.sticky_queue.clone(),
            ] {
                for _ in 0..2 {
                    pollers.spawn(self.clone().workflow_poller(queue.clone(), stop.clone()));
                }
            }
        }
        // Lives until the end of this function (after the drain below), not with the pollers:
        // activities finishing during the grace period still report through it.
        let mut reporter = JoinSet::new();
        if let Some(rx) = self.outcomes_rx.lock().take() {
            reporter.spawn(
                self.clone()
                    .report_outcomes(rx, registration.host_queue.clone()),
            );
        }
        if !self.activities.is_empty() {
            // Each poll takes from this worker's host queue (work pinned here: sessions,
            // `on_worker`) and from the task queue at once, holding one slot while it waits.
            let n = self.options.max_concurrent_activities.clamp(1, 8);
            for _ in 0..n {
                pollers.spawn(
                    self.clone()
                        .activity_poller(registration.host_queue.clone(), stop.clone()),
                );
            }
        }
        let _ = stop.wait_for(|s| *s).await;
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The server hears of it first: nothing new is placed or dispatched here, the polls
        // parked here are answered empty, and the sessions hosted here end now rather than
        // after the liveness timeout. Then the pollers stop: an activity poll still out is
        // waited for (a task already handed to it runs in the grace period, see
        // `activity_poller`); workflow tasks in progress are short and finish first.
        self.deregister().await;
        while pollers.join_next().await.is_some() {}
        let total = self.options.max_concurrent_activities as u32;
        let drained = tokio::time::timeout(
            self.options.graceful_shutdown,
            self.activity_slots.acquire_many(total),
        )
        .await;
        if drained.is_err() {
            let left: Vec<RunningActivity> = self.running.lock().drain().map(|(_, r)| r).collect();
            tracing::warn!(
                count = left.len(),
                "grace period over: failing running activities so they retry elsewhere"
            );
            for r in left {
                r.ctx.cancel(CancelReason::WorkerShutdown);
                r.abort.abort();
                let failure = pb::Failure {
                    message: format!(
                        "worker {} shut down before the activity finished",
                        self.options.identity
                    ),
                    error_type: "WorkerShutdown".into(),
                    kind: pb::FailureKind::Server as i32,
                    ..Default::default()
                };
                let _ = self
                    .rpc
                    .clone()
                    .fail_activity_task(pb::FailActivityTaskRequest {
                        task_token: r.token,
                        failure: Some(failure),
                        identity: self.options.identity.clone(),
                        next_task: None,
                    })
                    .await;
            }
        }
    }
}
