"""A Python worker in a process of its own, for tests that kill it: runs until SIGTERM (graceful)
or SIGKILL. Usage: worker_process.py ADDRESS TASK_QUEUE IDENTITY INVENTORY READY_FILE"""

import asyncio
import sys
import time
from pathlib import Path

import tether
from tether import activity


@activity.defn
def where() -> dict:
    s = activity.session()
    return {
        "worker": activity.info().worker_identity,
        "cuda": activity.cuda_visible_devices(),
        "session": s.session_id if s else None,
        "gpus": [g.index for g in s.gpus] if s else [],
    }


@activity.defn
def train(steps: int) -> str:
    for _ in range(steps):
        activity.heartbeat()
        time.sleep(0.05)
    return activity.info().worker_identity


async def main(address: str, queue: str, identity: str, inventory: str, ready: str) -> None:
    client = await tether.Client.connect(address)
    worker = tether.Worker(
        client, task_queue=queue, activities=[where, train], identity=identity, inventory=inventory or None, state_dir=None
    )
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.2)
    Path(ready).write_text("ready")
    await run


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
