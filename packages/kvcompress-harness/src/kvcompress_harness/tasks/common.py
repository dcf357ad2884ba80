"""Small helpers shared by the built-in tasks."""

from __future__ import annotations

from typing import Any


def kv_bytes(cache: Any) -> int:
    """Bytes of the tensors ``cache`` holds (``kvcompress.kv_bytes``)."""
    import kvcompress

    return int(kvcompress.kv_bytes(cache))


def kept_share(cache: Any, positions: tuple[int, ...]) -> float | None:
    """The share of ``positions`` a cache holds, averaged over its layers, batch rows and kv heads (None for a
    cache that does not say which tokens it holds, or no positions)."""
    layers = [getattr(layer, "positions", None) for layer in getattr(cache, "layers", [])]
    held = [p for p in layers if p is not None]
    if not positions or not held:
        return None
    import torch

    shares = []
    for pos in held:
        wanted = torch.tensor(positions, dtype=pos.dtype, device=pos.device)
        shares.append((pos.unsqueeze(-1) == wanted).any(dim=2).float().mean().item())
    return sum(shares) / len(shares)


def mean(values: list[float]) -> float | None:
    """Arithmetic mean, None for no values."""
    return sum(values) / len(values) if values else None


def mean_known(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None when none is known)."""
    return mean([v for v in values if v is not None])
