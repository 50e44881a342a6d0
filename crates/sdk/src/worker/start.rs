//! The worker an application builds: registered code, then a running worker and its handle.

use super::cache::Cache;
use super::identity::{self};
use super::inner::{ActivityFn, Inner};
use super::options::{WorkerError, WorkerOptions};
use crate::activity::{ActivityContext, ActivityError};
use crate::client::Client;
use crate::codec;
use crate::workflow::{
    FutureCode, WorkflowCode, WorkflowCodeFactory, WorkflowContext, WorkflowError, WorkflowFactory,
    WorkflowInfo,
};
use futures::FutureExt;
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tether_wire::STICKY_QUEUE_PREFIX;
use tokio::sync::{mpsc, watch, Semaphore};

/// A worker under construction: register code, then [`Worker::run`] or [`Worker::start`].
pub struct Worker {
    pub(super) client: Client,
    pub(super) options: WorkerOptions,
    pub(super) workflows: HashMap<String, WorkflowCodeFactory>,
    pub(super) activities: HashMap<String, ActivityFn>,
}

impl Worker {
    /// A worker that talks to the server through `client` (and works in its namespace).
    pub fn new(client: Client, options: WorkerOptions) -> Self {
        Worker {
            client,
            options,
            workflows: HashMap::new(),
            activities: HashMap::new(),
        }
    }

    /// Registers a workflow function under a type name.
    pub fn register_workflow<I, O, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let factory: WorkflowFactory = Arc::new(move |ctx, input| {
            let f = f.clone();
            async move {
                let input: I = codec::from_payload(input.as_ref())?;
                let output = f(ctx, input).await?;
                Ok(Some(codec::to_payload(&output)?))
            }
            .boxed()
        });
        self.register_workflow_code(name, move |info| {
            Box::new(FutureCode::new(info, factory.clone()))
        })
    }

    /// Registers workflow code that is not a Rust `async fn`: `make` gives the code of each
    /// run, which the worker then drives one activation at a time (see
    /// [`WorkflowCode`](crate::workflow::WorkflowCode)): how an SDK in another language runs its
    /// workflows on this worker. Replay, command matching and non-determinism checks are the
    /// worker's, as for Rust workflows.
    pub fn register_workflow_code<F>(&mut self, name: &str, make: F) -> &mut Self
    where
        F: Fn(WorkflowInfo) -> Box<dyn WorkflowCode> + Send + Sync + 'static,
    {
        self.workflows.insert(name.to_string(), Arc::new(make));
        self
    }

    /// Registers an activity function under a type name.
    pub fn register_activity<I, O, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let activity: ActivityFn = Arc::new(move |ctx, input| {
            let f = f.clone();
            async move {
                let input: I = codec::from_payload(input.as_ref())?;
                let output = f(ctx, input).await?;
                Ok(Some(codec::to_payload(&output).map_err(|e| {
                    ActivityError::non_retryable(e.to_string()).with_type("ConvertError")
                })?))
            }
            .boxed()
        });
        self.activities.insert(name.to_string(), activity);
        self
    }

    /// Registers activity code that takes and gives payloads as they are (codecs already undone
    /// on the way in, and run on the way out by the worker): how an SDK in another language
    /// hosts its activities on this worker, with its own conversion of values.
    pub fn register_activity_raw<F>(&mut self, name: &str, f: F) -> &mut Self
    where
        F: Fn(
                ActivityContext,
                Option<tether_wire::pb::Payload>,
            ) -> futures::future::BoxFuture<
                'static,
                Result<Option<tether_wire::pb::Payload>, ActivityError>,
            > + Send
            + Sync
            + 'static,
    {
        self.activities.insert(name.to_string(), Arc::new(f));
        self
    }

    /// Starts the worker in the background. Fails at once when another live process on this
    /// host holds the identity.
    pub fn start(self) -> Result<WorkerHandle, WorkerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (inner, lease) = self.into_inner()?;
        let identity = inner.options.identity.clone();
        let instance_id = inner.instance_id.clone();
        let task = tokio::spawn(inner.run(stop_tx.clone(), stop_rx));
        Ok(WorkerHandle {
            stop: stop_tx,
            task: Some(task),
            identity,
            instance_id,
            _lease: Some(lease),
        })
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let mut handle = self.start()?;
        shutdown.await;
        handle.shutdown_inner().await;
        Ok(())
    }

    fn into_inner(mut self) -> Result<(Arc<Inner>, identity::IdentityLease), WorkerError> {
        if self.workflows.is_empty() && self.activities.is_empty() {
            return Err(WorkerError::NothingRegistered);
        }
        self.options
            .check(!self.workflows.is_empty(), !self.activities.is_empty())?;
        let fingerprint = self.options.capabilities.fingerprint();
        let hostname = self.options.capabilities.hostname();
        let lease = identity::acquire(&identity::IdentityRequest {
            explicit: &self.options.identity,
            state_dir: self.options.state_dir.as_deref(),
            server: self.client.address(),
            namespace: self.client.namespace(),
            task_queue: &self.options.task_queue,
            fingerprint: &fingerprint,
            hostname: &hostname,
        })?;
        self.options.identity = lease.identity.clone();
        tether_core::types::validate_name("identity", &self.options.identity)
            .map_err(|e| WorkerError::InvalidOptions(e.to_string()))?;
        let sticky_queue = format!(
            "{STICKY_QUEUE_PREFIX}{}/{}",
            self.options.identity,
            uuid::Uuid::new_v4().simple()
        );
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            instance_id: lease.instance_id.clone(),
            previous_instance_id: lease.previous_instance_id.clone(),
            outcomes,
            outcomes_rx: Mutex::new(Some(outcomes_rx)),
            rpc: self.client.raw(),
            dc: self.client.data_converter().clone(),
            namespace: self.client.namespace().to_string(),
            workflow_slots: Arc::new(Semaphore::new(self.options.max_concurrent_workflow_tasks)),
            activity_slots: Arc::new(Semaphore::new(self.options.max_concurrent_activities)),
            cache: Mutex::new(Cache::new(self.options.max_cached_workflows)),
            running: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            local: Arc::new(crate::activity::WorkerLocal {
                caps: self.options.capabilities.clone(),
                caps_changed: tokio::sync::Notify::new(),
            }),
            options: self.options,
            workflows: self.workflows,
            activities: self.activities,
            sticky_queue,
        });
        Ok((inner, lease))
    }
}

/// A running worker.
pub struct WorkerHandle {
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
    pub(super) identity: String,
    pub(super) instance_id: String,
    /// The identity's lock: held while the worker runs, released when it stops or is killed,
    /// as the kernel releases it when a process dies.
    pub(super) _lease: Option<identity::IdentityLease>,
}

impl WorkerHandle {
    /// The worker's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This process's instance id (what the server knows it by, next to the identity).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Stops polling, lets running work finish within the grace period, then fails what is left
    /// so it retries elsewhere.
    pub async fn shutdown(mut self) {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self._lease.take();
    }

    /// Stops the worker at once, as if its process died: nothing is reported to the server.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self._lease.take();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
