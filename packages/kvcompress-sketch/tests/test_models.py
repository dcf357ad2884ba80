"""The sketch policy on tiny random-init transformers models (Llama, Qwen2 with GQA): the invariants."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import greedy_logits, prompt, tiny_model
from transformers import DynamicCache

SPECS = ["sketch(budget=100,recent=8)", "sketch(budget=100,recent=8,width=8,depth=3,weighting=norm,half_life=16)",
         "sketch(budget=100,recent=8,read=bucket,planes=6,width=4,depth=2)",
         "sketch(budget=100,recent=8,strategy=aggregate,buckets=8)"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_covering_budget_equals_dynamic_cache(spec, arch, llama, qwen2):
    model = llama if arch == "llama" else qwen2
    ids = prompt(40, seed=1, batch=2)
    want = greedy_logits(model, ids, DynamicCache(), steps=12)
    cache = kvcompress.make_cache(spec, model=model)
    got = greedy_logits(model, ids, cache, steps=12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in cache.layers:  # nothing evicted, nothing added: every token stored once, exactly
        assert layer.slots.length == layer.seen == 52 and layer.evictions == 0
        assert layer.bias_view() is None
        if "aggregate" in spec:
            assert not layer.slots.view("bucket").any()


def test_topk_keeps_sink_recent_and_the_budget(qwen2):
    cache = kvcompress.make_cache("sketch(budget=24,sink=2,recent=6,step=4)", model=qwen2)
    greedy_logits(qwen2, prompt(50, batch=2), cache, steps=9)
    for layer in cache.layers:
        positions = layer.slots.view("positions")
        assert 24 <= layer.slots.length < 28 and layer.evictions > 0
        assert (positions[..., :2] == torch.tensor([0, 1], dtype=torch.int32)).all()
        recent = torch.arange(layer.seen - 6, layer.seen, dtype=torch.int32)
        assert (positions[..., -6:] == recent).all()
        assert layer.bias_view() is None  # topk only drops


def test_aggregates_stand_for_every_evicted_token(qwen2):
    cache = kvcompress.make_cache("sketch(budget=30,sink=2,recent=6,step=4,strategy=aggregate,buckets=8)",
                                  model=qwen2)
    greedy_logits(qwen2, prompt(60, batch=2), cache, steps=11)
    for layer in cache.layers:
        counts = layer.bias_view().exp()
        torch.testing.assert_close(counts.sum(-1), torch.full((2, 2), float(layer.seen)))  # all 71 tokens
        bucket = layer.slots.view("bucket")
        assert ((bucket > 0).sum(-1) == 8).all()  # exactly `buckets` aggregate slots, one per bucket
        assert all(sorted(row[row > 0].tolist()) == list(range(1, 9)) for row in bucket.view(-1, bucket.shape[-1]))
        assert 30 <= layer.slots.length < 34
        exact = bucket == 0
        assert (counts[exact] == 1).all()  # exact tokens stand for themselves
        assert (layer.slots.view("positions")[..., :2] == torch.tensor([0, 1], dtype=torch.int32)).all()


@pytest.mark.parametrize("spec", ["sketch(budget=80)", "sketch(budget=12,recent=4,step=4)",
                                  "sketch(budget=16,recent=4,step=4,strategy=aggregate,buckets=4,width=4)"])
def test_left_padded_batch_matches_each_prompt_alone(spec, qwen2):
    """Padding queries are not counted and padding slots go first. Under eviction the prompts are longer than
    the budget, so that each compresses right after its prefill, alone or in the batch (the core evicts every
    row of a batch at once: a shorter prompt alone would evict later, and keep other tokens)."""
    prompts = [prompt(20, seed=1)[0], prompt(30, seed=2)[0], prompt(23, seed=4)[0]]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    cache = kvcompress.make_cache(spec, model=qwen2)
    batch = qwen2.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert all((layer.evictions > 0) == ("80" not in spec) for layer in cache.layers)
    for i, p in enumerate(prompts):
        alone_cache = kvcompress.make_cache(spec, model=qwen2)
        alone = qwen2.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               past_key_values=alone_cache, max_new_tokens=16, do_sample=False)
        assert batch[i, n:].tolist() == alone[0, len(p):].tolist()
        for a, b in zip(cache.layers, alone_cache.layers, strict=True):  # the same sketch of the queries
            torch.testing.assert_close(a.bound.sketch.table[i], b.bound.sketch.table[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["sketch(budget=16,recent=4,step=4)",
                                  "sketch(budget=24,recent=4,step=4,strategy=aggregate,buckets=4)"])
@torch.no_grad()
def test_chunks_of_step_tokens_equal_token_by_token(spec, llama):
    """Why the perplexity task may feed ``step`` tokens per forward: the same evictions and logits."""
    ids = prompt(48, seed=5)
    one, four = kvcompress.make_cache(spec, model=llama), kvcompress.make_cache(spec, model=llama)
    by_token = torch.cat([llama(input_ids=ids[:, i:i + 1], past_key_values=one).logits for i in range(48)], 1)
    by_chunk = torch.cat([llama(input_ids=ids[:, i:i + 4], past_key_values=four).logits
                          for i in range(0, 48, 4)], 1)
    torch.testing.assert_close(by_chunk, by_token, atol=1e-4, rtol=1e-4)
    for a, b in zip(one.layers, four.layers, strict=True):
        assert a.evictions == b.evictions > 0
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))


def test_beam_search_reorders_the_sketch(llama):
    cache = kvcompress.make_cache("sketch(budget=16,recent=4,step=4,width=4)", model=llama)
    out = llama.generate(prompt(30), attention_mask=torch.ones(1, 30, dtype=torch.long), past_key_values=cache,
                         max_new_tokens=10, num_beams=3, do_sample=False)
    assert out.shape == (1, 40)
    for layer in cache.layers:
        assert layer.bound.sketch.table.shape[0] == 3  # one sketch per beam, reordered with them


@pytest.mark.parametrize("spec", ["sketch(budget=24,recent=8,step=4)+quant(bits=4)",
                                  "sketch(budget=40,recent=8,step=4,strategy=aggregate,buckets=8)+quant(bits=4)"])
def test_bfloat16_and_composition_with_quant(spec):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama", dtype=torch.bfloat16, device=device)
    cache = kvcompress.make_cache(spec, model=model)
    ids = prompt(60).to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=10,
                         do_sample=False)
    assert out.shape == (1, 70)
    layer = cache.layers[0]
    assert layer.evictions > 0 and layer.slots.length < 48
    assert layer.bound.sketch.table.dtype == torch.float32 and torch.isfinite(layer.bound.sketch.table).all()
