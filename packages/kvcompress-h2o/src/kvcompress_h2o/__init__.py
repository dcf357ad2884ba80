"""kvcompress-h2o: Heavy-Hitter Oracle (H2O) and LRU eviction for kvcompress caches."""

from __future__ import annotations

from .policies import H2O, LRU, AttentionScored, evictions, mode
from .retrieval import TOVA, SnapKV


def __getattr__(name: str):  # the ready-made caches need torch and transformers: loaded on first use
    if name in ("H2OCache", "LRUCache"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'kvcompress_h2o' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["H2O", "LRU", "TOVA", "AttentionScored", "H2OCache", "LRUCache", "SnapKV", "evictions", "mode"]
