"""kvcompress-h2o: Heavy-Hitter Oracle (H2O) and LRU eviction for kvcompress caches."""

from __future__ import annotations

from .cache import H2OCache, LRUCache
from .policies import H2O, LRU, AttentionScored

__version__ = "0.1.0"

__all__ = ["H2O", "LRU", "AttentionScored", "H2OCache", "LRUCache"]
