"""Standalone activities through the Python client, run by a Python worker: values, sync and
async functions, errors and retries, heartbeats, cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest
from conftest import run

import tether
from tether import activity


@activity.defn
def add(x: dict) -> dict:
    return {"sum": x["a"] + x["b"], "thread": threading.current_thread().name}


@activity.defn(name="echo")
async def echo_async(value):
    return value


@activity.defn
def no_argument() -> str:
    return "none needed"


async def client_for(server) -> tether.Client:
    return await tether.Client.connect(server.address, retry_for=5)


@run
async def test_a_sync_activity_runs_on_a_pool_thread_and_an_async_one_on_the_loop(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[add, echo_async, no_argument], state_dir=str(tmp_path)):
        out = await client.execute_activity("add", {"a": 2, "b": 40}, task_queue=queue)
        assert out["sum"] == 42
        assert out["thread"].startswith("tether-activity"), out
        for value in [None, 7, 2.5, "text", [1, "a", None], {"nested": {"k": [True, False]}}, b"\x00\xffraw"]:
            assert await client.execute_activity("echo", value, task_queue=queue) == value
        assert await client.execute_activity("no_argument", task_queue=queue) == "none needed"


@activity.defn
def refuse(reason: str) -> None:
    raise tether.ApplicationError(f"refused: {reason}", type="Refused", non_retryable=True)


@run
async def test_a_non_retryable_application_error_ends_the_activity_with_its_type(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[refuse], state_dir=str(tmp_path)):
        with pytest.raises(tether.ActivityFailureError) as e:
            await client.execute_activity("refuse", "bad input", task_queue=queue)
    assert e.value.status == "failed"
    assert e.value.type == "Refused"
    assert "refused: bad input" in e.value.message


ATTEMPTS: dict = {}


@activity.defn
def flaky(key: str) -> int:
    info = activity.info()
    ATTEMPTS.setdefault(key, []).append(info.attempt)
    if info.attempt < 3:
        raise ConnectionError(f"attempt {info.attempt} lost its connection")
    return info.attempt


@run
async def test_a_raised_exception_is_retried_with_a_new_attempt_number(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[flaky], state_dir=str(tmp_path)):
        attempt = await client.execute_activity("flaky", queue, task_queue=queue, retry_initial=0.05, retry_backoff=1.0)
    assert attempt == 3
    assert ATTEMPTS[queue] == [1, 2, 3]


@run
async def test_retries_stop_at_the_policy_limit_and_say_why(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[flaky], state_dir=str(tmp_path)):
        with pytest.raises(tether.ActivityFailureError) as e:
            await client.execute_activity(
                "flaky", queue, task_queue=queue, retry_initial=0.05, retry_max_attempts=2
            )
    assert e.value.type == "ConnectionError"
    assert "attempt 2 lost its connection" in e.value.message
    assert ATTEMPTS[queue] == [1, 2]


@activity.defn
def resumable(total: int) -> dict:
    start = activity.heartbeat_details() or 0
    for step in range(start, total):
        activity.heartbeat(step + 1)
        if activity.info().attempt == 1 and step + 1 == 3:
            raise RuntimeError("crashed after step 3")
    return {"resumed_from": start, "attempt": activity.info().attempt}


@run
async def test_the_next_attempt_resumes_from_the_last_heartbeat(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[resumable], state_dir=str(tmp_path)):
        out = await client.execute_activity("resumable", 5, task_queue=queue, retry_initial=0.05, heartbeat=10)
    assert out == {"resumed_from": 3, "attempt": 2}


STARTED: dict = {}


@activity.defn
async def waits_forever(key: str) -> str:
    STARTED[key] = True
    try:
        while True:
            activity.heartbeat()
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        STARTED[key] = "saw CancelledError"
        raise


@activity.defn
def polls_for_cancel(key: str) -> str:
    STARTED[key] = True
    deadline = time.monotonic() + 30
    while not activity.is_cancelled() and time.monotonic() < deadline:
        activity.heartbeat()
        time.sleep(0.05)
    STARTED[key] = f"saw is_cancelled ({activity.cancel_reason()})"
    raise tether.ApplicationError("stopped on request", type="Cancelled")


@pytest.mark.parametrize("kind", ["waits_forever", "polls_for_cancel"])
@run
async def test_a_cancelled_activity_is_told_and_ends_canceled(server, queue, tmp_path, kind):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[waits_forever, polls_for_cancel], state_dir=str(tmp_path)):
        handle = await client.start_activity(kind, queue, task_queue=queue, heartbeat=5)
        deadline = time.monotonic() + 20
        while queue not in STARTED:
            assert time.monotonic() < deadline, "the activity never started"
            await asyncio.sleep(0.02)
        await handle.cancel("enough")
        with pytest.raises(tether.ActivityFailureError) as e:
            await handle.result()
    assert e.value.status == "canceled", e.value
    expected = "saw CancelledError" if kind == "waits_forever" else "saw is_cancelled (requested)"
    assert STARTED[queue] == expected


@run
async def test_an_activity_id_that_is_running_cannot_be_started_again(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[waits_forever], state_dir=str(tmp_path)):
        first = await client.start_activity("waits_forever", queue, task_queue=queue, id=f"{queue}-once", heartbeat=5)
        with pytest.raises(tether.AlreadyStartedError) as e:
            await client.start_activity("waits_forever", queue, task_queue=queue, id=f"{queue}-once")
        assert e.value.run_id == first.run_id
        await first.cancel()


MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark")


@activity.defn
def marks_its_context(i: int) -> dict:
    # What an attempt sets in its context stays its own, though the thread is the next one's.
    seen = MARK.get("unset")
    MARK.set(f"set by {i}")
    return {"seen": seen, "thread": threading.current_thread().name, "attempt": activity.info().attempt}


@run
async def test_each_plain_def_attempt_runs_in_a_context_of_its_own_on_the_pool(server, queue, tmp_path):
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[marks_its_context], state_dir=str(tmp_path),
                             max_concurrent_activities=1):
        outs = [await client.execute_activity("marks_its_context", i, task_queue=queue) for i in range(5)]
    assert [o["seen"] for o in outs] == ["unset"] * 5, outs
    assert len({o["thread"] for o in outs}) == 1 and outs[0]["thread"].startswith("tether-activity"), outs
    assert all(o["attempt"] == 1 for o in outs), outs


@run
async def test_ids_the_client_makes_up_name_the_activity_and_sort_in_start_order(server, queue, tmp_path):
    # Time-ordered, so that the store's index of runs by id takes them at its end (random
    # ids put every insert on a page of its own).
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[echo_async], state_dir=str(tmp_path)):
        handles = [await client.start_activity("echo", i, task_queue=queue) for i in range(6)]
        assert [await h.result() for h in handles] == list(range(6))
    ids = [h.activity_id for h in handles]
    assert all(i.startswith("echo-") for i in ids), ids
    assert sorted(ids) == ids and len(set(ids)) == 6, ids


@run
async def test_bad_options_are_refused_before_anything_is_sent(server, queue):
    client = await client_for(server)
    with pytest.raises(ValueError, match="requirements"):
        await client.execute_activity("add", {}, task_queue=queue, requirements="gpu.count >>= 2")
    with pytest.raises(ValueError, match="start_to_close"):
        await client.execute_activity("add", {}, task_queue=queue, start_to_close=-1)
    with pytest.raises(TypeError, match="cannot send"):
        await client.execute_activity("add", object(), task_queue=queue)


@run
async def test_connecting_where_no_server_listens_fails_with_a_how_to():
    with pytest.raises(tether.ConnectError, match="tether dev"):
        await tether.Client.connect("127.0.0.1:1", retry_for=0)


def test_a_worker_needs_activities_and_refuses_two_with_one_name(server):
    async def go():
        client = await client_for(server)
        with pytest.raises(ValueError, match="at least one activity or workflow"):
            tether.Worker(client, task_queue="q", activities=[])
        with pytest.raises(ValueError, match="two activities"):
            tether.Worker(client, task_queue="q", activities=[echo_async, activity.defn(name="echo")(add)])

    asyncio.run(go())


def test_activity_functions_outside_an_activity_say_so():
    with pytest.raises(RuntimeError, match="not inside a tether activity"):
        activity.info()


@activity.defn
def read_credential(name: str) -> str:
    return activity.credential(name)


@run
async def test_a_declared_credential_is_read_on_the_worker_and_a_missing_one_fails_for_good(server, queue, tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_TEST_TOKEN", "s3cret")
    inventory = tmp_path / "inventory.toml"
    inventory.write_text('[[credential]]\nname = "hub-token"\nenv = "TETHER_TEST_TOKEN"\n')
    client = await client_for(server)
    async with tether.Worker(client, task_queue=queue, activities=[read_credential], inventory=str(inventory), state_dir=str(tmp_path)):
        assert await client.execute_activity("read_credential", "hub-token", task_queue=queue) == "s3cret"
        with pytest.raises(tether.ActivityFailureError) as e:
            await client.execute_activity("read_credential", "nope", task_queue=queue, retry_initial=0.05)
    assert e.value.type == "CredentialMissing"
    assert e.value.failure["non_retryable"] is True


@activity.defn
def load_model(name: str) -> str:
    activity.set_label("model_loaded", name)
    return activity.info().worker_identity


@activity.defn
def use_model() -> str:
    return activity.info().worker_identity


@run
async def test_a_label_an_activity_sets_routes_the_next_activity_to_its_worker(server, queue, tmp_path):
    client = await client_for(server)
    a = tether.Worker(client, task_queue=queue, activities=[load_model, use_model], identity=f"{queue}-a", state_dir=None)
    b = tether.Worker(client, task_queue=queue, activities=[load_model, use_model], identity=f"{queue}-b", state_dir=None)
    async with a, b:
        loaded_on = await client.execute_activity("load_model", "llama", task_queue=queue)
        for _ in range(4):
            ran_on = await client.execute_activity(
                "use_model", task_queue=queue, requirements="label.model_loaded=llama", schedule_to_start=10
            )
            assert ran_on == loaded_on
