//! The worker: the Rust SDK's, with Python activities and workflows registered on it. The
//! worker polls, holds slots, heartbeats and reports; each activity attempt is handed to the
//! Python dispatcher of the asyncio loop that started the worker (`tether/worker.py`), which
//! runs the function (a thread for a plain `def`) and answers how it went; workflow runs are
//! `crate::workflow`'s.

use crate::bridge::{self, LoopQueue};
use crate::client::{seconds, PyClient};
use crate::convert::{self, invalid};
use futures::FutureExt;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tether_sdk::activity::{ActivityContext, ActivityError, CancelReason};
use tether_sdk::caps::{CapabilitySource, Inventory};
use tether_sdk::worker::{Worker, WorkerHandle, WorkerOptions};
use tether_wire::pb;

enum State {
    /// Activities may still be registered.
    Building(Box<Worker>),
    Running(WorkerHandle),
    Stopped,
}

/// A worker on one task queue of the client's namespace.
#[pyclass(name = "Worker", module = "tether._core", frozen)]
pub(crate) struct PyWorker {
    state: Arc<Mutex<State>>,
    /// The asyncio loop activities run on: the one that called `run`.
    event_loop: Arc<Mutex<Option<Arc<LoopQueue>>>>,
    /// Set to ask the worker to stop. `run`'s own future then stops it gracefully, so that
    /// what the worker does last in Python is the completion `run`'s caller awaits: no
    /// completion of another future can reach Python after `run` has returned (and an
    /// interpreter shutting down behind it).
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Set once the worker has stopped.
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
}

