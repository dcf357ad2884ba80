"""An eviction as a plan: which slots stay, what they now hold, and what attention adds to each.

The default plan of a selection policy keeps the top slots of its ``score()``. A policy that merges
evicted tokens (cluster, sketch aggregates) returns a plan with new contents for some kept slots and a
per-slot attention bias (``log n`` for a slot that stands for ``n`` tokens), or extra slots. The layer
applies a plan to its whole slot table (positions, validity, per-slot state, bias) and to its store in
one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Added:
    """Slots a plan adds ``[B, H_kv, A, ...]``: they take their place among the kept slots by position."""

    keys: torch.Tensor  # [B, H, A, D]
    values: torch.Tensor  # [B, H, A, D]
    positions: torch.Tensor  # [B, H, A] the position the slot is ordered by (e.g. its oldest token's)
    bias: torch.Tensor | None = None  # [B, H, A] float32
    states: dict[str, torch.Tensor] | None = None  # per-slot state of the added slots (default zero)


@dataclass
class Plan:
    """One eviction, per (batch, kv-head).

    ``keep`` ``[B, H_kv, K]``: the slots that stay, ascending (temporal order). ``keys``/``values``
    ``[B, H_kv, K, D]``: new contents of the kept slots where ``changed`` ``[B, H_kv, K]`` (default: every
    kept slot when ``keys`` is given). ``bias`` ``[B, H_kv, K]`` float32: the kept slots' new additive
    attention bias (default: each keeps its own, zero if it had none). ``states``: new per-slot state of
    the kept slots. ``added``: extra slots. Kept plus added slots must fit the policy's target.
    """

    keep: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    changed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    states: dict[str, torch.Tensor] | None = None
    added: Added | None = None

    @property
    def size(self) -> int:
        """Slots after the plan."""
        return self.keep.shape[-1] + (0 if self.added is None else self.added.keys.shape[2])


def merge_into(ctx, keep: torch.Tensor, into: torch.Tensor, weights: torch.Tensor | None = None) -> Plan:
    """A plan that keeps ``keep`` ``[B, H, K]`` and merges other slots into kept ones.

    ``into`` ``[B, H, S]`` names, for each stored slot, the position ``0..K-1`` in ``keep`` of the kept slot
    it merges into, or ``-1`` to drop it; kept slots always stand for themselves (their own entry is
    ignored) and padding is always dropped. Each kept slot becomes the mean of the keys (and values) of the
    tokens it then stands for, weighted by how many tokens each merged slot already stood for (``exp`` of
    its bias) times ``weights`` ``[B, H, S]`` if given; its bias becomes ``log`` of the number of tokens it
    stands for. n copies of one token merged into one slot give that token with bias ``log n``: the same
    softmax attention as the n copies.
    """
    b, h, k = keep.shape
    s = into.shape[-1]
    keys, values = ctx.keys, ctx.values
    d = keys.shape[-1]
    bias = ctx.bias
    count = torch.where(ctx.valid, 1.0, 0.0) if bias is None else torch.where(ctx.valid, bias.exp(), 0.0)
    into = into.clone()
    into.scatter_(2, keep, torch.arange(k, device=keep.device).view(1, 1, k).expand(b, h, k))
    into = torch.where(ctx.valid, into, -1)
    live = into >= 0
    w = count if weights is None else count * weights.float()
    w = torch.where(live, w, 0.0)
    target = into.clamp(min=0)
    total = torch.zeros((b, h, k), dtype=torch.float32, device=keys.device).scatter_add_(2, target, w)
    tokens = torch.zeros((b, h, k), dtype=torch.float32, device=keys.device)
    tokens.scatter_add_(2, target, torch.where(live, count, 0.0))
    members = torch.zeros((b, h, k), dtype=torch.int32, device=keys.device)
    members.scatter_add_(2, target, live.to(torch.int32))
    idx = target.unsqueeze(-1).expand(b, h, s, d)
    wk = (keys.float() * w.unsqueeze(-1))
    wv = (values.float() * w.unsqueeze(-1))
    new_k = torch.zeros((b, h, k, d), dtype=torch.float32, device=keys.device).scatter_add_(2, idx, wk)
    new_v = torch.zeros((b, h, k, d), dtype=torch.float32, device=keys.device).scatter_add_(2, idx, wv)
    denom = total.clamp(min=1e-30).unsqueeze(-1)
    changed = members > 1
    return Plan(keep=keep, keys=(new_k / denom).to(keys.dtype), values=(new_v / denom).to(values.dtype),
                changed=changed, bias=tokens.clamp(min=1.0).log())
