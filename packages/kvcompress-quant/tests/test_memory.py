"""quant holds what its parameters promise: a short context stays in the model's dtype (no more than `full`
plus the slot table), a long one the sink + window in full precision and the rest at `bits` per code plus
its scales and zero points, within 5%."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

import kvcompress


def _fill(model, cache, n):
    ids = torch.randint(1, 96, (2, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(4):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("tokens", [16, 128, 1024])
def test_quant_holds_what_it_promises(bits, tokens):
    model = tiny_model("llama", hidden_size=256, max_position_embeddings=2048)  # head_dim 64
    full, cache = DynamicCache(), kvcompress.make_cache(f"quant(bits={bits})", model=model)
    _fill(model, full, tokens)
    _fill(model, cache, tokens)
    q = cache.representation
    seen, layers, batch, heads, d = cache.get_seq_length(), len(cache.layers), 2, 2, 64
    capacity = max(layer.slots.capacity for layer in cache.layers)
    table = layers * batch * heads * capacity * 5  # positions (int32) and valid (bool) per slot
    fp_tokens = min(seen, q.sink + q.window + q.group - 1)
    mid = seen - fp_tokens
    per_fp = 2 * d * 4  # K and V, float32
    per_code = 2 * d * bits / 8
    key_scales = 2 * 2 * d / q.group  # per channel: a scale and a zero point (fp16) per group of tokens
    value_scales = 2 * 2 * d / (q.cgroup or q.group)  # per token: one per group of channels
    promise = layers * batch * heads * (fp_tokens * per_fp + mid * (per_code + key_scales + value_scales))
    held = kvcompress.kv_bytes(cache)
    assert held <= 1.05 * promise + table, (held, promise)
    assert held <= 1.05 * kvcompress.kv_bytes(full) + table
