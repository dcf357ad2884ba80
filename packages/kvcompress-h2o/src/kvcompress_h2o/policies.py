"""H2O and LRU: selection policies scored from the attention the core lets them observe.

The core hands :meth:`observe` the softmax weights ``[B, H_kv, G, q, S]`` of every
query (decode steps in the attention pass itself, prompts in chunks of queries)
and gathers the per-slot state with the kept tokens; these policies only score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvcompress import SelectionPolicy, param

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from kvcompress import LayerInfo, SlotContext


@dataclass
class AttentionScored(SelectionPolicy):
    """Base of the attention-scored policies: records which kind of compression ran.

    Each layer's bound state counts its evictions: ``"prompt"`` right after a multi-token forward (a
    prompt compressed once after prefill), ``"decode"`` after a one-token decode step (the cache held
    within budget while generating); :func:`mode` reads them off a cache.
    """

    needs_attention: ClassVar[bool] = True

    def bind(self, layer: LayerInfo) -> dict[str, Any]:
        return {"prompt": 0, "decode": 0}

    def _note_eviction(self, ctx: SlotContext) -> None:
        # right after a multi-token forward (or a cache.compress() between forwards): a prompt compressed
        ctx.bound["decode" if ctx.new == 1 else "prompt"] += 1


def evictions(cache: Any) -> dict[str, int]:
    """Layer evictions of an attention-scored cache, summed over its layers: ``{"prompt": n, "decode": m}``."""
    totals = {"prompt": 0, "decode": 0}
    for layer in getattr(cache, "layers", []):
        bound = getattr(layer, "bound", None)
        if isinstance(bound, dict):
            for key in totals:
                totals[key] += bound.get(key, 0)
    return totals


def mode(cache: Any) -> str:
    """``"none"``, ``"prompt"``, ``"decode"`` or ``"prompt+decode"``: which compressions ran in ``cache``."""
    counts = evictions(cache)
    return "+".join(m for m in ("prompt", "decode") if counts[m]) or "none"


@dataclass
class H2O(AttentionScored):
    """Heavy-Hitter Oracle: keep the tokens with the most accumulated attention plus the most recent."""

    name: ClassVar[str] = "h2o"
    slot_states: ClassVar[dict[str, str]] = {"acc": "float32"}

    heavy_ratio: float = param(0.5, min=0.0, max=1.0, help="share of the budget for heavy hitters")
    recent_ratio: float = param(0.5, min=0.0, max=1.0, help="share of the budget for the most recent tokens")
    gqa: str = param("sum", choices=("sum", "max"),
                     help="how the query heads sharing a kv head combine their attention")
    normalize: bool = param(False, help="divide accumulated attention by the number of queries a token has seen")

    def check(self) -> None:
        super().check()
        if abs(self.heavy_ratio + self.recent_ratio - 1.0) > 1e-6:
            raise ValueError(
                f"h2o: parameters 'heavy_ratio' ({self.heavy_ratio}) and 'recent_ratio' ({self.recent_ratio}) "
                f"sum to {self.heavy_ratio + self.recent_ratio:g}; allowed: they must sum to 1"
            )

    def accumulated_attention(self) -> tuple[str, str]:
        return "acc", self.gqa  # what observe() does, so a decode step may fuse it into attention

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        import torch

        heads = weights if self.gqa == "sum" else weights.amax(2, keepdim=True)  # [B, Hkv, G or 1, q, S]
        ctx.state["acc"].add_(heads.sum((2, 3), dtype=torch.float32))

    def score(self, ctx: SlotContext) -> torch.Tensor:
        self._note_eviction(ctx)
        acc = ctx.state["acc"]
        if self.normalize:  # a kept token at position p has been attended by the queries p .. seen-1
            acc = acc / (ctx.seen - ctx.positions).clamp(min=1)
        n_recent = round(self.recent_ratio * self.target(ctx.seen))
        return acc.masked_fill(ctx.positions >= ctx.seen - n_recent, float("inf"))


@dataclass
class LRU(AttentionScored):
    """Least recently used: evict the tokens whose last attention above `threshold` is oldest."""

    name: ClassVar[str] = "lru"
    slot_states: ClassVar[dict[str, str]] = {"last": "float32"}

    threshold: float = param(0.01, min=0.0, max=1.0, min_exclusive=True,
                             help="attention weight at which a query counts as using a token")

    def accumulated_attention(self) -> tuple[str, str, float]:
        return "last", "last", self.threshold  # what observe() does, so a prompt's observation may be fused

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        import torch

        used = (weights > self.threshold).any(2)  # [B, Hkv, q, S]: any query head of the group
        when = query_positions.to(torch.float32).view(1, 1, -1, 1)
        last = ctx.state["last"]
        last.copy_(torch.maximum(last, torch.where(used, when, -1.0).amax(2)))

    def score(self, ctx: SlotContext) -> torch.Tensor:
        import torch

        self._note_eviction(ctx)
        return torch.maximum(ctx.state["last"], ctx.positions.to(torch.float32))  # arrival counts as a use
