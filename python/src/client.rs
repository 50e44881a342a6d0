//! The client: connect, workflows, standalone activities and sessions, each call an asyncio
//! awaitable over the Rust SDK's `Client`.

use crate::bridge::{self, later};
use crate::convert::{self, invalid};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether_sdk::client::{
    ActivityOptions, Client, ClientOptions, RetryPolicy, Session, SessionOptions,
    StandaloneActivityOptions, WorkflowOptions,
};
use tether_sdk::codec::{AesGcmCodec, DataConverter};

/// Connects to a server (or to the replicas of a cluster: several addresses, comma-separated).
#[pyfunction]
#[pyo3(signature = (address, namespace="default", identity=None, tls_ca=None, tls_cert=None,
                    tls_key=None, tls_server_name=None, keys=None, retry_for_s=30.0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect<'py>(
    py: Python<'py>,
    address: String,
    namespace: &str,
    identity: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_server_name: Option<String>,
    keys: Option<PathBuf>,
    retry_for_s: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let mut options = ClientOptions {
        namespace: namespace.to_string(),
        retry_for: seconds("retry_for_s", retry_for_s)?,
        ..ClientOptions::default()
    };
    if let Some(identity) = identity {
        options.identity = identity;
    }
    if tls_ca.is_some() || tls_cert.is_some() || tls_key.is_some() {
        tether_sdk::tls::install_crypto_provider();
        options.tls = Some(
            tether_sdk::tls::ClientTls::from_files(
                tls_ca.as_deref(),
                tls_cert.as_deref(),
                tls_key.as_deref(),
                tls_server_name,
            )
            .map_err(invalid)?,
        );
    }
    if let Some(keys) = keys {
        let codec = AesGcmCodec::from_file(&keys).map_err(invalid)?;
        options.data_converter = DataConverter::default().with_codec(std::sync::Arc::new(codec));
    }
    bridge::future(py, async move {
        let client = Client::connect_with(address, options).await?;
        Ok(PyClient { client })
    })
}

/// A connection to the server, in one namespace.
#[pyclass(name = "Client", module = "tether._core", frozen)]
pub(crate) struct PyClient {
    pub(crate) client: Client,
}

#[pymethods]
impl PyClient {
    /// The namespace every call works in.
    #[getter]
    fn namespace(&self) -> String {
        self.client.namespace().to_string()
    }

    /// The address (or addresses) connected to.
    #[getter]
    fn address(&self) -> String {
        self.client.address().to_string()
    }

