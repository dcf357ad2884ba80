"""The ``sketch-overlap`` harness task: what the sketch's shared counters do to the kept set.

At every eviction of every layer the stored keys are also scored from *exact* per-cell statistics: the
same SimHash cells of the same queries, with the same weights, each cell with a counter of its own (in a
Count-Min row of ``width`` counters, cells share one). The task records the overlap of the two kept sets
over the slots the policy chooses (the protected sink and recent slots left out) and the streaming
perplexity of the text (``drive="exact"``: the exact scores decide the evictions instead).

Registered only for the harness (``kvcompress run --task sketch-overlap --policy "sketch(...)"``); this
module imports neither torch nor the harness until a cell runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .policy import Sketch


def exact_scores(state: Any, queries: Any, weights: Any, keys: Any, read: str) -> Any:
    """Scores ``[B, H, S]`` of ``keys`` ``[B, H, S, D]`` from exact per-cell counts and sums of every query
    seen, ``queries`` ``[B, H, G, n, D]`` with ``weights`` ``[B, H, G, n]`` (the sketch's own cells)."""
    import torch

    from .state import simhash

    b, h, g, _, d = queries.shape
    cells = simhash(queries, state.planes, state.powers)  # [B, H, G, n]
    out = torch.empty(keys.shape[:3], dtype=torch.float32)
    for bi in range(b):
        for hi in range(h):
            per_head = []
            key_cells = simhash(keys[bi, hi].float(), state.planes, state.powers)
            for gi in range(g):
                unique, inverse = torch.unique(cells[bi, hi, gi], return_inverse=True)
                w = weights[bi, hi, gi].float()
                mass = torch.zeros(len(unique)).index_add_(0, inverse, w)
                if read == "bucket":
                    pos = torch.searchsorted(unique, key_cells).clamp(max=len(unique) - 1)
                    per_head.append(torch.where(unique[pos] == key_cells, mass[pos], 0.0))
                    continue
                sums = torch.zeros(len(unique), d).index_add_(0, inverse, queries[bi, hi, gi].float() * w[:, None])
                mu = sums / mass.clamp(min=1e-30)[:, None]
                per_head.append(torch.logsumexp(keys[bi, hi].float() @ mu.T * d**-0.5 + mass.log(), -1))
            stacked = torch.stack(per_head)
            out[bi, hi] = stacked.sum(0) if read == "bucket" else torch.logsumexp(stacked, 0)
    return out


@dataclass
class Audited(Sketch):
    """The sketch policy, also scoring every eviction from exact per-cell statistics (batch 1)."""

    drive: str = "sketch"
    overlaps: list = field(default_factory=list, repr=False, compare=False)
    history: dict = field(default_factory=dict, repr=False, compare=False)

    def on_tokens(self, ctx: Any) -> None:
        import torch

        q = ctx.queries
        b, hq, n, d = q.shape
        h = ctx.info.kv_heads
        x = q.float().view(b, h, hq // h, n, d)
        w = ctx.valid[:, :1, ctx.valid.shape[-1] - n:].float().unsqueeze(1).expand(b, h, hq // h, n)
        if self.weighting == "norm":
            w = w * x.norm(dim=-1)
        if self.half_life:  # the sketch's decay: a query's weight doubles every half_life tokens of age
            w = w * 2.0 ** (torch.arange(ctx.seen - n, ctx.seen, dtype=torch.float32) / self.half_life)
        old = self.history.get(ctx.layer_idx)
        self.history[ctx.layer_idx] = (x, w) if old is None else (torch.cat([old[0], x], 3),
                                                                  torch.cat([old[1], w], 3))
        super().on_tokens(ctx)

    def score(self, ctx: Any) -> Any:
        sketch = super().score(ctx)
        x, w = self.history[ctx.layer_idx]
        exact = exact_scores(ctx.bound, x, w, ctx.keys, self.read)
        target = self.target(ctx.seen)
        protected = min(self.sink + self.recent, target)
        a, e = ctx.select(sketch, target), ctx.select(exact, target)
        same = (a.unsqueeze(-1) == e.unsqueeze(-2)).any(-1).sum(-1).float()
        self.overlaps.append(float(((same - protected) / max(target - protected, 1)).mean()))
        return exact if self.drive == "exact" else sketch


class OverlapTask:
    """Overlap of the sketch's kept set with the one exact per-cell counts keep, and streaming perplexity."""

    name = "sketch-overlap"
    primary = "kept_overlap"
    higher_is_better = True
    default_lengths = (2048,)
    defaults: ClassVar[dict[str, Any]] = {"offset": 0, "drive": "sketch"}
    limits: ClassVar[dict[str, tuple]] = {"offset": (0, None)}
    choices: ClassVar[dict[str, tuple]] = {"drive": ("sketch", "exact")}
    labels: ClassVar[dict[str, str]] = {
        "kept_overlap": "chosen slots kept by both the sketch and exact counts (fraction, mean over evictions)",
        "kept_overlap_min": "the smallest overlap at one eviction (fraction)",
        "ppl": "perplexity (lower is better)"}

    def run(self, ctx: Any) -> dict[str, Any]:
        import kvcompress
        import torch
        import torch.nn.functional as F
        from kvcompress_harness.decoding import prefill

        ids = ctx.tokens(ctx.length, offset=int(ctx.params["offset"]))
        if ctx.spec == "full":  # everything is kept: the exact set itself
            cache, policy = ctx.make_cache(), None
        else:
            selection, representation = kvcompress.build_policies(ctx.spec)
            if type(selection) is not Sketch or representation is not None:
                raise ValueError(f"sketch-overlap: policy {ctx.spec!r}; allowed: a sketch(...) spec alone")
            params = {f.name: getattr(selection, f.name) for f in fields(Sketch)}
            policy = Audited(**params, drive=ctx.params["drive"])
            kvcompress.attach(ctx.model)  # the harness attached it already; a plain model is attached here
            cache = kvcompress.CompressedCache(policy, model=ctx.model)
        total, count = torch.zeros((), dtype=torch.float64), 0

        def score(start: int, end: int, logits: Any) -> None:
            nonlocal total, count
            targets = ids[0, start + 1:end + 1]
            if targets.numel():
                total += F.cross_entropy(logits[0, :targets.numel()], targets, reduction="sum").double().cpu()
                count += targets.numel()

        prefill(ctx.model, ids, cache, chunk=ctx.chunk or 1, on_logits=score)
        overlaps = policy.overlaps if policy is not None and policy.overlaps else [1.0]
        return {"kept_overlap": sum(overlaps) / len(overlaps), "kept_overlap_min": min(overlaps),
                "evictions": len(overlaps) if policy is not None else 0, "ppl": float(torch.exp(total / count)),
                "kv_bytes": kvcompress.kv_bytes(cache)}