#[pymethods]
impl PyWorker {
    #[new]
    #[pyo3(signature = (client, task_queue, identity=None, max_concurrent_activities=100,
                        max_concurrent_sessions=10, graceful_shutdown_s=10.0, inventory=None,
                        labels=None, resources=None, state_dir=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        client: &PyClient,
        task_queue: String,
        identity: Option<String>,
        max_concurrent_activities: usize,
        max_concurrent_sessions: u32,
        graceful_shutdown_s: f64,
        inventory: Option<PathBuf>,
        labels: Option<BTreeMap<String, String>>,
        resources: Option<BTreeMap<String, u64>>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut caps = CapabilitySource::detect();
        if let Some(path) = inventory {
            caps = caps.with_inventory(Inventory::load(&path).map_err(invalid)?);
        }
        for (k, v) in labels.unwrap_or_default() {
            caps = caps.label(k, v);
        }
        for (k, v) in resources.unwrap_or_default() {
            caps = caps.resource(k, v);
        }
        let mut options = WorkerOptions::new(task_queue)
            .max_concurrent_activities(max_concurrent_activities)
            .max_concurrent_sessions(max_concurrent_sessions)
            .graceful_shutdown(seconds("graceful_shutdown_s", graceful_shutdown_s)?)
            .capabilities(caps);
        if let Some(identity) = identity {
            options = options.identity(identity);
        }
        if state_dir.is_some() {
            options = options.state_dir(state_dir);
        }
        let options = options.build().map_err(invalid)?;
        Ok(PyWorker {
            state: Arc::new(Mutex::new(State::Building(Box::new(Worker::new(
                client.client.clone(),
                options,
            ))))),
            event_loop: Arc::new(Mutex::new(None)),
            stop: Arc::new(tokio::sync::watch::channel(false).0),
            stopped: Arc::new(tokio::sync::watch::channel(false).0),
        })
    }

    /// Registers an activity type. `dispatch(ctx, data, encoding)` runs one attempt and
    /// answers `("ok", data, encoding)`, `("error", message, type, non_retryable)` or
    /// `("cancelled",)`. Without an `executor` it is a coroutine function, run as a task of the
    /// asyncio loop that calls `run`; with one it is a plain function, submitted to that
    /// `concurrent.futures` executor from the loop's thread, in a copy of the loop's context,
    /// and its future answers from the executor's thread: no hop back through the loop (with
    /// `run_in_executor` a plain `def` activity cost its worker twice the CPU of an `async def`
    /// one under W3).
    #[pyo3(signature = (name, dispatch, executor=None))]
    fn register_activity(
        &self,
        name: String,
        dispatch: Py<PyAny>,
        executor: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let mut state = self.state.lock().expect("not poisoned");
        let State::Building(worker) = &mut *state else {
            return Err(invalid("activities are registered before the worker runs"));
        };
        let dispatch = Arc::new(match executor {
            Some(executor) => Dispatch::OnExecutor {
                run: dispatch,
                executor,
            },
            None => Dispatch::OnLoop(dispatch),
        });
        // The loop is known only when `run` is called: the activity reads it from there.
        let event_loop = self.event_loop.clone();
        worker.register_activity_raw(&name, move |ctx, input| {
            let dispatch = dispatch.clone();
            let event_loop = event_loop.lock().expect("not poisoned").clone();
            async move {
                let event_loop = event_loop
                    .ok_or_else(|| ActivityError::retryable("the Python worker is not running"))?;
                let cancel = ctx.clone();
                let task = Arc::new(Mutex::new(None));
                let (answer, answered) = tokio::sync::oneshot::channel();
                let started = ActivityStart {
                    ctx,
                    input,
                    dispatch,
                    task: task.clone(),
                    answer,
                };
                event_loop.push(Box::new(move |py| started.start(py)));
                let mut answered = std::pin::pin!(answered);
                // Told to stop: the async activity's task is cancelled on its loop (it sees
                // CancelledError); a plain `def` one learns it from `is_cancelled()`.
                let answer = tokio::select! {
                    answer = &mut answered => answer,
                    _ = cancel.cancelled() => {
                        event_loop.push(Box::new(move |py| cancel_task(py, &task)));
                        answered.await
                    }
                };
                // No answer: the loop dropped the attempt unrun (it stopped, or is gone).
                answer.unwrap_or_else(|_| {
                    Err(ActivityError::retryable(
                        "the Python worker's asyncio loop stopped before the activity ended",
                    ))
                })
            }
            .boxed()
        });
        Ok(())
    }

    /// Registers a workflow type. `factory(info)` makes the object of one run, whose
    /// `activate(events)` answers the commands of one activation (see `tether/workflow.py`).
    fn register_workflow(&self, name: String, factory: Py<PyAny>) -> PyResult<()> {
        let mut state = self.state.lock().expect("not poisoned");
        let State::Building(worker) = &mut *state else {
            return Err(invalid("workflows are registered before the worker runs"));
        };
        let factory = Arc::new(factory);
        worker.register_workflow_code(&name, move |info| {
            Box::new(crate::workflow::PyWorkflowCode::new(&factory, info))
        });
        Ok(())
    }

    /// Starts the worker on the running asyncio loop; the awaitable ends when it has stopped
    /// (see `shutdown`). Fails at once when another live process holds the identity.
    fn run<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (_, event_loop) = bridge::running_loop(py)?;
        let mut state = self.state.lock().expect("not poisoned");
        let worker = match std::mem::replace(&mut *state, State::Stopped) {
            State::Building(worker) => *worker,
            other => {
                *state = other;
                return Err(invalid("this worker has already been run (or stopped)"));
            }
        };
        *self.event_loop.lock().expect("not poisoned") = Some(event_loop);
        let started = {
            let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
            worker.start()
        };
        let handle = started.map_err(invalid)?;
        *state = State::Running(handle);
        drop(state);
        let mut stop = self.stop.subscribe();
        let state = self.state.clone();
        let stopped = self.stopped.clone();
        bridge::future(py, async move {
            let _ = stop.wait_for(|asked| *asked).await;
            stop_gracefully(&state, &stopped).await;
            Ok(())
        })
    }

    /// The worker's identity once it runs.
    #[getter]
    fn identity(&self) -> Option<String> {
        match &*self.state.lock().expect("not poisoned") {
            State::Running(h) => Some(h.identity().to_string()),
            _ => None,
        }
    }

    /// Asks the worker to stop (what SIGINT and SIGTERM do): `run` then stops polling, lets
    /// running activities finish within the grace period, tells the server, and returns.
    fn request_stop(&self) {
        let mut state = self.state.lock().expect("not poisoned");
        if matches!(&*state, State::Building(_)) {
            // Never run: nothing to stop, and it may not run any more.
            *state = State::Stopped;
            self.stopped.send_replace(true);
        }
        self.stop.send_replace(true);
    }

    /// [`request_stop`](Self::request_stop), then waits until the worker has stopped (and
    /// stops it itself where `run`'s future is gone, cancelled with its task).
    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.request_stop();
        let state = self.state.clone();
        let stopped = self.stopped.clone();
        bridge::future(py, async move {
            stop_gracefully(&state, &stopped).await;
            Ok(())
        })
    }

    /// Stops at once, as if the process died: nothing is reported (for tests of failover).
    fn kill(&self) {
        let previous = std::mem::replace(
            &mut *self.state.lock().expect("not poisoned"),
            State::Stopped,
        );
        if let State::Running(handle) = previous {
            let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
            handle.kill();
        }
        self.stopped.send_replace(true);
        self.stop.send_replace(true);
    }
}

