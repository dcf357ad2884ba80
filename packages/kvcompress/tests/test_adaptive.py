"""Per-head adaptive budgets (AdaKV-style, ``adaptive=``): the heads of a layer share heads x budget live
slots by score; the slots a head does not use are masked with bias -inf and still held."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import greedy_logits, tiny_model
from transformers import DynamicCache

import kvcompress


def _run(spec, n=60, seed=0, arch="llama"):
    model = tiny_model(arch)
    cache = kvcompress.make_cache(spec, model=model)
    ids = torch.randint(1, 96, (2, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return model, cache


@pytest.mark.parametrize("spread", [1.5, 2.0, 4.0])
def test_heads_share_the_layer_budget_by_score(spread):
    budget = 12
    model, cache = _run(f"keydiff(budget={budget},adaptive={spread},step=64)")
    full = DynamicCache()
    ids = torch.randint(1, 96, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=full)
    cache.compress()
    kmax, floor = math.ceil(budget * spread), math.ceil(budget / spread)
    for i, layer in enumerate(cache.layers):
        live = layer.bias_view() == 0
        assert layer.slots.length == kmax
        assert (live.sum((1, 2)) == 2 * budget).all()  # heads x budget live slots per batch row
        per_head = live.sum(-1)
        assert (per_head >= floor).all() and (per_head <= kmax).all()
        # the live slots are the layer's best scores: every live one beats every dropped one of its row
        keys = torch.nn.functional.normalize(full.layers[i].keys.float(), dim=-1)
        anchor = torch.nn.functional.normalize(keys.sum(2), dim=-1)
        score = -(keys * anchor.unsqueeze(2)).sum(-1)  # [B, H, 60]
        positions = layer.slots.view("positions").long()
        for b in range(2):
            live_scores, rest = [], []
            for h in range(2):
                held = set(positions[b, h][live[b, h]].tolist())
                ranked = score[b, h].argsort(descending=True).tolist()
                forced = set(ranked[:floor])
                assert forced <= held  # each head keeps at least its floor
                live_scores += [float(score[b, h, p]) for p in held - forced]
                rest += [float(score[b, h, p]) for p in range(60) if p not in held]
            assert min(live_scores, default=math.inf) >= max(rest) - 1e-6


def test_unused_slots_do_not_reach_attention():
    model, cache = _run("keydiff(budget=8,adaptive=2.0,step=4)", n=40)
    token = torch.tensor([[5], [6]])
    with torch.no_grad():
        want = model(token, past_key_values=cache, use_cache=True).logits
        cache.crop(-1)
        for layer in cache.layers:
            dead = (layer.bias_view() < 0).unsqueeze(-1)
            assert dead.any()
            values = layer.store.buf.view("values")
            values.copy_(torch.where(dead, torch.randn_like(values) * 100, values))
        got = model(token, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adaptive_with_a_covering_budget_equals_dynamic_cache():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    want = greedy_logits(model, ids, DynamicCache(), steps=8)
    got = greedy_logits(model, ids, kvcompress.make_cache("keydiff(budget=40,adaptive=2)", model=model), steps=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adaptive_out_of_range():
    with pytest.raises(ValueError, match="parameter 'adaptive' got 0.5; allowed: float >= 1.0 and <= 8.0"):
        kvcompress.build_policies("window(adaptive=0.5)")
