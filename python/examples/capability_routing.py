"""Capability-tagged routing: three unlike workers advertise what they have (GPUs, labels, a
credential by name); each activity says what it needs, the server routes it to a worker that has
it, and an activity no worker can take is explained, not silently queued.

    tether dev &
    python python/examples/capability_routing.py    # --address HOST:PORT, else $TETHER_ADDRESS
"""

from __future__ import annotations

import os

import tether
from tether import activity

import _fleet
from _fleet import Fleet, gpus

QUEUE = "fleet"


@activity.defn
def where() -> str:
    return activity.info().worker_identity


@activity.defn
def sync_to_s3() -> str:
    activity.credential("s3-prod")  # read on the worker; the secret never reaches the server
    return activity.info().worker_identity




async def main(address: str) -> None:
    os.environ["S3_PROD_KEY"] = "example-secret"  # inherited by the workers started below
    fleet = Fleet(__file__, address, QUEUE)
    fleet.start("cpu-box", '[labels]\nzone = "a"\n[[credential]]\nname = "s3-prod"\nenv = "S3_PROD_KEY"\n')
    fleet.start("h100-box", gpus(8, "NVIDIA H100 80GB HBM3", "80GiB") + '[labels]\nzone = "b"\n')
    fleet.start("a10-box", gpus(1, "NVIDIA A10", "24GiB") + '[labels]\nzone = "a"\n')
    print(f"workers: {', '.join(fleet.names())}")
    client = await tether.Client.connect(address)
    try:
        tasks = [
            ("where", "gpu.count>=4, gpu.memory>=80GiB"),
            ("where", "gpu.count>=1, label.zone=a"),
            ("sync_to_s3", "credential=s3-prod"),
            ("where", "gpu.count>=1, prefer gpu.name~H100:10"),
        ]
        for name, requirements in tasks:
            ran_on = await client.execute_activity(name, task_queue=QUEUE, requirements=requirements)
            print(f"  {name:<11} needs {requirements:<40} ran on {ran_on}")
        handle = await client.start_activity("where", task_queue=QUEUE, requirements="gpu.memory>=120GiB",
                                             schedule_to_start=2)
        print(f"\nunplaceable (needs gpu.memory>=120GiB): {handle.placement_note}")
        try:
            await handle.result()
        except tether.ActivityFailureError as e:
            print(f"  after its schedule-to-start timeout: {e.status}: {e.message}")
    finally:
        fleet.stop()


if __name__ == "__main__":
    _fleet.run(main, [where, sync_to_s3])
