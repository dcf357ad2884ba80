"""Seats for clusters: which candidates stay so that every cluster is represented in proportion to its share,
and which kept slot of its cluster each evicted token merges into. Batched over rows ``[N, S]``."""

from __future__ import annotations

import torch


def rank_in_cluster(labels: torch.Tensor, merit: torch.Tensor, member: torch.Tensor,
                    clusters: int) -> torch.Tensor:
    """Rank ``[N, S]`` (0 = best) of each member among the members of its cluster, by ``merit`` descending
    (ties: earlier slot first); non-members rank after every member."""
    n, s = labels.shape
    lab = torch.where(member, labels, clusters)  # non-members: a pseudo-cluster sorted last
    by_merit = merit.masked_fill(~member, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    by_cluster = lab.gather(1, by_merit).argsort(dim=-1, stable=True)
    order = by_merit.gather(1, by_cluster)  # slots sorted by (cluster, -merit)
    sizes = torch.zeros((n, clusters + 1), dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(1, lab, torch.ones_like(lab))
    start = sizes.cumsum(1) - sizes
    sorted_lab = lab.gather(1, order)
    ranks = torch.arange(s, device=labels.device).expand(n, s) - start.gather(1, sorted_lab)
    return torch.empty_like(ranks).scatter_(1, order, ranks)


def shares(labels: torch.Tensor, mass: torch.Tensor, member: torch.Tensor, clusters: int) -> torch.Tensor:
    """Each cluster's share ``[N, C]``: the summed ``mass`` of its members."""
    out = torch.zeros((labels.shape[0], clusters), dtype=torch.float32, device=labels.device)
    return out.scatter_add_(1, labels, torch.where(member, mass.float(), 0.0))


def priorities(labels: torch.Tensor, rank: torch.Tensor, share: torch.Tensor,
               member: torch.Tensor) -> torch.Tensor:
    """Seat priority ``[N, S]`` of each member (Sainte-Lague: a cluster's ``r``-th member bids
    ``share / (2r + 1)``), with each cluster's best member above every other bid so that every cluster is
    represented first. Taking the top k bids gives each cluster seats in proportion to its share, filled
    in rank order. Non-members bid ``-inf``."""
    share = share.clamp(min=1e-12)
    bid = share.gather(1, labels) / (2 * rank + 1).float()
    first = share.sum(1, keepdim=True) + 1.0
    bid = torch.where(rank == 0, bid + first, bid)
    return bid.masked_fill(~member, float("-inf"))


def slot_to_keep(keep: torch.Tensor, slots: int) -> torch.Tensor:
    """For each slot ``[N, S]``, its index in ``keep`` ``[N, K]``, or -1 if evicted."""
    n, k = keep.shape
    out = torch.full((n, slots), -1, dtype=torch.int64, device=keep.device)
    return out.scatter_(1, keep, torch.arange(k, device=keep.device).expand(n, k))


def merge_targets(points: torch.Tensor, labels: torch.Tensor, member: torch.Tensor, keep: torch.Tensor,
                  distance: str, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """``into`` ``[N, S]`` for :func:`kvcompress.merge_into`: each evicted member's nearest kept member of its
    own cluster (by the clustering's metric over the prepared ``points``), as an index into ``keep``; -1
    where none (kept slots, non-members, a cluster left without a kept member). Only the ``S - K`` evicted
    slots are compared with the kept ones (a decode-time eviction compares ``step`` slots), in chunks, so
    that a long prompt never builds an ``S x K`` matrix per row at once."""
    n, s, d = points.shape
    k = keep.shape[1]
    kept = slot_to_keep(keep, s) >= 0
    evicted = kept.to(torch.uint8).argsort(dim=-1, stable=True)[:, : s - k]  # [N, E] the slots not kept
    kept_points = points.gather(1, keep.unsqueeze(-1).expand(n, k, d))
    # a protected slot (sink, recent) is no merge target
    kept_labels = labels.gather(1, keep).masked_fill(~member.gather(1, keep), -1)
    # nearest in L2: the largest x.c - |c|^2 / 2; on the sphere: the largest x.c
    offset = None if distance == "cosine" else 0.5 * kept_points.square().sum(-1).unsqueeze(1)
    into = torch.full((n, s), -1, dtype=torch.int64, device=points.device)
    step = max(1, chunk_elements // max(1, n * k))
    for start in range(0, s - k, step):
        rows = evicted[:, start:start + step]  # [N, c]
        x = points.gather(1, rows.unsqueeze(-1).expand(*rows.shape, d))
        sim = torch.bmm(x, kept_points.transpose(1, 2))  # [N, c, K]
        if offset is not None:
            sim = sim - offset
        other = labels.gather(1, rows).unsqueeze(-1) != kept_labels.unsqueeze(1)
        best, idx = sim.masked_fill_(other, float("-inf")).max(-1)
        ok = torch.isfinite(best) & member.gather(1, rows)
        into.scatter_(1, rows, torch.where(ok, idx, -1))
    return into
