"""What activity code uses: the `defn` decorator, and, while an attempt runs, its context.

Inside an activity (``async def`` or plain ``def``, which runs on a thread of the worker's
pool), call the functions of this module: ``activity.info()``, ``activity.heartbeat(...)``,
``activity.heartbeat_details()``, ``activity.is_cancelled()``, ``activity.session()``,
``activity.cuda_visible_devices()``, ``activity.credential(name)``, ``activity.set_label(k, v)``.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, overload

from . import converter
from .client import SessionInfo

F = TypeVar("F", bound=Callable[..., Any])

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("tether_activity")


@overload
def defn(fn: F) -> F: ...
@overload
def defn(*, name: Optional[str] = None) -> Callable[[F], F]: ...
def defn(fn: Optional[F] = None, *, name: Optional[str] = None) -> Any:
    """Marks a function as an activity, registered under `name` (default: its ``__name__``)."""

    def mark(f: F) -> F:
        setattr(f, "__tether_activity_name__", name or f.__name__)
        return f

    return mark(fn) if fn is not None else mark


def name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__tether_activity_name__", None) or fn.__name__


@dataclass(frozen=True)
class Info:
    """Facts about the running attempt."""

    activity_id: str
    activity_type: str
    attempt: int
    namespace: str
    workflow_id: str
    run_id: str
    task_queue: str
    worker_identity: str
    heartbeat_timeout: Optional[float]
    deadline_ms: int


def _ctx() -> Any:
    ctx = _current.get(None)
    if ctx is None:
        raise RuntimeError("not inside a tether activity: this is only available while an activity runs")
    return ctx


def info() -> Info:
    d = _ctx().info()
    return Info(
        activity_id=d["activity_id"],
        activity_type=d["activity_type"],
        attempt=d["attempt"],
        namespace=d["namespace"],
        workflow_id=d["workflow_id"],
        run_id=d["run_id"],
        task_queue=d["task_queue"],
        worker_identity=d["worker_identity"],
        heartbeat_timeout=d["heartbeat_timeout_s"],
        deadline_ms=d["deadline_ms"],
    )


def heartbeat(details: Any = None) -> None:
    """Records progress; the server keeps the latest `details` for the next attempt. Sent in
    the background, throttled: call it as often as you like."""
    data, encoding = converter.encode(details)
    _ctx().heartbeat(data, encoding)


def heartbeat_details() -> Any:
    """The details of the previous attempt's last heartbeat (None on a first attempt)."""
    return converter.decode(_ctx().heartbeat_details())


def is_cancelled() -> bool:
    """Whether this attempt was told to stop (cancelled, timed out, worker shutting down).
    An ``async def`` activity is also interrupted with asyncio.CancelledError."""
    return bool(_ctx().is_cancelled())


def cancel_reason() -> Optional[str]:
    """"requested", "not_current", "worker_shutdown", or None."""
    return _ctx().cancel_reason()


def session() -> Optional[SessionInfo]:
    """The session this attempt runs in (worker, host, reserved GPUs and resources)."""
    d = _ctx().session()
    return SessionInfo.from_core(d) if d is not None else None


def cuda_visible_devices() -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for the session's reserved GPUs ("2,3"); None outside a session.
    Give it to child processes; the worker does not change its own environment."""
    return _ctx().cuda_visible_devices()


def credential(name: str) -> str:
    """A credential declared on this worker (environment variable or file), read here; it
    never travels to the server. Raises a non-retryable ApplicationError when it is missing."""
    return _ctx().credential(name)


def set_label(key: str, value: str) -> None:
    """Sets a label on this worker (e.g. ``model_loaded=llama-70b``), advertised at once."""
    _ctx().set_label(key, value)


def remove_label(key: str) -> None:
    _ctx().remove_label(key)
