"""W1, W2 and W3 of shared/BENCHMARKS.md with Python activities on tether's Python SDK.

    python python/bench/bench.py [--sync] [--w1 N] [--w2 N] [--w3 N]

Starts its own `tether dev` (TETHER_BIN, else target/release/tether: build it with `cargo build
--release --bin tether`; the SDK's native module should be a release build too, `maturin
develop --release` in python/), durable (fsync per group commit), and one worker process per
workload, apart from the client as a Celery or Ray worker is. Activities are `async def` unless
--sync (plain `def` on the worker's thread pool). Payloads are the peers' ~100-byte JSON, each
returned unchanged. Prints one line per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

import tether  # noqa: E402
from tether import activity  # noqa: E402

PAD = "x" * 80


@activity.defn(name="noop")
async def noop_async(x):
    return x


@activity.defn(name="noop")
def noop_sync(x):
    return x


@activity.defn(name="step")
async def step_async(d):
    d["trace"].append(activity.info().worker_identity)
    return d


@activity.defn(name="step")
def step_sync(d):
    d["trace"].append(activity.info().worker_identity)
    return d


async def worker_main(address: str, queue: str, identity: str, sync: bool, slots: int) -> None:
    client = await tether.Client.connect(address)
    acts = [noop_sync, step_sync] if sync else [noop_async, step_async]
    worker = tether.Worker(client, task_queue=queue, activities=acts, identity=identity,
                           max_concurrent_activities=slots, max_concurrent_sessions=1000)
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.3)
    print("ready", flush=True)
    await run


def start_worker(address: str, queue: str, identity: str, sync: bool, slots: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, __file__, "--worker", address, queue, identity,
                          "sync" if sync else "async", str(slots)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", "worker did not start"
    return p


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuUse:
    """CPU each process (and this client) spends over a workload, per unit of work: a figure
    that other load on the machine moves far less than it moves the throughput."""

    def __init__(self, pids: dict) -> None:
        self.pids = pids
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.client_before = time.process_time()

    def per(self, units: int) -> str:
        used = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        used["client"] = time.process_time() - self.client_before
        parts = ", ".join(f"{name} {1e3 * s / units:.2f}" for name, s in used.items())
        return f"{parts}; all {1e3 * sum(used.values()) / units:.2f}"


def pct(xs, q):
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def w1(client, queue, n, in_flight=256):
    sem = asyncio.Semaphore(in_flight)

    async def one(i):
        async with sem:
            out = await client.execute_activity("noop", {"i": i, "p": PAD}, task_queue=queue, id=f"w1-{queue}-{i}")
            assert out["i"] == i

    await asyncio.gather(*(one(i) for i in range(min(200, n))))  # warm-up
    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(200, 200 + n)))
    return n / (time.perf_counter() - t)


async def w2(client, queue, n):
    for i in range(50):
        await client.execute_activity("noop", {"i": i, "p": PAD}, task_queue=queue)
    lat = []
    for i in range(n):
        t = time.perf_counter()
        out = await client.execute_activity("noop", {"i": i, "p": PAD}, task_queue=queue)
        lat.append(time.perf_counter() - t)
        assert out["i"] == i
    return pct(lat, 50) * 1e3, pct(lat, 99) * 1e3


async def w3(client, queue, workers, n):
    async def chain(c):
        host = workers[c % 2]
        async with client.session(task_queue=queue, worker=host) as s:
            d = {"c": c, "host": host, "p": PAD[:60], "trace": []}
            for _ in range(5):
                d = await s.execute_activity("step", d)
        assert d["trace"] == [host] * 5, d
        return d

    await asyncio.gather(*(chain(c) for c in range(20)))  # warm-up
    t = time.perf_counter()
    await asyncio.gather(*(chain(c) for c in range(n)))
    return n / (time.perf_counter() - t)


def start_server() -> tuple[subprocess.Popen, str]:
    binary = Path(os.environ.get("TETHER_BIN", REPO / "target" / "release" / "tether"))
    if not binary.is_file():
        raise SystemExit(f"no tether binary at {binary}: cargo build --release --bin tether (or set TETHER_BIN)")
    log = tempfile.NamedTemporaryFile(prefix="tether-bench-", suffix=".log", delete=False)
    p = subprocess.Popen([str(binary), "dev", "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+)", Path(log.name).read_text(errors="replace"))
        if m:
            return p, m.group(1)
        time.sleep(0.05)
    raise SystemExit("tether dev did not start")


async def main(args) -> None:
    if tether._core.DEBUG_BUILD:
        raise SystemExit(
            "tether's native module is a debug build, several times slower than a release one: "
            "build it with `maturin develop --release` in python/ (scripts/test-python builds a "
            "debug one), then run the benchmark again"
        )
    server, address = start_server()
    kind = "sync def (thread pool)" if args.sync else "async def"
    print(f"tether Python SDK benchmark: {kind} activities, tether dev (SQLite, fsync per group commit), "
          f"worker process apart from the client")
    procs = []
    try:
        client = await tether.Client.connect(address)
        procs.append(start_worker(address, "w1", "bench-w1", args.sync, args.slots))
        use = CpuUse({"server": server.pid, "worker": procs[0].pid})
        rate = await w1(client, "w1", args.w1)
        print(f"W1  {args.w1} activities, 256 in flight, {args.slots} slots: {rate:.0f} activities/s "
              f"(CPU ms per activity: {use.per(args.w1 + min(200, args.w1))})")
        p50, p99 = await w2(client, "w1", args.w2)
        print(f"W2  {args.w2} sequential round trips: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        procs.append(start_worker(address, "w3", "bench-a", args.sync, args.slots))
        procs.append(start_worker(address, "w3", "bench-b", args.sync, args.slots))
        use = CpuUse({"server": server.pid, "worker a": procs[1].pid, "worker b": procs[2].pid})
        rate = await w3(client, "w3", ["bench-a", "bench-b"], args.w3)
        print(f"W3  {args.w3} chains of 5 steps, a session per chain, 2 workers with {args.slots} slots: {rate:.0f} chains/s "
              f"(every step on its session's worker: checked; CPU ms per chain: {use.per(args.w3 + 20)})")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        asyncio.run(worker_main(a[0], a[1], a[2], a[3] == "sync", int(a[4])))
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--sync", action="store_true", help="plain def activities on the thread pool")
        parser.add_argument("--w1", type=int, default=20000)
        parser.add_argument("--w2", type=int, default=1000)
        parser.add_argument("--w3", type=int, default=500)
        parser.add_argument("--slots", type=int, default=100)
        asyncio.run(main(parser.parse_args()))
