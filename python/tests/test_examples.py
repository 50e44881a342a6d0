"""The examples in python/examples run against a server and end as they say they do."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize(
    "example, expected",
    [
        ("gpu_pipeline.py", ["dies (kill -9 of its worker)", "SessionFailed", "resumed from epoch", "done:"]),
        ("file_processing.py", ["done: each file's three steps ran on one host"]),
        ("capability_routing.py", ["ran on h100-box", "ran on a10-box", "ran on cpu-box", "timed_out"]),
    ],
)
def test_example_runs_and_prints_what_happened(server, example, expected):
    done = subprocess.run(
        [sys.executable, str(REPO / "python" / "examples" / example), "--address", server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in expected:
        assert line in done.stdout, done.stdout
