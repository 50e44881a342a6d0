//! Workers and queues: registration, heartbeats, deregistration, and what `describe` and `list` show of them.

use super::*;

impl Engine {
    /// Backlog, pollers and per-requirement backlogs of a task queue.
    pub fn describe_queue(
        &self,
        namespace: &Namespace,
        queue: &TaskQueue,
    ) -> Result<pb::DescribeTaskQueueResponse, EngineError> {
        Self::check_namespace(&self.state.lock(), namespace)?;
        let wf = self
            .matcher
            .stats(&QueueKey::new(namespace, queue, TaskKind::Workflow));
        let act = self
            .matcher
            .stats(&QueueKey::new(namespace, queue, TaskKind::Activity));
        let state_of = |identity: &str| -> String {
            match self.matcher.worker(namespace, identity) {
                Some(w) if w.stopped => "stopped",
                Some(w) if w.alive => "alive",
                Some(_) => "dead",
                None => "unregistered",
            }
            .into()
        };
        let mut pollers: Vec<pb::PollerInfo> = wf
            .pollers
            .iter()
            .map(|(id, t)| pb::PollerInfo {
                identity: id.clone(),
                kind: TaskKind::Workflow.name().into(),
                last_poll_ms: *t,
                state: state_of(id),
            })
            .chain(act.pollers.iter().map(|(id, t)| pb::PollerInfo {
                identity: id.clone(),
                kind: TaskKind::Activity.name().into(),
                last_poll_ms: *t,
                state: state_of(id),
            }))
            .collect();
        pollers.sort_by(|a, b| (&a.identity, &a.kind).cmp(&(&b.identity, &b.kind)));
        let mut requirement_backlogs: Vec<pb::RequirementBacklog> = act
            .classes
            .iter()
            .map(|(requirements, tasks)| {
                let explanation = self.matcher.explain(namespace, queue, requirements);
                pb::RequirementBacklog {
                    requirements: requirements.clone(),
                    tasks: *tasks as u64,
                    unplaceable: !explanation.is_empty(),
                    explanation,
                }
            })
            .collect();
        requirement_backlogs.sort_by(|a, b| a.requirements.cmp(&b.requirements));
        Ok(pb::DescribeTaskQueueResponse {
            workflow_backlog: wf.backlog as u64,
            activity_backlog: act.backlog as u64,
            pollers,
            requirement_backlogs,
        })
    }

    pub(super) fn worker_info(&self, w: &crate::matching::WorkerRecord) -> pb::WorkerInfo {
        let mut queues: Vec<String> = w.task_queues.clone();
        queues.sort();
        queues.dedup();
        pb::WorkerInfo {
            identity: w.identity.clone(),
            task_queues: queues,
            last_seen_ms: w.last_seen_ms,
            namespace: w.namespace.clone(),
            state: if w.stopped {
                "stopped"
            } else if w.alive {
                "alive"
            } else {
                "dead"
            }
            .into(),
            host_queue: crate::matching::host_queue_name(&w.identity),
            capabilities: Some((*w.caps).clone()),
            registered_ms: w.registered_ms,
            instance_id: w.instance_id.clone(),
            pid: w.pid,
            stop_reason: w.stop_reason.clone(),
        }
    }

