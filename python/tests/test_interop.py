"""Python and Rust on one server: a Python client runs a Rust workflow that calls a Python
activity, and a Rust activity directly; with the AES-256-GCM codec (the same key file for both
languages) every payload crosses encrypted, and a client without the keys cannot read them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run

import tether
from tether import activity


def interop_worker_bin() -> Path:
    path = Path(os.environ.get("TETHER_INTEROP_WORKER", REPO / "target" / "debug" / "examples" / "interop_worker"))
    if not path.is_file():
        pytest.fail(
            f"the Rust interop worker is not at {path}: build it with `cargo build --example "
            "interop_worker` (scripts/test-python does)",
            pytrace=False,
        )
    return path


class RustWorker:
    def __init__(self, address: str, queue: str, keys: "str | None" = None) -> None:
        args = [str(interop_worker_bin()), address, queue] + ([keys] if keys else [])
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.stop()
            pytest.fail(f"the Rust interop worker did not start (it printed {line!r})", pytrace=False)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@activity.defn
async def py_shout(name: str) -> str:
    return name.upper() + "!"


def key_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text("k1 = " + "ab" * 32 + "\n")
    return str(path)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@run
async def test_a_python_client_runs_a_rust_workflow_that_calls_a_python_activity(server, queue, tmp_path, encrypted):
    keys = key_file(tmp_path) if encrypted else None
    client = await tether.Client.connect(server.address, keys=keys)
    rust = RustWorker(server.address, f"{queue}-rust", keys)
    try:
        async with tether.Worker(client, task_queue=f"{queue}-py", activities=[py_shout], state_dir=None):
            out = await client.execute_workflow(
                "greet_through_python",
                {"name": "ada", "python_queue": f"{queue}-py"},
                id=f"{queue}-greet",
                task_queue=f"{queue}-rust",
            )
            assert out == {"shouted": "ADA!", "reversed": "ada"[::-1]}
            # A Python client calls a Rust activity directly.
            assert await client.execute_activity("rust_reverse", "tether", task_queue=f"{queue}-rust") == "rehtet"
    finally:
        rust.stop()
    if encrypted:
        # What the server stored is ciphertext: without the keys the result cannot be read.
        without_keys = await tether.Client.connect(server.address)
        with pytest.raises(ValueError, match="codec"):
            await without_keys.get_workflow_handle(f"{queue}-greet").result()


@run
async def test_a_key_file_that_is_not_one_is_refused_with_what_is_wrong(server, tmp_path):
    bad = tmp_path / "bad-keys"
    bad.write_text("this is not a key\n")
    with pytest.raises(ValueError, match="KEY_ID"):
        await tether.Client.connect(server.address, keys=str(bad))


@run
async def test_a_python_client_signals_describes_and_terminates_a_rust_workflow(server, queue):
    client = await tether.Client.connect(server.address)
    rust = RustWorker(server.address, queue)
    try:
        handle = await client.start_workflow("wait_for_signal", None, id=f"{queue}-signalled", task_queue=queue)
        described = await handle.describe()
        assert described["status"] == "running" and described["workflow_type"] == "wait_for_signal"
        await handle.signal("go", {"value": 42})
        assert await handle.result() == {"value": 42}
        assert (await handle.describe())["status"] == "completed"

        doomed = await client.start_workflow("wait_for_signal", None, id=f"{queue}-doomed", task_queue=queue)
        await doomed.terminate("not needed")
        with pytest.raises(tether.WorkflowFailureError) as e:
            await doomed.result()
        assert e.value.status == "terminated"
        with pytest.raises(tether.AlreadyStartedError):
            await client.start_workflow("wait_for_signal", None, id=f"{queue}-again", task_queue=queue)
            await client.start_workflow("wait_for_signal", None, id=f"{queue}-again", task_queue=queue)
    finally:
        rust.stop()


@tether.workflow.defn
class CallsRust:
    async def run(self, arg: dict) -> str:
        return await tether.workflow.execute_activity("rust_reverse", arg["text"], task_queue=arg["rust_queue"])


@run
async def test_a_python_workflow_calls_a_rust_activity(server, queue):
    client = await tether.Client.connect(server.address)
    rust = RustWorker(server.address, f"{queue}-rust")
    try:
        async with tether.Worker(client, task_queue=queue, workflows=[CallsRust], identity=f"{queue}-py"):
            out = await client.execute_workflow(
                "CallsRust", {"text": "durable", "rust_queue": f"{queue}-rust"}, id=f"{queue}-calls-rust", task_queue=queue
            )
    finally:
        rust.stop()
    assert out == "elbarud"
