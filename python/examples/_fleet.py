"""Shared by the examples: a fleet of worker processes on this machine, each with a declared
inventory (so that the examples run without GPUs; a real worker detects its GPUs through NVML
and needs no inventory)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional


class Fleet:
    def __init__(self, script: str, address: str, queue: str) -> None:
        self.script = script
        self.address = address
        self.queue = queue
        self.dir = Path(tempfile.mkdtemp(prefix="tether-example-"))
        self.processes: Dict[str, subprocess.Popen] = {}

    def start(self, name: str, inventory: str) -> None:
        """Starts worker `name` (its identity and host name) with this inventory TOML."""
        path = self.dir / f"{name}.toml"
        path.write_text(f'hostname = "{name}"\n' + inventory)
        process = subprocess.Popen(
            [sys.executable, self.script, "--worker", name, str(path), self.address, self.queue, str(self.dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = process.stdout.readline() if process.stdout else ""
        if line.strip() != "ready":
            raise SystemExit(f"worker {name} did not start (is `tether dev` running at {self.address}?)")
        self.processes[name] = process
        # What the worker prints from now on shows here, as it happens.
        threading.Thread(target=_forward, args=(process,), daemon=True).start()

    def kill(self, name: str) -> None:
        """kill -9: the machine died, nothing is said to the server."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop(self) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        for p in self.processes.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def names(self) -> List[str]:
        return list(self.processes)


def address_from_args(argv: List[str]) -> str:
    if "--address" in argv:
        return argv[argv.index("--address") + 1]
    return os.environ.get("TETHER_ADDRESS", "127.0.0.1:7233")


def gpus(count: int, model: str = "NVIDIA A100-SXM4-80GB", memory: str = "80GiB") -> str:
    return f'[[gpu]]\nname = "{model}"\nmemory = "{memory}"\ncompute = "8.0"\ncount = {count}\n'


def _forward(process: subprocess.Popen) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)


def run(
    example: Callable[[str], Awaitable[None]],
    activities: List[Callable[..., Any]],
    on_worker_start: Optional[Callable[[str], None]] = None,
) -> None:
    """The example's entry point: `example(address)`, or, when `Fleet.start` ran this script
    as a worker, a worker with `activities` (`on_worker_start` is given the scratch folder)."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, inventory, address, queue, scratch = sys.argv[2:7]
        if on_worker_start is not None:
            on_worker_start(scratch)
        asyncio.run(_serve(name, inventory, address, queue, activities))
    else:
        asyncio.run(example(address_from_args(sys.argv)))


async def _serve(name: str, inventory: str, address: str, queue: str, activities: List[Callable[..., Any]]) -> None:
    import tether

    client = await tether.Client.connect(address)
    worker = tether.Worker(client, task_queue=queue, activities=activities, identity=name, inventory=inventory)
    running = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.3)
    print("ready", flush=True)
    await running
