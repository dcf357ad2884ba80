"""``sketch``: which tokens to keep, read from a Count-Min sketch of what the queries look for.

No attention weights: each layer keeps, per query head, a Count-Min sketch of its queries (SimHash cells
of the queries, counted with their sum; see :mod:`.state`), a state that does not grow with the context.
At an eviction a key's importance is the attention the sketch's counters would pay it: ``log sum_c n_c
exp(mu_c . k / sqrt(d))`` over the counters ``c`` of a row (count ``n_c``, centroid ``mu_c``) and the query
heads of its kv head, averaged over the rows (``read="centroid"``), or the classical Count-Min estimate of
the key's own cell (``read="bucket"``). ``strategy="topk"`` keeps the first ``sink``, the last ``recent`` and
the best-scored others; ``strategy="aggregate"`` folds the evicted tokens into at most ``buckets`` slots
(sum of keys and values, count) that attention sees with a ``log count`` bias.

This module imports neither torch nor transformers (``kvcompress list`` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvcompress import SelectionPolicy, param

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from kvcompress import LayerInfo, Plan, SlotContext


@dataclass
class Sketch(SelectionPolicy):
    """Keep the tokens a Count-Min sketch of the queries says they look for (constant state per layer)."""

    name: ClassVar[str] = "sketch"

    budget: int = param(256, min=1, help="max tokens kept per (batch, kv-head)")
    sink: int = param(4, min=0, help="first tokens always kept")
    recent: int = param(64, min=0, help="last tokens always kept")
    step: int = param(32, min=1, help="evict (and fold the buffered queries in) every `step` tokens")
    strategy: str = param("topk", choices=("topk", "aggregate"),
                          help="topk: drop the evicted tokens; aggregate: fold them into per-bucket slots")
    width: int = param(1, min=1, max=4096, help="counters per row of the sketch (per query head)")
    depth: int = param(1, min=1, max=16, help="rows of the sketch, each with its own seeded hash")
    planes: int = param(16, min=1, max=24, help="SimHash hyperplanes: queries fall in 2**planes cells")
    read: str = param("centroid", choices=("centroid", "bucket"),
                      help="centroid: attention of the counters' mean queries; bucket: the key's cell count")
    weighting: str = param("one", choices=("one", "norm"), help="a query counts 1 or its norm")
    half_life: int = param(0, min=0, help="tokens after which a query counts half (0: no decay)")
    buckets: int = param(4, min=1, max=4096, help="aggregate: most slots the evicted tokens fold into "
                                                    "(a power of two: SimHash cells of the keys)")
    fold_by: str = param("value", choices=("value", "key"),
                         help="aggregate: a token's bucket is the SimHash cell of its value or of its key")
    seed: int = param(0, min=0, help="seed of the hyperplanes and hashes (layer i: its own draw)")

    @property
    def slot_states(self) -> dict[str, str]:  # aggregate: which slot is the aggregate of which bucket
        return {"bucket": "int32"} if self.strategy == "aggregate" else {}

    def check(self) -> None:
        if self.strategy == "aggregate":
            if self.buckets & (self.buckets - 1):
                raise ValueError(f"sketch: parameter 'buckets' got {self.buckets}; allowed: a power of two "
                                 "(aggregates are SimHash cells of the keys)")
            if self.adaptive > 1.0:
                raise ValueError(f"sketch: parameter 'adaptive' got {self.adaptive}; allowed: 1.0 with strategy "
                                 "'aggregate' (every head holds the same exact slots and buckets)")
            reserved = self.sink + self.recent + self.buckets
            if self.ratio is None and self.budget < reserved:
                raise ValueError(
                    f"sketch: parameter 'budget' is {self.budget}; allowed: >= sink + recent + buckets = "
                    f"{self.sink} + {self.recent} + {self.buckets} = {reserved} (strategy 'aggregate')")
        super().check()

    def target(self, seen: int) -> int | None:
        target = super().target(seen)
        if self.strategy == "aggregate" and target is not None:
            return max(target, self.sink + self.recent + self.buckets)
        return target

    def bind(self, layer: LayerInfo) -> Any:
        from .state import QuerySketch

        return QuerySketch(self, layer)

    def on_tokens(self, ctx: SlotContext) -> None:
        state = ctx.bound
        state.push(ctx.queries)
        if ctx.new > 1 or state.pending_tokens >= self.step:
            state.fold(ctx)

    def score(self, ctx: SlotContext) -> torch.Tensor:
        return ctx.bound.score(ctx)

    def plan(self, ctx: SlotContext, target: int) -> Plan:
        if self.strategy == "topk":
            return super().plan(ctx, target)
        from .aggregate import aggregate_plan

        return aggregate_plan(self, ctx, target)
