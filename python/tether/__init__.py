"""tether's Python SDK: a client, activities, sessions and workflows on tether's Rust core.

    import asyncio, tether
    from tether import activity

    @activity.defn
    def train(config: dict) -> dict:
        gpus = activity.cuda_visible_devices()
        ...

    async def main():
        client = await tether.Client.connect("127.0.0.1:7233")
        async with tether.Worker(client, task_queue="gpu", activities=[train]):
            async with client.session(task_queue="gpu", gpus=2) as s:
                print(await s.execute_activity("train", {"epochs": 3}))

    asyncio.run(main())
"""

from . import activity, converter, errors, workflow
from .client import ActivityHandle, Client, Gpu, Session, SessionInfo, WorkflowHandle
from .errors import (
    ActivityFailureError,
    AlreadyStartedError,
    ApplicationError,
    ConnectError,
    FailureError,
    RpcError,
    TetherError,
    WorkflowFailureError,
)
from .worker import Worker

__all__ = [
    "activity",
    "converter",
    "workflow",
    "errors",
    "ActivityFailureError",
    "ActivityHandle",
    "AlreadyStartedError",
    "ApplicationError",
    "Client",
    "ConnectError",
    "FailureError",
    "Gpu",
    "RpcError",
    "Session",
    "SessionInfo",
    "TetherError",
    "Worker",
    "WorkflowFailureError",
    "WorkflowHandle",
]
