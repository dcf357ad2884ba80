"""Reported KV bytes equal the bytes of every tensor the cache holds (the store's own state, the bases and the
shared RoPE table included), and they really shrink."""

from __future__ import annotations

import pytest
from conftest import HEAD_DIM, greedy_logits, ids, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.testing import reachable_tensors


@pytest.mark.parametrize(
    "spec",
    [
        "lowrank(basis=random,k_rank=12,v_rank=20,window=8,sink=2)",
        "lowrank(basis=random,k_rank=12,v_rank=20,coeff_bits=None,window=0,sink=0)",
        "window(budget=24,step=4)+lowrank(basis=random,k_rank=12,v_rank=20,window=8)",
    ],
)
def test_kv_bytes_equal_the_bytes_held(spec):
    model = tiny_model("llama")
    cache = kvcompress.make_cache(spec, model=model)
    greedy_logits(model, ids(60, batch=2), cache, steps=10)
    held = {}
    for layer in cache.layers:
        held.update(reachable_tensors(layer))
    assert kvcompress.kv_bytes(cache) == sum(t.untyped_storage().nbytes() for t in held.values())


def test_bytes_shrink_as_the_layout_says():
    """int8 coefficients of ranks 8 + 8 of 32 dims: 16 bytes per token and head where full float32 holds 256,
    plus per slot a float16 scale for each, an int32 position here and the slot table's 5 bytes."""
    model = tiny_model("llama")
    prompt = ids(500)
    full = DynamicCache()
    cache = kvcompress.make_cache("lowrank(basis=random,k_rank=8,v_rank=8,window=16,sink=2)", model=model)
    greedy_logits(model, prompt, full, steps=1)
    greedy_logits(model, prompt, cache, steps=1)
    per_slot = 8 + 8 + 2 * 2 + 4 + 5  # coefficients, scales, position, slot table
    layers, heads, n = 2, 2, 501
    exact = (2 + 16) * 2 * HEAD_DIM * 4  # head and window slots, K and V in float32
    fixed = 2 * (HEAD_DIM + 8 * HEAD_DIM) * 4 + 4  # per head: mean + basis, K and V (float32); the row offset
    rope = 2 * (n + n // 8) * (HEAD_DIM // 2) * 4  # the shared cos/sin table, once per cache
    slack = n // 32 + 4  # buffers grow by 1/32
    expect_max = layers * (heads * ((n + slack) * per_slot + exact + fixed)) + rope + 256
    assert kvcompress.kv_bytes(cache) <= expect_max, (kvcompress.kv_bytes(cache), expect_max)
    # the cos/sin table is 128 bytes per position here against 1 KiB of full K/V (2 layers); 0.5% on SmolLM2
    assert kvcompress.kv_bytes(cache) - rope < 0.2 * kvcompress.kv_bytes(full)
