"""The sketch's scores match a slow, plainly written reference on random queries and keys.

The policy runs inside the core's real ``CompressedLayer`` (append, on_tokens, evict); the reference
recomputes, for each kept key, the attention the counters' centroids would pay it (or the Count-Min
estimate of its cell) from every query counted, with its weight (padding 0, norm, decay).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcompress import CompressedLayer

from kvcompress_sketch import Sketch
from kvcompress_sketch.state import simhash


def drive(policy, forwards, batch, heads, groups, d, seed, pad):
    """Feed random keys and queries through a real layer; return the layer and every query fed."""
    g = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(policy, None, layer_idx=0)
    queries = []
    for i, q in enumerate(forwards):
        layer.update(torch.randn(batch, heads, q, d, generator=g), torch.randn(batch, heads, q, d, generator=g))
        query = torch.randn(batch, heads * groups, q, d, generator=g) + 0.5
        valid = None
        if i == 0 and pad:  # left padding in row 0 of the prompt
            valid = torch.ones(batch, q, dtype=torch.bool)
            valid[0, :pad] = False
        layer.finish_attention(valid, query)
        queries.append(query)
    return layer, torch.cat(queries, 2)


def reference_scores(policy, layer, queries, pad):
    state = layer.bound
    b, hq, n, d = queries.shape
    h = layer.info.kv_heads
    groups = hq // h
    keys = layer.store.keys_values()[0].double()
    weight = torch.ones(b, n, dtype=torch.float64)
    weight[0, :pad] = 0
    if policy.half_life:
        weight = weight * 2.0 ** (torch.arange(n, dtype=torch.float64) / policy.half_life)
    cm = state.sketch
    out = torch.zeros(keys.shape[:3], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for s in range(keys.shape[2]):
                k = keys[bi, hi, s]
                per_row = []
                for r in range(policy.depth):
                    mass = torch.zeros(groups, policy.width, dtype=torch.float64)
                    vec = torch.zeros(groups, policy.width, d, dtype=torch.float64)
                    for gi in range(groups):
                        for t in range(n):
                            q = queries[bi, hi * groups + gi, t]
                            w = weight[bi, t] * (q.double().norm() if policy.weighting == "norm" else 1.0)
                            cell = simhash(q.view(1, d), state.planes, state.powers)
                            counter = int(cm.index(cell)[0, r]) - r * policy.width
                            mass[gi, counter] += w
                            vec[gi, counter] += w * q.double()
                    if policy.read == "bucket":
                        cell = simhash(k.float().view(1, d), state.planes, state.powers)
                        per_row.append(mass[:, int(cm.index(cell)[0, r]) - r * policy.width])
                        continue
                    used = mass > 0
                    logits = (vec[used] / mass[used, None]) @ k / math.sqrt(d) + mass[used].log()
                    per_row.append(torch.logsumexp(logits, 0))
                if policy.read == "bucket":  # smallest counter per head, summed over the heads
                    out[bi, hi, s] = torch.stack(per_row).amin(0).sum()
                else:
                    out[bi, hi, s] = torch.stack(per_row).mean()
    return out


@settings(max_examples=12, deadline=None)
@given(width=st.sampled_from([1, 2, 8]), depth=st.integers(1, 3), planes=st.integers(1, 8),
       read=st.sampled_from(["centroid", "bucket"]), weighting=st.sampled_from(["one", "norm"]),
       half_life=st.sampled_from([0, 3, 50]), groups=st.integers(1, 3), prompt=st.integers(2, 12),
       decode=st.integers(0, 7), pad=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_scores_match_reference(width, depth, planes, read, weighting, half_life, groups, prompt, decode, pad,
                                seed):
    pad = min(pad, prompt - 1)
    policy = Sketch(budget=1000, sink=0, recent=0, step=3, width=width, depth=depth, planes=planes, read=read,
                    weighting=weighting, half_life=half_life, seed=seed % 7)
    layer, queries = drive(policy, [prompt] + [1] * decode, batch=2, heads=2, groups=groups, d=8, seed=seed, pad=pad)
    got = policy.score(layer.context()).double()
    want = reference_scores(policy, layer, queries, pad)
    if read == "centroid":  # decay folds a common factor into the table: compare differences between keys
        got, want = got - got[..., :1], want - want[..., :1]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    else:
        scale = 2.0 ** (-(layer.bound.base) / half_life) if half_life else 1.0
        torch.testing.assert_close(got, want * scale, rtol=1e-4, atol=1e-4)
    assert layer.bound.pending_tokens == 0  # score() folded what was pending
