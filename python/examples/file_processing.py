"""Session-based file processing: download -> transform -> upload, on one host, because the
files each step writes stay on that host's disk. A session pins the three steps to the machine
it was placed on; several files go through at once, each in a session of its own.

    tether dev &
    python python/examples/file_processing.py       # --address HOST:PORT, else $TETHER_ADDRESS
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import tether
from tether import activity

import _fleet
from _fleet import Fleet

QUEUE = "file-processing"


def scratch() -> Path:
    # This host's local disk (a directory per worker here).
    d = Path(SCRATCH) / activity.info().worker_identity
    d.mkdir(parents=True, exist_ok=True)
    return d


SCRATCH = "."


def use_scratch(folder: str) -> None:
    global SCRATCH
    SCRATCH = folder


@activity.defn
def download(name: str) -> str:
    path = scratch() / name
    path.write_bytes((name * 1000).encode())
    return str(path)


@activity.defn
def transform(path: str) -> str:
    source = Path(path)  # fails unless this is the host that downloaded it
    out = source.with_suffix(".sha256")
    out.write_text(hashlib.sha256(source.read_bytes()).hexdigest())
    return str(out)


@activity.defn
def upload(path: str) -> dict:
    return {"digest": Path(path).read_text()[:16], "from": activity.info().worker_identity}




async def process(client: tether.Client, name: str) -> str:
    async with client.session(task_queue=QUEUE, packing="spread") as s:
        path = await s.execute_activity("download", name)
        digest_path = await s.execute_activity("transform", path)
        done = await s.execute_activity("upload", digest_path)
        assert done["from"] == s.info.worker_identity
        return f"{name:<12} on {s.info.worker_identity}: sha256 {done['digest']}..."


async def main(address: str) -> None:
    fleet = Fleet(__file__, address, QUEUE)
    for name in ("files-host-a", "files-host-b", "files-host-c"):
        fleet.start(name, "")
    print(f"three hosts up: {', '.join(fleet.names())}")
    client = await tether.Client.connect(address)
    try:
        names = [f"report-{i}.csv" for i in range(6)]
        for line in await asyncio.gather(*(process(client, n) for n in names)):
            print(" ", line)
        print("done: each file's three steps ran on one host, where its files were")
    finally:
        fleet.stop()


if __name__ == "__main__":
    _fleet.run(main, [download, transform, upload], on_worker_start=use_scratch)
