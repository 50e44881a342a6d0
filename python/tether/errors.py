"""The errors tether's Python SDK raises, and the one activity code raises to fail on purpose."""

from __future__ import annotations

from typing import Any, Optional


class TetherError(Exception):
    """Base of every error the SDK raises."""


class ConnectError(TetherError):
    """The server could not be reached, or the address was malformed."""


class RpcError(TetherError):
    """The server refused or failed a call: `code` is the gRPC code name (``NOT_FOUND``)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{code}: {message}")
        self.message = message
        self.code = code


class AlreadyStartedError(TetherError):
    """A workflow or standalone activity with this id is already running (as `run_id`)."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class FailureError(TetherError):
    """A workflow or activity ended without a result: `status` says how (``failed``,
    ``canceled``, ``terminated``, ``timed_out``), `failure` why (message, type, non_retryable,
    kind, timeout_type, cause)."""

    def __init__(self, what: str, id: str, status: str, failure: Optional[dict[str, Any]]) -> None:
        failure = failure or {}
        message = failure.get("message") or f"ended {status}"
        super().__init__(f"{what} {id} ended {status}: {message}")
        self.id = id
        self.status = status
        self.failure = failure
        self.message = message
        self.type = failure.get("type", "")


class WorkflowFailureError(FailureError):
    """A workflow run ended without a result."""


class ActivityFailureError(FailureError):
    """An activity ended without a result (all its attempts failed, it timed out or was
    cancelled)."""


class ApplicationError(TetherError):
    """Raised by activity code to fail an attempt with a type of its choosing.

    With ``non_retryable=True`` no further attempt is made, whatever the retry policy; a `type`
    listed in the policy's ``non_retryable_types`` is not retried either. Any other exception an
    activity raises fails the attempt as retryable, with the exception's class name as type.
    """

    def __init__(self, message: str, type: Optional[str] = None, non_retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or ""
        self.non_retryable = non_retryable
