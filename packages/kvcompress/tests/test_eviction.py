"""Window / sink at small budgets: bounded storage, true positions, generation past the budget."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits, tiny_model

import kvcompress


@pytest.mark.parametrize("spec,budget,step", [("window", 16, 1), ("sink", 16, 1), ("sink", 12, 5),
                                              ("random", 10, 3), ("window", 24, 8)])
def test_stored_length_stays_within_budget_plus_step(spec, budget, step):
    model = tiny_model("llama")
    cache = kvcompress.make_cache(f"{spec}(budget={budget},step={step})", model=model)
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        seen = 30
        for _ in range(40):
            for layer in cache.layers:
                assert layer.slots.length < budget + step
                assert layer.store.length == layer.slots.length
            assert cache.get_seq_length() == seen
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            seen += 1


def test_sink_keeps_first_tokens_and_recent_window():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("sink(budget=10,sink=3)", model=model)
    ids = torch.randint(1, 96, (1, 25), generator=torch.Generator().manual_seed(0))
    greedy_logits(model, ids, cache, steps=5)  # 25 prompt + 5 decoded tokens stored = 30 seen
    positions = cache.layers[1].slots.view("positions")[0, 0].tolist()
    assert positions == [0, 1, 2, 23, 24, 25, 26, 27, 28, 29]


def test_window_matches_plain_truncation_reference():
    """window(budget=B) gives the same logits as a DynamicCache cut to its last B entries every step,
    with the true positions passed explicitly."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    budget = 12
    cache = kvcompress.make_cache(f"window(budget={budget})", model=model)
    ref = DynamicCache()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            tok = ids[:, t : t + 1]
            pos = torch.tensor([[t]])
            got = model(tok, past_key_values=cache, use_cache=True).logits
            want = model(tok, position_ids=pos, cache_position=pos[0], past_key_values=ref,
                         use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for layer in ref.layers:
                layer.keys, layer.values = layer.keys[:, :, -budget:], layer.values[:, :, -budget:]


def test_generate_runs_past_budget():
    model = tiny_model("qwen2")
    cache = kvcompress.make_cache("sink(budget=8,step=4)", model=model)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=50, do_sample=False, min_new_tokens=50)
    assert out.shape == (2, 60)
    assert cache.get_seq_length() == 59
    assert all(layer.slots.length < 12 for layer in cache.layers)


def test_prompt_is_compressed_right_after_prefill():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=16,step=4)", model=model)
    ids = torch.randint(1, 96, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert [layer.slots.length for layer in cache.layers] == [16, 16]
    assert cache.layers[0].slots.capacity <= 20  # the prompt-sized buffer was released


def test_chunked_prefill_after_eviction_is_causal():
    """Feeding a prompt in chunks after an eviction equals feeding it token by token."""
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 48), generator=torch.Generator().manual_seed(9))
    by_token = kvcompress.make_cache("sink(budget=16,step=8)", model=model)
    by_chunk = kvcompress.make_cache("sink(budget=16,step=8)", model=model)
    with torch.no_grad():
        want = [model(ids[:, t : t + 1], past_key_values=by_token, use_cache=True).logits for t in range(24)]
        got = [model(ids[:, :24][:, t : t + 1], past_key_values=by_chunk, use_cache=True).logits
               for t in range(24)]
        torch.testing.assert_close(torch.cat(got), torch.cat(want))
        # a chunk of 8 with 16+ stored: the mask must keep the chunk causal
        tail_chunk = model(ids[:, 24:32], past_key_values=by_chunk, use_cache=True).logits
        tail_token = torch.cat([model(ids[:, t : t + 1], past_key_values=by_token, use_cache=True).logits
                                for t in range(24, 32)], dim=1)
    torch.testing.assert_close(tail_chunk[:, 0], tail_token[:, 0], rtol=1e-5, atol=1e-5)
