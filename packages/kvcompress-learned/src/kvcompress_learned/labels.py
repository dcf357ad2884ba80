"""Training labels from attention weights, accumulated over chunks of queries.

For key ``j`` of one (layer, kv head), with ``w[i, j]`` the attention weight of query ``i`` summed over
the query heads of that kv head:

- ``h2o``: ``sum_{i >= j} w[i, j]``, what H2O has accumulated for ``j`` when the sequence ends ``[B, H, S]``;
- ``future``: the attention ``j`` receives from the next ``horizon`` queries (``j < i <= j + horizon``),
  kept apart by distance ``d = i - j`` in bins ``d in [2^b, 2^(b+1))`` ``[B, H, S, bins]``: the sum over
  bins is the plain future label; the bins show how a token's attention fades with age.

Each weight may be scaled by the number of keys its query sees (``i + 1``), its ratio to a uniform
distribution (``relative=True``), so that a token's label does not depend on how many tokens came before it.
"""

from __future__ import annotations

import torch

LABELS = ("future", "h2o")


def bins(horizon: int) -> int:
    """Distance bins of a ``future`` label: ``d in [2^b, 2^(b+1))`` for ``1 <= d <= horizon``."""
    return max(horizon, 1).bit_length()


def distance_bin(d: torch.Tensor) -> torch.Tensor:
    """``floor(log2(d))`` of distances ``d >= 1`` (int64)."""
    return torch.frexp(d.double())[1].long() - 1


class LabelSums:
    """Running label sums for one layer over the query chunks of one sequence."""

    def __init__(self, label: str, horizon: int, relative: bool) -> None:
        if label not in LABELS:
            raise ValueError(f"label: got {label!r}; allowed: {', '.join(LABELS)}")
        self.label, self.horizon, self.relative = label, horizon, relative
        self.sums: torch.Tensor | None = None

    def add(self, weights: torch.Tensor, start: int) -> None:
        """Add the weights ``[B, H_kv, G, c, S]`` of queries ``start .. start + c - 1`` (key ``j`` at index
        ``j``; a query's own and later keys may hold anything: they are masked here)."""
        w = weights.float().sum(2)  # [B, H, c, S]
        b, h, c, s = w.shape
        i = torch.arange(start, start + c, device=w.device).view(c, 1)
        d = i - torch.arange(s, device=w.device).view(1, s)
        if self.relative:
            w = w * (i + 1).to(w.dtype)
        if self.label == "h2o":
            part = torch.where(d >= 0, w, 0.0).sum(2)
            self.sums = part if self.sums is None else self.sums + part
            return
        nb = bins(self.horizon)
        if self.sums is None:
            self.sums = torch.zeros(b, h, s * (nb + 1), dtype=torch.float32, device=w.device)
        inside = (d >= 1) & (d <= self.horizon)
        slot = torch.where(inside, distance_bin(d.clamp(min=1)), nb)  # bin nb: not counted
        index = (torch.arange(s, device=w.device).view(1, s) * (nb + 1) + slot).view(1, 1, c * s)
        self.sums.scatter_add_(2, index.expand(b, h, c * s), w.reshape(b, h, c * s))

    def result(self) -> torch.Tensor:
        """``[B, H, S]`` (h2o) or ``[B, H, S, bins]`` (future)."""
        if self.label == "h2o":
            return self.sums
        b, h, _ = self.sums.shape
        nb = bins(self.horizon)
        return self.sums.view(b, h, -1, nb + 1)[..., :nb]


def counts(label: str, horizon: int, length: int) -> torch.Tensor:
    """How many queries each key's label sums over: ``[length]`` (h2o) or ``[length, bins]`` (future)."""
    j = torch.arange(length)
    if label == "h2o":
        return length - j  # queries j .. length-1
    b = torch.arange(bins(horizon))
    lo, hi = 2**b, (2 ** (b + 1) - 1).clamp(max=horizon)  # distances of bin b
    last = (length - 1 - j).view(-1, 1)  # the farthest query a key has
    return (torch.minimum(hi.view(1, -1), last) - lo.view(1, -1) + 1).clamp(min=0)


def reference(weights: torch.Tensor, label: str, horizon: int, relative: bool) -> torch.Tensor:
    """The label of every key from a whole attention matrix ``[B, H_kv, G, L, L]``, by plain loops (tests)."""
    b, h, g, n, _ = weights.shape
    nb = bins(horizon)
    out = torch.zeros((b, h, n) if label == "h2o" else (b, h, n, nb), dtype=torch.float64)
    for j in range(n):
        for i in range(j, n) if label == "h2o" else range(j + 1, min(j + horizon, n - 1) + 1):
            value = weights[:, :, :, i, j].double().sum(2) * ((i + 1) if relative else 1)
            if label == "h2o":
                out[:, :, j] += value
            else:
                out[:, :, j, (i - j).bit_length() - 1] += value
    return out
