"""At full rank (a random orthonormal basis of rank head_dim: the identity up to a rotation) the store is
exact: logits equal DynamicCache's, alone and under selection policies; int8 coefficients and lower ranks are
close."""

from __future__ import annotations

import pytest
import torch
from conftest import full_rank, greedy_logits, ids, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress_lowrank import LowRankStore


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gpt2"])
def test_full_rank_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    prompt = ids(40, batch=2)
    want = greedy_logits(model, prompt, DynamicCache(), steps=24)
    cache = kvcompress.make_cache(full_rank(), model=model)
    got = greedy_logits(model, prompt, cache, steps=24)
    store = cache.layers[0].store
    assert isinstance(store, LowRankStore) and store.m >= 40  # most tokens really went through the basis
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "selection",
    [
        "sink(budget=200)",
        "window(budget=24,step=4)",
        "random(budget=20,step=5)",
        "sink(budget=20,sink=4,step=3)",
    ],
)
def test_full_rank_under_a_selection_equals_the_selection_alone(selection):
    model = tiny_model("llama")
    prompt = ids(50, seed=1, batch=2)
    want = greedy_logits(model, prompt, kvcompress.make_cache(selection, model=model), steps=20)
    got = greedy_logits(
        model, prompt, kvcompress.make_cache(f"{selection}+{full_rank()}", model=model), steps=20
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_full_rank_under_h2o_observing_attention():
    """The decode path adds each slot's attention to h2o's state from the stored form (accumulate)."""
    if "h2o" not in kvcompress.get_registry().policies:
        pytest.skip("kvcompress-h2o is not installed")
    model = tiny_model("llama")
    prompt = ids(50, seed=2)
    spec = "h2o(budget=24,step=4)"
    want = greedy_logits(model, prompt, kvcompress.make_cache(spec, model=model), steps=20)
    got = greedy_logits(model, prompt, kvcompress.make_cache(f"{spec}+{full_rank()}", model=model), steps=20)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_int8_and_lower_ranks_are_close_and_error_grows_as_rank_drops():
    model = tiny_model("llama")
    prompt = ids(60, seed=3)
    want = greedy_logits(model, prompt, DynamicCache(), steps=16)
    errors = []
    for spec in (
        full_rank(coeff_bits=8),
        "lowrank(basis=random,k_rank=24,v_rank=24,sink=2,window=8)",
        "lowrank(basis=random,k_rank=8,v_rank=8,sink=2,window=8)",
    ):
        got = greedy_logits(model, prompt, kvcompress.make_cache(spec, model=model), steps=16)
        errors.append(float((got - want).norm() / want.norm()))
    assert 0 < errors[0] < 0.01 and errors[0] < errors[1] < errors[2], errors


def test_generate_with_sampling_and_a_short_prompt():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("lowrank(basis=random,k_rank=12,v_rank=12,window=4,sink=1)", model=model)
    torch.manual_seed(0)
    out = model.generate(ids(5), past_key_values=cache, max_new_tokens=40, do_sample=True, top_k=5)
    assert out.shape == (1, 45) and cache.layers[0].store.m > 0
