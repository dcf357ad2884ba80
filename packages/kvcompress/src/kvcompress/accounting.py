"""Byte accounting for any transformers cache."""

from __future__ import annotations

from typing import Any


def _layer_tensors(layer: Any) -> list:
    if hasattr(layer, "held_tensors"):
        return list(layer.held_tensors())
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]


def kv_bytes(cache: Any, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of every tensor the cache holds: stored keys/values however represented, plus per-token state.

    Works for kvcompress caches and for transformers' own (``DynamicCache``...). With ``by_device`` the
    bytes come back per device, e.g. ``{"cuda:0": ..., "cuda:1": ...}`` for a model split across GPUs.
    """
    per: dict[str, int] = {}
    for layer in getattr(cache, "layers", []):
        for t in _layer_tensors(layer):
            key = str(t.device)
            per[key] = per.get(key, 0) + t.numel() * t.element_size()
    return per if by_device else sum(per.values())
