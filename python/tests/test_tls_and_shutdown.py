"""mTLS from Python (certificates made by `tether certs dev`), and a worker process that stops
gracefully on SIGTERM: the activity it runs finishes and its result is kept."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Server, run, tether_bin, worker_process

import tether
from tether import activity


@activity.defn
def hello(name: str) -> str:
    return f"hello {name}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(tether_bin()), "certs", "dev", "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tls_server(certs):
    s = Server("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
               "--client-ca", str(certs / "ca.pem"))
    yield s
    s.stop()


@run
async def test_a_client_and_worker_with_certificates_work_over_mtls(tls_server, certs, queue):
    client = await tether.Client.connect(
        tls_server.address, tls_ca=str(certs / "ca.pem"), tls_cert=str(certs / "client.pem"),
        tls_key=str(certs / "client.key"), tls_server_name="localhost", retry_for=5,
    )
    async with tether.Worker(client, task_queue=queue, activities=[hello], identity=f"{queue}-w"):
        assert await client.execute_activity("hello", "tls", task_queue=queue) == "hello tls"


@run
async def test_without_a_client_certificate_the_server_refuses(tls_server, certs):
    with pytest.raises(tether.TetherError):
        client = await tether.Client.connect(tls_server.address, tls_ca=str(certs / "ca.pem"),
                                             tls_server_name="localhost", retry_for=0)
        await client.execute_activity("hello", "x", task_queue="q", schedule_to_close=1)


@run
async def test_sigterm_stops_a_worker_gracefully(server, queue, tmp_path):
    process = await worker_process(server.address, queue, f"{queue}-w", "", tmp_path)
    try:
        client = await tether.Client.connect(server.address)
        handle = await client.start_activity("train", 20, task_queue=queue, heartbeat=5)  # about 1 s
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert await handle.result() == f"{queue}-w", "the running activity was not let finish"
        assert await asyncio.get_running_loop().run_in_executor(None, process.wait, 20) == 0
    finally:
        process.kill()
        process.wait()


@run
async def test_workers_stopped_by_sigterm_at_once_all_exit_cleanly(server, queue, tmp_path):
    # Each process races its interpreter's exit against the core's last completions (one that
    # reached Python after `run` returned crashed the process now and then): several at once.
    processes = await asyncio.gather(
        *(worker_process(server.address, f"{queue}-{i}", f"{queue}-w{i}", "", tmp_path) for i in range(6))
    )
    try:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        codes = [await loop.run_in_executor(None, process.wait, 20) for process in processes]
        assert codes == [0] * len(processes), f"exit codes after SIGTERM: {codes}"
    finally:
        for process in processes:
            process.kill()
            process.wait()