    /// Starts a workflow; answers its run id.
    #[pyo3(signature = (workflow_type, data, encoding, workflow_id, task_queue,
                        run_timeout_s=None, task_timeout_s=None))]
    #[allow(clippy::too_many_arguments)]
    fn start_workflow<'py>(
        &self,
        py: Python<'py>,
        workflow_type: String,
        data: Option<Vec<u8>>,
        encoding: &str,
        workflow_id: String,
        task_queue: String,
        run_timeout_s: Option<f64>,
        task_timeout_s: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = WorkflowOptions::new(workflow_id, task_queue);
        options.run_timeout = run_timeout_s
            .map(|s| seconds("run_timeout_s", s))
            .transpose()?;
        options.task_timeout = task_timeout_s
            .map(|s| seconds("task_timeout_s", s))
            .transpose()?;
        let input = convert::payload(data, encoding);
        let client = self.client.clone();
        bridge::future(py, async move {
            let handle = client
                .start_workflow_raw(&workflow_type, input, options)
                .await?;
            Ok(handle.run_id.to_string())
        })
    }

    /// Waits for a workflow run (`activity` false) or a standalone activity to close: its
    /// outcome (see `convert::outcome_to_py`).
    #[pyo3(signature = (activity, id, run_id=""))]
    fn outcome<'py>(
        &self,
        py: Python<'py>,
        activity: bool,
        id: &str,
        run_id: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        let (id, run_id) = (id.to_string(), run_id.to_string());
        bridge::future(py, async move {
            let outcome = if activity {
                client.activity_handle(&id, &run_id).outcome().await
            } else {
                client.workflow_handle(&id, &run_id).outcome().await
            }?;
            Ok(later(move |py| convert::outcome_to_py(py, &outcome)))
        })
    }

    /// Sends a signal to a workflow run.
    #[pyo3(signature = (workflow_id, run_id, signal_name, data, encoding))]
    fn signal_workflow<'py>(
        &self,
        py: Python<'py>,
        workflow_id: &str,
        run_id: &str,
        signal_name: String,
        data: Option<Vec<u8>>,
        encoding: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.client.workflow_handle(workflow_id, run_id);
        let input = convert::payload(data, encoding);
        bridge::future(py, async move {
            Ok(handle.signal_raw(&signal_name, input).await?)
        })
    }

    /// Asks a workflow run to cancel (it sees the request and may clean up), or, with
    /// `terminate`, ends it at once.
    fn end_workflow<'py>(
        &self,
        py: Python<'py>,
        workflow_id: &str,
        run_id: &str,
        terminate: bool,
        reason: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.client.workflow_handle(workflow_id, run_id);
        bridge::future(py, async move {
            let ended = if terminate {
                handle.terminate(&reason).await
            } else {
                handle.cancel(&reason).await
            };
            Ok(ended?)
        })
    }

    /// A workflow run's state: status, type, queue, times, pending work.
    fn describe_workflow<'py>(
        &self,
        py: Python<'py>,
        workflow_id: &str,
        run_id: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.client.workflow_handle(workflow_id, run_id);
        bridge::future(py, async move {
            let d = handle.describe().await?;
            Ok(later(move |py| {
                let out = PyDict::new(py);
                let info = d.info.unwrap_or_default();
                let status =
                    tether_wire::pb::ExecutionStatus::try_from(info.status).unwrap_or_default();
                out.set_item("workflow_id", info.workflow_id)?;
                out.set_item("run_id", info.run_id)?;
                out.set_item("workflow_type", info.workflow_type)?;
                out.set_item("task_queue", info.task_queue)?;
                out.set_item("status", status.short_name())?;
                out.set_item("start_ms", info.start_ms)?;
                out.set_item("close_ms", info.close_ms)?;
                out.set_item("history_length", info.history_length)?;
                out.set_item("pending_activities", d.pending_activities.len())?;
                out.set_item("pending_timers", d.pending_timers)?;
                match &d.last_workflow_task_failure {
                    Some(f) => {
                        let failure = PyDict::new(py);
                        failure.set_item("cause", &f.cause)?;
                        failure.set_item("message", &f.message)?;
                        failure.set_item("attempt", f.attempt)?;
                        out.set_item("task_failure", failure)?;
                    }
                    None => out.set_item("task_failure", py.None())?,
                }
                Ok(out.into_any())
            }))
        })
    }

    /// Starts a standalone activity and, with `wait`, waits for it: `(run_id, placement_note,
    /// outcome or None)`; the note says why no live worker can take it now ("" when one can).
    #[pyo3(signature = (activity_type, data, encoding, activity_id, task_queue, options, wait))]
    #[allow(clippy::too_many_arguments)]
    fn start_activity<'py>(
        &self,
        py: Python<'py>,
        activity_type: String,
        data: Option<Vec<u8>>,
        encoding: &str,
        activity_id: String,
        task_queue: String,
        options: Option<&Bound<'py, PyDict>>,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut o = StandaloneActivityOptions::new(activity_id, task_queue);
        o.options = activity_options(options)?;
        let input = convert::payload(data, encoding);
        let client = self.client.clone();
        bridge::future(py, async move {
            let (handle, outcome) = if wait {
                let (handle, outcome) = client
                    .execute_activity_raw(&activity_type, input, o)
                    .await?;
                (handle, Some(outcome))
            } else {
                let handle = client.start_activity_raw(&activity_type, input, o).await?;
                (handle, None)
            };
            Ok(later(move |py| {
                let outcome = outcome
                    .map(|o| convert::outcome_to_py(py, &o))
                    .transpose()?;
                (handle.run_id.to_string(), handle.placement_note, outcome)
                    .into_pyobject(py)
                    .map(Bound::into_any)
            }))
        })
    }

    /// Asks a standalone activity to cancel.
    fn cancel_activity<'py>(
        &self,
        py: Python<'py>,
        activity_id: &str,
        run_id: &str,
        reason: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.client.activity_handle(activity_id, run_id);
        bridge::future(py, async move { Ok(handle.cancel(&reason).await?) })
    }

    /// Creates a session and waits for the server to place it.
    #[pyo3(signature = (task_queue, gpus=0, requirements="", resources=None, packing="",
                        creation_timeout_s=None, idle_timeout_s=None, worker=None,
                        liveness_timeout_s=None))]
    #[allow(clippy::too_many_arguments)]
    fn create_session<'py>(
        &self,
        py: Python<'py>,
        task_queue: String,
        gpus: u32,
        requirements: &str,
        resources: Option<BTreeMap<String, u64>>,
        packing: &str,
        creation_timeout_s: Option<f64>,
        idle_timeout_s: Option<f64>,
        worker: Option<String>,
        liveness_timeout_s: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut o = SessionOptions::new(task_queue);
        o.liveness_timeout = liveness_timeout_s
            .map(|s| seconds("liveness_timeout_s", s))
            .transpose()?;
        o.gpus = gpus;
        o.requirements = parse_requirements(requirements)?;
        o.resources = resources.unwrap_or_default();
        o.packing = packing.to_string();
        o.creation_timeout = creation_timeout_s
            .map(|s| seconds("creation_timeout_s", s))
            .transpose()?;
        o.idle_timeout = idle_timeout_s
            .map(|s| seconds("idle_timeout_s", s))
            .transpose()?;
        o.worker = worker;
        let client = self.client.clone();
        bridge::future(py, async move {
            let session = client.create_session(o).await?;
            Ok(PySession {
                session: Arc::new(session),
            })
        })
    }
}

