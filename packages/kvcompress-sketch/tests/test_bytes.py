"""kv_bytes counts the sketch: it equals the bytes of every tensor the cache holds, and the sketch's share
does not grow with the context (the same at 1k and 8k tokens)."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import prompt, tiny_model
from kvcompress.testing import reachable_tensors


def held_storage_bytes(cache) -> int:
    """Bytes of every tensor storage reachable from the cache's layers (found independently of kv_bytes)."""
    skip = ("selection", "representation", "policy", "cache", "layer", "info")
    return sum(t.untyped_storage().nbytes() for t in reachable_tensors(list(cache.layers), skip).values())


def sketch_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.bound.tensors())


@pytest.mark.parametrize("spec", ["sketch(budget=64,recent=16,step=8,width=8,depth=2)",
                                  "sketch(budget=64,recent=16,step=8,strategy=aggregate,buckets=8)"])
@torch.no_grad()
def test_sketch_bytes_are_counted_and_constant_in_the_context(spec):
    model = tiny_model("llama", layers=1)
    measured = {}
    for n in (1024, 8192):
        cache = kvcompress.make_cache(spec, model=model)
        out = model(prompt(n, seed=n), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for _ in range(13):  # decode steps: queries buffered in between folds
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        assert kvcompress.kv_bytes(cache) == held_storage_bytes(cache)
        assert cache.layers[0].bound.pending_tokens == 13 - 8  # one fold after 8 steps, 5 queries pending
        measured[n] = (sketch_bytes(cache), kvcompress.kv_bytes(cache))
    assert measured[1024] == measured[8192]
    assert measured[1024][0] > 0
