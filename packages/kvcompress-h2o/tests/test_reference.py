"""The kept set matches slow, plainly written references of H2O and LRU on random attention inputs.

The policies run inside the core's real ``CompressedLayer`` (append, observe, evict);
only the attention weights are random (causal, normalised), so every eviction
decision can be recomputed by hand.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcompress import CompressedLayer

from kvcompress_h2o import H2O, LRU


def random_attention(positions: torch.Tensor, query_pos: list[int], groups: int, gen) -> torch.Tensor:
    """Causal softmax-like weights ``[B, H, G, q, S]`` over the stored slots."""
    b, h, s = positions.shape
    raw = torch.rand((b, h, groups, len(query_pos), s), generator=gen) ** 4  # peaky, like real attention
    qpos = torch.tensor(query_pos).view(1, 1, 1, -1, 1)
    raw = raw * (positions[:, :, None, None, :] <= qpos)
    return raw / raw.sum(-1, keepdim=True)


def drive(policy, forwards: list[int], batch: int, heads: int, groups: int, seed: int, layers: list | None = None):
    """Run ``forwards`` (tokens per forward) through a real layer; yield (weights, positions before/after)."""
    gen = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(policy, None, layer_idx=0)
    if layers is not None:
        layers.append(layer)
    for q in forwards:
        layer.update(torch.randn(batch, heads, q, 4), torch.randn(batch, heads, q, 4))
        before = layer.slots.view("positions").clone()
        qpos = list(range(layer.seen - q, layer.seen))
        weights = random_attention(before, qpos, groups, gen)
        policy.observe(layer.context(), weights, torch.tensor(qpos, dtype=torch.int32))
        layer.finish_attention(None, torch.zeros(batch, heads * groups, q, 4))  # as attention calls it
        yield weights, before, layer.slots.view("positions").tolist(), layer.seen


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(2, 24), step=st.integers(1, 6), recent_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]),
       gqa=st.sampled_from(["sum", "max"]), normalize=st.booleans(), prompt=st.integers(1, 40),
       decode=st.integers(0, 30), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_h2o_matches_reference(budget, step, recent_ratio, gqa, normalize, prompt, decode, groups, seed):
    policy = H2O(budget=budget, step=step, heavy_ratio=1.0 - recent_ratio, recent_ratio=recent_ratio, gqa=gqa,
                 normalize=normalize)
    batch, heads = 2, 2
    kept = [[[] for _ in range(heads)] for _ in range(batch)]  # positions kept, per (b, h)
    acc = [[{} for _ in range(heads)] for _ in range(batch)]  # position -> accumulated attention
    seen_by = [[{} for _ in range(heads)] for _ in range(batch)]  # position -> queries that attended it
    layers: list = []
    for weights, before, after, seen in drive(policy, [prompt] + [1] * decode, batch, heads, groups, seed, layers):
        q = weights.shape[3]
        for b in range(batch):
            for h in range(heads):
                kept[b][h] += list(range(seen - q, seen))
                assert before[b, h].tolist() == kept[b][h]
                for j, pos in enumerate(kept[b][h]):
                    for i in range(q):
                        per_head = [float(weights[b, h, g, i, j]) for g in range(groups)]
                        acc[b][h][pos] = acc[b][h].get(pos, 0.0) + (sum(per_head) if gqa == "sum"
                                                                    else max(per_head))
                        if pos <= seen - q + i:
                            seen_by[b][h][pos] = seen_by[b][h].get(pos, 0) + 1
                if len(kept[b][h]) >= budget + step:
                    n_recent = round(recent_ratio * budget)
                    recent = [p for p in kept[b][h] if p >= seen - n_recent]
                    rest = [p for p in kept[b][h] if p < seen - n_recent]

                    def score(p, b=b, h=h):
                        return acc[b][h][p] / seen_by[b][h][p] if normalize else acc[b][h][p]

                    heavy = sorted(rest, key=score, reverse=True)[: budget - len(recent)]
                    kept[b][h] = sorted(recent + heavy)
                assert after[b][h] == kept[b][h], (b, h, after[b][h], kept[b][h])
                assert len(kept[b][h]) < budget + step
    total = prompt + decode
    counts = layers[0].bound  # the layer's own eviction counters
    assert counts["prompt"] + counts["decode"] == (0 if total < budget + step else layers[0].evictions)
    assert counts["prompt"] == (1 if prompt >= budget + step and prompt > 1 else 0)


@settings(max_examples=30, deadline=None)
@given(budget=st.integers(1, 20), step=st.integers(1, 5), threshold=st.sampled_from([0.02, 0.1, 0.3]),
       prompt=st.integers(1, 40), decode=st.integers(0, 30), groups=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_lru_matches_reference(budget, step, threshold, prompt, decode, groups, seed):
    policy = LRU(budget=budget, step=step, threshold=threshold)
    batch, heads = 1, 3
    last = [{} for _ in range(heads)]  # position -> last query position that gave it weight > threshold
    for weights, before, after, seen in drive(policy, [prompt] + [1] * decode, batch, heads, groups, seed):
        q = weights.shape[3]
        for h in range(heads):
            stored, kept = before[0, h].tolist(), after[0][h]
            for j, pos in enumerate(stored):
                for i in range(q):
                    if any(float(weights[0, h, g, i, j]) > threshold for g in range(groups)):
                        last[h][pos] = max(last[h].get(pos, -1), seen - q + i)
            if len(stored) >= budget + step:
                score = {p: max(last[h].get(p, -1), p) for p in stored}
                evicted = [score[p] for p in stored if p not in kept]
                assert len(kept) == budget
                assert min(score[p] for p in kept) >= max(evicted)  # ties may go either way
            else:
                assert kept == stored
