"""H2O and LRU on tiny random-init transformers models (Llama, Qwen2; GQA)."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import prompt, tiny_model
from transformers import DynamicCache

from kvcompress_h2o import H2OCache, LRUCache, evictions, mode

SPECS = ["h2o(budget={b})", "h2o(budget={b},gqa=max,normalize=true,step=4)", "lru(budget={b},step=3)"]


@torch.no_grad()
def stepwise_logits(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then ``steps`` greedy decode steps; every forward's logits."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    logits = [out]
    for _ in range(steps):
        nxt = out[:, -1:].argmax(-1)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        logits.append(out)
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", SPECS)
def test_budget_covering_sequence_equals_full_cache(arch, spec, llama, qwen2):
    model = llama if arch == "llama" else qwen2
    ids = prompt(24)
    reference = stepwise_logits(model, DynamicCache(), ids, 32)
    cache = kvcompress.make_cache(spec.format(b=24 + 32 + 8), model=model)
    got = stepwise_logits(model, cache, ids, 32)
    for ref, out in zip(reference, got):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert mode(cache) == "none" and cache.layers[0].slots.length == 24 + 32


@pytest.mark.parametrize("spec", SPECS)
def test_prompt_compression_then_decode_within_budget(spec, qwen2):
    cache = kvcompress.make_cache(spec.format(b=16), model=qwen2)
    policy = cache.selection
    with torch.no_grad():
        out = qwen2(input_ids=prompt(50), past_key_values=cache, use_cache=True).logits
        assert all(layer.slots.length == 16 for layer in cache.layers)  # prompt compressed once
        assert mode(cache) == "prompt" and evictions(cache)["prompt"] == len(cache.layers)
        for _ in range(20):
            out = qwen2(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
            assert all(layer.slots.length < 16 + policy.step for layer in cache.layers)
    assert torch.isfinite(out).all()
    assert mode(cache) == "prompt+decode" and evictions(cache)["decode"] >= len(cache.layers)
    assert cache.get_seq_length() == 70  # positions stay true
    positions = cache.layers[1].slots.view("positions")
    assert positions.shape[1] == 2 and positions.max() == 69


def test_h2o_keeps_heavy_hitters_and_recent(llama):
    cache = H2OCache(llama, budget=20, heavy_ratio=0.4, recent_ratio=0.6)
    with torch.no_grad():
        llama(input_ids=prompt(60), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    positions = layer.slots.view("positions")
    assert (positions[..., -12:] == torch.arange(48, 60, dtype=torch.int32)).all()  # 60% of 20 recent
    # the 8 others are the 8 highest accumulated-attention tokens among the rest, per kv head
    acc = layer.slots.view("acc")[..., :8]
    assert (positions[..., :8] < 48).all() and acc.min() > 0


@torch.no_grad()
def test_accumulated_attention_equals_eager_attention(qwen2):
    """``acc`` is the sum over queries (and over / max across the 3 query heads of a kv head) of what
    transformers' eager attention returns with ``output_attentions``."""
    ids = prompt(30, seed=3)
    qwen2.set_attn_implementation("eager")
    try:
        ref = DynamicCache()
        weights = [qwen2(input_ids=ids, past_key_values=ref, output_attentions=True).attentions]
        for tok in (5, 7, 11):
            weights.append(qwen2(input_ids=torch.tensor([[tok]]), past_key_values=ref,
                                 output_attentions=True).attentions)
    finally:
        qwen2.set_attn_implementation("sdpa")
    for gqa in ("sum", "max"):
        cache = H2OCache(qwen2, budget=100, gqa=gqa)
        qwen2(input_ids=ids, past_key_values=cache)
        for tok in (5, 7, 11):
            qwen2(input_ids=torch.tensor([[tok]]), past_key_values=cache)
        for layer_idx, layer in enumerate(cache.layers):
            expected = torch.zeros(1, 2, 33)
            for step in weights:
                w = step[layer_idx].view(1, 2, 3, step[layer_idx].shape[2], -1)  # [B, Hkv, G, q, S]
                w = w.sum(2) if gqa == "sum" else w.amax(2)
                expected[..., : w.shape[-1]] += w.sum(2)
            torch.testing.assert_close(layer.slots.view("acc"), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda m: H2OCache(m, budget=64), lambda m: LRUCache(m, budget=64, step=4)])