    /// Workers of a namespace by identity, a page at a time: registered ones with their state,
    /// plus pollers that never registered. Returns the page and the next page's token.
    pub fn list_workers(
        &self,
        namespace: &Namespace,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<pb::WorkerInfo>, String), EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), namespace)?;
        let after = page_token;
        let mut by_identity: BTreeMap<String, pb::WorkerInfo> = self
            .matcher
            .workers_in(namespace)
            .iter()
            .filter(|w| after.is_empty() || w.identity.as_str() > after)
            .map(|w| (w.identity.clone(), self.worker_info(w)))
            .collect();
        for (identity, queue, _kind, seen) in self.matcher.pollers_in(namespace) {
            if !after.is_empty() && identity.as_str() <= after {
                continue;
            }
            let w = by_identity
                .entry(identity.clone())
                .or_insert_with(|| pb::WorkerInfo {
                    identity,
                    namespace: namespace.to_string(),
                    state: "unregistered".into(),
                    ..Default::default()
                });
            let internal = queue.starts_with(tether_wire::STICKY_QUEUE_PREFIX)
                || queue.starts_with(crate::matching::HOST_QUEUE_PREFIX);
            if !internal && !w.task_queues.contains(&queue) {
                w.task_queues.push(queue);
            }
            w.last_seen_ms = w.last_seen_ms.max(seen);
        }
        let more = by_identity.len() > page_size;
        let page: Vec<pb::WorkerInfo> = by_identity
            .into_values()
            .take(page_size)
            .map(|mut w| {
                w.task_queues.sort();
                w
            })
            .collect();
        let next = if more {
            page.last().map(|w| w.identity.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// One worker.
    pub fn describe_worker(
        &self,
        namespace: &Namespace,
        identity: &WorkerId,
    ) -> Result<pb::WorkerInfo, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), namespace)?;
        if let Some(w) = self.matcher.worker(namespace, identity) {
            return Ok(self.worker_info(&w));
        }
        // Seen polling, never registered.
        let polled: Vec<(String, String, TaskKind, i64)> = self
            .matcher
            .pollers_in(namespace)
            .into_iter()
            .filter(|(id, ..)| id == identity)
            .collect();
        if polled.is_empty() {
            return Err(EngineError::NotFound(format!(
                "worker {identity:?} is not known in namespace {namespace:?}"
            )));
        }
        let mut queues: Vec<String> = polled
            .iter()
            .map(|(_, q, ..)| q.clone())
            .filter(|q| {
                !q.starts_with(tether_wire::STICKY_QUEUE_PREFIX)
                    && !q.starts_with(crate::matching::HOST_QUEUE_PREFIX)
            })
            .collect();
        queues.sort();
        queues.dedup();
        Ok(pb::WorkerInfo {
            identity: identity.to_string(),
            namespace: namespace.to_string(),
            state: "unregistered".into(),
            task_queues: queues,
            last_seen_ms: polled.iter().map(|(.., t)| *t).max().unwrap_or(0),
            ..Default::default()
        })
    }

    /// Registers a worker process; returns its host queue. An identity belongs to one live
    /// process at a time: another process's registration is refused (ALREADY_EXISTS naming the
    /// holder) while the holder lives, unless it says it replaces the holder.
    pub async fn register_worker(
        &self,
        req: pb::RegisterWorkerRequest,
    ) -> Result<pb::RegisterWorkerResponse, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        let now = self.now_ms();
        let caps = req.capabilities.unwrap_or_default();
        let registered = self
            .matcher
            .register_instance(
                crate::matching::Registration {
                    namespace: req.namespace.clone(),
                    identity: req.identity.clone(),
                    instance_id: req.instance_id.clone(),
                    previous_instance_id: req.previous_instance_id.clone(),
                    pid: req.pid,
                    caps: caps.clone(),
                    task_queues: req.task_queues,
                    max_sessions: req.max_concurrent_sessions,
                },
                now,
                self.config.worker_liveness_timeout,
            )
            .map_err(EngineError::AlreadyExists)?;
        tracing::info!(
            namespace = req.namespace,
            identity = req.identity,
            instance = req.instance_id,
            outcome = ?registered,
            "worker registered"
        );
        self.transact(|st, txn| {
            // A new process under this identity: whatever an earlier process of it was running
            // (handed out durably, so this holds across server restarts too) is gone with that
            // process. Retry it now rather than after its timeouts; but a process that shut
            // down gracefully may still be finishing its attempts, which stay its own.
            let keep: Option<Vec<&str>> = match &registered {
                crate::matching::Registered::Again => None,
                crate::matching::Registered::New => Some(vec![&req.instance_id]),
                crate::matching::Registered::Replaced {
                    previous,
                    previous_draining,
                } => Some(if *previous_draining {
                    vec![&req.instance_id, previous]
                } else {
                    vec![&req.instance_id]
                }),
            };
            if let Some(keep) = keep {
                for (run_id, entry) in st.runs.iter_mut() {
                    if entry.state.namespace == req.namespace
                        && entry.worker_restarted(&req.identity, &keep, now, &mut txn.fx)
                    {
                        txn.touched.insert(run_id.clone());
                    }
                }
            }
            self.fail_sessions_on_vanished_gpus(st, &req.namespace, &req.identity, &caps, now, txn);
            // A new worker may be able to host sessions that are waiting for a placement.
            self.try_place_pending(st, now, txn);
            Ok(())
        })
        .await?;
        let liveness = self.config.worker_liveness_timeout;
        Ok(pb::RegisterWorkerResponse {
            host_queue: crate::matching::host_queue_name(&req.identity),
            heartbeat_interval_ms: (liveness.as_millis() as u64 / 3).max(100),
            liveness_timeout_ms: liveness.as_millis() as u64,
        })
    }

    /// Records a worker heartbeat; false when the worker must register again. New capabilities
    /// that lost GPUs end the sessions reserved on them.
    pub async fn worker_heartbeat(
        &self,
        req: pb::WorkerHeartbeatRequest,
    ) -> Result<bool, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        match self.matcher.instance_of(&req.namespace, &req.identity) {
            None => return Ok(false),
            Some(holder) if holder != req.instance_id => {
                return Err(EngineError::AlreadyExists(format!(
                    "worker identity {:?} is held by another process (instance {holder}) now; \
                     this process (instance {}) must stop or take another identity",
                    req.identity, req.instance_id
                )))
            }
            Some(_) => {}
        }
        let gpus_before = self
            .matcher
            .worker(&req.namespace, &req.identity)
            .map(|w| w.caps.gpus.clone());
        let caps = req.capabilities.clone();
        let known = self.matcher.heartbeat(
            &req.namespace,
            &req.identity,
            req.capabilities,
            self.now_ms(),
        );
        let lost_gpus = match (&caps, gpus_before) {
            (Some(caps), Some(before)) => before.iter().any(|g| {
                !caps
                    .gpus
                    .iter()
                    .any(|h| h.index == g.index && h.uuid == g.uuid)
            }),
            _ => false,
        };
        if known && lost_gpus {
            let caps = caps.expect("checked");
            let now = self.now_ms();
            self.transact(|st, txn| {
                self.fail_sessions_on_vanished_gpus(
                    st,
                    &req.namespace,
                    &req.identity,
                    &caps,
                    now,
                    txn,
                );
                Ok(())
            })
            .await?;
        }
        Ok(known)
    }

    /// A worker shut down: it is stopped at once (nothing new is placed on or dispatched to
    /// it), and the sessions it hosts end now with the reason given (default "worker shut
    /// down") instead of after the liveness timeout. Its running attempts may still report.
    pub async fn deregister_worker(
        &self,
        req: pb::DeregisterWorkerRequest,
    ) -> Result<Vec<String>, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        let reason = if req.reason.is_empty() {
            format!("worker {} shut down", req.identity)
        } else {
            req.reason.clone()
        };
        if !self
            .matcher
            .deregister(&req.namespace, &req.identity, &req.instance_id, &reason)
        {
            return Err(EngineError::NotFound(format!(
                "worker {:?} (instance {}) is not registered in namespace {:?}; nothing to \
                 deregister",
                req.identity, req.instance_id, req.namespace
            )));
        }
        tracing::info!(
            namespace = req.namespace,
            identity = req.identity,
            "worker stopped"
        );
        let now = self.now_ms();
        let ended = self
            .transact(|st, txn| {
                let ended: Vec<String> = st
                    .sessions
                    .values()
                    .filter_map(|s| s.info.as_ref())
                    .filter(|i| {
                        sessions::is_in(i, SessionPhase::Open)
                            && i.namespace == req.namespace
                            && i.worker_identity == req.identity
                    })
                    .map(|i| i.session_id.clone())
                    .collect();
                for id in &ended {
                    self.close_session(
                        st,
                        &SessionId::from(id.as_str()),
                        SessionEnd::Failed,
                        &reason,
                        true,
                        now,
                        txn,
                    );
                }
                Ok(ended)
            })
            .await?;
        Ok(ended)
    }
}
