"""Small helpers shared by the built-in tasks."""

from __future__ import annotations

from typing import Any


def kv_bytes(cache: Any) -> int:
    """Bytes of the tensors ``cache`` holds (``kvcompress.kv_bytes``)."""
    import kvcompress

    return int(kvcompress.kv_bytes(cache))


def mean(values: list[float]) -> float | None:
    """Arithmetic mean, None for no values."""
    return sum(values) / len(values) if values else None
