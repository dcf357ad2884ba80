"""kvcompress-lowrank: calibrated low-rank K/V storage (keys projected before RoPE) for kvcompress caches."""

from __future__ import annotations

from .policy import LowRank

__version__ = "0.1.0"
__all__ = ["LowRank", "LowRankStore", "shipped"]


def __getattr__(name: str):  # the store and calibration need torch: loaded on first use
    import importlib

    if name == "LowRankStore":
        return importlib.import_module(".store", __name__).LowRankStore
    if name == "shipped":
        return importlib.import_module(".basis", __name__).shipped
    raise AttributeError(f"module 'kvcompress_lowrank' has no attribute {name!r}")
