"""kvcompress-cluster: k-means over keys, cluster-proportional eviction, merging evicted tokens into their
clusters."""

from __future__ import annotations

from .policy import Cluster

__version__ = "0.1.0"
__all__ = ["Cluster", "kmeans"]


def __getattr__(name: str):  # the k-means needs torch: loaded on first use
    if name == "kmeans":
        import importlib

        return importlib.import_module(".kmeans", __name__)
    raise AttributeError(f"module 'kvcompress_cluster' has no attribute {name!r}")
