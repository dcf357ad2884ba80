"""One eviction of the ``cluster`` policy, batched over every (batch, kv-head) of a layer.

1. Candidates: the valid slots that are neither sink nor recent. Their keys are clustered (Lloyd,
   ``iters`` iterations, each point weighted by the tokens its slot stands for), starting from the
   previous eviction's clusters (each slot carries its cluster label; a cluster left empty restarts
   from one of the newest candidates) or, at a layer's first eviction, from a seeded k-means++.
2. Seats: each cluster's candidates bid ``share / (2r + 1)`` for their rank ``r`` in the cluster, every
   cluster's best above all (Sainte-Lague apportionment); the top bids stay, and the core's ``select``
   adds the protected tokens and pushes padding out. With ``share="attention"`` a cluster's share is the
   attention its tokens received and candidates rank by their own; with ``share="size"`` the share is its
   token count and candidates rank by smaller key norm.
3. ``merge``: each evicted candidate folds into its nearest kept candidate of the same cluster
   (:func:`kvcompress.merge_into`): the slot's bias becomes ``log n`` for the ``n`` tokens it now stands
   for, and its observed attention their sum. ``fold="mass"`` (the default with ``share="attention"``)
   keeps the kept token's key and value (the evicted tokens count as copies of their nearest kept
   neighbour); ``fold="mean"`` (the default with ``share="size"``) makes them the mean of the tokens',
   weighted by observed attention (by token count with ``share="size"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvcompress import Plan, merge_into

from . import kmeans, seats

if TYPE_CHECKING:  # pragma: no cover
    from kvcompress import SlotContext

    from .policy import Cluster


def protected(valid: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """The slots ``ctx.select`` protects: the first ``sink`` valid ones and the last ``recent``."""
    out = torch.zeros_like(valid)
    if sink:
        out |= valid.to(torch.int32).cumsum(-1) <= sink
    if recent:
        out[..., max(valid.shape[-1] - recent, 0):] = True
    return out & valid


def seeding(policy: Cluster, ctx: SlotContext, points: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """k-means++ centroids ``[N, C, D]`` drawn from numbers hashed from (seed + layer, kv-head, the token's
    index in its own sequence): the same prompt seeds the same clusters alone or in a left-padded batch."""
    b, h, s = ctx.valid.shape
    pads = (~ctx.valid[:, 0]).sum(-1, keepdim=True).view(b, 1, 1)  # first eviction: all padding still here
    tokens = (ctx.positions - pads).reshape(b * h, s)
    heads = torch.arange(b * h, device=points.device) % h
    seed = policy.seed + ctx.layer_idx
    return kmeans.kmeans_pp(points, weight, policy.clusters,
                            lambda draw: kmeans.hashed_uniform(seed, heads, tokens, draw), policy.distance)


def warm_start(policy: Cluster, ctx: SlotContext, points: torch.Tensor, weight: torch.Tensor,
               member: torch.Tensor) -> torch.Tensor:
    """The previous eviction's clusters, as the weighted means of the slots that still carry their label;
    an emptied cluster restarts from one of the newest candidates (the slots just before ``recent``)."""
    n, s, d = points.shape
    c = policy.clusters
    previous = ctx.state["cluster"].reshape(n, s).long() - 1
    labelled = member & (previous >= 0)
    newest = torch.arange(s - policy.recent - c, s - policy.recent, device=points.device).clamp(min=0)
    fallback = points.index_select(1, newest)
    return kmeans.update(points, torch.where(labelled, weight, 0.0), previous.clamp(min=0), fallback,
                         policy.distance)


def cluster_plan(policy: Cluster, ctx: SlotContext, target: int) -> Plan:
    """The plan of one eviction to ``target`` slots per (batch, kv-head)."""
    b, h, s = ctx.valid.shape
    n, c = b * h, policy.clusters
    keys = ctx.keys
    member = (ctx.valid & ~protected(ctx.valid, policy.sink, policy.recent)).reshape(n, s)
    bias = ctx.bias
    count = bias.exp().reshape(n, s) if bias is not None else torch.ones((n, s), device=keys.device)
    weight = torch.where(member, count, 0.0)
    points = kmeans.prepare(keys.reshape(n, s, -1), policy.distance)
    first = ctx.bound["evictions"] == 0
    start = seeding(policy, ctx, points, weight) if first else warm_start(policy, ctx, points, weight, member)
    _, labels = kmeans.lloyd(points, weight, start, policy.iters, policy.distance)
    ctx.bound["evictions"] += 1
    attention = ctx.state["acc"].reshape(n, s) if policy.needs_attention else None
    if attention is not None:
        merit, mass = attention, attention
    else:  # low key norm goes with high attention (Devoto et al. 2024)
        merit, mass = -keys.float().norm(dim=-1).reshape(n, s), count
    rank = seats.rank_in_cluster(labels, merit, member, c)
    bids = seats.priorities(labels, rank, seats.shares(labels, mass, member, c), member)
    keep = ctx.select(bids.view(b, h, s), target)
    k = keep.shape[-1]
    flat_keep = keep.reshape(n, k)
    label_state = torch.where(member, labels + 1, 0).to(torch.int32)
    states = {"cluster": label_state.gather(1, flat_keep).view(b, h, k)}
    if policy.mode == "evict":
        return Plan(keep=keep, states=states)
    into = seats.merge_targets(points, labels, member, flat_keep, policy.distance)
    # merge_into weighs each slot by its token count times `weights`
    if policy.folding == "mass":  # the kept slot's contents stay; it takes the evicted tokens' count
        kept = seats.slot_to_keep(flat_keep, s) >= 0
        weights = (torch.where(kept, 1.0, 1e-6) / count).view(b, h, s)
    elif attention is not None:  # means weighted by the attention each slot received
        weights = (attention / count).clamp(min=1e-6).view(b, h, s)
    else:  # means weighted by token count
        weights = None
    plan = merge_into(ctx, keep, into.view(b, h, s), weights=weights)
    if attention is not None:  # a merged slot has received the attention of every token it stands for
        own = seats.slot_to_keep(flat_keep, s)
        dest = torch.where(own >= 0, own, into)
        moved = torch.where(dest >= 0, attention, 0.0)
        acc = torch.zeros((n, k), dtype=torch.float32, device=keys.device)
        acc.scatter_add_(1, dest.clamp(min=0), moved)
        states["acc"] = acc.view(b, h, k)
    plan.states = states
    return plan
