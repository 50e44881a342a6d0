//! Between the wire's types and Python's: payloads as (bytes, encoding), outcomes, failures
//! and sessions as dicts, and the SDK's errors as the exceptions of `tether.errors`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use tether_sdk::client::{code_name, ClientError};
use tether_sdk::codec;
use tether_wire::pb;

/// A payload the Python side encoded: `data` in `encoding` ("json/plain" or "binary/plain").
pub(crate) fn payload(data: Option<Vec<u8>>, encoding: &str) -> Option<pb::Payload> {
    let data = data?;
    Some(match encoding {
        "binary/plain" => codec::binary_payload(data),
        _ => codec::json_payload(data),
    })
}

/// `(data, encoding)` of a payload, `None` for none.
pub(crate) fn payload_to_py<'py>(
    py: Python<'py>,
    payload: Option<&pb::Payload>,
) -> PyResult<Bound<'py, PyAny>> {
    match payload {
        None => Ok(py.None().into_bound(py)),
        Some(p) => Ok((PyBytes::new(py, &p.data), codec::encoding_of(p))
            .into_pyobject(py)?
            .into_any()),
    }
}

/// A failure as a dict: message, type, non_retryable, kind, timeout_type, cause.
pub(crate) fn failure_to_py<'py>(
    py: Python<'py>,
    failure: &pb::Failure,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("message", &failure.message)?;
    d.set_item("type", &failure.error_type)?;
    d.set_item("non_retryable", failure.non_retryable)?;
    let kind = pb::FailureKind::try_from(failure.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("FAILURE_KIND_")
                .to_lowercase()
        })
        .unwrap_or_default();
    d.set_item("kind", kind)?;
    d.set_item("timeout_type", &failure.timeout_type)?;
    match &failure.cause {
        Some(cause) => d.set_item("cause", failure_to_py(py, cause)?)?,
        None => d.set_item("cause", py.None())?,
    }
    Ok(d)
}

/// How a workflow or activity ended: `{"status", "result": (data, encoding) | None,
/// "failure": dict | None}`.
pub(crate) fn outcome_to_py<'py>(
    py: Python<'py>,
    outcome: &pb::GetWorkflowResultResponse,
) -> PyResult<Bound<'py, PyAny>> {
    let d = PyDict::new(py);
    let status = pb::ExecutionStatus::try_from(outcome.status).unwrap_or_default();
    d.set_item("status", status.short_name())?;
    d.set_item("result", payload_to_py(py, outcome.result.as_ref())?)?;
    match &outcome.failure {
        Some(f) => d.set_item("failure", failure_to_py(py, f)?)?,
        None => d.set_item("failure", py.None())?,
    }
    Ok(d.into_any())
}

/// A session as a dict: id, state, worker, host, host queue, reserved GPUs and resources.
pub(crate) fn session_to_py<'py>(
    py: Python<'py>,
    info: &pb::SessionInfo,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("session_id", &info.session_id)?;
    d.set_item("namespace", &info.namespace)?;
    d.set_item("state", &info.state)?;
    d.set_item("worker_identity", &info.worker_identity)?;
    d.set_item("hostname", &info.hostname)?;
    d.set_item("host_queue", &info.host_queue)?;
    d.set_item("reason", &info.reason)?;
    d.set_item("owner", &info.owner)?;
    d.set_item("activities_run", info.activities_run)?;
    let gpus = PyList::empty(py);
    for g in &info.gpus {
        let gpu = PyDict::new(py);
        gpu.set_item("index", g.index)?;
        gpu.set_item("uuid", &g.uuid)?;
        gpu.set_item("model", &g.name)?;
        gpu.set_item("memory_total_bytes", g.memory_total_bytes)?;
        gpus.append(gpu)?;
    }
    d.set_item("gpus", gpus)?;
    let resources = PyDict::new(py);
    for (name, amount) in &info.resources {
        resources.set_item(name, amount)?;
    }
    d.set_item("resources", resources)?;
    Ok(d)
}

/// The exception of `tether.errors` named `class`, made with `args`.
pub(crate) fn tether_exception<'py>(
    py: Python<'py>,
    class: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyErr {
    let made = py
        .import("tether.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1(args));
    match made {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

/// A client call's failure as the exception Python code catches.
pub(crate) fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    match &e {
        ClientError::Connect { .. } => tether_exception(py, "ConnectError", (e.to_string(),)),
        ClientError::Rpc(status) => tether_exception(
            py,
            "RpcError",
            (
                status.message().to_string(),
                code_name(status.code()).to_string(),
            ),
        ),
        ClientError::AlreadyStarted { run_id, .. } => {
            tether_exception(py, "AlreadyStartedError", (e.to_string(), run_id.clone()))
        }
        ClientError::Failed { .. } | ClientError::Convert(_) => {
            tether_exception(py, "TetherError", (e.to_string(),))
        }
    }
}

/// Bad arguments from Python: a ValueError saying what was wrong.
pub(crate) fn invalid(what: impl std::fmt::Display) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(what.to_string())
}
