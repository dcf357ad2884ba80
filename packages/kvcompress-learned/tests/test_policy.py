"""The policy on tiny random-init models: scores are the MLP of the attention input, evictions keep the top
scores plus sink and recent, and the core's invariants hold (covering budget == DynamicCache, left padding,
bytes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import prompt, weights_file
from transformers import DynamicCache

import kvcompress
from kvcompress_learned import Learned


@torch.no_grad()
def stepwise_logits(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then ``steps`` greedy decode steps; every forward's logits."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    logits = [out]
    for _ in range(steps):
        out = model(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
        logits.append(out)
    return logits


@torch.no_grad()
def attention_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention-module input ``[B, n, hidden]`` on a plain DynamicCache (the reference)."""
    seen: dict[int, torch.Tensor] = {}
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    hooks = [m.register_forward_pre_hook(lambda m, a, k: seen.__setitem__(m.layer_idx, k["hidden_states"]),
                                         with_kwargs=True) for m in mods]
    try:
        model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(mods))]


def mlp(tensors: dict[str, torch.Tensor], layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The scorer written out plainly: ``[B, n, F] -> [B, H, n]``."""
    z = F.gelu(hidden @ tensors["w1"][layer].float() + tensors["b1"][layer].float())
    return (z @ tensors["w2"][layer].float() + tensors["b2"][layer].float()).transpose(1, 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_budget_covering_sequence_equals_full_cache(arch, llama, qwen2):
    model = llama if arch == "llama" else qwen2
    ids = prompt(24)
    reference = stepwise_logits(model, DynamicCache(), ids, 24)
    cache = kvcompress.make_cache("learned(budget=56,weights=random,step=4)", model=model)
    got = stepwise_logits(model, cache, ids, 24)
    for ref, out in zip(reference, got, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert cache.layers[0].slots.length == 48 and cache.layers[0].evictions == 0


def test_scores_are_the_mlp_of_each_tokens_attention_input(llama, tmp_path):
    """Every stored score is the scorer applied to that token's attention input, computed once when the
    token arrived, whether it came in the prompt, in a chunk or as a decode step."""
    path = weights_file(tmp_path / "w.safetensors", llama, units=8, seed=3)
    tensors, _ = kvcompress.load_weights(path)
    ids = prompt(40, seed=5)
    cache = kvcompress.make_cache(f"learned(budget=100,weights='{path}')", model=llama)
    with torch.no_grad():
        llama(input_ids=ids[:, :25], past_key_values=cache, use_cache=True)
        llama(input_ids=ids[:, 25:33], past_key_values=cache, use_cache=True)  # a chunk
        for t in range(33, 40):  # decode steps
            llama(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    for i, hidden in enumerate(attention_inputs(llama, ids)):
        torch.testing.assert_close(cache.layers[i].slots.view("learned"), mlp(tensors, i, hidden),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("age_weight", [0.0, 1.0, 2.5])
def test_eviction_keeps_the_top_aged_scores_plus_sink_and_recent(qwen2, tmp_path, age_weight):
    """Kept: the sink and recent tokens, then the top of score + age_weight * age[floor(log2(age))]."""
    path = weights_file(tmp_path / "w.safetensors", qwen2, units=4, seed=1)
    tensors, _ = kvcompress.load_weights(path)
    ids = prompt(60, seed=2)
    spec = f"learned(budget=20,sink=2,recent=6,age_weight={age_weight},weights='{path}')"
    cache = kvcompress.make_cache(spec, model=qwen2)
    with torch.no_grad():
        qwen2(input_ids=ids, past_key_values=cache, use_cache=True)
    age_bin = torch.tensor([(60 - p).bit_length() - 1 for p in range(60)])  # floor(log2(age))
    for i, hidden in enumerate(attention_inputs(qwen2, ids)):
        scores = mlp(tensors, i, hidden)
        aged = scores + age_weight * tensors["age"][i][:, age_bin].unsqueeze(0)
        top = aged[..., 2:54].topk(12, dim=-1).indices + 2  # neither sink nor recent
        want = torch.cat([torch.arange(2).expand(1, 2, 2), top, torch.arange(54, 60).expand(1, 2, 6)], -1)
        got = cache.layers[i].slots.view("positions").long()
        assert torch.equal(got, want.sort(-1).values)
        torch.testing.assert_close(cache.layers[i].slots.view("learned"), scores.gather(2, got))


def test_the_age_curve_moves_the_kept_set_towards_recent_tokens(qwen2, tmp_path):
    path = weights_file(tmp_path / "w.safetensors", qwen2, units=4, seed=1)  # age table: -floor(log2(age))/2
    kept = {}
    for weight in (0.0, 3.0):
        spec = f"learned(budget=20,sink=2,recent=6,age_weight={weight},weights='{path}')"
        cache = kvcompress.make_cache(spec, model=qwen2)
        with torch.no_grad():
            qwen2(input_ids=prompt(60, seed=2), past_key_values=cache, use_cache=True)
        kept[weight] = cache.layers[0].slots.view("positions").float()
    assert kept[3.0].mean() > kept[0.0].mean() + 2


def test_decoding_stays_within_budget_and_positions_stay_true(llama):
    cache = kvcompress.make_cache("learned(budget=16,recent=4,step=4,weights=random)", model=llama)
    with torch.no_grad():
        out = llama(input_ids=prompt(50), past_key_values=cache, use_cache=True).logits
        for _ in range(20):
            out = llama(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            assert all(layer.slots.length < 16 + 4 for layer in cache.layers)
    assert torch.isfinite(out).all() and cache.get_seq_length() == 70
    assert int(cache.layers[1].slots.view("positions").max()) == 69


def test_left_padded_batch_matches_each_prompt_alone(qwen2):
    prompts = [prompt(9, seed=1)[0], prompt(30, seed=2)[0], prompt(21, seed=4)[0]]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    spec = "learned(budget=16,sink=2,recent=4,weights=random)"  # step 1: rows evict alike
    batch = qwen2.generate(ids, attention_mask=mask, past_key_values=kvcompress.make_cache(spec, model=qwen2),
                           max_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        alone = qwen2.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               past_key_values=kvcompress.make_cache(spec, model=qwen2), max_new_tokens=12,
                               do_sample=False)
        assert batch[i, n:].tolist() == alone[0, len(p):].tolist()


def test_reported_bytes_are_the_tensors_held_scores_included(llama):
    cache = kvcompress.make_cache("learned(budget=16,recent=4,step=4,weights=random)", model=llama)
    stepwise_logits(llama, cache, prompt(40, batch=2), 5)
    for layer in cache.layers:
        table = layer.slots.tensors
        assert sorted(table) == ["learned", "positions", "valid"]
        assert table["learned"].shape == (2, 2, layer.slots.capacity)
        assert table["learned"].dtype == torch.float32
        parts = [*layer.store.tensors(), *table.values()]
        assert layer.nbytes() == sum(t.numel() * t.element_size() for t in parts)
    assert kvcompress.kv_bytes(cache) == sum(layer.nbytes() for layer in cache.layers)


def test_the_policy_needs_the_model():
    with pytest.raises(kvcompress.ModelRequiredError, match="pass the model"):
        kvcompress.make_cache("learned(budget=64)")


@pytest.mark.parametrize("params, message", [
    ({"budget": 8, "sink": 4, "recent": 32}, "parameter 'budget' is 8; allowed: >= sink \\+ recent"),
    ({"seed": -1}, "seed"),
    ({"weights": 3}, "weights"),
])
def test_bad_parameters_are_named(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Learned.from_params(**params)
