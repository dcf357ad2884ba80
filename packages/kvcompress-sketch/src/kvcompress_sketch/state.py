"""One layer's sketch of what its queries look for: the bound state of the ``sketch`` policy.

Each query of each query head is hashed to a SimHash cell (``planes`` seeded hyperplanes: ``2**planes``
cells) and counted, with its weight (1 or its norm, times a growth factor that stands for decay), in a
Count-Min sketch (:mod:`.countmin`) of that head; each counter also sums the queries counted in it, so it
knows what they look for (their centroid). Queries are buffered and folded in once per ``step`` tokens
(or at once for a prompt chunk), so a decode step only appends a reference to a list.
"""

from __future__ import annotations

import math

import torch

from .countmin import CountMin

RENORMALISE = 30.0  # fold decay into the table once the newest weight reaches exp(30)


def simhash(x: torch.Tensor, planes: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """SimHash cell ``[...]`` (int64) of each vector ``[..., D]``: the signs of its projections on ``planes``
    ``[D, P]`` read as a P-bit number."""
    return ((x.to(planes.dtype) @ planes > 0).to(powers.dtype) @ powers).long()


class QuerySketch:
    """Per-layer state: a Count-Min sketch of the queries of each query head, the pending queries, the
    hyperplanes. ``tensors()`` lists everything held (counted by ``kvcompress.kv_bytes``)."""

    def __init__(self, policy, layer) -> None:
        d, device = layer.head_dim, layer.device
        g = torch.Generator().manual_seed(policy.seed * 7919 + layer.index)
        self.planes = torch.randn(d, policy.planes, generator=g).to(device)
        self.powers = (2.0 ** torch.arange(policy.planes)).to(device)
        self.fold_planes = None
        if policy.strategy == "aggregate":
            bits = policy.buckets.bit_length() - 1
            self.fold_planes = torch.randn(d, bits, generator=g).to(device)
            self.fold_powers = (2.0 ** torch.arange(bits)).to(device)
        self.policy = policy
        self.layer = layer
        self.sketch: CountMin | None = None  # made at the first fold (query heads known then)
        self.pending: list[torch.Tensor] = []
        self.pending_tokens = 0
        self.rate = math.log(2) / policy.half_life if policy.half_life else 0.0
        self.base = 0  # the position whose weight is exp(0)

    def push(self, queries: torch.Tensor) -> None:
        """Buffer a step's queries ``[B, Hq, q, D]`` (no copy unless they are a view of a larger tensor)."""
        if queries.untyped_storage().nbytes() != queries.numel() * queries.element_size():
            queries = queries.clone()
        self.pending.append(queries)
        self.pending_tokens += queries.shape[2]

    def fold(self, ctx) -> None:
        """Count the pending queries (the last ``pending_tokens`` slots of the layer) in the sketch."""
        if not self.pending:
            return
        q = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending, 2)
        self.pending, n = [], self.pending_tokens
        self.pending_tokens = 0
        b, hq, _, d = q.shape
        hkv = ctx.info.kv_heads
        p = self.policy
        if self.sketch is None:
            extra = d if p.read == "centroid" else 0
            self.sketch = CountMin((b, hkv, hq // hkv), p.width, p.depth, p.seed, extra, q.device)
        first = ctx.seen - n
        weight = ctx.valid[:, :1, ctx.valid.shape[-1] - n:].float()  # [B, 1, n]: padding counts 0
        if self.rate:
            if (ctx.seen - self.base) * self.rate > RENORMALISE:
                self.sketch.scale_(math.exp(-(first - self.base) * self.rate))
                self.base = first
            ages = torch.arange(first - self.base, ctx.seen - self.base, device=q.device, dtype=torch.float32)
            weight = weight * (ages * self.rate).exp()
        x = q.view(b, hkv, hq // hkv, n, d)
        if p.weighting == "norm":
            weight = weight.unsqueeze(1) * x.float().norm(dim=-1)  # [B, Hkv, G, n]
        else:
            weight = weight.unsqueeze(1).expand(b, hkv, hq // hkv, n)
        cells = simhash(x, self.planes, self.powers) if p.width > 1 else x[..., 0]  # width 1: no cells needed
        self.sketch.add(cells, weight, x if p.read == "centroid" else None)

    def score(self, ctx) -> torch.Tensor:
        """Importance ``[B, H_kv, S]`` of each stored key, read from the sketch."""
        self.fold(ctx)
        keys = ctx.keys
        b, h, s, d = keys.shape
        if self.sketch is None:  # nothing seen yet
            return torch.zeros((b, h, s), device=keys.device)
        cm = self.sketch
        if self.policy.read == "bucket":  # the Count-Min estimate of the key's own cell, summed over heads
            cells = simhash(keys, self.planes, self.powers).unsqueeze(2).expand(-1, -1, cm.table.shape[2], -1)
            return cm.estimate(cells).sum(2)
        table = cm.table  # [B, H, G, depth * width, 1 + D]
        mass = table[..., 0]
        centroids = table[..., 1:] / mass.clamp(min=1e-30).unsqueeze(-1)
        logits = keys.float().unsqueeze(2) @ centroids.transpose(-1, -2) * d**-0.5 + mass.log().unsqueeze(-2)
        rows = logits.view(b, h, -1, s, cm.depth, cm.width).logsumexp(-1).logsumexp(2)  # [B, H, S, depth]
        return rows.mean(-1)

    def buckets(self, keys: torch.Tensor, values: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """The aggregate bucket ``[B, H, S]`` of each slot: the SimHash cell of its value (or key, with
        ``fold_by="key"``) minus the mean over the ``exact`` slots."""
        x = (values if self.policy.fold_by == "value" else keys).float()
        w = exact.unsqueeze(-1)
        mean = (x * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
        return simhash(x - mean, self.fold_planes, self.fold_powers)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.sketch is not None:
            self.sketch.select_batch(index)
        self.pending = [t.index_select(0, index.to(t.device)) for t in self.pending]

    def tensors(self) -> list[torch.Tensor]:
        own = [self.planes, self.powers, *self.pending]
        if self.fold_planes is not None:
            own += [self.fold_planes, self.fold_powers]
        return own + (self.sketch.tensors() if self.sketch is not None else [])
