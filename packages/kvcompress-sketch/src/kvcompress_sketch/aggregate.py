"""The ``aggregate`` strategy's eviction: exact sink + recent + top-k, the rest folded into bucket slots.

Every evicted token joins the aggregate slot of its bucket (a SimHash cell of its value, or of its key with
``fold_by="key"``, centred on the mean over the exact slots): the slot holds the count-weighted mean of its tokens' keys and values and the bias
``log count``, so attention gives it the weight of its ``count`` tokens (the core's
:func:`kvcompress.merge_into`). The first eviction adds all ``buckets`` aggregate slots at once
(``Plan(added=...)``); a bucket nobody has joined yet is an empty slot whose bias (``EMPTY``) makes its
attention weight exactly zero. So every (batch, kv-head) holds ``target - buckets`` exact slots and
``buckets`` aggregates: rows of a batch never differ in size, and a row behaves as it would alone. The
per-slot state ``bucket`` (0: an exact token, ``c + 1``: the aggregate of bucket ``c``) marks them.
"""

from __future__ import annotations

import torch
from kvcompress import Added, Plan, merge_into

EMPTY = -30000.0  # bias of an aggregate standing for no token: exp(EMPTY + score) == 0, finite in fp16


def aggregate_plan(policy, ctx, target: int) -> Plan:
    """Keep ``target - buckets`` exact slots by score; fold the evicted tokens into their buckets' slots."""
    state = ctx.state["bucket"]
    is_agg = state > 0
    exact = ctx.valid & ~is_agg
    keep = _exact_keep(policy, ctx, policy.score(ctx), exact, is_agg, target - policy.buckets)
    b, h, _ = exact.shape
    evicted = exact & ~torch.zeros_like(exact).scatter_(2, keep, True)
    bucket = ctx.bound.buckets(ctx.keys, ctx.values, exact)  # [B, H, S]
    if not bool(is_agg.any()):
        return _first(ctx, policy.buckets, keep, evicted, bucket)
    keep = torch.cat([keep, is_agg.nonzero()[:, 2].view(b, h, policy.buckets)], 2).sort(-1).values
    k = keep.shape[-1]
    agg_bucket = state.gather(2, keep).long() - 1  # [B, H, K]: -1 for exact slots
    slot_of = torch.full((b, h, policy.buckets), -1, dtype=torch.long, device=keep.device)
    where = torch.where(agg_bucket >= 0, torch.arange(k, device=keep.device), -1)
    slot_of.scatter_reduce_(2, agg_bucket.clamp(min=0), where, "amax")  # kept position of bucket c's slot
    into = torch.where(evicted, slot_of.gather(2, bucket), -1)
    plan = merge_into(ctx, keep, into)
    joined = torch.zeros((b, h, k), dtype=torch.int32, device=keep.device)
    joined.scatter_add_(2, into.clamp(min=0), (into >= 0).to(torch.int32))
    still_empty = (ctx.bias.gather(2, keep) <= EMPTY / 2) & (joined == 0)
    plan.bias = plan.bias.masked_fill(still_empty, EMPTY)
    return plan


def _exact_keep(policy, ctx, scores: torch.Tensor, exact: torch.Tensor, is_agg: torch.Tensor, k: int
                ) -> torch.Tensor:
    """The ``k`` exact slots to keep ``[B, H, k]`` (ascending): the first ``sink`` and last ``recent`` real
    tokens, then the best scored; padding fills a row with too few tokens, never an aggregate slot."""
    s = scores.shape[-1]
    order = scores.float().nan_to_num(0.0, 1e30, -1e30).clamp(-1e30, 1e30)
    protected = exact & (ctx.valid.to(torch.int32).cumsum(-1) <= policy.sink)
    if policy.recent:
        protected[..., max(s - policy.recent, 0):] |= exact[..., max(s - policy.recent, 0):]
    order = order.masked_fill(protected, 1e38).masked_fill(~ctx.valid, -1e37).masked_fill(is_agg, -1e38)
    return order.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _first(ctx, buckets: int, keep: torch.Tensor, evicted: torch.Tensor, bucket: torch.Tensor) -> Plan:
    """The first eviction: the kept slots stay as they are; ``buckets`` aggregate slots are added."""
    b, h, s = evicted.shape
    d = ctx.keys.shape[-1]
    w = evicted.float().unsqueeze(-1)
    index = bucket.unsqueeze(-1).expand(b, h, s, d)
    zeros = torch.zeros((b, h, buckets, d), dtype=torch.float32, device=keep.device)
    count = torch.zeros((b, h, buckets), dtype=torch.float32, device=keep.device).scatter_add_(2, bucket, w[..., 0])
    mean_k = zeros.scatter_add(2, index, ctx.keys.float() * w) / count.clamp(min=1).unsqueeze(-1)
    mean_v = zeros.scatter_add(2, index, ctx.values.float() * w) / count.clamp(min=1).unsqueeze(-1)
    positions = ctx.positions.masked_fill(~evicted, torch.iinfo(torch.int32).max)
    oldest = torch.full((b, h, buckets), torch.iinfo(torch.int32).max, dtype=torch.int32, device=keep.device)
    oldest.scatter_reduce_(2, bucket, positions, "amin")
    first = positions.amin(-1, keepdim=True).expand(b, h, buckets)  # an empty bucket sits with the others
    oldest = torch.where(count > 0, oldest, first)
    bias = torch.where(count > 0, count.clamp(min=1).log(), EMPTY)
    label = torch.arange(1, buckets + 1, dtype=torch.int32, device=keep.device).expand(b, h, buckets)
    added = Added(keys=mean_k.to(ctx.keys.dtype), values=mean_v.to(ctx.values.dtype), positions=oldest,
                  bias=bias, states={"bucket": label})
    return Plan(keep=keep, added=added)
