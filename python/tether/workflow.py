"""Workflows in Python, deterministic, on tether's Rust core.

    from tether import workflow

    @workflow.defn
    class Approval:
        def __init__(self) -> None:
            self.approved = False

        @workflow.signal
        def approve(self, by: str) -> None:
            self.approved = True

        async def run(self, order: dict) -> str:
            await workflow.execute_activity("reserve", order, start_to_close=30)
            await workflow.wait_condition(lambda: self.approved)
            await workflow.sleep(60)                       # a durable timer
            return await workflow.execute_activity("ship", order)

A run's code runs on an event loop of its own, driven by activations from the Rust worker:
the worker replays history into it, matches the commands it issues against history (a change
that breaks replay is reported as non-determinism, the task retried), caches the run and
completes its tasks. Inside: no real time, no I/O, no threads: ``time.time()``,
``time.sleep()``, ``asyncio.sleep()`` and ``open()`` raise RestrictedWorkflowError; use
``workflow.now()``, ``workflow.sleep()``, activities. ``asyncio.gather`` and tasks work.

An ``ApplicationError`` (or an activity's failure) that leaves ``run`` fails the run; any other
exception fails the workflow task, which is tried again (fix the code, deploy, and the run goes
on), as a panic does in a Rust workflow.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import datetime
import inspect
import random as _random
import threading
import time as _time
import uuid as _uuid
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, TypeVar

from . import converter
from ._options import Seconds, activity_options, seconds
from .client import SessionInfo
from .errors import ActivityFailureError, ApplicationError, TetherError

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class RestrictedWorkflowError(TetherError):
    """Workflow code called something that would make replay differ (real time, sleeping a
    thread, files): what to use instead is in the message."""


def defn(cls: Optional[C] = None, *, name: Optional[str] = None) -> Any:
    """Marks a class as a workflow, registered under `name` (default: the class name). It has
    an ``async def run(self[, arg])``; methods marked ``@workflow.signal`` receive signals."""

    def mark(c: C) -> C:
        if not inspect.iscoroutinefunction(getattr(c, "run", None)):
            raise TypeError(f"workflow {c.__name__} needs an `async def run(self, arg)` method")
        setattr(c, "__tether_workflow_name__", name or c.__name__)
        return c

    return mark(cls) if cls is not None else mark


def signal(fn: Optional[F] = None, *, name: Optional[str] = None) -> Any:
    """Marks a workflow method as the handler of signal `name` (default: the method's name)."""

    def mark(f: F) -> F:
        setattr(f, "__tether_signal_name__", name or f.__name__)
        return f

    return mark(fn) if fn is not None else mark


def name_of(cls: type) -> str:
    n = getattr(cls, "__tether_workflow_name__", None)
    if n is None:
        raise TypeError(f"{cls.__name__} is not a workflow: mark it with @workflow.defn")
    return n


@dataclass(frozen=True)
class Info:
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str


# The run being activated on this thread (activations run on the core's threads, one at a time
# per run; activities and clients on other threads are not affected by the guards below).
_local = threading.local()


def _run() -> "_Run":
    run = getattr(_local, "run", None)
    if run is None:
        raise RuntimeError("not inside a tether workflow: this is only available in workflow code")
    return run


def info() -> Info:
    return _run().info


def now() -> datetime.datetime:
    """The workflow's time: when the event being handled happened (the same on replay)."""
    return datetime.datetime.fromtimestamp(_run().now_ms / 1000, tz=datetime.timezone.utc)


def random() -> _random.Random:
    """A random generator seeded by the run: the same numbers on every replay."""
    return _run().random


def uuid4() -> _uuid.UUID:
    """A random UUID that replays the same."""
    return _uuid.UUID(int=_run().random.getrandbits(128), version=4)


async def execute_activity(activity: str, arg: Any = None, **options: Any) -> Any:
    """Schedules an activity (on the workflow's task queue unless ``task_queue=`` names
    another; the other options as for ``Client.execute_activity``) and waits for its result.
    Raises ActivityFailureError when it ends without one."""
    return await _schedule(activity, arg, activity_options(**options))


async def _schedule(activity: str, arg: Any, options: Dict[str, Any]) -> Any:
    run = _run()
    data, encoding = converter.encode(arg)
    seq = run.next_seq()
    future = run.loop.create_future()
    run.pending[seq] = (activity, future)
    run.commands.append(("activity", seq, activity, data, encoding, options))
    return await future


class SessionError(TetherError):
    """A session could not be created (no worker could host it within its creation timeout)."""


class WorkflowSession:
    """A session a workflow holds: its activities run on its worker only, seeing its
    reservation. It ends with the run, or at `complete()`."""

    def __init__(self, run: "_Run", info: SessionInfo, options: Dict[str, Any]) -> None:
        self._run = run
        self.info = info
        self.options = options

    @property
    def id(self) -> str:
        return self.info.session_id

    @property
    def state(self) -> Tuple[str, str]:
        """``("open", "")``, or ``("failed" | "timed_out", reason)`` once the server said so."""
        return self._run.ended_sessions.get(self.id, (self.info.state, ""))

    async def execute_activity(self, activity: str, arg: Any = None, **options: Any) -> Any:
        """Runs an activity in the session. If the session fails, it fails with type
        ``SessionFailed`` (and is not retried): recreate the session to go on."""
        o = activity_options(**options)
        o["session_id"] = self.id
        return await _schedule(activity, arg, o)

    def complete(self) -> None:
        """Ends the session and frees its reservation."""
        run = _run()
        run.commands.append(("complete_session", run.next_seq(), self.id))


async def create_session(
    *,
    task_queue: Optional[str] = None,
    gpus: int = 0,
    requirements: str = "",
    resources: Optional[Dict[str, int]] = None,
    packing: str = "",
    worker: Optional[str] = None,
    creation_timeout: Optional[Seconds] = None,
    execution_timeout: Optional[Seconds] = None,
    liveness_timeout: Optional[Seconds] = None,
    idle_timeout: Optional[Seconds] = None,
) -> WorkflowSession:
    """Asks the server to place a session (on the workflow's task queue unless named): one
    worker, `gpus` concrete GPUs and `resources` reserved; waits until it is placed. Raises
    SessionError when no worker can host it within `creation_timeout`."""
    return await _create_session(
        dict(
            task_queue=task_queue or _run().info.task_queue,
            gpus=gpus,
            requirements=requirements,
            resources=resources,
            packing=packing,
            worker=worker,
            creation_timeout_s=seconds("creation_timeout", creation_timeout),
            execution_timeout_s=seconds("execution_timeout", execution_timeout),
            liveness_timeout_s=seconds("liveness_timeout", liveness_timeout),
            idle_timeout_s=seconds("idle_timeout", idle_timeout),
        )
    )


SAME_HOST = "same_host"
SAME_HOST_OR_FAILOVER = "same_host_or_failover"


async def recreate_session(old: WorkflowSession, policy: str = SAME_HOST_OR_FAILOVER) -> WorkflowSession:
    """Creates a session like `old` again after it failed: on the same worker only
    (``SAME_HOST``, waiting for it to come back within the creation timeout), or on any worker
    that meets the same requirements (``SAME_HOST_OR_FAILOVER``)."""
    if policy not in (SAME_HOST, SAME_HOST_OR_FAILOVER):
        raise ValueError(f"policy must be {SAME_HOST!r} or {SAME_HOST_OR_FAILOVER!r}, not {policy!r}")
    options = dict(old.options)
    options["worker"] = old.info.worker_identity if policy == SAME_HOST else None
    return await _create_session(options)


async def _create_session(options: Dict[str, Any]) -> WorkflowSession:
    run = _run()
    seq = run.next_seq()
    # Derived from the run and seq, so a replay asks for the very same session.
    session_id = f"{run.info.run_id}-s{seq}"
    future = run.loop.create_future()
    run.pending[seq] = ("session", future)
    run.sessions_asked[seq] = options
    run.commands.append(("session", seq, session_id, options))
    return await future


def side_effect(fn: Callable[[], Any]) -> Any:
    """Runs `fn` once and records its result in history; on replay answers the recorded value
    without running it. For what must not change on replay (a config value read once, a name
    made from the clock): `fn` may read the time, the environment or a file."""
    run = _run()
    seq = run.next_seq()
    if seq in run.recorded_side_effects:
        value = converter.decode(run.recorded_side_effects.pop(seq))
    else:
        _local.run = None  # the guards are off for the side effect itself
        try:
            value = fn()
        finally:
            _local.run = run
    data, encoding = converter.encode(value)
    run.commands.append(("side_effect", seq, data, encoding))
    return value


async def sleep(duration: Seconds) -> None:
    """A durable timer: it fires even across worker and server restarts."""
    run = _run()
    ms = int(round(seconds("duration", duration) * 1000))  # type: ignore[operator]
    seq = run.next_seq()
    future = run.loop.create_future()
    run.pending[seq] = ("timer", future)
    run.commands.append(("timer", seq, ms))
    await future


async def wait_condition(condition: Callable[[], bool]) -> None:
    """Waits until `condition()` holds (checked after every event, e.g. a signal handler that
    changed the workflow's state)."""
    if condition():
        return
    run = _run()
    future = run.loop.create_future()
    run.conditions.append((condition, future))
    await future


class _Loop(asyncio.AbstractEventLoop):
    """A deterministic event loop: callbacks run in the order they were scheduled, nothing
    waits on real time, and it runs only while an activation is being handled."""

    def __init__(self, run: "_Run") -> None:
        self._ready: Deque[asyncio.Handle] = collections.deque()
        self._run = run
        self._unhandled: List[BaseException] = []

    def call_soon(self, callback, *args, context=None):  # type: ignore[override]
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback, *args, context=None):  # type: ignore[override]
        raise RestrictedWorkflowError("workflow code cannot be called from other threads")

    def call_later(self, delay, callback, *args, context=None):  # type: ignore[override]
        raise RestrictedWorkflowError(
            "asyncio.sleep and asyncio's timers would wait on real time: use `await workflow.sleep(seconds)`"
        )

    def call_at(self, when, callback, *args, context=None):  # type: ignore[override]
        return self.call_later(0, callback)

    def time(self) -> float:
        return self._run.now_ms / 1000

    def create_future(self) -> asyncio.Future:
        return asyncio.Future(loop=self)

    def create_task(self, coro, *, name=None, context=None):  # type: ignore[override]
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_exception_handler(self, context: Dict[str, Any]) -> None:
        exception = context.get("exception")
        if exception is not None:
            self._unhandled.append(exception)

    def run_ready(self) -> None:
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()
        finally:
            asyncio.events._set_running_loop(None)


