"""The Count-Min sketch the policy counts queries in: its classical guarantees, on random streams."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress_sketch import countmin
from kvcompress_sketch.countmin import MAX_ITEM, CountMin


def exact_counts(items: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct items and the exact total weight of each."""
    keys, inverse = torch.unique(items, return_inverse=True)
    return keys, torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, weights.double()).float()


def stream(seed: int, n: int, distinct: int, skew: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` items drawn from ``distinct`` random ids with Zipf-like frequencies, and weights in [0, 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MAX_ITEM, (distinct,), generator=g)
    p = torch.arange(1, distinct + 1, dtype=torch.float64) ** -skew
    items = ids[torch.multinomial(p, n, replacement=True, generator=g)]
    return items, 2 * torch.rand(n, generator=g, dtype=torch.float64).float()


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 64), depth=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       n=st.integers(1, 400), distinct=st.integers(1, 300), skew=st.floats(0.0, 2.0))
def test_estimate_never_undercounts(width, depth, seed, n, distinct, skew):
    items, weights = stream(seed, n, distinct, skew)
    cm = CountMin((1,), width, depth, seed)
    cm.add(items.view(1, -1), weights.view(1, -1))
    keys, want = exact_counts(items, weights)
    est = cm.estimate(keys.view(1, -1))[0]
    assert (est >= want - 1e-4 * (1 + want)).all()
    assert est.max() <= weights.sum() + 1e-3  # no counter holds more than the stream


@settings(max_examples=10, deadline=None)
@given(width=st.sampled_from([4, 8, 16, 32, 64]), depth=st.integers(1, 4), stream_seed=st.integers(0, 2**20),
       distinct=st.integers(50, 400), skew=st.floats(0.0, 1.5))
def test_error_within_e_over_width_of_total_with_probability_one_minus_exp_minus_depth(
        width, depth, stream_seed, distinct, skew):
    """For each item, over many seeds of the hashes, P[estimate - count > e/width * total] <= exp(-depth)."""
    items, weights = stream(stream_seed, 1000, distinct, skew)
    keys, want = exact_counts(items, weights)
    seeds = 120
    bound = math.e / width * float(weights.sum())
    failures = torch.zeros(len(keys))
    for seed in range(seeds):
        cm = CountMin((1,), width, depth, stream_seed * 1000 + seed)
        cm.add(items.view(1, -1), weights.view(1, -1))
        failures += (cm.estimate(keys.view(1, -1))[0] - want > bound).float()
    rate = failures / seeds  # per item, over the seeds
    p = math.exp(-depth)
    slack = 3 * math.sqrt(p * (1 - p) / seeds) + 1 / seeds  # three binomial standard deviations
    assert rate.max() <= p + slack, (rate.max(), p)
    assert rate.mean() <= p


def test_a_broken_hash_is_caught_by_the_bound():
    """The bound test can fail: hashes that send every item to one counter exceed it at once."""
    items, weights = stream(1, 2000, 200, 0.5)
    cm = CountMin((1,), 64, 3, 0)
    cm.coef[0].fill_(0)  # a = 0: every item lands on counter b mod width
    cm.add(items.view(1, -1), weights.view(1, -1))
    keys, want = exact_counts(items, weights)
    excess = cm.estimate(keys.view(1, -1))[0] - want
    assert (excess > math.e / 64 * float(weights.sum())).float().mean() > 0.9


@pytest.mark.parametrize("chunk", [10**9, 7 * 4 * 3])  # one matmul, or many small chunks of items
@pytest.mark.parametrize("width", [7, 1])  # width 1 takes a path without hashing
def test_counters_sum_the_vectors_of_their_items(monkeypatch, chunk, width):
    monkeypatch.setattr(countmin, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    rows, m, d, depth = (2, 3), 50, 5, 4
    items = torch.randint(0, MAX_ITEM, (*rows, m), generator=g)
    weights = torch.rand((*rows, m), generator=g)
    vectors = torch.randn((*rows, m, d), generator=g)
    cm = CountMin(rows, width, depth, seed=3, extra=d)
    cm.add(items, weights, vectors)
    index = cm.index(items)  # [2, 3, m, depth]
    want = torch.zeros(*rows, depth * width, 1 + d)
    for i in range(rows[0]):
        for j in range(rows[1]):
            for t in range(m):
                for r in range(depth):
                    want[i, j, index[i, j, t, r], 0] += weights[i, j, t]
                    want[i, j, index[i, j, t, r], 1:] += weights[i, j, t] * vectors[i, j, t]
    torch.testing.assert_close(cm.table, want, rtol=1e-5, atol=1e-5)
    assert ((index >= 0) & (index < depth * width)).all()
    assert (index // width == torch.arange(depth)).all()  # row r's counters are r * width .. (r + 1) * width - 1


def test_seeds_give_independent_rows_and_reproducible_tables():
    a, b = CountMin((1,), 16, 4, seed=5), CountMin((1,), 16, 4, seed=5)
    assert torch.equal(a.coef, b.coef)
    assert len(set(a.coef[0].tolist())) == 4  # four different multipliers: four different hashes
    assert not torch.equal(a.coef, CountMin((1,), 16, 4, seed=6).coef)