/// Stops the running worker gracefully, if this caller is the first to take it, and says so
/// (also when dropped half-way: the worker is then aborted with its handle); otherwise waits
/// until whoever took it has.
async fn stop_gracefully(state: &Mutex<State>, stopped: &Arc<tokio::sync::watch::Sender<bool>>) {
    struct SayStopped<'a>(&'a tokio::sync::watch::Sender<bool>);
    impl Drop for SayStopped<'_> {
        fn drop(&mut self) {
            self.0.send_replace(true);
        }
    }
    let taken = std::mem::replace(&mut *state.lock().expect("not poisoned"), State::Stopped);
    match taken {
        State::Running(handle) => {
            let _say = SayStopped(stopped);
            handle.shutdown().await;
        }
        State::Building(_) => {
            stopped.send_replace(true);
        }
        State::Stopped => {
            let _ = stopped.subscribe().wait_for(|done| *done).await;
        }
    }
}

/// The answer of one attempt, as the worker takes it.
type Answer = Result<Option<pb::Payload>, ActivityError>;

/// How an activity type's attempts run (see `register_activity`).
enum Dispatch {
    /// A coroutine function, run as a task of the loop.
    OnLoop(Py<PyAny>),
    /// A plain function, submitted to a `concurrent.futures` executor.
    OnExecutor { run: Py<PyAny>, executor: Py<PyAny> },
}

/// One attempt, handed to the loop's thread to start.
struct ActivityStart {
    ctx: ActivityContext,
    input: Option<pb::Payload>,
    dispatch: Arc<Dispatch>,
    task: Arc<Mutex<Option<Py<PyAny>>>>,
    answer: tokio::sync::oneshot::Sender<Answer>,
}

impl ActivityStart {
    /// On the loop's thread: runs the dispatcher as a task of the loop, or submits it to its
    /// executor; either future answers when it ends (see `AnswerWhenDone`).
    fn start(self, py: Python<'_>) {
        static ENSURE_FUTURE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
        static COPY_CONTEXT: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
        let answer = AnswerWhenDone {
            answer: Mutex::new(Some(self.answer)),
        };
        let pyctx = PyActivityContext {
            ctx: self.ctx,
            task: self.task,
        };
        let (data, encoding) = match &self.input {
            Some(p) => (
                Some(PyBytes::new(py, &p.data)),
                tether_sdk::codec::encoding_of(p),
            ),
            None => (None, String::new()),
        };
        let task = match &*self.dispatch {
            Dispatch::OnLoop(dispatch) => dispatch
                .bind(py)
                .call1((pyctx, data, encoding))
                .and_then(|coroutine| {
                    ENSURE_FUTURE
                        .import(py, "asyncio", "ensure_future")?
                        .call1((coroutine,))
                }),
            // Each attempt in a context of its own, as a task would have (what it sets stays
            // its own), copied from the loop's as `run_in_executor` callers do.
            Dispatch::OnExecutor { run, executor } => COPY_CONTEXT
                .import(py, "contextvars", "copy_context")
                .and_then(|copy| copy.call0())
                .and_then(|context| {
                    executor.bind(py).call_method1(
                        pyo3::intern!(py, "submit"),
                        (
                            context.getattr(pyo3::intern!(py, "run"))?,
                            run,
                            pyctx,
                            data,
                            encoding,
                        ),
                    )
                }),
        };
        match task {
            Ok(task) => {
                if let Err(e) = task.call_method1(pyo3::intern!(py, "add_done_callback"), (answer,))
                {
                    // Not reached with asyncio's tasks; the attempt then fails and is retried.
                    tracing::error!(error = %e, "could not follow the Python activity's task");
                }
            }
            Err(e) => answer.send(Err(python_failure(e))),
        }
    }
}

