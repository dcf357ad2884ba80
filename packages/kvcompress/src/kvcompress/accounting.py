"""Byte accounting for any transformers cache."""

from __future__ import annotations

from typing import Any


def kv_bytes(cache: Any) -> int:
    """Bytes of every tensor the cache holds: stored keys/values however represented, plus per-token state.

    Works for kvcompress caches and for transformers' own (``DynamicCache``...).
    """
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total