/// An open session a client owns.
#[pyclass(name = "Session", module = "tether._core", frozen)]
pub(crate) struct PySession {
    /// Shared with each call's future, which a deep copy of the session (its info's strings,
    /// GPUs and resources) would cost at every activity.
    session: Arc<Session>,
}

#[pymethods]
impl PySession {
    /// What the server placed: worker, host, reserved GPUs and resources.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::session_to_py(py, &self.session.info)
    }

    /// Runs an activity on the session's worker and waits for it: its outcome.
    #[pyo3(signature = (activity_type, data, encoding, options=None))]
    fn execute_activity<'py>(
        &self,
        py: Python<'py>,
        activity_type: String,
        data: Option<Vec<u8>>,
        encoding: &str,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = activity_options(options)?;
        let input = convert::payload(data, encoding);
        let session = self.session.clone();
        bridge::future(py, async move {
            let outcome = session
                .execute_activity_raw(&activity_type, input, options)
                .await?;
            Ok(later(move |py| convert::outcome_to_py(py, &outcome)))
        })
    }

    /// Ends the session and releases its reservation; answers its final state.
    fn complete<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let session = self.session.clone();
        bridge::future(py, async move {
            let info = session.complete().await?;
            Ok(later(move |py| {
                Ok(convert::session_to_py(py, &info)?.into_any())
            }))
        })
    }
}

/// A duration in seconds from Python, refused when negative or not a number.
pub(crate) fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| invalid(format!("{name} must be a number of seconds >= 0, not {s}")))
}

fn parse_requirements(text: &str) -> PyResult<tether_sdk::caps::Requirements> {
    tether_sdk::caps::Requirements::parse(text)
        .map_err(|e| invalid(format!("requirements {text:?}: {e}")))
}

/// Activity options from the dict the Python side builds (see `tether/_options.py`): every key
/// is optional, and a key this does not know is refused, not ignored.
pub(crate) fn activity_options(dict: Option<&Bound<'_, PyDict>>) -> PyResult<ActivityOptions> {
    let mut o = ActivityOptions::default();
    let Some(dict) = dict else { return Ok(o) };
    let mut retry = RetryPolicy::default();
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        let secs = |v: &Bound<'_, PyAny>| -> PyResult<Duration> { seconds(&key, v.extract()?) };
        match key.as_str() {
            "task_queue" => o.task_queue = value.extract()?,
            "start_to_close_s" => o.start_to_close = Some(secs(&value)?),
            "schedule_to_close_s" => o.schedule_to_close = Some(secs(&value)?),
            "schedule_to_start_s" => o.schedule_to_start = Some(secs(&value)?),
            "heartbeat_s" => o.heartbeat = Some(secs(&value)?),
            "requirements" => o.requirements = parse_requirements(&value.extract::<String>()?)?,
            "worker" => o.worker = Some(value.extract()?),
            "retry_initial_s" => retry.initial_interval = secs(&value)?,
            "retry_backoff" => retry.backoff_coefficient = value.extract()?,
            "retry_max_interval_s" => retry.maximum_interval = Some(secs(&value)?),
            "retry_max_attempts" => retry.maximum_attempts = value.extract()?,
            "non_retryable_types" => retry.non_retryable_error_types = value.extract()?,
            "session_id" => o.session_id = Some(value.extract()?),
            other => return Err(invalid(format!("unknown activity option {other:?}"))),
        }
    }
    o.retry = retry;
    Ok(o)
}

/// Session options from the dict a Python workflow builds (`tether/workflow.py`); unknown keys
/// are refused.
pub(crate) fn session_options(dict: &Bound<'_, PyDict>) -> PyResult<SessionOptions> {
    let mut o = SessionOptions::default();
    for (key, value) in dict.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        let secs = |v: &Bound<'_, PyAny>| -> PyResult<Duration> { seconds(&key, v.extract()?) };
        match key.as_str() {
            "task_queue" => o.task_queue = value.extract()?,
            "gpus" => o.gpus = value.extract()?,
            "requirements" => o.requirements = parse_requirements(&value.extract::<String>()?)?,
            "resources" => o.resources = value.extract()?,
            "packing" => o.packing = value.extract()?,
            "worker" => o.worker = Some(value.extract()?),
            "creation_timeout_s" => o.creation_timeout = Some(secs(&value)?),
            "execution_timeout_s" => o.execution_timeout = Some(secs(&value)?),
            "liveness_timeout_s" => o.liveness_timeout = Some(secs(&value)?),
            "idle_timeout_s" => o.idle_timeout = Some(secs(&value)?),
            other => return Err(invalid(format!("unknown session option {other:?}"))),
        }
    }
    Ok(o)
}