/// The done callback of an attempt's future (an asyncio task, run on the loop; or an executor's
/// future, run on the thread that finished it): sends its answer to the worker.
#[pyclass(frozen)]
struct AnswerWhenDone {
    answer: Mutex<Option<tokio::sync::oneshot::Sender<Answer>>>,
}

impl AnswerWhenDone {
    fn send(&self, answer: Answer) {
        if let Some(tx) = self.answer.lock().expect("not poisoned").take() {
            // The attempt may be gone (its worker killed): nobody waits for the answer.
            let _ = tx.send(answer);
        }
    }
}

#[pymethods]
impl AnswerWhenDone {
    fn __call__(&self, py: Python<'_>, task: &Bound<'_, PyAny>) {
        let cancelled = task
            .call_method0(pyo3::intern!(py, "cancelled"))
            .and_then(|c| c.is_truthy());
        let answer = if matches!(cancelled, Ok(true)) {
            // Cancelled before the dispatcher's first step (which would have caught it).
            Err(ActivityError::Cancelled)
        } else {
            match task.call_method0(pyo3::intern!(py, "result")) {
                Ok(answer) => read_answer(&answer),
                Err(e) => Err(python_failure(e)),
            }
        };
        self.send(answer);
    }
}

/// On the loop's thread: cancels the attempt's asyncio task, if it has one (an `async def`
/// activity that started).
fn cancel_task(py: Python<'_>, task: &Mutex<Option<Py<PyAny>>>) {
    let task = task.lock().expect("not poisoned").take();
    if let Some(task) = task {
        if let Err(e) = task.bind(py).call_method0(pyo3::intern!(py, "cancel")) {
            tracing::warn!(error = %e, "could not cancel the Python activity's task");
        }
    }
}

/// What the dispatcher answered, as the worker's outcome of the attempt.
fn read_answer(answer: &Bound<'_, PyAny>) -> Answer {
    let parsed = || -> PyResult<Result<Option<pb::Payload>, ActivityError>> {
        let answer = answer.cast::<PyTuple>()?;
        let kind: String = answer.get_item(0)?.extract()?;
        Ok(match kind.as_str() {
            "ok" => {
                let data: Option<Vec<u8>> = answer.get_item(1)?.extract()?;
                let encoding: String = answer.get_item(2)?.extract()?;
                Ok(convert::payload(data, &encoding))
            }
            "error" => {
                let message: String = answer.get_item(1)?.extract()?;
                let error_type: String = answer.get_item(2)?.extract()?;
                let non_retryable: bool = answer.get_item(3)?.extract()?;
                let e = if non_retryable {
                    ActivityError::non_retryable(message)
                } else {
                    ActivityError::retryable(message)
                };
                Err(if error_type.is_empty() {
                    e
                } else {
                    e.with_type(error_type)
                })
            }
            "cancelled" => Err(ActivityError::Cancelled),
            other => Err(ActivityError::non_retryable(format!(
                "the Python dispatcher answered {other:?}"
            ))),
        })
    };
    parsed().unwrap_or_else(|e| Err(python_failure(e)))
}

