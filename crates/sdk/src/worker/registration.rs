//! Registration with the server, the worker's heartbeat, and deregistration at shutdown.

use super::inner::{poll_backoff, Inner};
use crate::activity::CancelReason;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb::{self};
use tokio::sync::watch;

impl Inner {
    pub(super) async fn capabilities(&self) -> pb::Capabilities {
        let source = self.local.caps.clone();
        tokio::task::spawn_blocking(move || source.snapshot())
            .await
            .unwrap_or_default()
    }

    pub(super) fn registration(&self, caps: pb::Capabilities) -> pb::RegisterWorkerRequest {
        pb::RegisterWorkerRequest {
            namespace: self.namespace.clone(),
            identity: self.options.identity.clone(),
            task_queues: vec![self.options.task_queue.clone().into()],
            capabilities: Some(caps),
            max_concurrent_sessions: self.options.max_concurrent_sessions,
            instance_id: self.instance_id.clone(),
            previous_instance_id: self.previous_instance_id.clone(),
            pid: std::process::id(),
        }
    }

    /// Tells the server this worker stopped. Its sessions end (with their activities, which
    /// this worker then stops too: their outcomes would be refused); other running activities
    /// keep their grace period.
    pub(super) async fn deregister(&self) {
        let reply = self
            .rpc
            .clone()
            .deregister_worker(pb::DeregisterWorkerRequest {
                namespace: self.namespace.clone(),
                identity: self.options.identity.clone(),
                instance_id: self.instance_id.clone(),
                reason: String::new(),
            })
            .await;
        match reply {
            Ok(r) => {
                let ended = r.into_inner().sessions_ended;
                if !ended.is_empty() {
                    tracing::info!(sessions = ?ended, "sessions ended with this worker's shutdown");
                    for r in self.running.lock().values() {
                        let in_ended = r
                            .ctx
                            .info()
                            .session
                            .as_ref()
                            .is_some_and(|s| ended.contains(&s.session_id));
                        if in_ended {
                            r.ctx.cancel(CancelReason::WorkerShutdown);
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), code = ?status.code(), "could not tell the server this worker stopped; it will be marked dead after the liveness timeout")
            }
        }
    }

    /// Registers with the server, retrying while it is unreachable. None if stopped first.
    pub(super) async fn register_until_done(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<pb::RegisterWorkerResponse> {
        let mut failures = 0;
        loop {
            let request = self.registration(self.capabilities().await);
            let mut rpc = self.rpc.clone();
            let reply = tokio::select! {
                r = rpc.register_worker(request) => r,
                _ = stop.wait_for(|s| *s) => return None,
            };
            match reply {
                Ok(r) => return Some(r.into_inner()),
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    // Another live process holds this identity. Keep trying: when it stops (or
                    // the server declares it dead) the identity is free.
                    tracing::error!(error = %status.message(), "worker registration refused; retrying until the identity is free");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "worker registration failed; retrying");
                    tokio::select! {
                        _ = poll_backoff(&mut failures) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
            }
        }
    }

    /// Heartbeats with refreshed capabilities; at once when an activity changed a label.
    pub(super) async fn heartbeat_worker(
        self: Arc<Self>,
        registration: pb::RegisterWorkerResponse,
        stopper: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let interval = Duration::from_millis(registration.heartbeat_interval_ms.max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.local.caps_changed.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let caps = self.capabilities().await;
            let reply = self
                .rpc
                .clone()
                .worker_heartbeat(pb::WorkerHeartbeatRequest {
                    namespace: self.namespace.clone(),
                    identity: self.options.identity.clone(),
                    capabilities: Some(caps.clone()),
                    instance_id: self.instance_id.clone(),
                })
                .await;
            match reply {
                Ok(r) if r.get_ref().reregister => {
                    // The server restarted and forgot us (or marked us dead).
                    let _ = self
                        .rpc
                        .clone()
                        .register_worker(self.registration(caps))
                        .await;
                }
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    // Another process took the identity over: this one must not go on.
                    tracing::error!(error = %status.message(), "this worker lost its identity to another process; stopping");
                    let _ = stopper.send(true);
                    return;
                }
                Err(status) => {
                    tracing::debug!(error = %status.message(), "worker heartbeat failed")
                }
            }
        }
    }
}
