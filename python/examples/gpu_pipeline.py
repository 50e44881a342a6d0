"""The GPU pipeline: prepare -> train -> evaluate, pinned by a session to one machine and two of
its GPUs. Midway through training that machine dies (its worker process is killed with -9); the
session fails, the pipeline opens a new one on another machine that matches, and training
resumes there from its last checkpoint.

    tether dev &
    python python/examples/gpu_pipeline.py          # --address HOST:PORT, else $TETHER_ADDRESS
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import tether
from tether import activity

import _fleet
from _fleet import Fleet, gpus

QUEUE = "gpu-pipeline"


# The activities: plain functions, run on a worker's thread pool.


@activity.defn
def prepare(dataset: str) -> dict:
    s = activity.session()
    return {"dataset": dataset, "shards": 8, "host": s.hostname if s else None}


@activity.defn
def train(job: dict) -> dict:
    checkpoint = Path(job["checkpoints"]) / "checkpoint.json"  # shared storage in real life
    start = json.loads(checkpoint.read_text())["epoch"] if checkpoint.exists() else 0
    host = activity.session().hostname
    devices = activity.cuda_visible_devices()
    for epoch in range(start + 1, job["epochs"] + 1):
        time.sleep(0.3)  # an epoch on CUDA_VISIBLE_DEVICES=devices
        checkpoint.write_text(json.dumps({"epoch": epoch, "host": host}))
        activity.heartbeat(epoch)
        print(f"    [{host}] epoch {epoch}/{job['epochs']} on GPUs {devices}", flush=True)
    return {"model": f"model-{job['epochs']}ep", "resumed_from_epoch": start, "host": host, "gpus": devices}


@activity.defn
def evaluate(model: dict) -> dict:
    return {"model": model["model"], "accuracy": 0.93, "host": activity.session().hostname}




async def main(address: str) -> None:
    fleet = Fleet(__file__, address, QUEUE)
    for name in ("gpu-box-1", "gpu-box-2"):
        fleet.start(name, gpus(4))
    print(f"two workers up, each advertising 4 declared A100s: {', '.join(fleet.names())}")
    client = await tether.Client.connect(address)
    job = {"epochs": 8, "checkpoints": str(fleet.dir)}
    killed = None
    try:
        for attempt in (1, 2):
            async with client.session(task_queue=QUEUE, gpus=2, requirements="gpu.memory>=40GiB",
                                      liveness_timeout=3) as s:
                print(f"session {s.id} on {s.info.hostname}, GPUs {s.info.cuda_visible_devices}")
                data = await s.execute_activity("prepare", "imagenet-mini")
                print(f"  prepared {data['shards']} shards on {data['host']}")
                training = asyncio.ensure_future(s.execute_activity("train", job, heartbeat=2))
                if attempt == 1:
                    await asyncio.sleep(1.2)
                    killed = s.info.hostname
                    print(f"  !! {killed} dies (kill -9 of its worker) in the middle of training")
                    fleet.kill(killed)
                try:
                    model = await training
                except tether.ActivityFailureError as e:
                    print(f"  training failed: {e.type}: {e.message}")
                    print("  -> a new session on another matching machine")
                    continue
                print(f"  trained {model['model']} on {model['host']} (GPUs {model['gpus']}), "
                      f"resumed from epoch {model['resumed_from_epoch']}")
                result = await s.execute_activity("evaluate", model)
                print(f"  evaluated on {result['host']}: accuracy {result['accuracy']}")
                assert model["host"] != killed and result["host"] == model["host"] == s.info.hostname
                print("done: every step of each session ran on its session's machine")
                return
        raise SystemExit("the pipeline did not finish")
    finally:
        fleet.stop()


if __name__ == "__main__":
    _fleet.run(main, [prepare, train, evaluate])
