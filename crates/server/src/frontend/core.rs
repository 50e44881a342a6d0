//! The frontend itself: the engine (or, on a cluster replica, the engine of each namespace) it
//! serves, the authorization table applied to each call, and what several handlers share
//! (results, operator calls on one run, either kind of id).

use super::access::{Guarded, Scope};
use super::checks::*;
use super::reader::InProcessRead;
use crate::auth::Role;
use crate::cluster::Replica;
use crate::engine::{Engine, NextTasks, RunSelector, RunTarget};
use crate::error::EngineError;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb;
use tonic::{Request, Response, Status};

/// What the frontend serves.
pub(super) enum Serving {
    /// One engine, every namespace (a server on SQLite).
    One(Arc<Engine>),
    /// A cluster replica: the engines of the namespaces it holds; other namespaces' calls are
    /// answered with where their holder is.
    Replica(Arc<Replica>),
}

/// The API implementation.
pub struct Frontend {
    pub(super) serving: Serving,
}

impl Frontend {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        Frontend {
            serving: Serving::One(engine),
        }
    }

    /// Serves as a cluster replica.
    pub fn for_replica(replica: Arc<Replica>) -> Self {
        Frontend {
            serving: Serving::Replica(replica),
        }
    }

    /// The engine that serves `namespace`, or the status that says where to go instead.
    pub(super) async fn engine(&self, namespace: &str) -> Result<Arc<Engine>, Status> {
        match &self.serving {
            Serving::One(engine) => Ok(engine.clone()),
            Serving::Replica(replica) => replica.engine_for(namespace).await,
        }
    }

    /// The engine of the namespace a task token names; a malformed token is refused here as
    /// the engine would refuse it.
    pub(super) async fn token_engine(&self, token: &[u8]) -> Result<Arc<Engine>, Status> {
        match &self.serving {
            Serving::One(engine) => Ok(engine.clone()),
            Serving::Replica(_) => {
                let token = Engine::decode_token(token)?;
                self.engine(&token.namespace).await
            }
        }
    }

    fn access(&self) -> Option<Arc<crate::auth::Access>> {
        match &self.serving {
            Serving::One(engine) => engine.access(),
            Serving::Replica(replica) => replica.access(),
        }
    }

    /// Applies the authorization table ([`access`]) to a call, before anything else looks at
    /// it: the role its RPC needs in its namespace, and for worker calls the worker identity it
    /// acts as. Returns the caller's certificate identities (empty with authorization off) and
    /// the request.
    pub(super) fn admit<T: Guarded>(
        &self,
        request: Request<T>,
    ) -> Result<(Vec<String>, T), Status> {
        let Some(access) = self.access() else {
            return Ok((Vec::new(), request.into_inner()));
        };
        // A view in this process (see `Reader`) makes only calls that change nothing, which
        // need the client role; the mark cannot come from the network.
        if request.extensions().get::<InProcessRead>().is_some() && T::ROLE == Role::Client {
            return Ok((Vec::new(), request.into_inner()));
        }
        let ids = crate::auth::identities_of(&request);
        let req = request.into_inner();
        let acting_as = req.acting_as();
        match req.scope() {
            Scope::AnyGrant => {
                if !access.known(&ids) {
                    return Err(Status::permission_denied(
                        "this identity holds no grant in the access file",
                    ));
                }
            }
            Scope::Namespace(namespace) => grant(&access, &ids, namespace, T::ROLE, acting_as)?,
            Scope::Tokens(namespaces) => {
                for namespace in &namespaces {
                    grant(&access, &ids, namespace, T::ROLE, acting_as)?;
                }
            }
        }
        Ok((ids, req))
    }

    pub(super) fn allow(&self, ids: &[String], namespace: &str, role: Role) -> Result<(), Status> {
        match self.access() {
            None => Ok(()),
            Some(access) => grant(&access, ids, namespace, role, None),
        }
    }

    /// The worker role in `namespace`, acting as worker `identity`: with authorization on, the
    /// identity must be one the caller's certificate may use.
    pub(super) fn allow_worker(
        &self,
        ids: &[String],
        namespace: &str,
        identity: &str,
    ) -> Result<(), Status> {
        match self.access() {
            None => Ok(()),
            Some(access) => grant(&access, ids, namespace, Role::Worker, Some(identity)),
        }
    }

    pub(super) fn max_payload(&self) -> usize {
        match &self.serving {
            Serving::One(engine) => engine.max_payload_bytes(),
            Serving::Replica(replica) => replica.config().max_payload_bytes,
        }
    }

    /// Where a completion may take its next tasks from: checked like a poll of those queues
    /// (the worker role in that namespace, and no other worker's host queue).
    pub(super) fn next_task_target(
        &self,
        ids: &[String],
        next: &Option<pb::NextTaskRequest>,
        identity: &str,
        max: usize,
    ) -> Result<Option<NextTasks>, Status> {
        match next {
            None => Ok(None),
            Some(n) => {
                self.allow_worker(ids, &n.namespace, identity)?;
                name("namespace", &n.namespace)?;
                let queues: Vec<String> = n
                    .additional_task_queues
                    .iter()
                    .chain(std::iter::once(&n.task_queue))
                    .cloned()
                    .collect();
                for q in &queues {
                    name("task queue", q)?;
                    check_host_queue(q, identity)?;
                }
                Ok(Some(NextTasks {
                    namespace: n.namespace.clone(),
                    queues,
                    identity: identity.to_string(),
                    instance: n.instance_id.clone(),
                    max,
                }))
            }
        }
    }

    /// GetWorkflowResult and GetActivityResult: the same checks and wait, for either kind.
    pub(super) async fn wait_for_result(
        &self,
        run: &RunSelector,
        wait_ms: u64,
    ) -> R<pb::GetWorkflowResultResponse> {
        check_selector(run)?;
        let outcome = self
            .engine(&run.namespace)
            .await?
            .result(run, Duration::from_millis(wait_ms))
            .await?;
        ok(outcome)
    }

    /// Cancels or terminates one run (a workflow's, or a standalone activity's): the role
    /// (client to cancel, admin to terminate) and the names checked the same way for either.
    pub(super) async fn act_on_run(
        &self,
        op: RunOp,
        run: RunSelector,
        reason: &str,
        identity: &str,
    ) -> Result<(), Status> {
        check_selector(&run)?;
        let engine = self.engine(&run.namespace).await?;
        match op {
            RunOp::Cancel => engine.request_cancel(&run, reason, identity).await?,
            RunOp::Terminate => engine.terminate(&run, reason, identity).await?,
        }
        Ok(())
    }

    /// A describe, history or result for an id that may be a workflow's or a standalone
    /// activity's: the workflow first, then the activity of that id.
    pub(super) async fn either_kind<'s, T, F, Fut>(
        &self,
        workflow: &'s RunSelector,
        activity: &'s RunSelector,
        f: F,
    ) -> Result<T, EngineError>
    where
        F: Fn(&'s RunSelector) -> Fut,
        Fut: std::future::Future<Output = Result<T, EngineError>>,
    {
        match f(workflow).await {
            Err(EngineError::NotFound(why)) => {
                f(activity).await.map_err(|_| EngineError::NotFound(why))
            }
            other => other,
        }
    }
}

/// What an operator does to a run.
#[derive(Clone, Copy)]
pub(super) enum RunOp {
    Cancel,
    Terminate,
}

/// The names a selector carries, checked as the wire gave them.
fn check_selector(run: &RunSelector) -> Result<(), Status> {
    name("namespace", &run.namespace)?;
    match &run.target {
        RunTarget::Workflow(id) => name("workflow id", id)?,
        RunTarget::Activity(id) => name("activity id", id)?,
    }
    optional_name("run id", &run.run_id)
}

pub(super) type R<T> = Result<Response<T>, Status>;

pub(super) fn ok<T>(value: T) -> R<T> {
    Ok(Response::new(value))
}

/// `role` in `namespace`, and, for a call that acts as a worker identity, that identity too.
fn grant(
    access: &crate::auth::Access,
    ids: &[String],
    namespace: &str,
    role: Role,
    acting_as: Option<&str>,
) -> Result<(), Status> {
    access.check(ids, namespace, role)?;
    match acting_as {
        Some(identity) => access.check_worker_identity(ids, namespace, identity),
        None => Ok(()),
    }
}
