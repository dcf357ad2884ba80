"""KeyDiff: the kept set against a plain reference; the cache invariants."""

from __future__ import annotations

import numpy as np
import torch
from conftest import greedy_logits, tiny_model
from transformers import DynamicCache

import kvcompress


def _reference_keep(keys: np.ndarray, k: int) -> list[int]:
    """Keys least cosine-similar to the normalised mean of the normalised keys, ascending."""
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    anchor = unit.mean(0)
    anchor /= np.linalg.norm(anchor)
    return sorted(np.argsort(unit @ anchor, kind="stable")[:k].tolist())


def test_keydiff_keeps_the_keys_far_from_the_mean_direction():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("keydiff(budget=10,step=64)", model=model)
    full = DynamicCache()
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    cache.compress()
    for i, layer in enumerate(cache.layers):
        keys = full.layers[i].keys.double().numpy()
        for b in range(2):
            for h in range(2):
                assert layer.slots.view("positions")[b, h].tolist() == _reference_keep(keys[b, h], 10)


def test_keydiff_with_a_covering_budget_equals_dynamic_cache():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    want = greedy_logits(model, ids, DynamicCache(), steps=8)
    got = greedy_logits(model, ids, kvcompress.make_cache("keydiff(budget=40)", model=model), steps=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
