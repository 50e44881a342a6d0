"""One `tether dev` server for the whole test session, on a free loopback port, and helpers.

The server is the real binary (TETHER_BIN, else target/debug/tether of this repository, which
`scripts/test-python` builds). Tests keep out of each other's way with task queues of their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def tether_bin() -> Path:
    path = Path(os.environ.get("TETHER_BIN", REPO / "target" / "debug" / "tether"))
    if not path.is_file():
        pytest.fail(
            f"the tether server binary is not at {path}: build it with `cargo build --bin tether` "
            "(scripts/test-python does), or point TETHER_BIN at one",
            pytrace=False,
        )
    return path


class Server:
    def __init__(self, *extra: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="tether-dev-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [str(tether_bin()), "dev", "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        self.address = ""
        while not self.address:
            text = Path(self.log.name).read_text(errors="replace")
            found = re.search(r"listening on (\S+)", text)
            if found:
                self.address = found.group(1)
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"tether dev did not start; its log:\n{text}", pytrace=False)
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def queue() -> str:
    """A task queue no other test uses."""
    return f"py-{uuid.uuid4().hex[:12]}"


async def worker_process(address: str, queue: str, identity: str, inventory: str, tmp_path: Path) -> subprocess.Popen:
    """Starts worker_process.py (activities `where` and `train`) and waits until it runs. The
    caller kills it (and waits for it) when done."""
    import sys

    ready = tmp_path / f"ready-{identity}"
    here = Path(__file__).parent
    process = subprocess.Popen(
        [sys.executable, str(here / "worker_process.py"), address, queue, identity, inventory, str(ready)],
        env={**os.environ, "PYTHONPATH": str(here)},
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail("the worker process never became ready", pytrace=False)
        await asyncio.sleep(0.05)
    return process


def run(coroutine_fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Runs an async test function on a fresh event loop, with a deadline so that a hang fails
    the test instead of the suite."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(asyncio.wait_for(coroutine_fn(*args, **kwargs), 60))

    wrapper.__name__ = coroutine_fn.__name__
    wrapper.__signature__ = __import__("inspect").signature(coroutine_fn)  # type: ignore[attr-defined]
    return wrapper
