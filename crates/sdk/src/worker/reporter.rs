//! The reporter: sends finished attempts' outcomes in batches, retried while the server cannot be reached, and hands the next tasks back to the slots.

use super::inner::{Inner, PendingOutcome};
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb::{self};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Most outcomes the reporter sends in one call.
pub(super) const MAX_OUTCOMES_PER_REPORT: usize = 256;

/// Most report calls in flight at once.
pub(super) const MAX_REPORTS_IN_FLIGHT: usize = 2;

/// How long a report is retried while the server cannot be reached, unless an attempt's own
/// deadline comes first (after it the server has given up on the attempt anyway).
pub(super) const REPORT_RETRY_LIMIT: Duration = Duration::from_secs(60);

/// Errors that say the server could not be reached (or dropped the connection), not that it
/// refused the request: worth trying again.
pub(super) fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

impl Inner {
    /// Sends queued outcomes in batches. A few calls may be in flight at once (so slots keep
    /// cycling while the server commits); beyond that, outcomes gather and go together, so a
    /// busy worker makes one call for many activities and refills each reporting slot from the
    /// reply.
    pub(super) async fn report_outcomes(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<PendingOutcome>,
        host_queue: String,
    ) {
        let in_flight = Arc::new(Semaphore::new(MAX_REPORTS_IN_FLIGHT));
        // Owned here so that aborting the reporter (a killed worker) also stops its calls.
        let mut calls = JoinSet::new();
        loop {
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            while calls.try_join_next().is_some() {}
            let mut batch = Vec::new();
            if rx.recv_many(&mut batch, MAX_OUTCOMES_PER_REPORT).await == 0 {
                break;
            }
            let inner = self.clone();
            let host_queue = host_queue.clone();
            calls.spawn(async move {
                inner.send_report(batch, &host_queue).await;
                drop(permit);
            });
        }
    }

    /// One RespondActivityTasks call: the outcomes, and as many next tasks as slots asked for.
    /// While the server cannot be reached the call is retried with backoff, so a network blip
    /// does not cost a finished activity its result (and a re-run after its timeout).
    pub(super) async fn send_report(&self, batch: Vec<PendingOutcome>, host_queue: &str) {
        let wanted = batch.iter().filter(|p| p.wants_next).count();
        let next_task = if wanted > 0 {
            self.next_task_request(host_queue)
        } else {
            None
        };
        let give_up_ms = batch
            .iter()
            .map(|p| p.deadline_ms)
            .filter(|d| *d > 0)
            .min()
            .unwrap_or(i64::MAX)
            .min(tether_wire::now_ms() + REPORT_RETRY_LIMIT.as_millis() as i64);
        let mut waiting = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for p in batch {
            outcomes.push(p.outcome);
            waiting.push((p.activity_id, p.wants_next, p.reply));
        }
        let request = pb::RespondActivityTasksRequest {
            identity: self.options.identity.clone(),
            outcomes,
            max_next_tasks: if next_task.is_some() {
                wanted as u32
            } else {
                0
            },
            next_task,
        };
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0;
        let reply = loop {
            tries += 1;
            match self
                .rpc
                .clone()
                .respond_activity_tasks(request.clone())
                .await
            {
                Err(status)
                    if is_transient(&status)
                        && tether_wire::now_ms() + (backoff.as_millis() as i64) < give_up_ms =>
                {
                    if tries == 1 {
                        tracing::warn!(error = %status.message(), code = ?status.code(), outcomes = waiting.len(), "could not report activity outcomes; retrying until the server is back");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => break other,
            }
        };
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                let mut next_tasks = reply
                    .next_tasks
                    .into_iter()
                    .filter(|t| !t.task_token.is_empty());
                for (i, (activity_id, wants_next, slot)) in waiting.into_iter().enumerate() {
                    if let Some(ack) = reply.acks.get(i).filter(|a| !a.error.is_empty()) {
                        if tries > 1 {
                            // An earlier try may have landed before its reply was lost.
                            tracing::info!(activity_id, error = %ack.error, "activity outcome refused on a retry (an earlier try may have recorded it)");
                        } else {
                            tracing::warn!(activity_id, error = %ack.error, "activity outcome refused");
                        }
                    }
                    let next = if wants_next { next_tasks.next() } else { None };
                    let _ = slot.send(next);
                }
                // The server never sends more than asked; were it to, the attempt would time out
                // and retry rather than vanish, so say so.
                for extra in next_tasks {
                    tracing::warn!(
                        activity_id = extra.activity_id,
                        "server sent more tasks than asked for; the attempt will time out and retry"
                    );
                }
            }
            Err(status) => {
                for (activity_id, _, slot) in waiting {
                    tracing::warn!(activity_id, error = %status.message(), code = ?status.code(), tries, "activity outcome not delivered; the attempt will time out and retry");
                    let _ = slot.send(None);
                }
            }
        }
    }
}
