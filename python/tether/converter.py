"""Values to payloads and back: JSON for everything JSON can hold, raw bytes as binary.

The Rust core runs the codec chain (e.g. AES-256-GCM) on what this produces, so the encoding
seen here is always the plain one, and a Rust worker or client reads it as it would its own.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Tuple

JSON = "json/plain"
BINARY = "binary/plain"


def encode(value: Any) -> Tuple[bytes, str]:
    """`(data, encoding)` for a value: bytes as they are, anything else as compact JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), BINARY
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(), JSON
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"cannot send a {type(value).__name__} value: tether carries JSON values (dict, list, "
            f"str, int, float, bool, None) and bytes ({e})"
        ) from e


def decode(payload: Optional[Tuple[bytes, str]]) -> Any:
    """The value of `(data, encoding)`; None for no payload."""
    if payload is None:
        return None
    data, encoding = payload
    if encoding == BINARY:
        return bytes(data)
    if encoding in (JSON, ""):
        return json.loads(data) if data else None
    raise ValueError(
        f"a payload encoded {encoding!r} cannot be read here (only {JSON} and {BINARY}); was it "
        "written with a codec this client was not given (keys=...)?"
    )