def test_left_padded_batch_matches_each_prompt_alone(make, qwen2):
    prompts = [prompt(9, seed=1)[0], prompt(16, seed=2)[0], prompt(13, seed=4)[0]]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    batch = qwen2.generate(ids, attention_mask=mask, past_key_values=make(qwen2), max_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        alone = qwen2.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               past_key_values=make(qwen2), max_new_tokens=12, do_sample=False)
        assert batch[i, n:].tolist() == alone[0, len(p):].tolist()


def test_left_padding_is_evicted_first(qwen2):
    ids = torch.cat([torch.zeros(1, 10, dtype=torch.long), prompt(30)], 1).repeat(2, 1)
    ids[1, 10:] = prompt(30, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # row 0 has 10 pads, row 1 none
    cache = H2OCache(qwen2, budget=16, step=2)
    out = qwen2.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 46)
    for layer in cache.layers:
        assert layer.slots.view("valid").all()  # no padding slot survives an eviction
        assert (layer.slots.view("positions")[0] >= 10).all()


@pytest.mark.parametrize("spec", ["h2o(budget=16,step=4)", "lru(budget=16,step=4)"])
def test_bfloat16_and_device(spec):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", dtype=torch.bfloat16, device=device)
    cache = kvcompress.make_cache(spec, model=model)
    ids = prompt(40).to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=10,
                         do_sample=False)
    assert out.shape == (1, 50)
    layer = cache.layers[0]
    keys, _ = layer.store.keys_values()
    assert keys.dtype == torch.bfloat16 and keys.device.type == device
    state = layer.slots.view("acc" if spec.startswith("h2o") else "last")
    assert state.dtype == torch.float32 and torch.isfinite(state).all()
    assert mode(cache) == "prompt+decode"


def test_h2o_cache_in_generate_with_sampling(llama):
    torch.manual_seed(0)
    cache = H2OCache(llama, budget=12, step=2)
    out = llama.generate(prompt(30), attention_mask=torch.ones(1, 30, dtype=torch.long), past_key_values=cache,
                         max_new_tokens=15, do_sample=True, top_k=20)
    assert out.shape == (1, 45) and cache.mode == "prompt+decode"
    assert cache.evictions["prompt"] == 2 and cache.evictions["decode"] > 0
    assert all(layer.slots.length < 14 for layer in cache.layers)


@pytest.mark.parametrize("spec", ["h2o(budget=16,step=4)", "lru(budget=16,step=4)"])
@torch.no_grad()
def test_chunks_of_step_tokens_equal_token_by_token(spec, llama):
    """Why benchmarks/streaming_ppl.py may feed ``step`` tokens per forward: eviction points, observed
    attention and so logits are those of token-by-token decoding with block eviction."""
    ids = prompt(48, seed=5)
    one, four = kvcompress.make_cache(spec, model=llama), kvcompress.make_cache(spec, model=llama)
    by_token = torch.cat([llama(input_ids=ids[:, i:i + 1], past_key_values=one).logits for i in range(48)], 1)
    by_chunk = torch.cat([llama(input_ids=ids[:, i:i + 4], past_key_values=four).logits
                          for i in range(0, 48, 4)], 1)
    torch.testing.assert_close(by_chunk, by_token, atol=1e-4, rtol=1e-4)
    for a, b in zip(one.layers, four.layers):
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
    assert mode(one) == "decode" and mode(four) == "prompt"
    assert evictions(one)["decode"] == evictions(four)["prompt"] == 2 * 8