class _Run:
    """One run of a workflow class, as the core drives it (see `python/src/workflow.rs`)."""

    def __init__(self, cls: type, info: Dict[str, Any]) -> None:
        self.cls = cls
        self.info = Info(**info)
        self.loop = _Loop(self)
        self.now_ms = 0
        self.seq = 0
        self.random = _random.Random(self.info.run_id)
        self.commands: List[Tuple[Any, ...]] = []
        self.pending: Dict[int, Tuple[str, asyncio.Future]] = {}
        self.conditions: List[Tuple[Callable[[], bool], asyncio.Future]] = []
        self.instance: Any = None
        self.main: Optional[asyncio.Task] = None
        self.finished = False
        self.cancel_requested = False
        self.signal_handlers: Dict[str, Callable[..., Any]] = {}
        self.sessions_asked: Dict[int, Dict[str, Any]] = {}
        self.recorded_side_effects: Dict[int, Any] = {}
        self.ended_sessions: Dict[str, Tuple[str, str]] = {}
        self.buffered_signals: List[Tuple[str, Any]] = []

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def recorded(self, side_effects: Dict[int, Any]) -> None:
        """Before a task's activations: the values its history recorded, by seq."""
        self.recorded_side_effects = dict(side_effects)

    def activate(self, events: List[Dict[str, Any]]) -> List[Tuple[Any, ...]]:
        _local.run = self
        try:
            # As for a Rust workflow: every event of the activation is applied, then the code
            # runs (so it sees, say, both an activity's failure and its session's end).
            for event in events:
                self.now_ms = max(self.now_ms, event["time_ms"])
                self._apply(event)
            self._step()
            if self.main is not None and self.main.done() and not self.finished:
                self.finished = True
                self.commands.append(self._terminal(self.main))
            if self.loop._unhandled:
                raise self.loop._unhandled[0]
            out, self.commands = self.commands, []
            return out
        finally:
            _local.run = None

    def _step(self) -> None:
        while True:
            self.loop.run_ready()
            met = [(c, f) for c, f in self.conditions if not f.done() and c()]
            if not met:
                return
            for c, f in met:
                f.set_result(None)
            self.conditions = [(c, f) for c, f in self.conditions if not f.done()]

    def _apply(self, event: Dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "started":
            self.instance = self.cls()
            for attr in dir(self.cls):
                handler = getattr(self.instance, attr, None)
                signal_name = getattr(handler, "__tether_signal_name__", None)
                if signal_name:
                    self.signal_handlers[signal_name] = handler
            arg = converter.decode(event["input"])
            params = [p for p in inspect.signature(self.instance.run).parameters.values()]
            coroutine = self.instance.run(arg) if params else self.instance.run()
            self.main = self.loop.create_task(coroutine)
            for name, value in self.buffered_signals:
                self._signal(name, value)
            self.buffered_signals.clear()
        elif kind == "activity_completed":
            _, future = self.pending.pop(event["seq"])
            future.set_result(converter.decode(event["result"]))
        elif kind == "activity_failed":
            activity, future = self.pending.pop(event["seq"])
            future.set_exception(
                ActivityFailureError("activity", f"{activity} (seq {event['seq']})", event["status"], event["failure"])
            )
        elif kind == "timer_fired":
            _, future = self.pending.pop(event["seq"])
            future.set_result(None)
        elif kind == "signal":
            value = converter.decode(event["input"])
            if self.instance is None:
                self.buffered_signals.append((event["name"], value))
            else:
                self._signal(event["name"], value)
        elif kind == "session_created":
            _, future = self.pending.pop(event["seq"])
            options = self.sessions_asked.pop(event["seq"])
            future.set_result(WorkflowSession(self, SessionInfo.from_core(event["session"]), options))
        elif kind == "session_create_failed":
            _, future = self.pending.pop(event["seq"])
            self.sessions_asked.pop(event["seq"], None)
            future.set_exception(SessionError(f"session {event['session_id']} could not be created: {event['reason']}"))
        elif kind == "session_ended":
            self.ended_sessions[event["session_id"]] = (event["state"], event["reason"])
        elif kind == "cancel_requested":
            self.cancel_requested = True
            if self.main is not None:
                self.main.cancel()

    def _signal(self, name: str, value: Any) -> None:
        handler = self.signal_handlers.get(name)
        if handler is None:
            return  # a signal nobody handles is dropped, as in a Rust workflow without its channel
        params = list(inspect.signature(handler).parameters.values())
        result = handler(value) if params else handler()
        if inspect.iscoroutine(result):
            self.loop.create_task(result)

    def _terminal(self, main: asyncio.Task) -> Tuple[Any, ...]:
        if main.cancelled():
            if self.cancel_requested:
                return ("cancel",)
            return ("fail", "the workflow's task was cancelled", "Cancelled", True)
        error = main.exception()
        if error is None:
            data, encoding = converter.encode(main.result())
            return ("complete", data, encoding)
        if isinstance(error, ApplicationError):
            return ("fail", error.message, error.type, error.non_retryable)
        if isinstance(error, (ActivityFailureError, SessionError)):
            return ("fail", str(error), getattr(error, "type", "") or type(error).__name__, False)
        # Anything else is a bug in the code: the task fails and is tried again.
        raise error


def factory(cls: type) -> Callable[[Dict[str, Any]], _Run]:
    return lambda info: _Run(cls, info)


# Guards: in workflow code (only on the thread of an activation), real time, sleeping and files
# are refused with what to use instead; everywhere else they are what they always were.
def _guard(original: Callable[..., Any], what: str, instead: str) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "run", None) is not None:
            raise RestrictedWorkflowError(f"{what} is not allowed in workflow code (replay would differ): {instead}")
        return original(*args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    guarded.__name__ = getattr(original, "__name__", what)
    return guarded


if not hasattr(_time.time, "__wrapped__"):
    _time.time = _guard(_time.time, "time.time()", "use workflow.now()")
    _time.time_ns = _guard(_time.time_ns, "time.time_ns()", "use workflow.now()")
    _time.sleep = _guard(_time.sleep, "time.sleep()", "use await workflow.sleep(seconds)")
    builtins.open = _guard(builtins.open, "open()", "do I/O in an activity")
