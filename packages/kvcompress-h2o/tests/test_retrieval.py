"""TOVA and SnapKV: kept sets against plain references on random attention, and the cache invariants."""

from __future__ import annotations

import kvcompress
import pytest
import torch
import torch.nn.functional as F
from conftest import prompt
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcompress import CompressedLayer
from test_models import stepwise_logits
from test_reference import random_attention
from transformers import DynamicCache

from kvcompress_h2o import TOVA, SnapKV


def _forward(layer, policy, q, groups, gen, batch=1, heads=2):
    layer.update(torch.randn(batch, heads, q, 4), torch.randn(batch, heads, q, 4))
    before = layer.slots.view("positions").clone()
    qpos = list(range(layer.seen - q, layer.seen))
    weights = random_attention(before, qpos, groups, gen)
    ctx = layer.context()
    for start in range(0, q, 5):  # prompts are observed in chunks of queries, in order
        policy.observe(ctx, weights[:, :, :, start:start + 5], torch.tensor(qpos[start:start + 5]))
    layer.finish_attention(None)
    return weights, before, layer.slots.view("positions").clone()


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(2, 16), step=st.integers(1, 4), prompt_len=st.integers(1, 30), decode=st.integers(0, 20),
       groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_tova_keeps_what_the_last_query_attends_to(budget, step, prompt_len, decode, groups, seed):
    policy = TOVA(budget=budget, step=step)
    layer = CompressedLayer(policy, None, 0)
    gen = torch.Generator().manual_seed(seed)
    for q in [prompt_len] + [1] * decode:
        weights, before, after = _forward(layer, policy, q, groups, gen)
        if before.shape[-1] >= budget + step:
            last = weights[:, :, :, -1].sum(2)  # [B, H, S]: the latest query, over the kv head's query heads
            for h in range(2):
                kept = set(after[0, h].tolist())
                score = {int(p): float(last[0, h, j]) for j, p in enumerate(before[0, h])}
                assert len(kept) == budget
                assert min(score[p] for p in kept) >= max(s for p, s in score.items() if p not in kept)
        else:
            assert torch.equal(after, before)


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(2, 16), prompt_len=st.integers(1, 30), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_tova_layer_heads_keep_one_set_by_the_mean_attention(budget, prompt_len, groups, seed):
    policy = TOVA(budget=budget, step=1, heads="layer")
    layer = CompressedLayer(policy, None, 0)
    gen = torch.Generator().manual_seed(seed)
    weights, before, after = _forward(layer, policy, prompt_len, groups, gen)
    if prompt_len < budget + 1:
        assert torch.equal(after, before)
        return
    last = weights[:, :, :, -1].sum(2).mean(1)[0]  # [S]: the latest query, averaged over every head
    kept = set(after[0, 0].tolist())
    assert kept == set(after[0, 1].tolist()) and len(kept) == budget  # the same tokens in every head
    score = {int(p): float(last[j]) for j, p in enumerate(before[0, 0])}
    assert min(score[p] for p in kept) >= max(s for p, s in score.items() if p not in kept) - 1e-6


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(4, 16), votes=st.integers(1, 6), pool=st.sampled_from([1, 3, 5]),
       prompt_len=st.integers(20, 40), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_snapkv_scores_by_the_last_queries_pooled(budget, votes, pool, prompt_len, groups, seed):
    votes = min(votes, budget)  # a window larger than the budget keeps its most recent part only
    policy = SnapKV(budget=budget, step=1, votes=votes, pool=pool)
    layer = CompressedLayer(policy, None, 0)
    weights, _, after = _forward(layer, policy, prompt_len, groups, torch.Generator().manual_seed(seed))
    window = weights[:, :, :, prompt_len - votes:].sum((2, 3))  # [B, H, S]
    pooled = [[sum(window[0, h, max(0, j - pool // 2):j + pool // 2 + 1].tolist())
               / len(window[0, h, max(0, j - pool // 2):j + pool // 2 + 1]) for j in range(prompt_len)]
              for h in range(2)]
    for h in range(2):
        kept = set(after[0, h].tolist())
        assert set(range(prompt_len - votes, prompt_len)) <= kept  # the voting queries' own tokens
        rest = {p: pooled[h][p] for p in range(prompt_len - votes)}
        chosen = [rest[p] for p in kept if p in rest]
        others = [s for p, s in rest.items() if p not in kept]
        assert len(kept) == budget
        if chosen and others:
            assert min(chosen) >= max(others) - 1e-6


def test_snapkv_pool_must_be_odd():
    with pytest.raises(ValueError, match="parameter 'pool' is 4; allowed: an odd width"):
        kvcompress.build_policies("snapkv(pool=4)")


@pytest.mark.parametrize("spec", ["tova(budget={b})", "snapkv(budget={b},votes=8,step=4)"])
def test_covering_budget_equals_full_cache(spec, llama):
    ids = prompt(24)
    reference = stepwise_logits(llama, DynamicCache(), ids, 16)
    got = stepwise_logits(llama, kvcompress.make_cache(spec.format(b=48), model=llama), ids, 16)
    for ref, out in zip(reference, got):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["tova(budget=64)", "snapkv(budget=64,votes=4)"])
def test_left_padded_batch_matches_each_prompt_alone(spec, qwen2):
    prompts = [prompt(9, seed=1)[0], prompt(16, seed=2)[0], prompt(13, seed=4)[0]]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    make = lambda: kvcompress.make_cache(spec, model=qwen2)
    batch = qwen2.generate(ids, attention_mask=mask, past_key_values=make(), max_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        alone = qwen2.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               past_key_values=make(), max_new_tokens=12, do_sample=False)
        assert batch[i, n:].tolist() == alone[0, len(p):].tolist()


def test_tova_under_compression_tracks_the_latest_query(llama):
    """On a real (tiny) model, after each eviction TOVA holds the top of the latest query's attention."""
    cache = kvcompress.make_cache("tova(budget=8,step=1)", model=llama)
    stepwise_logits(llama, cache, prompt(30), 5)
    for layer in cache.layers:
        last = layer.slots.view("last")
        assert layer.slots.length == 8 and torch.isfinite(last).all() and (last >= 0).all()
        assert F.normalize(last, p=1, dim=-1).sum(-1).allclose(torch.ones(1, 2))


@pytest.mark.parametrize("spec,queries", [("tova(budget=16)", 1), ("snapkv(budget=16,votes=6)", 6)])
def test_a_prompt_is_observed_only_where_the_policy_looks(spec, queries, llama, monkeypatch):
    cache = kvcompress.make_cache(spec, model=llama)
    shown = []
    original = type(cache.selection).observe
    monkeypatch.setattr(type(cache.selection), "observe",
                        lambda self, ctx, w, pos: (shown.append(tuple(pos.tolist())), original(self, ctx, w, pos)))
    with torch.no_grad():
        llama(input_ids=prompt(40), past_key_values=cache, use_cache=True)
    assert shown and all(p == tuple(range(40 - queries, 40)) for p in shown)  # every layer: the last queries
