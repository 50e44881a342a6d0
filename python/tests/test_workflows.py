"""Python workflows: activities, timers, signals and conditions on the SDK's deterministic
loop; replay on a fresh worker; non-determinism and restricted calls reported as task failures;
failures and cancellation of a run."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import run

import tether
from tether import activity, workflow

CALLS: dict = {}


@activity.defn
async def shout(s: str) -> str:
    CALLS[s] = CALLS.get(s, 0) + 1
    return s.upper()


@activity.defn
def echo(v):
    return v


@workflow.defn
class Greeter:
    def __init__(self) -> None:
        self.approver = None

    @workflow.signal
    def approve(self, by: str) -> None:
        self.approver = by

    async def run(self, name: str) -> dict:
        first = await shout_once(name)
        both = await asyncio.gather(
            workflow.execute_activity("shout", f"{name}-x"), workflow.execute_activity("shout", f"{name}-y")
        )
        await workflow.sleep(0.1)
        token = str(workflow.uuid4())
        echoed = await workflow.execute_activity("echo", token)
        await workflow.wait_condition(lambda: self.approver is not None)
        return {"first": first, "both": both, "token": token, "echoed": echoed, "approver": self.approver}


async def shout_once(name: str) -> str:
    return await workflow.execute_activity("shout", name, start_to_close=10)


def wait_for(predicate, what, seconds=20.0):
    async def go():
        deadline = time.monotonic() + seconds
        while True:
            value = await predicate()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    return go()


@run
async def test_a_python_workflow_runs_activities_timers_and_signals(server, queue):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[shout, echo], workflows=[Greeter], identity=f"{queue}-w"):
        handle = await client.start_workflow("Greeter", queue, id=f"{queue}-greet", task_queue=queue)
        await wait_for(lambda: _history_at_least(handle, 12), "the workflow to wait for its signal")
        await handle.signal("approve", "bob")
        out = await handle.result()
    assert out["first"] == queue.upper()
    assert out["both"] == [f"{queue}-X".upper(), f"{queue}-Y".upper()]
    assert out["approver"] == "bob"
    assert out["token"] == out["echoed"]


async def _history_at_least(handle, n):
    return (await handle.describe())["history_length"] >= n


@run
async def test_a_run_replays_on_a_fresh_worker_without_running_its_activities_again(server, queue):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[shout, echo], workflows=[Greeter], identity=f"{queue}-1"):
        handle = await client.start_workflow("Greeter", queue, id=f"{queue}-replay", task_queue=queue)
        await wait_for(lambda: _history_at_least(handle, 12), "the workflow to wait for its signal")
    # A new worker: nothing cached, so the signal's task replays the whole history.
    async with tether.Worker(client, task_queue=queue, activities=[shout, echo], workflows=[Greeter], identity=f"{queue}-2"):
        await handle.signal("approve", "carol")
        out = await handle.result()
    assert out["approver"] == "carol"
    assert out["token"] == out["echoed"], "workflow.uuid4() gave another value on replay"
    assert CALLS[queue] == 1, "replay ran the activity again"
    assert (await handle.describe())["task_failure"] is None


@workflow.defn(name="Changing")
class ChangingV1:
    async def run(self) -> str:
        await workflow.execute_activity("echo", "one")
        await workflow.wait_condition(lambda: False)
        return "never"


@workflow.defn(name="Changing")
class ChangingV2:
    async def run(self) -> str:
        await workflow.sleep(5)  # a timer where history has an activity
        return "changed"


@run
async def test_a_change_that_breaks_replay_is_reported_as_nondeterminism(server, queue):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[ChangingV1], identity=f"{queue}-v1"):
        handle = await client.start_workflow("Changing", None, id=f"{queue}-nd", task_queue=queue)
        await wait_for(lambda: _history_at_least(handle, 5), "the first activity to finish")
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[ChangingV2], identity=f"{queue}-v2"):
        await handle.signal("anything")
        failure = await wait_for(lambda: _task_failure(handle), "a workflow task failure")
    assert failure["cause"] == "nondeterminism", failure
    await handle.terminate("test over")


async def _task_failure(handle):
    return (await handle.describe())["task_failure"]


@workflow.defn
class ReadsTheClock:
    async def run(self, what: str) -> float:
        if what == "time":
            return time.time()
        if what == "sleep":
            await asyncio.sleep(1)
        if what == "open":
            open("/etc/hostname").read()
        return 0.0


@pytest.mark.parametrize("what, message", [("time", "time.time()"), ("sleep", "asyncio.sleep"), ("open", "open()")])
@run
async def test_real_time_sleeping_and_files_are_refused_in_workflow_code(server, queue, what, message):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[ReadsTheClock], identity=f"{queue}-w"):
        handle = await client.start_workflow("ReadsTheClock", what, id=f"{queue}-clock", task_queue=queue)
        failure = await wait_for(lambda: _task_failure(handle), "a workflow task failure")
        await handle.terminate("test over")
    assert message in failure["message"], failure
    assert "RestrictedWorkflowError" in failure["message"], failure
    # Outside workflow code the same calls work as always.
    assert time.time() > 0


@workflow.defn
class Fails:
    async def run(self, how: str) -> None:
        if how == "application":
            raise tether.ApplicationError("order rejected", type="Rejected", non_retryable=True)
        await workflow.execute_activity("refuse_always", None, retry_max_attempts=1)


@activity.defn
def refuse_always() -> None:
    raise ValueError("no")


@pytest.mark.parametrize("how", ["application", "activity"])
@run
async def test_an_application_error_or_a_failed_activity_fails_the_run(server, queue, how):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[refuse_always], workflows=[Fails], identity=f"{queue}-w"):
        with pytest.raises(tether.WorkflowFailureError) as e:
            await client.execute_workflow("Fails", how, id=f"{queue}-fails", task_queue=queue)
    assert e.value.status == "failed"
    if how == "application":
        assert e.value.type == "Rejected" and "order rejected" in e.value.message
    else:
        assert "ValueError: no" in e.value.message, e.value.message


@workflow.defn
class Sleeper:
    async def run(self) -> None:
        await workflow.sleep(3600)


@run
async def test_a_cancelled_run_ends_canceled(server, queue):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[Sleeper], identity=f"{queue}-w"):
        handle = await client.start_workflow("Sleeper", None, id=f"{queue}-sleep", task_queue=queue)
        await wait_for(lambda: _history_at_least(handle, 3), "the timer to start")
        await handle.cancel("no longer needed")
        with pytest.raises(tether.WorkflowFailureError) as e:
            await handle.result()
    assert e.value.status == "canceled"


def test_a_class_without_an_async_run_is_refused():
    with pytest.raises(TypeError, match="async def run"):

        @workflow.defn
        class NoRun:
            def run(self):
                return 1


SIDE_EFFECT_RUNS: dict = {}


@workflow.defn
class TakesASnapshot:
    async def run(self, key: str) -> dict:
        def read_clock() -> float:
            SIDE_EFFECT_RUNS[key] = SIDE_EFFECT_RUNS.get(key, 0) + 1
            return time.time()  # allowed here: recorded once, replayed after

        taken = workflow.side_effect(read_clock)
        await workflow.wait_condition(lambda: self.go)
        return {"taken": taken, "again": workflow.side_effect(lambda: "second")}

    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True


@run
async def test_a_side_effect_runs_once_and_replays_its_recorded_value(server, queue):
    client = await tether.Client.connect(server.address)
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[TakesASnapshot], identity=f"{queue}-1"):
        handle = await client.start_workflow("TakesASnapshot", queue, id=f"{queue}-snap", task_queue=queue)
        await wait_for(lambda: _history_at_least(handle, 3), "the first task")
    before = time.time()
    async with tether.Worker(client, task_queue=queue, activities=[echo], workflows=[TakesASnapshot], identity=f"{queue}-2"):
        await handle.signal("proceed")
        out = await handle.result()
    assert out["taken"] < before, "the replay ran the side effect again instead of reading it"
    assert out["again"] == "second"
    assert SIDE_EFFECT_RUNS[queue] == 1
