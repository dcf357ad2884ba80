"""Seats per cluster follow Sainte-Lague apportionment of the shares, every cluster first; merge targets stay
inside a cluster."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress_cluster import seats


def _sainte_lague(share: list[float], sizes: list[int], seats_total: int) -> list[int]:
    """Plain reference: one seat per non-empty cluster first, then the largest share / (2 r + 1) each time."""
    got = [0] * len(share)
    for c, n in enumerate(sizes):
        if n and seats_total > sum(got):
            got[c] = 1
    while sum(got) < seats_total:
        bids = [(share[c] / (2 * got[c] + 1), -c) for c in range(len(share)) if got[c] < sizes[c]]
        _, c = max(bids)
        got[-c] += 1
    return got


@settings(max_examples=40, deadline=None)
@given(points=st.integers(8, 60), clusters=st.integers(1, 6), frac=st.floats(0.2, 1.0),
       seed=st.integers(0, 999))
def test_top_bids_give_sainte_lague_seats_in_rank_order(points, clusters, frac, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (1, points), generator=g)
    member = torch.rand(1, points, generator=g) < 0.9
    merit = torch.rand(1, points, generator=g)
    mass = torch.rand(1, points, generator=g) * 3
    sizes = [int((member & (labels == c)).sum()) for c in range(clusters)]
    total = max(sum(1 for n in sizes if n), int(frac * sum(sizes)))
    rank = seats.rank_in_cluster(labels, merit, member, clusters)
    share = seats.shares(labels, mass, member, clusters)
    bids = seats.priorities(labels, rank, share, member)
    kept = bids.topk(total, dim=-1).indices[0]
    per = [int((labels[0, kept] == c).sum()) for c in range(clusters)]
    assert per == _sainte_lague(share[0].tolist(), sizes, total)
    for c in range(clusters):  # inside a cluster, the best merits are the ones kept
        mine = (member[0] & (labels[0] == c)).nonzero().flatten()
        best = mine[merit[0, mine].argsort(descending=True)[: per[c]]]
        assert sorted(best.tolist()) == sorted(i for i in kept.tolist() if labels[0, i] == c)


def test_rank_in_cluster_counts_from_zero_per_cluster():
    labels = torch.tensor([[0, 1, 0, 1, 0, 2]])
    merit = torch.tensor([[0.1, 0.5, 0.9, 0.2, 0.5, 0.0]])
    member = torch.tensor([[True, True, True, True, True, False]])
    assert seats.rank_in_cluster(labels, merit, member, 3)[0, :5].tolist() == [2, 0, 0, 1, 1]


def test_merge_targets_are_the_nearest_kept_member_of_the_same_cluster():
    points = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7], [1.0, 0.05]]])
    labels = torch.tensor([[0, 0, 1, 1, 1, 0]])
    member = torch.ones(1, 6, dtype=torch.bool)
    keep = torch.tensor([[0, 2, 4]])
    into = seats.merge_targets(points, labels, member, keep, "cosine")
    # slot 1 and 5 -> slot 0 (index 0 in keep); slot 3 -> slot 2 (index 1), not slot 4 of the same cluster
    assert into[0, [1, 3, 5]].tolist() == [0, 1, 0]
    member[0, 5] = False
    assert seats.merge_targets(points, labels, member, keep, "l2")[0, 5] == -1  # not a candidate: not merged
