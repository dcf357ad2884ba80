"""``cluster``: k-means over each (batch, kv-head)'s stored keys; evictions keep every cluster represented
in proportion to its share, and in ``merge`` mode fold evicted tokens into a kept slot of their cluster.

This module imports neither torch nor transformers (``kvcompress list`` stays fast); the eviction itself
lives in :mod:`kvcompress_cluster.evict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvcompress import SelectionPolicy, param

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvcompress import LayerInfo, Plan, SlotContext


@dataclass
class Cluster(SelectionPolicy):
    """k-means over keys: every cluster keeps seats in proportion to its share; ``merge`` folds the evicted
    tokens into their cluster's kept slots (weighted means, bias log n)."""

    name: ClassVar[str] = "cluster"

    sink: int = param(4, min=0, help="first tokens always kept (attention sinks)")
    recent: int = param(64, min=0, help="last tokens always kept")
    step: int = param(16, min=1, help="evict every `step` tokens (amortises the clustering and the gather)")
    clusters: int = param(16, min=1, help="k-means clusters per (batch, kv-head)")
    iters: int = param(2, min=1, help="Lloyd iterations per eviction (from the previous clusters)")
    distance: str = param("cosine", choices=("cosine", "l2"), help="k-means metric over keys")
    mode: str = param("merge", choices=("merge", "evict"),
                      help="merge: evicted tokens fold into a kept slot of their cluster; evict: dropped")
    fold: str | None = param(None, choices=("mass", "mean"),
                             help="merge: a kept slot keeps its key/value and takes the tokens' count "
                                  "(mass), or becomes their weighted mean (mean); unset: mass with "
                                  "share=attention, mean with share=size")
    share: str = param("attention", choices=("attention", "size"),
                       help="a cluster's seats follow its observed attention mass, or its token count")
    seed: int = param(0, min=0, help="k-means++ seeding (layer i draws from seed + i)")

    def check(self) -> None:
        super().check()
        seats = self.budget - self.sink - self.recent
        if self.ratio is None and self.clusters > seats:
            raise ValueError(
                f"cluster: parameter 'clusters' is {self.clusters}; allowed: at most budget - sink - recent "
                f"= {self.budget} - {self.sink} - {self.recent} = {seats} (each cluster needs a seat)"
            )

    @property
    def folding(self) -> str:
        """How merged slots are made: ``fold``, or the measured best for the ``share`` when unset."""
        if self.fold is not None:
            return self.fold
        return "mass" if self.share == "attention" else "mean"

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.share == "attention"

    @property
    def slot_states(self) -> dict[str, str]:  # type: ignore[override]
        states = {"cluster": "int32"}  # 1 + the slot's cluster at the last eviction; 0: not clustered yet
        if self.needs_attention:
            states["acc"] = "float32"
        return states

    def bind(self, layer: LayerInfo) -> dict[str, Any]:
        return {"evictions": 0}  # the first eviction seeds k-means++, later ones start from the last clusters

    def accumulated_attention(self) -> tuple[str, str] | None:
        return ("acc", "sum") if self.needs_attention else None

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        import torch

        ctx.state["acc"].add_(weights.sum((2, 3), dtype=torch.float32))

    def plan(self, ctx: SlotContext, target: int) -> Plan:
        from .evict import cluster_plan

        return cluster_plan(self, ctx, target)
