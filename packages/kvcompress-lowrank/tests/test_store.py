"""The store under the core's plans (kept, rewritten and added slots), crop, batch selection and beam
reordering: at full rank it behaves exactly as the dense store does."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import full_rank, greedy_logits, ids, tiny_model

import kvcompress
from kvcompress import Plan


def _pair(spec: str = "window(budget=200)", n: int = 40, batch: int = 1, model=None):
    model = model or tiny_model("llama")
    caches = [
        kvcompress.make_cache(spec, model=model),
        kvcompress.make_cache(f"{spec}+{full_rank()}", model=model),
    ]
    for cache in caches:
        with torch.no_grad():
            model(ids(n, batch=batch), past_key_values=cache, use_cache=True)
    return model, caches


def _step(model, cache, tokens):
    with torch.no_grad():
        return model(tokens, past_key_values=cache, use_cache=True).logits


def test_a_plan_with_new_contents_bias_and_added_slots_matches_the_dense_store():
    model, (dense, low) = _pair(n=40, batch=2)
    for layer_d, layer_l in zip(dense.layers, low.layers, strict=True):
        keys, values = layer_d.keys.clone(), layer_d.values.clone()
        h = keys.shape[1]
        keep = torch.tensor([0, 1, 2, 9, 10, 20, 30, 35, 36, 37, 38, 39]).view(1, 1, -1).expand(2, h, -1)
        changed = torch.zeros(keep.shape, dtype=torch.bool)
        changed[..., 3] = True  # slot 9 becomes the mean of slots 3..9 (a merge)
        new_k = keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])).clone()
        new_v = values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])).clone()
        new_k[:, :, 3], new_v[:, :, 3] = keys[:, :, 3:10].mean(2), values[:, :, 3:10].mean(2)
        bias = torch.zeros(keep.shape)
        bias[..., 3] = math.log(7)
        added = kvcompress.Added(
            keys=keys[:, :, 11:14].mean(2, keepdim=True),
            values=values[:, :, 11:14].mean(2, keepdim=True),
            positions=torch.full((2, h, 1), 12),
            bias=torch.full((2, h, 1), math.log(3)),
        )
        for layer in (layer_d, layer_l):
            layer._apply(
                Plan(keep=keep, keys=new_k, values=new_v, changed=changed, bias=bias, added=added), target=200
            )
    assert low.layers[0].store.length == 13
    tokens = torch.tensor([[5], [7]])
    for _ in range(3):
        torch.testing.assert_close(
            _step(model, low, tokens), _step(model, dense, tokens), rtol=1e-4, atol=1e-4
        )


def test_per_head_eviction_keeps_per_head_positions():
    """random() keeps other tokens in each (batch, head): the store rotates each at its own position."""
    model, (dense, low) = _pair("random(budget=16,step=4,seed=3)", n=50, batch=2)
    store = low.layers[0].store
    positions = low.layers[0].slots.view("positions")
    assert not torch.equal(positions[0, 0], positions[0, 1])
    assert torch.equal(store.positions(), positions)  # no padding: true positions are the slots'
    tokens = torch.tensor([[5], [7]])
    for _ in range(6):
        torch.testing.assert_close(
            _step(model, low, tokens), _step(model, dense, tokens), rtol=1e-4, atol=1e-4
        )


def test_crop_then_continue_matches_the_dense_store():
    model, (dense, low) = _pair(n=40)
    for cache in (dense, low):
        cache.crop(-12)  # back into slots the window ring had already given up
    assert low.get_seq_length() == 28 and low.layers[0].store.length == 28
    tokens = torch.tensor([[9]])
    for _ in range(4):
        torch.testing.assert_close(
            _step(model, low, tokens), _step(model, dense, tokens), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("rows", [[1], [0, 0, 1], [1, 0]])
def test_batch_selection_and_reordering(rows):
    model, (dense, low) = _pair(n=40, batch=2)
    index = torch.tensor(rows)
    for cache in (dense, low):
        for layer in cache.layers:  # one row kept (generate dropping finished rows), or beams reordered
            if len(rows) == 1:
                layer.batch_select_indices(index)
            else:
                layer.reorder_cache(index)
    tokens = torch.arange(len(rows)).view(-1, 1) + 3
    torch.testing.assert_close(_step(model, low, tokens), _step(model, dense, tokens), rtol=1e-4, atol=1e-4)


def test_beam_search_runs_and_matches_the_dense_store():
    model = tiny_model("llama")
    prompt = ids(30)
    outs = []
    for spec in ("window(budget=200)", f"window(budget=200)+{full_rank()}"):
        cache = kvcompress.make_cache(spec, model=model)
        outs.append(
            model.generate(prompt, past_key_values=cache, num_beams=3, max_new_tokens=12, do_sample=False)
        )
    assert torch.equal(outs[0], outs[1])


def test_ratio_budget_shrinks_and_grows_the_store():
    model = tiny_model("llama")
    cache = kvcompress.make_cache(
        "sink(ratio=0.5,step=8)+lowrank(basis=random,k_rank=12,v_rank=12,window=8)", model=model
    )
    greedy_logits(model, ids(60), cache, steps=30)
    store = cache.layers[0].store
    assert store.length == cache.layers[0].slots.length <= 0.5 * 90 + 8
    assert store.cap_m <= store.m + store.m // 8 + 16


def test_an_observation_that_replaces_is_not_added():
    """``Accumulate(replace=True)`` (tova's "set"): after a decode step the state is that step's attention
    alone, summed over the query heads of each kv head, whatever it held before."""
    from kvcompress.store import Accumulate

    model = tiny_model()
    cache = kvcompress.make_cache(full_rank(), model=model)
    with torch.no_grad():
        model(input_ids=ids(30), past_key_values=cache, use_cache=True)
    store = cache.layers[0].store
    cfg = model.config
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    query = torch.randn(1, cfg.num_attention_heads, 1, cfg.hidden_size // cfg.num_attention_heads)
    for replace, before in ((True, 5.0), (False, 0.0)):
        state = torch.full((1, cfg.num_key_value_heads, store.length + 4), before)
        store.attend(query, None, query.shape[-1] ** -0.5, accumulate=Accumulate(state, "sum", replace))
        torch.testing.assert_close(state.sum(-1), torch.full((1, cfg.num_key_value_heads), float(gqa)))
