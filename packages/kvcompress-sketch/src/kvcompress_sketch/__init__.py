"""kvcompress-sketch: token importance from a Count-Min sketch of the queries, for kvcompress caches."""

from __future__ import annotations

from .policy import Sketch


def __getattr__(name: str):  # the sketch itself needs torch: loaded on first use
    if name == "CountMin":
        from .countmin import CountMin

        return CountMin
    if name == "QuerySketch":
        from .state import QuerySketch

        return QuerySketch
    raise AttributeError(f"module 'kvcompress_sketch' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["CountMin", "QuerySketch", "Sketch"]
