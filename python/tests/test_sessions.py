"""Client sessions from Python: a reservation of concrete GPUs on one worker, activities pinned
to it, release on exit (also on an exception), and failover when the worker process dies."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from conftest import Server, run, worker_process

import tether
from worker_process import where


def inventory(tmp_path: Path, name: str, gpus: int) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'hostname = "{name}"\n'
        f'[[gpu]]\nname = "NVIDIA A100-SXM4-40GB"\nmemory = "40GiB"\ncompute = "8.0"\ncount = {gpus}\n'
    )
    return str(path)




@run
async def test_a_session_reserves_gpus_and_runs_every_activity_on_its_worker(server, queue, tmp_path):
    client = await tether.Client.connect(server.address)
    a = tether.Worker(client, task_queue=queue, activities=[where], identity=f"{queue}-a",
                      inventory=inventory(tmp_path, "box-a", 4), state_dir=None)
    b = tether.Worker(client, task_queue=queue, activities=[where], identity=f"{queue}-b",
                      inventory=inventory(tmp_path, "box-b", 4), state_dir=None)
    async with a, b:
        async with client.session(task_queue=queue, gpus=2, requirements="gpu.memory>=40GiB") as s:
            assert s.info is not None and len(s.info.gpus) == 2
            assert all(g.model == "NVIDIA A100-SXM4-40GB" for g in s.info.gpus)
            seen = [await s.execute_activity("where") for _ in range(6)]
        assert {x["worker"] for x in seen} == {s.info.worker_identity}
        assert {x["session"] for x in seen} == {s.info.session_id}
        assert {x["cuda"] for x in seen} == {s.info.cuda_visible_devices}
        assert seen[0]["gpus"] == [g.index for g in s.info.gpus]
        # Outside a session the same activity sees none.
        plain = await client.execute_activity("where", task_queue=queue)
        assert plain["session"] is None and plain["cuda"] is None


@run
async def test_a_session_is_released_when_its_block_raises(server, queue, tmp_path):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[where],
                             inventory=inventory(tmp_path, "box", 2), state_dir=str(tmp_path)):
        with pytest.raises(ZeroDivisionError):
            async with client.session(task_queue=queue, gpus=2) as s:
                await s.execute_activity("where")
                1 / 0
        # Both GPUs are free again: a second session that needs both is placed at once.
        async with client.session(task_queue=queue, gpus=2, creation_timeout=5) as again:
            assert len(again.info.gpus) == 2


@run
async def test_a_session_that_cannot_be_placed_says_why(server, queue, tmp_path):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[where],
                             inventory=inventory(tmp_path, "small", 1), state_dir=str(tmp_path)):
        with pytest.raises(tether.TetherError) as e:
            async with client.session(task_queue=queue, gpus=2, creation_timeout=1):
                pass
    assert "gpu" in str(e.value).lower(), e.value


@pytest.fixture(scope="module")
def fast_server():
    """A server that declares a silent worker dead after 2 s (the default is 15 s)."""
    s = Server("--worker-liveness-timeout", "2s")
    yield s
    s.stop()


@run
async def test_when_the_sessions_worker_process_is_killed_its_activity_fails_and_a_new_session_lands_elsewhere(
    fast_server, queue, tmp_path
):
    process = await worker_process(fast_server.address, queue, f"{queue}-doomed", inventory(tmp_path, "doomed", 2), tmp_path)
    try:
        client = await tether.Client.connect(fast_server.address)
        async with client.session(task_queue=queue, gpus=2, worker=f"{queue}-doomed") as s:
            assert s.info.worker_identity == f"{queue}-doomed"
            training = asyncio.ensure_future(s.execute_activity("train", 2000, heartbeat=1))
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGKILL)
            with pytest.raises(tether.ActivityFailureError) as e:
                await training
        assert e.value.type == "SessionFailed", e.value.failure
        # Recover on another machine: a second worker takes a new session.
        async with tether.Worker(client, task_queue=queue, activities=[where], identity=f"{queue}-spare",
                                 inventory=inventory(tmp_path, "spare", 2), state_dir=None):
            async with client.session(task_queue=queue, gpus=2, creation_timeout=10) as again:
                assert again.info.worker_identity == f"{queue}-spare"
                out = await again.execute_activity("where")
                assert out["worker"] == f"{queue}-spare" and out["cuda"] == again.info.cuda_visible_devices
    finally:
        process.kill()
        process.wait()


@tether.workflow.defn
class PinnedSteps:
    async def run(self, gpus: int) -> dict:
        wf = tether.workflow
        s = await wf.create_session(gpus=gpus, requirements="gpu.memory>=40GiB")
        steps = [await s.execute_activity("where") for _ in range(3)]
        s.complete()
        again = await wf.create_session(gpus=gpus, creation_timeout=5)
        reused = await again.execute_activity("where")
        return {"session": s.info.session_id, "worker": s.info.worker_identity, "cuda": s.info.cuda_visible_devices,
                "steps": steps, "reused_gpus": reused["gpus"]}


@run
async def test_a_python_workflow_pins_its_steps_to_a_session_and_frees_it(server, queue, tmp_path):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[where], workflows=[PinnedSteps],
                             identity=f"{queue}-box", inventory=inventory(tmp_path, "box", 2), state_dir=None):
        out = await client.execute_workflow("PinnedSteps", 2, id=f"{queue}-pinned", task_queue=queue)
    assert {x["worker"] for x in out["steps"]} == {out["worker"]}
    assert {x["session"] for x in out["steps"]} == {out["session"]}
    assert {x["cuda"] for x in out["steps"]} == {out["cuda"]} and out["cuda"].count(",") == 1
    # The second session needed both GPUs: it was placed because the first one was freed.
    assert len(out["reused_gpus"]) == 2


@tether.workflow.defn
class Failover:
    async def run(self, doomed: str) -> dict:
        wf = tether.workflow
        s = await wf.create_session(gpus=2, worker=doomed, liveness_timeout=2)
        first = (await s.execute_activity("where"))["worker"]
        try:
            await s.execute_activity("train", 2000, heartbeat=1)
            error = None
        except tether.ActivityFailureError as e:
            error = e.type
        state = s.state[0]
        again = await wf.recreate_session(s, wf.SAME_HOST_OR_FAILOVER)
        after = await again.execute_activity("where")
        return {"first": first, "error": error, "state": state, "after": after["worker"], "cuda": after["cuda"]}


@run
async def test_a_python_workflow_recreates_its_session_elsewhere_when_the_worker_dies(server, queue, tmp_path):
    doomed = f"{queue}-doomed"
    process = await worker_process(server.address, queue, doomed, inventory(tmp_path, "doomed", 2), tmp_path)
    try:
        client = await tether.Client.connect(server.address)
        async with tether.Worker(client, task_queue=queue, activities=[where], workflows=[Failover],
                                 identity=f"{queue}-spare", inventory=inventory(tmp_path, "spare", 2), state_dir=None):
            handle = await client.start_workflow("Failover", doomed, id=f"{queue}-failover", task_queue=queue)
            # Once training runs on the doomed worker, its machine dies.
            deadline = time.monotonic() + 20
            while (await handle.describe())["pending_activities"] == 0:
                assert time.monotonic() < deadline, "training never started"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGKILL)
            out = await handle.result()
    finally:
        process.kill()
        process.wait()
    assert out["first"] == doomed
    assert out["error"] == "SessionFailed"
    assert out["state"] == "failed"
    assert out["after"] == f"{queue}-spare" and out["cuda"] is not None
