"""The worker: hosts Python activities and workflows on tether's Rust worker core."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import signal
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from . import _core, activity, converter, workflow
from ._options import Seconds, seconds
from .client import Client
from .errors import ApplicationError

Answer = Tuple[Any, ...]


class Worker:
    """Polls `task_queue` and runs the given activities and workflows (see tether.workflow).

    The Rust core does the polling, slots, heartbeats, batched reports and capability
    advertisement (GPUs through NVML, host facts, an `inventory` file's declared GPUs, labels,
    resources, credentials), exactly as for a Rust worker: the same identity rules and host
    queue. ``async def`` activities run on this event loop; plain ``def`` ones on a thread pool
    of `max_concurrent_activities` threads, so CPU and GPU code does not block the loop.

    Cancellation: an ``async def`` activity is interrupted with asyncio.CancelledError; a plain
    ``def`` one polls ``activity.is_cancelled()`` (its heartbeats bring the news) and returns
    or raises: whatever it raises once told to stop ends the attempt as cancelled.

    ``await worker.run()`` runs until cancelled, ``shutdown()`` is called, or (in the main
    thread) SIGINT/SIGTERM arrives; ``async with worker:`` runs it for the length of a block.
    """

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str,
        activities: Iterable[Callable[..., Any]] = (),
        workflows: Iterable[Any] = (),
        identity: Optional[str] = None,
        max_concurrent_activities: int = 100,
        max_concurrent_sessions: int = 10,
        graceful_shutdown: Seconds = 10.0,
        inventory: Optional[str] = None,
        labels: Optional[Dict[str, str]] = None,
        resources: Optional[Dict[str, int]] = None,
        state_dir: Optional[str] = None,
        activity_executor: Optional[concurrent.futures.Executor] = None,
    ) -> None:
        self._workflows: Dict[str, type] = {}
        for cls in workflows:
            name = workflow.name_of(cls)
            if name in self._workflows:
                raise ValueError(f"two workflows are registered as {name!r}")
            self._workflows[name] = cls
        self._activities: Dict[str, Callable[..., Any]] = {}
        for fn in activities:
            name = activity.name_of(fn)
            if name in self._activities:
                raise ValueError(f"two activities are registered as {name!r}")
            self._activities[name] = fn
        if not self._activities and not self._workflows:
            raise ValueError("a worker needs at least one activity or workflow (activities=[...], workflows=[...])")
        self._core = _core.Worker(
            client._core,
            task_queue,
            identity,
            max_concurrent_activities,
            max_concurrent_sessions,
            seconds("graceful_shutdown", graceful_shutdown),
            inventory,
            labels,
            resources,
            state_dir,
        )
        self._executor = activity_executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent_activities, thread_name_prefix="tether-activity"
        )
        for name, fn in self._activities.items():
            self._core.register_activity(name, *self._dispatcher(fn))
        for name, cls in self._workflows.items():
            self._core.register_workflow(name, workflow.factory(cls))
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def identity(self) -> Optional[str]:
        """The worker's identity once it runs."""
        return self._core.identity

    def _dispatcher(self, fn: Callable[..., Any]) -> Tuple[Callable[..., Any], Optional[concurrent.futures.Executor]]:
        """What the core runs for one attempt of `fn`, and where: for an ``async def``, a
        coroutine function run as a task of the loop (no executor); for a plain ``def``, a
        function the core submits to the executor (in a copy of the loop's context), whose
        future it follows from there."""
        takes_arg = _takes_an_argument(fn)

        def failure(ctx: Any, e: Exception) -> Answer:
            if ctx.is_cancelled():
                # Told to stop, it stopped: however it ended, that is the cancellation.
                return ("cancelled",)
            if isinstance(e, ApplicationError):
                return ("error", e.message, e.type, e.non_retryable)
            return ("error", f"{type(e).__name__}: {e}", type(e).__name__, False)

        if not inspect.iscoroutinefunction(fn):

            def run(ctx: Any, data: Optional[bytes], encoding: str) -> Answer:
                activity._current.set(ctx)
                try:
                    arg = converter.decode((data, encoding) if data is not None else None)
                    result = fn(arg) if takes_arg else fn()
                    out, out_encoding = converter.encode(result)
                    return ("ok", out, out_encoding)
                except Exception as e:
                    return failure(ctx, e)

            return run, self._executor

        async def dispatch(ctx: Any, data: Optional[bytes], encoding: str) -> Answer:
            activity._current.set(ctx)
            try:
                arg = converter.decode((data, encoding) if data is not None else None)
                # The core cancels this task when the attempt is told to stop.
                if ctx.set_task(asyncio.current_task()):
                    raise asyncio.CancelledError
                result = await (fn(arg) if takes_arg else fn())
                out, out_encoding = converter.encode(result)
                return ("ok", out, out_encoding)
            except asyncio.CancelledError:
                return ("cancelled",)
            except Exception as e:
                return failure(ctx, e)

        return dispatch, None

    async def run(self) -> None:
        """Runs until cancelled, `shutdown()`, or SIGINT/SIGTERM (when in the main thread);
        then stops polling, lets running activities finish within the grace period, and tells
        the server."""
        loop = asyncio.get_running_loop()
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    # Only a request: `run` itself stops the worker, so that no other
                    # future of the core completes after `run` has returned.
                    loop.add_signal_handler(sig, self._core.request_stop)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        try:
            await self._core.run()
        except asyncio.CancelledError:
            await self.shutdown()
            raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        """Stops the worker gracefully; `run` then returns."""
        await self._core.shutdown()

    def kill(self) -> None:
        """Stops at once, as if the process had died: nothing is reported to the server (its
        sessions fail after their liveness timeout). For tests of failover."""
        self._core.kill()

    async def __aenter__(self) -> "Worker":
        self._task = asyncio.ensure_future(self.run())
        # Let `run` register with the core (and fail fast, e.g. on an identity in use).
        await asyncio.sleep(0)
        if self._task.done():
            self._task.result()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()
        if self._task is not None:
            await self._task


def _takes_an_argument(fn: Callable[..., Any]) -> bool:
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if len(params) > 1 and all(p.default is p.empty for p in params[1:]):
        raise TypeError(
            f"activity {fn.__name__} takes {len(params)} arguments; an activity takes one (a "
            "dict or list for several values) or none"
        )
    return bool(params)
