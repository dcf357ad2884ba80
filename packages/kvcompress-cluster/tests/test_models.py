"""The policy inside real caches on tiny random-init transformers models: the invariants every policy holds
(covering budget == DynamicCache, left padding, bytes), merge exactness, budget and token accounting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import prompt
from transformers import DynamicCache

import kvcompress
from kvcompress import Plan
from kvcompress.testing import reachable_tensors

MODES = ["cluster(budget={b},recent=8,clusters=4,step=4)",
         "cluster(budget={b},recent=8,clusters=4,step=4,fold=mean)",
         "cluster(budget={b},recent=8,clusters=4,step=4,mode=evict)",
         "cluster(budget={b},recent=8,clusters=4,step=4,share=size,distance=l2)",
         "cluster(budget={b},recent=8,clusters=4,step=4,share=size,mode=evict)"]


@torch.no_grad()
def stepwise_logits(model, cache, ids: torch.Tensor, steps: int,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``ids`` then ``steps`` greedy decode steps; every step's last logits ``[steps+1, B, V]``."""
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    logits = [out[:, -1]]
    for _ in range(steps):
        token = out[:, -1:].argmax(-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        logits.append(out[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("arch,spec", [("llama", s) for s in MODES] + [("qwen2", m) for m in MODES[::2]])
def test_budget_covering_sequence_equals_dynamic_cache(arch, spec, llama, qwen2):
    model = llama if arch == "llama" else qwen2
    ids = prompt(24, batch=2)
    reference = stepwise_logits(model, DynamicCache(), ids, 24)
    cache = kvcompress.make_cache(spec.format(b=24 + 24 + 4), model=model)
    torch.testing.assert_close(stepwise_logits(model, cache, ids, 24), reference, atol=1e-5, rtol=1e-4)
    assert all(layer.evictions == 0 for layer in cache.layers)


@pytest.mark.parametrize("spec", MODES)
def test_left_padded_batch_matches_each_prompt_alone(spec, qwen2):
    prompts = [prompt(40, seed=1)[0], prompt(57, seed=2)[0], prompt(48, seed=4)[0]]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    make = lambda: kvcompress.make_cache(spec.format(b=28), model=qwen2)  # noqa: E731
    batch = qwen2.generate(ids, attention_mask=mask, past_key_values=make(), max_new_tokens=16,
                           do_sample=False)
    for i, p in enumerate(prompts):
        alone = qwen2.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               past_key_values=make(), max_new_tokens=16, do_sample=False)
        assert batch[i, n:].tolist() == alone[0, len(p):].tolist()


def _layer_with_copies(model, spec: str, copies: int, recent: int):
    """A cache whose every layer holds token 3 ``copies`` times, then the last ``recent`` prompt tokens."""
    cache = kvcompress.make_cache(spec, model=model)
    with torch.no_grad():
        model(input_ids=prompt(20, seed=6), past_key_values=cache, use_cache=True)
    index = torch.cat([torch.full((copies,), 3), torch.arange(20 - recent, 20)])
    for layer in cache.layers:
        h = layer.slots.view("valid").shape[1]
        layer._apply(Plan(keep=index.view(1, 1, -1).expand(1, h, -1)), target=1000)
    return cache


@pytest.mark.parametrize("share,fold,copies", [("attention", "mass", 5), ("attention", "mean", 2),
                                               ("size", "mean", 5), ("size", "mass", 2)])
def test_n_copies_merged_equal_one_token_with_bias_log_n(share, fold, copies, llama):
    """The merge path of the policy itself: with one cluster and one seat, the n copies of a token fold into
    one slot carrying log n; the next forward's logits equal those of the token kept once with that bias."""
    recent = 6
    spec = f"cluster(budget={recent + 1},sink=0,recent={recent},clusters=1,share={share},fold={fold})"
    merged = _layer_with_copies(llama, spec, copies, recent)
    for layer in merged.layers:
        layer.maybe_evict(force=True)
        assert layer.slots.length == recent + 1
        torch.testing.assert_close(layer.bias_view()[..., 0], torch.full((1, 2), math.log(copies)))
    reference = _layer_with_copies(llama, "window(budget=1000)", 1, recent)
    for layer in reference.layers:
        bias = torch.zeros(1, 2, recent + 1)
        bias[..., 0] = math.log(copies)
        keep = torch.arange(recent + 1).view(1, 1, -1).expand(1, 2, -1)
        layer._apply(Plan(keep=keep, bias=bias), target=1000)
    token = torch.tensor([[7, 11]])
    with torch.no_grad():
        got = llama(input_ids=token, past_key_values=merged, use_cache=True).logits
        want = llama(input_ids=token, past_key_values=reference, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", MODES)
def test_budget_held_and_every_token_accounted_for(spec, qwen2):
    cache = kvcompress.make_cache(spec.format(b=24), model=qwen2)
    stepwise_logits(qwen2, cache, prompt(60, batch=2), 30)
    assert cache.get_seq_length() == 90
    for layer in cache.layers:
        assert 24 <= layer.slots.length < 24 + 4
        assert layer.evictions > 1 and layer.slots.view("valid").all()
        positions = layer.slots.view("positions")
        assert (positions.diff(dim=-1) > 0).all()  # temporal order kept
        assert (positions[..., :4] == torch.arange(4, dtype=torch.int32)).all()  # sink
        assert (positions[..., -8:] == torch.arange(82, 90, dtype=torch.int32)).all()  # recent
        bias = layer.bias_view()
        if "evict" in spec:
            assert bias is None
        else:  # each token seen stands in exactly one slot
            torch.testing.assert_close(bias.exp().sum(-1), torch.full((2, 2), 90.0))
        labels = layer.slots.view("cluster")
        assert labels.max() <= 4 and (labels[..., 4:-8] > 0).any()  # carried to the next eviction


def test_every_cluster_keeps_a_seat_after_eviction(qwen2):
    spec = "cluster(budget=20,sink=0,recent=4,clusters=6,step=4,mode=evict)"
    cache = kvcompress.make_cache(spec, model=qwen2)
    stepwise_logits(qwen2, cache, prompt(64, seed=3), 0)
    for layer in cache.layers:
        labels = layer.slots.view("cluster")[..., :-4]  # the 16 cluster seats
        for row in labels.reshape(-1, labels.shape[-1]):
            assert len(set(row.tolist())) == 6


@pytest.mark.parametrize("spec", [MODES[0], MODES[2]])
def test_kv_bytes_equal_held_storage_policy_state_included(spec, qwen2):
    cache = kvcompress.make_cache(spec.format(b=24), model=qwen2)
    stepwise_logits(qwen2, cache, prompt(60, batch=2), 10)
    held = {}
    for layer in cache.layers:
        held.update(reachable_tensors(layer))
    assert kvcompress.kv_bytes(cache) == sum(t.untyped_storage().nbytes() for t in held.values())


def test_same_seed_same_cache_other_seed_may_differ(qwen2):
    def positions(seed):
        spec = f"cluster(budget=24,recent=4,clusters=4,step=4,seed={seed})"
        cache = kvcompress.make_cache(spec, model=qwen2)
        stepwise_logits(qwen2, cache, prompt(80, seed=5), 8)
        return torch.stack([layer.slots.view("cluster") for layer in cache.layers])

    assert torch.equal(positions(0), positions(0))
    assert not torch.equal(positions(0), positions(1))
