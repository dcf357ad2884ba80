"""The age curve: how much a stored token's score should drop as it gets older, learned per layer and kv head.

A token's score ``s`` is computed once, when it arrives. When an eviction comes ``a`` tokens later, what
counts is the attention it will get from the queries still to come, at distances ``a+1 .. a+horizon``. From
the distance-binned future attention ``z(j, b)`` (log of the mean relative attention token ``j`` receives at
distances ``[2^b, 2^(b+1))``), a least-squares fit per (layer, kv head) of ``z(j, b) ~ alpha * s_j + g_b``
says how the attention fades with distance (``g``) in the units of the scores (``alpha``). The table
``age[k] = log(sum_{d=a_k+1}^{a_k+horizon} exp(g(d))) / alpha`` (``a_k`` the middle of age bin ``k``, ``g``
extended past the last fitted bin along its last slope) is added to the scores at eviction:
``score + age[floor(log2(age))]``.
"""

from __future__ import annotations

import math

import torch

from .scorer import AGE_BINS  # ages up to 2^20 tokens; older ones use the last bin

MIN_DISTANCE = 16  # attention at shorter distances decides nothing: those tokens are recent


def fit_age(scores: torch.Tensor, binned: torch.Tensor, usable: torch.Tensor, horizon: int) -> torch.Tensor:
    """The age table ``[L, H, AGE_BINS]`` (float32) from the scorer's scores ``[L, H, N]`` of N training
    tokens, their log binned future attention ``[L, H, N, bins]`` and which bins are usable ``[N, bins]``."""
    layers, heads, _, nb = binned.shape
    first = max(MIN_DISTANCE.bit_length() - 1, 0)
    use = usable.clone()
    use[:, :first] = False
    if not bool(use[:, first:].any()):  # too short a text for distant bins: use every bin there is
        use = usable
    rows, cols = use.nonzero(as_tuple=True)
    design = torch.zeros(rows.numel(), 1 + nb, dtype=torch.float64)
    design[torch.arange(rows.numel()), 1 + cols] = 1.0
    table = torch.zeros(layers, heads, AGE_BINS)
    for layer in range(layers):
        for head in range(heads):
            design[:, 0] = scores[layer, head, rows].double()
            target = binned[layer, head, rows, cols].double().unsqueeze(1)
            coef = torch.linalg.lstsq(design, target, driver="gelsd").solution[:, 0]
            alpha, g = float(coef[0]), coef[1:]
            fitted = sorted(set(cols.tolist()))
            table[layer, head] = _table(g, fitted, horizon) / max(alpha, 0.05)
    return table


def _table(g: torch.Tensor, fitted: list[int], horizon: int) -> torch.Tensor:
    """``log sum_{d=a_k+1}^{a_k+horizon} exp(g(bin(d)))`` for every age bin ``k``; ``g`` outside the fitted
    bins is extended flat below them and along the last slope (never rising) above them."""
    lo, hi = fitted[0], fitted[-1]
    slope = min(float(g[hi] - g[hi - 1]), 0.0) if hi > lo else 0.0
    out = torch.zeros(AGE_BINS, dtype=torch.float64)
    for k in range(AGE_BINS):
        age = int(2**k * math.sqrt(2)) if k else 1
        d = torch.arange(age + 1, age + horizon + 1, dtype=torch.float64)
        b = torch.frexp(d)[1].long() - 1
        value = torch.where(b > hi, g[hi] + slope * (b - hi), g[b.clamp(lo, hi)])
        out[k] = torch.logsumexp(value, 0) - math.log(horizon)
    return out.float()