/// A Python exception outside the activity's own code (the dispatcher's): retried.
fn python_failure(e: PyErr) -> ActivityError {
    ActivityError::retryable(format!("the Python worker failed: {e}")).with_type("PythonError")
}

/// What an activity attempt sees of itself: info, heartbeats, cancellation, its session.
#[pyclass(name = "ActivityContext", module = "tether._core", frozen)]
pub(crate) struct PyActivityContext {
    ctx: ActivityContext,
    /// The asyncio task running an `async def` activity (see `set_task`), to cancel it.
    task: Arc<Mutex<Option<Py<PyAny>>>>,
}

#[pymethods]
impl PyActivityContext {
    /// Facts about this attempt.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.ctx.info();
        let d = PyDict::new(py);
        d.set_item("namespace", i.namespace.to_string())?;
        d.set_item("activity_id", i.activity_id.to_string())?;
        d.set_item("activity_type", &i.activity_type)?;
        d.set_item("attempt", i.attempt)?;
        d.set_item("workflow_id", i.workflow_id.to_string())?;
        d.set_item("run_id", i.run_id.to_string())?;
        d.set_item("task_queue", i.task_queue.to_string())?;
        d.set_item(
            "heartbeat_timeout_s",
            i.heartbeat_timeout.map(|t| t.as_secs_f64()),
        )?;
        d.set_item("deadline_ms", i.deadline_ms)?;
        d.set_item("worker_identity", i.worker_identity.to_string())?;
        Ok(d)
    }

    /// Records progress (sent in the background, throttled).
    fn heartbeat(&self, data: Vec<u8>, encoding: &str) {
        if let Some(p) = convert::payload(Some(data), encoding) {
            self.ctx.heartbeat_payload(p);
        }
    }

    /// `(data, encoding)` of the previous attempt's last heartbeat, or None.
    fn heartbeat_details<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::payload_to_py(py, self.ctx.heartbeat_details_payload())
    }

    /// Whether the attempt was told to stop.
    fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    /// Why it was told to stop: "requested", "not_current", "worker_shutdown", or None.
    fn cancel_reason(&self) -> Option<&'static str> {
        self.ctx.cancel_reason().map(|r| match r {
            CancelReason::Requested => "requested",
            CancelReason::NotCurrent => "not_current",
            CancelReason::WorkerShutdown => "worker_shutdown",
        })
    }

    /// The asyncio task that runs this attempt's `async def` activity: cancelled when the
    /// attempt is told to stop. Answers whether it was told already (then nothing will cancel
    /// the task: the caller stops itself).
    fn set_task(&self, task: Py<PyAny>) -> bool {
        *self.task.lock().expect("not poisoned") = Some(task);
        // After the store: a cancellation that found no task is seen here.
        self.ctx.is_cancelled()
    }

    /// An awaitable that ends when the attempt is told to stop.
    fn cancelled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ctx = self.ctx.clone();
        bridge::future(py, async move {
            ctx.cancelled().await;
            Ok(())
        })
    }

    /// The session it runs in (worker, host, reserved GPUs and resources), or None.
    fn session<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.ctx
            .session()
            .map(|s| convert::session_to_py(py, s))
            .transpose()
    }

    /// `CUDA_VISIBLE_DEVICES` for the session's GPUs ("2,3"); None outside a session.
    fn cuda_visible_devices(&self) -> Option<String> {
        self.ctx.cuda_visible_devices()
    }

    /// A credential declared on this worker, read here (it never travels to the server).
    fn credential(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        self.ctx.credential(name).map_err(|e| {
            let f = e.to_failure();
            convert::tether_exception(
                py,
                "ApplicationError",
                (f.message, f.error_type, f.non_retryable),
            )
        })
    }

    /// Sets a label on this worker; it is advertised at once.
    fn set_label(&self, key: String, value: String) {
        self.ctx.set_label(key, value);
    }

    /// Removes a label from this worker.
    fn remove_label(&self, key: &str) {
        self.ctx.remove_label(key);
    }
}
