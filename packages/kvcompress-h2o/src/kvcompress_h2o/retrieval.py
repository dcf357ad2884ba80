"""TOVA and SnapKV: attention-scored policies that keep what the latest queries (a question) look for.

H2O keeps the tokens every query has looked at; for a long document followed by a question, the tokens a
later question will need are often not those. TOVA keeps what the most recent query attends to; SnapKV
scores a prompt by the attention of its last queries (where the question sits), pooled so that the
neighbours of a hit stay too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcompress import SelectionPolicy, param

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from kvcompress import SlotContext


@dataclass
class TOVA(SelectionPolicy):
    """TOVA (Oren et al. 2024): keep the tokens the most recent query attends to most."""

    name: ClassVar[str] = "tova"
    needs_attention: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {"last": "float32"}

    heads: str = param("each", choices=("each", "layer"),
                       help="each: every kv head keeps what its own query heads attend to; layer: one score, "
                            "the attention averaged over all the layer's heads, keeps the same tokens in every "
                            "head (the paper's)")

    def accumulated_attention(self) -> tuple[str, str, str]:
        return "last", "sum", "set"  # a decode step's attention replaces the last one

    def observed_queries(self, q: int) -> int:
        return 1  # only the latest query counts: a prompt's other queries need no attention weights

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        import torch

        # summed over the G query heads of a kv head (the mean, for ranking); prompt chunks come in order,
        # so the last call of a forward leaves its last query's attention
        ctx.state["last"].copy_(weights[:, :, :, -1].sum(2, dtype=torch.float32))

    def score(self, ctx: SlotContext) -> torch.Tensor:
        last = ctx.state["last"]
        if self.heads == "layer":
            return last.mean(1, keepdim=True).expand_as(last)
        return last


@dataclass
class SnapKV(SelectionPolicy):
    """SnapKV (Li et al. 2024): score tokens by the attention of the last `votes` queries, pooled; keep those."""

    name: ClassVar[str] = "snapkv"
    needs_attention: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {"votes": "float32"}

    votes: int = param(64, min=1, help="the last queries of each forward whose attention scores the tokens "
                                       "(SnapKV's observation window); those queries' own tokens are kept")
    pool: int = param(5, min=1, help="width of the average pooling over neighbouring tokens' scores (odd)")

    def check(self) -> None:
        super().check()
        if self.pool % 2 == 0:
            raise ValueError(f"snapkv: parameter 'pool' is {self.pool}; allowed: an odd width (1, 3, 5, ...)")

    def accumulated_attention(self) -> tuple[str, str]:
        return "votes", "sum"  # a decode step's query is always among the last `votes`

    def observed_queries(self, q: int) -> int:
        return min(q, self.votes)  # the window only: the rest of a prompt needs no attention weights

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        import torch

        voting = query_positions >= ctx.seen - self.votes  # [q]: this chunk's queries in the window
        if weights.shape[3] == 1:
            ctx.state["votes"].add_(weights.sum((2, 3), dtype=torch.float32))
        elif bool(voting.any()):
            w = weights[:, :, :, voting.to(weights.device)]
            ctx.state["votes"].add_(w.sum((2, 3), dtype=torch.float32))

    def score(self, ctx: SlotContext) -> torch.Tensor:
        import torch.nn.functional as F

        votes = ctx.state["votes"]
        if self.pool > 1:
            b, h, s = votes.shape
            votes = F.avg_pool1d(votes.reshape(b * h, 1, s), self.pool, stride=1, padding=self.pool // 2,
                                 count_include_pad=False).view(b, h, s)
        return votes.masked_fill(ctx.positions >= ctx.seen - self.votes, float("inf"))
