"""Activity options as keyword arguments, checked here and handed to the core as a dict."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Dict, Optional, Sequence, Union

Seconds = Union[float, int, timedelta]


def seconds(name: str, value: Optional[Seconds]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or a timedelta, not {value!r}")
    return float(value)


def activity_options(
    *,
    task_queue: Optional[str] = None,
    start_to_close: Optional[Seconds] = None,
    schedule_to_close: Optional[Seconds] = None,
    schedule_to_start: Optional[Seconds] = None,
    heartbeat: Optional[Seconds] = None,
    requirements: Optional[str] = None,
    worker: Optional[str] = None,
    retry_initial: Optional[Seconds] = None,
    retry_backoff: Optional[float] = None,
    retry_max_interval: Optional[Seconds] = None,
    retry_max_attempts: Optional[int] = None,
    non_retryable_types: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """The options the core takes; a None is the core's default (start_to_close 60 s when no
    schedule_to_close is given; retries every 1 s doubling up to 100 s, without end)."""
    out: Dict[str, Any] = {}
    for key, value in (
        ("start_to_close_s", seconds("start_to_close", start_to_close)),
        ("schedule_to_close_s", seconds("schedule_to_close", schedule_to_close)),
        ("schedule_to_start_s", seconds("schedule_to_start", schedule_to_start)),
        ("heartbeat_s", seconds("heartbeat", heartbeat)),
        ("retry_initial_s", seconds("retry_initial", retry_initial)),
        ("retry_max_interval_s", seconds("retry_max_interval", retry_max_interval)),
    ):
        if value is not None:
            out[key] = value
    if task_queue is not None:
        out["task_queue"] = task_queue
    if requirements is not None:
        out["requirements"] = requirements
    if worker is not None:
        out["worker"] = worker
    if retry_backoff is not None:
        out["retry_backoff"] = float(retry_backoff)
    if retry_max_attempts is not None:
        if retry_max_attempts < 0:
            raise ValueError(f"retry_max_attempts must be >= 0 (0: no limit), not {retry_max_attempts}")
        out["retry_max_attempts"] = int(retry_max_attempts)
    if non_retryable_types is not None:
        out["non_retryable_types"] = list(non_retryable_types)
    return out
