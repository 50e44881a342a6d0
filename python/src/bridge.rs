//! Crossings between tokio and an asyncio loop, batched, with the interpreter touched only on
//! the loop's own thread.
//!
//! Each loop that calls into the core gets a [`LoopQueue`]: tokio's side pushes closures onto
//! it and, when it was idle, writes one byte to a socket the loop watches (`add_reader`); the
//! loop then runs every closure pushed since, on its thread, holding the interpreter as it
//! does anyway. So a completion costs tokio's thread no GIL (which the busy loop holds, and
//! would make it wait), and a burst of completions costs the loop one wake-up, not one each.
//! It also means no tokio thread is ever inside the interpreter as it finalizes, after the
//! loop has gone: what it sends then is never run.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;
use std::cell::RefCell;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tether_sdk::client::ClientError;

/// Work for the loop's thread.
pub(crate) type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// What tokio's side hands one asyncio loop.
pub(crate) struct LoopQueue {
    jobs: Mutex<Vec<Job>>,
    /// A wake-up byte is on its way and the loop has not yet taken the jobs.
    armed: AtomicBool,
    wake: UnixStream,
    /// The loop's end. Kept open as long as anyone may push, so a write never meets a closed
    /// peer (no SIGPIPE, whatever the program did with that signal).
    woken: UnixStream,
}

impl LoopQueue {
    fn new() -> std::io::Result<Self> {
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        Ok(LoopQueue {
            jobs: Mutex::new(Vec::new()),
            armed: AtomicBool::new(false),
            wake,
            woken,
        })
    }

    /// Has `job` run on the loop's thread soon. Never blocks and never takes the GIL.
    pub(crate) fn push(&self, job: Job) {
        self.jobs.lock().expect("not poisoned").push(job);
        // After the push: a loop that cleared `armed` before this swap takes the job (it
        // takes the jobs after clearing), or is woken by this byte.
        if !self.armed.swap(true, Ordering::AcqRel) {
            // WouldBlock means bytes are waiting unread: the loop is woken already. A loop
            // that is gone reads nothing, and there is nobody left to tell.
            let _ = (&self.wake).write(&[1]);
        }
    }

    /// Runs on the loop's thread when the socket is readable: every job pushed so far.
    fn run_jobs(&self, py: Python<'_>) {
        let mut buf = [0u8; 256];
        loop {
            match (&self.woken).read(&mut buf) {
                Ok(n) if n == buf.len() => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        self.armed.store(false, Ordering::Release);
        let jobs = std::mem::take(&mut *self.jobs.lock().expect("not poisoned"));
        for job in jobs {
            // One job's panic must not lose the others (their awaiters would wait forever).
            if std::panic::catch_unwind(AssertUnwindSafe(|| job(py))).is_err() {
                tracing::error!("a completion panicked on the asyncio loop's thread");
            }
        }
    }
}

/// What `add_reader` calls.
#[pyclass(frozen)]
struct RunJobs {
    queue: Arc<LoopQueue>,
}

#[pymethods]
impl RunJobs {
    fn __call__(&self, py: Python<'_>) {
        self.queue.run_jobs(py);
    }
}

thread_local! {
    /// The loop last seen running on this thread and its queue: one loop runs per thread at
    /// a time, so one entry serves every call until another loop runs here.
    static LAST_LOOP: RefCell<Option<(Py<PyAny>, Arc<LoopQueue>)>> = const { RefCell::new(None) };
}

/// The running asyncio loop of this thread, and its queue (made and watched the first time).
pub(crate) fn running_loop<'py>(py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Arc<LoopQueue>)> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let event_loop = GET_RUNNING_LOOP
        .import(py, "asyncio", "get_running_loop")?
        .call0()?;
    let known = LAST_LOOP.with_borrow(|last| match last {
        Some((l, queue)) if l.bind(py).is(&event_loop) => Some(queue.clone()),
        _ => None,
    });
    if let Some(queue) = known {
        return Ok((event_loop, queue));
    }
    let queue = Arc::new(LoopQueue::new().map_err(|e| {
        PyRuntimeError::new_err(format!(
            "could not make the socket pair tether's core wakes the asyncio loop with: {e}"
        ))
    })?);
    event_loop.call_method1(
        pyo3::intern!(py, "add_reader"),
        (
            queue.woken.as_raw_fd(),
            RunJobs {
                queue: queue.clone(),
            },
        ),
    )?;
    LAST_LOOP.with_borrow_mut(|last| *last = Some((event_loop.clone().unbind(), queue.clone())));
    Ok((event_loop, queue))
}

/// A call's failure, made into the Python exception on the loop's thread (making one needs
/// the interpreter).
pub(crate) enum Failure {
    Python(PyErr),
    Client(ClientError),
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Python(e)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl Failure {
    fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Python(e) => e,
            Failure::Client(e) => crate::convert::client_error(py, e),
        }
    }
}

/// A value made into its Python object on the loop's thread, by `make`.
pub(crate) struct Later<F>(F);

/// [`Later`] for a closure (this form lets the closure take any `Python<'py>`).
pub(crate) fn later<F>(make: F) -> Later<F>
where
    F: for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>>,
{
    Later(make)
}

impl<'py, F> IntoPyObject<'py> for Later<F>
where
    F: FnOnce(Python<'py>) -> PyResult<Bound<'py, PyAny>>,
{
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        (self.0)(py)
    }
}

/// Runs `fut` on tokio and answers an asyncio future of the running loop that it settles.
/// Cancelling that future drops `fut`.
pub(crate) fn future<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, Failure>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    use futures::FutureExt;
    let (event_loop, queue) = running_loop(py)?;
    let py_future = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
    let target = py_future.clone().unbind();
    let task = pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        let outcome = AssertUnwindSafe(fut).catch_unwind().await;
        queue.push(Box::new(move |py| {
            let outcome = match outcome {
                Ok(Ok(value)) => value.into_py_any(py),
                Ok(Err(failure)) => Err(failure.into_pyerr(py)),
                Err(panic) => Err(PyRuntimeError::new_err(format!(
                    "tether's core panicked: {}",
                    panic_message(&*panic)
                ))),
            };
            settle(py, target.bind(py), outcome);
        }));
    });
    py_future.call_method1(
        pyo3::intern!(py, "add_done_callback"),
        (AbortWhenDone {
            task: task.abort_handle(),
        },),
    )?;
    Ok(py_future)
}

/// Sets an asyncio future's outcome unless it is done already (cancelled by its awaiter).
fn settle(py: Python<'_>, target: &Bound<'_, PyAny>, outcome: PyResult<Py<PyAny>>) {
    let done = target
        .call_method0(pyo3::intern!(py, "done"))
        .and_then(|d| d.is_truthy());
    if !matches!(done, Ok(false)) {
        return;
    }
    let set = match outcome {
        Ok(value) => target.call_method1(pyo3::intern!(py, "set_result"), (value,)),
        Err(e) => target.call_method1(pyo3::intern!(py, "set_exception"), (e.into_value(py),)),
    };
    if let Err(e) = set {
        e.print(py);
    }
}

/// An asyncio future's done callback: once it is done (settled, or cancelled by its awaiter),
/// the tokio task behind it has nothing left to do, so it is stopped.
#[pyclass(frozen)]
struct AbortWhenDone {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl AbortWhenDone {
    fn __call__(&self, _future: &Bound<'_, PyAny>) {
        self.task.abort();
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with no message")
}
