"""The aggregate strategy's evictions against a plainly written reference.

The policy runs inside the core's real ``CompressedLayer``; before each eviction the test takes the slot
table, recomputes by hand which tokens stay exact and what every bucket's slot must hold (count, mean
key, mean value), and compares with what the layer holds after the eviction.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcompress import CompressedLayer

from kvcompress_sketch import Sketch
from kvcompress_sketch.aggregate import EMPTY


def snapshot(layer):
    t = {name: layer.slots.view(name).clone() for name in layer.slots.tensors}
    keys, values = layer.store.keys_values()
    return t, keys.clone(), values.clone()


def expected_after(policy, layer, before):
    """Per (b, h): {('exact', position): (k, v)} and {('agg', bucket): (count, mean k, mean v)}."""
    t, keys, values = before
    ctx = layer.context()
    scores = policy.score(ctx)
    bucket_state = t["bucket"]
    is_agg = bucket_state > 0
    exact = t["valid"] & ~is_agg
    buckets = layer.bound.buckets(keys, values, exact)
    bias = t.get("bias", torch.zeros_like(scores))
    target = policy.target(layer.seen)
    b, h, s = scores.shape
    out = []
    for bi in range(b):
        for hi in range(h):
            real = [i for i in range(s) if exact[bi, hi, i]]
            protected = set(real[:policy.sink]) | {i for i in real if i >= s - policy.recent}
            rest = sorted((i for i in real if i not in protected), key=lambda i: -float(scores[bi, hi, i]))
            keep = protected | set(rest[:target - policy.buckets - len(protected)])
            row = {}
            for i in keep:
                row[("exact", int(t["positions"][bi, hi, i]))] = (1.0, keys[bi, hi, i], values[bi, hi, i])
            for c in range(policy.buckets):
                members = [(math.exp(float(bias[bi, hi, i])), keys[bi, hi, i], values[bi, hi, i])
                           for i in range(s) if is_agg[bi, hi, i] and int(bucket_state[bi, hi, i]) == c + 1]
                members += [(1.0, keys[bi, hi, i], values[bi, hi, i]) for i in real
                            if i not in keep and int(buckets[bi, hi, i]) == c]
                n = sum(m[0] for m in members)
                if n < 1e-6:
                    row[("agg", c)] = (0.0, None, None)
                    continue
                mk = sum(m[0] * m[1].double() for m in members) / n
                mv = sum(m[0] * m[2].double() for m in members) / n
                row[("agg", c)] = (n, mk, mv)
            out.append(row)
    return out


def held(layer):
    t, keys, values = snapshot(layer)
    bias = t.get("bias", torch.zeros(t["valid"].shape))
    b, h, s = t["valid"].shape
    rows = []
    for bi in range(b):
        for hi in range(h):
            row = {}
            for i in range(s):
                label = int(t["bucket"][bi, hi, i])
                key = ("agg", label - 1) if label else ("exact", int(t["positions"][bi, hi, i]))
                count = 0.0 if float(bias[bi, hi, i]) <= EMPTY / 2 else math.exp(float(bias[bi, hi, i]))
                row[key] = (count, keys[bi, hi, i], values[bi, hi, i])
            rows.append(row)
    return rows


@settings(max_examples=15, deadline=None)
@given(buckets=st.sampled_from([1, 2, 4]), sink=st.integers(0, 2), recent=st.integers(0, 3), step=st.integers(1, 4),
       extra=st.integers(0, 4), prompt=st.integers(1, 30), decode=st.integers(0, 25), seed=st.integers(0, 2**16))
def test_aggregate_matches_reference(buckets, sink, recent, step, extra, prompt, decode, seed):
    budget = sink + recent + buckets + extra
    policy = Sketch(budget=budget, sink=sink, recent=recent, step=step, strategy="aggregate", buckets=buckets)
    g = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(policy, None, layer_idx=0)
    evictions = 0
    for q in [prompt] + [1] * decode:
        layer.update(torch.randn(2, 2, q, 4, generator=g), torch.randn(2, 2, q, 4, generator=g))
        queries = torch.randn(2, 4, q, 4, generator=g)
        due = layer.slots.length >= policy.target(layer.seen) + step
        if not due:
            layer.finish_attention(None, queries)
            continue
        policy.on_tokens(layer.context(queries, q))  # count this step's queries first, as the layer does
        before = snapshot(layer)
        want = expected_after(policy, layer, before)
        layer._on_tokens = False  # already counted
        layer.finish_attention(None, queries)
        layer._on_tokens = True
        evictions += 1
        got = held(layer)
        for w, h_ in zip(want, got, strict=True):
            assert w.keys() == h_.keys()
            for key, (n, mk, mv) in w.items():
                hn, hk, hv = h_[key]
                assert abs(hn - n) < 1e-4 * max(1.0, n), (key, hn, n)
                if n > 0:
                    torch.testing.assert_close(hk.double(), mk.double(), rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(hv.double(), mv.double(), rtol=1e-4, atol=1e-5)
        counts = sum(n for n, _, _ in got[0].values())
        assert abs(counts - layer.seen) < 1e-3 * layer.seen  # every token seen is accounted for once
    if prompt + decode >= budget + step:
        assert evictions > 0
