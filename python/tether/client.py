"""The asyncio client: workflows, standalone activities and sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from . import _core, converter
from ._options import Seconds, activity_options, seconds
from .errors import ActivityFailureError, RpcError, WorkflowFailureError


def _result(what: str, id: str, outcome: Dict[str, Any]) -> Any:
    if outcome["status"] == "completed":
        return converter.decode(outcome["result"])
    error = WorkflowFailureError if what == "workflow" else ActivityFailureError
    raise error(what, id, outcome["status"], outcome["failure"])


class Client:
    """A connection to a tether server (or the replicas of a cluster), in one namespace.

    Make one with ``await Client.connect("127.0.0.1:7233")``; it is safe to share between tasks.
    """

    def __init__(self, core: Any) -> None:
        self._core = core

    @staticmethod
    async def connect(
        address: Union[str, List[str]] = "127.0.0.1:7233",
        *,
        namespace: str = "default",
        identity: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_server_name: Optional[str] = None,
        keys: Optional[str] = None,
        retry_for: Seconds = 30.0,
    ) -> "Client":
        """Connects, waiting up to `retry_for` while nobody answers (a server starting up).

        `address` may list several replicas (a list, or comma-separated). `tls_ca` turns TLS on;
        `tls_cert`/`tls_key` add a client certificate (mTLS). `keys` is a key file: payloads
        are then encrypted with AES-256-GCM before they leave this process (the same file
        format as the Rust SDK's and the CLI's ``--keys``).
        """
        if not isinstance(address, str):
            address = ",".join(address)
        core = await _core.connect(
            address,
            namespace,
            identity,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
            keys,
            seconds("retry_for", retry_for),
        )
        return Client(core)

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def address(self) -> str:
        return self._core.address

    # Workflows

    async def start_workflow(
        self,
        workflow: str,
        arg: Any = None,
        *,
        id: str,
        task_queue: str,
        run_timeout: Optional[Seconds] = None,
        task_timeout: Optional[Seconds] = None,
    ) -> "WorkflowHandle":
        """Starts a workflow by type name (one written in Rust or Python)."""
        data, encoding = converter.encode(arg)
        run_id = await self._core.start_workflow(
            workflow,
            data,
            encoding,
            id,
            task_queue,
            seconds("run_timeout", run_timeout),
            seconds("task_timeout", task_timeout),
        )
        return WorkflowHandle(self, id, run_id)

    async def execute_workflow(self, workflow: str, arg: Any = None, **options: Any) -> Any:
        """Starts a workflow and waits for its result (raises WorkflowFailureError if it
        ends without one)."""
        handle = await self.start_workflow(workflow, arg, **options)
        return await handle.result()

    def get_workflow_handle(self, workflow_id: str, run_id: str = "") -> "WorkflowHandle":
        """A handle to an existing workflow (its current run when `run_id` is empty)."""
        return WorkflowHandle(self, workflow_id, run_id)

    # Standalone activities

    async def execute_activity(
        self, activity: str, arg: Any = None, *, task_queue: str, id: Optional[str] = None, **options: Any
    ) -> Any:
        """Runs an activity without a workflow (durable, with timeouts and retries) and waits
        for its result. Options: start_to_close, schedule_to_close, schedule_to_start,
        heartbeat, requirements, worker, retry_initial, retry_backoff, retry_max_interval,
        retry_max_attempts, non_retryable_types."""
        id = id or f"{activity}-{_core.new_id()}"
        data, encoding = converter.encode(arg)
        _, _, outcome = await self._core.start_activity(
            activity, data, encoding, id, task_queue, activity_options(**options) if options else None, True
        )
        return _result("activity", id, outcome)

    async def start_activity(
        self, activity: str, arg: Any = None, *, task_queue: str, id: Optional[str] = None, **options: Any
    ) -> "ActivityHandle":
        """Starts a standalone activity; see `execute_activity` for the options."""
        id = id or f"{activity}-{_core.new_id()}"
        data, encoding = converter.encode(arg)
        run_id, placement_note, _ = await self._core.start_activity(
            activity, data, encoding, id, task_queue, activity_options(**options) if options else None, False
        )
        return ActivityHandle(self, id, run_id, placement_note)

    # Sessions

    def session(
        self,
        *,
        task_queue: str,
        gpus: int = 0,
        requirements: str = "",
        resources: Optional[Dict[str, int]] = None,
        packing: str = "",
        creation_timeout: Optional[Seconds] = None,
        idle_timeout: Optional[Seconds] = None,
        worker: Optional[str] = None,
        liveness_timeout: Optional[Seconds] = None,
    ) -> "Session":
        """A session: its activities all run on one worker, which reserves `gpus` GPUs and
        `resources` for it. Use it as ``async with client.session(...) as s:``; it is released
        on exit, also when the block raises.

        `requirements` are hard constraints and preferences on the worker (``gpu.memory>=40GiB,
        label.zone==a``); `packing` is "tightest" (default) or "spread"; `worker` pins it to one
        worker identity. If its worker is silent for `liveness_timeout` (default: the server's
        worker liveness timeout, 15 s) the session fails, and its pending activities fail with
        type ``SessionFailed``: open a new session to go on elsewhere. `idle_timeout` (default
        10 min) ends it when nothing runs in it."""
        return Session(
            self,
            dict(
                task_queue=task_queue,
                gpus=gpus,
                requirements=requirements,
                resources=resources,
                packing=packing,
                creation_timeout_s=seconds("creation_timeout", creation_timeout),
                idle_timeout_s=seconds("idle_timeout", idle_timeout),
                worker=worker,
                liveness_timeout_s=seconds("liveness_timeout", liveness_timeout),
            ),
        )


class WorkflowHandle:
    """A workflow run to wait on, signal, cancel, terminate or describe."""

    def __init__(self, client: Client, workflow_id: str, run_id: str) -> None:
        self.client = client
        self.workflow_id = workflow_id
        self.run_id = run_id

    async def result(self) -> Any:
        outcome = await self.client._core.outcome(False, self.workflow_id, self.run_id)
        return _result("workflow", self.workflow_id, outcome)

    async def signal(self, name: str, arg: Any = None) -> None:
        data, encoding = converter.encode(arg)
        await self.client._core.signal_workflow(self.workflow_id, self.run_id, name, data, encoding)

    async def cancel(self, reason: str = "") -> None:
        await self.client._core.end_workflow(self.workflow_id, self.run_id, False, reason)

    async def terminate(self, reason: str = "") -> None:
        await self.client._core.end_workflow(self.workflow_id, self.run_id, True, reason)

    async def describe(self) -> Dict[str, Any]:
        """status, workflow_type, task_queue, start_ms, close_ms, history_length,
        pending_activities, pending_timers."""
        return await self.client._core.describe_workflow(self.workflow_id, self.run_id)


class ActivityHandle:
    """A standalone activity to wait on or cancel."""

    def __init__(self, client: Client, activity_id: str, run_id: str, placement_note: str = "") -> None:
        self.client = client
        self.activity_id = activity_id
        self.run_id = run_id
        #: Why no live worker could take it when it started ("" when one could): it waits.
        self.placement_note = placement_note

    async def result(self) -> Any:
        outcome = await self.client._core.outcome(True, self.activity_id, self.run_id)
        return _result("activity", self.activity_id, outcome)

    async def cancel(self, reason: str = "") -> None:
        await self.client._core.cancel_activity(self.activity_id, self.run_id, reason)


@dataclass(frozen=True)
class Gpu:
    """A GPU reserved for a session."""

    index: int
    uuid: str
    model: str
    memory_total_bytes: int


@dataclass(frozen=True)
class SessionInfo:
    """Where the server placed a session and what it reserved there."""

    session_id: str
    state: str
    worker_identity: str
    hostname: str
    host_queue: str
    gpus: List[Gpu] = field(default_factory=list)
    resources: Dict[str, int] = field(default_factory=dict)
    reason: str = ""

    @staticmethod
    def from_core(d: Dict[str, Any]) -> "SessionInfo":
        return SessionInfo(
            session_id=d["session_id"],
            state=d["state"],
            worker_identity=d["worker_identity"],
            hostname=d["hostname"],
            host_queue=d["host_queue"],
            gpus=[Gpu(**g) for g in d["gpus"]],
            resources=dict(d["resources"]),
            reason=d["reason"],
        )

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(g.index) for g in self.gpus)


class Session:
    """A session a client owns (see `Client.session`)."""

    def __init__(self, client: Client, options: Dict[str, Any]) -> None:
        self._client = client
        self._options = options
        self._core: Any = None
        self.info: Optional[SessionInfo] = None

    async def __aenter__(self) -> "Session":
        o = self._options
        self._core = await self._client._core.create_session(
            o["task_queue"],
            o["gpus"],
            o["requirements"],
            o["resources"],
            o["packing"],
            o["creation_timeout_s"],
            o["idle_timeout_s"],
            o["worker"],
            o["liveness_timeout_s"],
        )
        self.info = SessionInfo.from_core(self._core.info())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.complete()
        except RpcError as e:
            # The session already ended (its worker died, an operator terminated it): there is
            # nothing left to release.
            if e.code != "FAILED_PRECONDITION":
                raise

    @property
    def id(self) -> str:
        if self.info is None:
            raise RuntimeError("the session is not open: use `async with client.session(...)`")
        return self.info.session_id

    async def execute_activity(self, activity: str, arg: Any = None, **options: Any) -> Any:
        """Runs an activity on the session's worker (nowhere else) and waits for its result."""
        if self._core is None:
            raise RuntimeError("the session is not open: use `async with client.session(...)`")
        data, encoding = converter.encode(arg)
        # No options is the common case: the defaults then need no checking here.
        outcome = await self._core.execute_activity(
            activity, data, encoding, activity_options(**options) if options else None
        )
        if outcome["status"] == "completed":
            return converter.decode(outcome["result"])
        return _result("activity", f"{activity} in session {self.id}", outcome)

    async def complete(self) -> Optional[SessionInfo]:
        """Ends the session and frees its reservation (done on leaving the ``async with``)."""
        if self._core is None:
            return None
        core, self._core = self._core, None
        return SessionInfo.from_core(await core.complete())
