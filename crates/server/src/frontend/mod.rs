//! gRPC handlers: check every request (names, sizes, required fields) before the engine sees it,
//! and map engine errors to gRPC statuses with messages that say what was wrong.

mod access;
mod checks;
mod core;
mod reader;

use crate::auth::Role;
use crate::engine::RunSelector;
use access::token_namespace;
use checks::*;
use std::time::Duration;
use tether_core::types::{Namespace, SessionId, TaskQueue, WorkerId};
use tether_wire::pb::{self, tether_service_server::TetherService};
use tonic::{Request, Status};

pub use self::core::Frontend;
use self::core::{ok, RunOp, Serving, R};
pub use self::reader::Reader;

#[tonic::async_trait]
impl TetherService for Frontend {
    async fn register_namespace(
        &self,
        request: Request<pb::RegisterNamespaceRequest>,
    ) -> R<pb::RegisterNamespaceResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        duration("retention_ms", req.retention_ms)?;
        let engine = match &self.serving {
            Serving::One(engine) => engine.clone(),
            Serving::Replica(replica) => replica.engine_for_new_namespace(&req.namespace).await?,
        };
        engine
            .register_namespace(&req.namespace, &req.description, req.retention_ms)
            .await?;
        ok(pb::RegisterNamespaceResponse {})
    }

    async fn update_namespace(
        &self,
        request: Request<pb::UpdateNamespaceRequest>,
    ) -> R<pb::NamespaceInfo> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        if let Some(ms) = req.retention_ms {
            duration("retention_ms", ms)?;
        }
        let engine = self.engine(&req.namespace).await?;
        ok(engine.update_namespace(req).await?)
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> R<pb::ListNamespacesResponse> {
        self.admit(request)?;
        let namespaces = match &self.serving {
            Serving::One(engine) => engine.list_namespaces(),
            Serving::Replica(replica) => replica.list_namespaces().await?,
        };
        ok(pb::ListNamespacesResponse { namespaces })
    }

    async fn start_workflow(
        &self,
        request: Request<pb::StartWorkflowRequest>,
    ) -> R<pb::StartWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("workflow id", &req.workflow_id)?;
        name("workflow type", &req.workflow_type)?;
        name("task queue", &req.task_queue)?;
        optional_name("request id", &req.request_id)?;
        payload("workflow input", req.input.as_ref(), self.max_payload())?;
        let engine = self.engine(&req.namespace).await?;
        let run_id = engine.start_workflow(req).await?;
        ok(pb::StartWorkflowResponse { run_id })
    }

    async fn signal_workflow(
        &self,
        request: Request<pb::SignalWorkflowRequest>,
    ) -> R<pb::SignalWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("workflow id", &req.workflow_id)?;
        optional_name("run id", &req.run_id)?;
        name("signal name", &req.signal_name)?;
        optional_name("request id", &req.request_id)?;
        payload("signal input", req.input.as_ref(), self.max_payload())?;
        let engine = self.engine(&req.namespace).await?;
        engine.signal(req).await?;
        ok(pb::SignalWorkflowResponse {})
    }

    async fn request_cancel_workflow(
        &self,
        request: Request<pb::RequestCancelWorkflowRequest>,
    ) -> R<pb::RequestCancelWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        self.act_on_run(
            RunOp::Cancel,
            RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id),
            &req.reason,
            &req.identity,
        )
        .await?;
        ok(pb::RequestCancelWorkflowResponse {})
    }

    async fn terminate_workflow(
        &self,
        request: Request<pb::TerminateWorkflowRequest>,
    ) -> R<pb::TerminateWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        self.act_on_run(
            RunOp::Terminate,
            RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id),
            &req.reason,
            &req.identity,
        )
        .await?;
        ok(pb::TerminateWorkflowResponse {})
    }

    async fn describe_workflow(
        &self,
        request: Request<pb::DescribeWorkflowRequest>,
    ) -> R<pb::DescribeWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("workflow id", &req.workflow_id)?;
        optional_name("run id", &req.run_id)?;
        // Standalone activities share the describe call: fall back to them by id.
        let workflow = RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id);
        let activity = RunSelector::activity(&req.namespace, &req.workflow_id, &req.run_id);
        let engine = self.engine(&req.namespace).await?;
        let found = self
            .either_kind(&workflow, &activity, |run| engine.describe(run))
            .await?;
        ok(found)
    }

    async fn get_workflow_history(
        &self,
        request: Request<pb::GetWorkflowHistoryRequest>,
    ) -> R<pb::GetWorkflowHistoryResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("workflow id", &req.workflow_id)?;
        optional_name("run id", &req.run_id)?;
        let workflow = RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id);
        let activity = RunSelector::activity(&req.namespace, &req.workflow_id, &req.run_id);
        let engine = self.engine(&req.namespace).await?;
        let events = self
            .either_kind(&workflow, &activity, |run| engine.history(run))
            .await?;
        ok(pb::GetWorkflowHistoryResponse { events })
    }

    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> R<pb::ListWorkflowsResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        let status = status_filter(req.status)?;
        let standalone = kind_is_activity(&req.kind)?;
        let matching = run_match(&req)?;
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(10_000)
        } as usize;
        let engine = self.engine(&req.namespace).await?;
        let (executions, next_page_token) = engine
            .list(
                &Namespace::from(&req.namespace),
                standalone,
                status,
                limit,
                &req.page_token,
                &matching,
            )
            .await?;
        ok(pb::ListWorkflowsResponse {
            executions,
            next_page_token,
        })
    }

    async fn get_workflow_result(
        &self,
        request: Request<pb::GetWorkflowResultRequest>,
    ) -> R<pb::GetWorkflowResultResponse> {
        let (_, req) = self.admit(request)?;
        // An id that names a standalone activity gets that activity's result.
        let workflow = RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id);
        let found = self.wait_for_result(&workflow, req.wait_ms).await;
        match found {
            Err(status) if status.code() == tonic::Code::NotFound => {
                let activity = RunSelector::activity(&req.namespace, &req.workflow_id, &req.run_id);
                self.wait_for_result(&activity, req.wait_ms)
                    .await
                    .map_err(|_| status)
            }
            other => other,
        }
    }

    async fn start_activity(
        &self,
        request: Request<pb::StartActivityRequest>,
    ) -> R<pb::StartActivityResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("activity id", &req.activity_id)?;
        name("activity type", &req.activity_type)?;
        name("task queue", &req.task_queue)?;
        optional_name("request id", &req.request_id)?;
        payload("activity input", req.input.as_ref(), self.max_payload())?;
        let (namespace, activity_id, wait) = (
            req.namespace.clone(),
            req.activity_id.clone(),
            Duration::from_millis(req.wait_ms),
        );
        let engine = self.engine(&req.namespace).await?;
        let started = engine.start_activity(req).await?;
        let run_id = started.run_id;
        let mut outcome = None;
        if !wait.is_zero() {
            let o = engine
                .result(
                    &RunSelector::activity(&namespace, activity_id, &run_id),
                    wait,
                )
                .await?;
            if o.status != pb::ExecutionStatus::Running as i32 {
                outcome = Some(o);
            }
        }
        // Only when the caller is left waiting does it need to hear why.
        let placement_note = if started.handed_over || outcome.is_some() {
            String::new()
        } else {
            engine.placement_note(
                &Namespace::from(&namespace),
                &TaskQueue::from(&started.queue),
                &started.requirements,
            )
        };
        ok(pb::StartActivityResponse {
            run_id,
            outcome,
            placement_note,
        })
    }

    async fn get_activity_result(
        &self,
        request: Request<pb::GetActivityResultRequest>,
    ) -> R<pb::GetWorkflowResultResponse> {
        let (_, req) = self.admit(request)?;
        let run = RunSelector::activity(&req.namespace, &req.activity_id, &req.run_id);
        self.wait_for_result(&run, req.wait_ms).await
    }

    async fn poll_workflow_task(
        &self,
        request: Request<pb::PollWorkflowTaskRequest>,
    ) -> R<pb::PollWorkflowTaskResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("task queue", &req.task_queue)?;
        optional_name("identity", &req.identity)?;
        optional_name("sticky queue", &req.sticky_queue)?;
        let engine = self.engine(&req.namespace).await?;
        ok(engine.poll_workflow_task(req).await?)
    }

    async fn complete_workflow_task(
        &self,
        request: Request<pb::CompleteWorkflowTaskRequest>,
    ) -> R<pb::CompleteWorkflowTaskResponse> {
        let (ids, req) = self.admit(request)?;
        optional_name("identity", &req.identity)?;
        optional_name("sticky queue", &req.sticky_queue)?;
        // Signalling a workflow in another namespace needs the client role there.
        let own = token_namespace(&req.task_token);
        for c in &req.commands {
            if let Some(pb::command::Kind::SignalExternal(sig)) = &c.kind {
                if !sig.namespace.is_empty() && sig.namespace != own {
                    self.allow(&ids, &sig.namespace, Role::Client)?;
                }
            }
        }
        let next = match &req.next_task {
            None => None,
            Some(n) => {
                self.allow(&ids, &n.namespace, Role::Worker)?;
                name("namespace", &n.namespace)?;
                for q in &n.task_queues {
                    name("task queue", q)?;
                }
                Some((n.namespace.clone(), n.task_queues.clone()))
            }
        };
        let (identity, sticky_queue) = (req.identity.clone(), req.sticky_queue.clone());
        let engine = self.token_engine(&req.task_token).await?;
        engine.complete_workflow_task(req).await?;
        let next_task = match next {
            // The next task is a convenience: where its namespace is served elsewhere, the
            // worker's next poll goes there.
            Some((namespace, queues)) => match self.engine(&namespace).await {
                Ok(next_engine) => {
                    next_engine
                        .next_workflow_task_now(
                            &Namespace::from(namespace),
                            &queues,
                            &WorkerId::from(identity),
                            &sticky_queue,
                        )
                        .await
                }
                Err(_) => None,
            },
            None => None,
        };
        ok(pb::CompleteWorkflowTaskResponse { next_task })
    }

    async fn fail_workflow_task(
        &self,
        request: Request<pb::FailWorkflowTaskRequest>,
    ) -> R<pb::FailWorkflowTaskResponse> {
        let (_, req) = self.admit(request)?;
        let engine = self.token_engine(&req.task_token).await?;
        engine.fail_workflow_task(req).await?;
        ok(pb::FailWorkflowTaskResponse {})
    }

    async fn poll_activity_task(
        &self,
        request: Request<pb::PollActivityTaskRequest>,
    ) -> R<pb::PollActivityTaskResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("task queue", &req.task_queue)?;
        optional_name("identity", &req.identity)?;
        check_host_queue(&req.task_queue, &req.identity)?;
        for q in &req.additional_task_queues {
            name("task queue", q)?;
            check_host_queue(q, &req.identity)?;
        }
        let engine = self.engine(&req.namespace).await?;
        ok(engine.poll_activity_task(req).await?)
    }

    async fn heartbeat_activity(
        &self,
        request: Request<pb::HeartbeatActivityRequest>,
    ) -> R<pb::HeartbeatActivityResponse> {
        let (_, req) = self.admit(request)?;
        payload(
            "heartbeat details",
            req.details.as_ref(),
            self.max_payload(),
        )?;
        let engine = self.token_engine(&req.task_token).await?;
        let cancel_requested = engine.heartbeat(req).await?;
        ok(pb::HeartbeatActivityResponse { cancel_requested })
    }

    async fn complete_activity_task(
        &self,
        request: Request<pb::CompleteActivityTaskRequest>,
    ) -> R<pb::CompleteActivityTaskResponse> {
        let (ids, req) = self.admit(request)?;
        payload("activity result", req.result.as_ref(), self.max_payload())?;
        let next = self.next_task_target(&ids, &req.next_task, &req.identity, 1)?;
        let engine = self.token_engine(&req.task_token).await?;
        let next_task = engine.complete_activity(req, next).await?;
        ok(pb::CompleteActivityTaskResponse { next_task })
    }

    async fn fail_activity_task(
        &self,
        request: Request<pb::FailActivityTaskRequest>,
    ) -> R<pb::FailActivityTaskResponse> {
        let (ids, req) = self.admit(request)?;
        if let Some(f) = &req.failure {
            payload("failure details", f.details.as_ref(), self.max_payload())?;
        }
        let next = self.next_task_target(&ids, &req.next_task, &req.identity, 1)?;
        let engine = self.token_engine(&req.task_token).await?;
        let next_task = engine.fail_activity(req, next).await?;
        ok(pb::FailActivityTaskResponse { next_task })
    }

    async fn respond_activity_tasks(
        &self,
        request: Request<pb::RespondActivityTasksRequest>,
    ) -> R<pb::RespondActivityTasksResponse> {
        let (ids, req) = self.admit(request)?;
        if req.outcomes.len() > MAX_OUTCOMES_PER_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} outcomes in one batch; send at most {MAX_OUTCOMES_PER_BATCH} per call",
                req.outcomes.len()
            )));
        }
        if req.max_next_tasks > MAX_NEXT_TASKS {
            return Err(Status::invalid_argument(format!(
                "max_next_tasks is {}; ask for at most {MAX_NEXT_TASKS}",
                req.max_next_tasks
            )));
        }
        let next = if req.max_next_tasks > 0 {
            self.next_task_target(
                &ids,
                &req.next_task,
                &req.identity,
                req.max_next_tasks as usize,
            )?
        } else {
            None
        };
        // Oversized payloads are refused one by one so the rest of the batch still lands.
        let max = self.max_payload();
        let mut acks: Vec<Option<Status>> = Vec::with_capacity(req.outcomes.len());
        let mut accepted = Vec::with_capacity(req.outcomes.len());
        for outcome in req.outcomes {
            let checked = match &outcome.outcome {
                Some(pb::activity_outcome::Outcome::Completed(c)) => {
                    payload("activity result", c.result.as_ref(), max)
                }
                Some(pb::activity_outcome::Outcome::Failed(f)) => {
                    payload("failure details", f.details.as_ref(), max)
                }
                Some(pb::activity_outcome::Outcome::Canceled(c)) => {
                    payload("cancel details", c.details.as_ref(), max)
                }
                None => Ok(()),
            };
            match checked {
                Ok(()) => {
                    acks.push(None);
                    accepted.push(outcome);
                }
                Err(status) => acks.push(Some(status)),
            }
        }
        // A batch is one worker's, and a worker serves one namespace: the first outcome's (or
        // the next tasks') namespace says which engine takes it.
        let namespace = accepted
            .iter()
            .find_map(|o| crate::engine::Engine::decode_token(&o.task_token).ok())
            .map(|token| token.namespace)
            .or_else(|| next.as_ref().map(|n| n.namespace.clone()));
        let engine = match (&self.serving, namespace) {
            (Serving::One(engine), _) => engine.clone(),
            (Serving::Replica(_), Some(namespace)) => self.engine(&namespace).await?,
            (Serving::Replica(_), None) => {
                // No outcome names a run (and no next tasks are asked for): each is refused
                // as an engine would refuse it.
                let mut malformed = accepted.iter().map(|o| {
                    crate::engine::Engine::decode_token(&o.task_token)
                        .err()
                        .map(Status::from)
                        .unwrap_or_else(|| Status::internal("a decodable token was missed"))
                });
                let acks = acks
                    .into_iter()
                    .map(|refused| refused.or_else(|| malformed.next()))
                    .map(|status| {
                        let status = status.unwrap_or_else(|| Status::internal("no outcome"));
                        pb::OutcomeAck {
                            error: status.message().to_string(),
                            code: status.code() as i32,
                        }
                    })
                    .collect();
                return ok(pb::RespondActivityTasksResponse {
                    acks,
                    next_tasks: Vec::new(),
                });
            }
        };
        let (applied, next_tasks) = engine
            .respond_activities(&WorkerId::from(&req.identity), accepted, next)
            .await?;
        let mut applied = applied.into_iter();
        let acks = acks
            .into_iter()
            .map(|refused| {
                let outcome = match refused {
                    Some(status) => Err(status),
                    None => applied
                        .next()
                        .expect("one result per accepted outcome")
                        .map_err(Status::from),
                };
                match outcome {
                    Ok(()) => pb::OutcomeAck::default(),
                    Err(status) => pb::OutcomeAck {
                        error: status.message().to_string(),
                        code: status.code() as i32,
                    },
                }
            })
            .collect();
        ok(pb::RespondActivityTasksResponse { acks, next_tasks })
    }

    async fn report_activity_canceled(
        &self,
        request: Request<pb::ReportActivityCanceledRequest>,
    ) -> R<pb::ReportActivityCanceledResponse> {
        let (_, req) = self.admit(request)?;
        payload("cancel details", req.details.as_ref(), self.max_payload())?;
        let engine = self.token_engine(&req.task_token).await?;
        engine.activity_canceled(req).await?;
        ok(pb::ReportActivityCanceledResponse {})
    }

    async fn describe_task_queue(
        &self,
        request: Request<pb::DescribeTaskQueueRequest>,
    ) -> R<pb::DescribeTaskQueueResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("task queue", &req.task_queue)?;
        let engine = self.engine(&req.namespace).await?;
        ok(engine.describe_queue(
            &Namespace::from(&req.namespace),
            &TaskQueue::from(&req.task_queue),
        )?)
    }

    async fn describe_worker(
        &self,
        request: Request<pb::DescribeWorkerRequest>,
    ) -> R<pb::DescribeWorkerResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("identity", &req.identity)?;
        let engine = self.engine(&req.namespace).await?;
        ok(pb::DescribeWorkerResponse {
            worker: Some(engine.describe_worker(
                &Namespace::from(&req.namespace),
                &WorkerId::from(&req.identity),
            )?),
        })
    }

    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> R<pb::RegisterWorkerResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("identity", &req.identity)?;
        name("instance id", &req.instance_id)
            .map_err(|e| Status::invalid_argument(format!("{}: every worker process makes a random instance id once at start and sends it with its registration, heartbeats and polls", e.message())))?;
        optional_name("previous instance id", &req.previous_instance_id)?;
        if req.task_queues.len() > registration_limits::TASK_QUEUES {
            return Err(Status::invalid_argument(format!(
                "the worker polls {} task queues; at most {} may be registered",
                req.task_queues.len(),
                registration_limits::TASK_QUEUES
            )));
        }
        for q in &req.task_queues {
            name("task queue", q)?;
        }
        check_capabilities(req.capabilities.as_ref())?;
        let engine = self.engine(&req.namespace).await?;
        ok(engine.register_worker(req).await?)
    }

    async fn worker_heartbeat(
        &self,
        request: Request<pb::WorkerHeartbeatRequest>,
    ) -> R<pb::WorkerHeartbeatResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("identity", &req.identity)?;
        check_capabilities(req.capabilities.as_ref())?;
        let engine = self.engine(&req.namespace).await?;
        let known = engine.worker_heartbeat(req).await?;
        ok(pb::WorkerHeartbeatResponse { reregister: !known })
    }

    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> R<pb::DeregisterWorkerResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("identity", &req.identity)?;
        name("instance id", &req.instance_id)?;
        let engine = self.engine(&req.namespace).await?;
        let sessions_ended = engine.deregister_worker(req).await?;
        ok(pb::DeregisterWorkerResponse { sessions_ended })
    }

    async fn describe_activity(
        &self,
        request: Request<pb::DescribeActivityRequest>,
    ) -> R<pb::DescribeWorkflowResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("activity id", &req.activity_id)?;
        optional_name("run id", &req.run_id)?;
        let engine = self.engine(&req.namespace).await?;
        ok(engine
            .describe(&RunSelector::activity(
                &req.namespace,
                &req.activity_id,
                &req.run_id,
            ))
            .await?)
    }

    async fn request_cancel_activity(
        &self,
        request: Request<pb::RequestCancelActivityRequest>,
    ) -> R<pb::RequestCancelActivityResponse> {
        let (_, req) = self.admit(request)?;
        self.act_on_run(
            RunOp::Cancel,
            RunSelector::activity(&req.namespace, &req.activity_id, &req.run_id),
            &req.reason,
            &req.identity,
        )
        .await?;
        ok(pb::RequestCancelActivityResponse {})
    }

    async fn terminate_activity(
        &self,
        request: Request<pb::TerminateActivityRequest>,
    ) -> R<pb::TerminateActivityResponse> {
        let (_, req) = self.admit(request)?;
        self.act_on_run(
            RunOp::Terminate,
            RunSelector::activity(&req.namespace, &req.activity_id, &req.run_id),
            &req.reason,
            &req.identity,
        )
        .await?;
        ok(pb::TerminateActivityResponse {})
    }

    async fn terminate_session(
        &self,
        request: Request<pb::TerminateSessionRequest>,
    ) -> R<pb::TerminateSessionResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("session id", &req.session_id)?;
        if req.reason.len() > 1024 {
            return Err(Status::invalid_argument(format!(
                "reason is {} bytes; give at most 1024",
                req.reason.len()
            )));
        }
        let engine = self.engine(&req.namespace).await?;
        let session = engine
            .terminate_session(
                &Namespace::from(&req.namespace),
                &SessionId::from(&req.session_id),
                &req.reason,
                &req.identity,
            )
            .await?;
        ok(pb::TerminateSessionResponse {
            session: Some(session),
        })
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> R<pb::CreateSessionResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        if req.options.is_none() {
            return Err(Status::invalid_argument(
                "options are required (at least the task queue whose workers may host the session)",
            ));
        }
        let engine = self.engine(&req.namespace).await?;
        let session = engine.create_session(req).await?;
        ok(pb::CreateSessionResponse {
            session: Some(session),
        })
    }

    async fn complete_session(
        &self,
        request: Request<pb::CompleteSessionRequest>,
    ) -> R<pb::CompleteSessionResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("session id", &req.session_id)?;
        let engine = self.engine(&req.namespace).await?;
        let session = engine
            .complete_session(
                &Namespace::from(&req.namespace),
                &SessionId::from(&req.session_id),
            )
            .await?;
        ok(pb::CompleteSessionResponse {
            session: Some(session),
        })
    }

    async fn describe_session(
        &self,
        request: Request<pb::DescribeSessionRequest>,
    ) -> R<pb::SessionInfo> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        name("session id", &req.session_id)?;
        let engine = self.engine(&req.namespace).await?;
        ok(engine
            .describe_session(
                &Namespace::from(&req.namespace),
                &SessionId::from(&req.session_id),
            )
            .await?)
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> R<pb::ListSessionsResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        let engine = self.engine(&req.namespace).await?;
        let (sessions, next_page_token) = engine
            .list_sessions(
                &Namespace::from(&req.namespace),
                req.include_closed,
                page_size(req.page_size),
                &req.page_token,
            )
            .await?;
        ok(pb::ListSessionsResponse {
            sessions,
            next_page_token,
        })
    }

    async fn describe_cluster(
        &self,
        request: Request<pb::DescribeClusterRequest>,
    ) -> R<pb::DescribeClusterResponse> {
        self.admit(request)?;
        match &self.serving {
            Serving::Replica(replica) => ok(replica.describe().await?),
            Serving::One(engine) => ok(pb::DescribeClusterResponse {
                store: "sqlite".into(),
                replicas: Vec::new(),
                leases: engine
                    .list_namespaces()
                    .into_iter()
                    .map(|ns| pb::LeaseInfo {
                        namespace: ns.name,
                        ..Default::default()
                    })
                    .collect(),
                lease_timeout_ms: 0,
                answered_by: String::new(),
            }),
        }
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> R<pb::ListWorkersResponse> {
        let (_, req) = self.admit(request)?;
        name("namespace", &req.namespace)?;
        let engine = self.engine(&req.namespace).await?;
        let (workers, next_page_token) = engine.list_workers(
            &Namespace::from(&req.namespace),
            page_size(req.page_size),
            &req.page_token,
        )?;
        ok(pb::ListWorkersResponse {
            workers,
            next_page_token,
        })
    }
}
