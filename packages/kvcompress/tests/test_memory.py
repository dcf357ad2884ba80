"""Memory shrinks as promised: every installed selection policy holds, at 16, 128 and 1,024 tokens, no more
than its parameters promise (the tokens it may store, at most ``kept + step - 1``, in the model's dtype)
plus 5%, its declared per-slot state and the tensors its bound state lists (``tensors()``, a size fixed by
its parameters); never more than ``full`` beyond that state."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.layer import state_dtype

_ELEMENT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.int32: 4, torch.int64: 8, torch.bool: 1,
            torch.uint8: 1}


def _selection_policies() -> list[str]:
    reg = kvcompress.get_registry()
    return sorted(n for n, e in reg.policies.items() if isinstance(e.obj, type)
                  and issubclass(e.obj, kvcompress.SelectionPolicy))


# a policy whose default loads weights shipped for real models gets its random-weights setting on a tiny one
_TINY_MODEL_SETTINGS = {"learned": ",weights=random"}


def _fill(model, cache, n: int) -> None:
    ids = torch.randint(1, 96, (2, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(4):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("budget,tokens", [("budget=96", 16), ("budget=96", 128), ("budget=96", 1024),
                                           ("ratio=0.25", 1024)])
@pytest.mark.parametrize("name", _selection_policies())
def test_held_bytes_are_what_the_parameters_promise(name, budget, tokens):
    model = tiny_model("llama", max_position_embeddings=2048)
    full = DynamicCache()
    _fill(model, full, tokens)
    extra = _TINY_MODEL_SETTINGS.get(name, "")
    cache = kvcompress.make_cache(f"{name}({budget},step=8{extra})", model=model)
    _fill(model, cache, tokens)
    policy, seen = cache.selection, cache.get_seq_length()
    layers, batch, heads, dim = len(cache.layers), 2, 2, 16
    most = min(seen, policy.kept_slots(policy.target(seen)) + policy.step - 1)  # tokens it may store
    kv_per_token = layers * batch * heads * dim * 2 * 4  # K and V, float32
    state = 4 + 1 + sum(_ELEMENT[state_dtype(d)] for d in policy.slot_states.values())  # positions, valid, ...
    state += 4 if any(layer.bias_view() is not None for layer in cache.layers) else 0
    capacity = max(layer.slots.capacity for layer in cache.layers)
    state_bytes = layers * batch * heads * capacity * state
    state_bytes += sum(t.numel() * t.element_size() for layer in cache.layers  # e.g. a sketch of the queries
                       for t in (layer.bound.tensors() if hasattr(layer.bound, "tensors") else []))
    held = kvcompress.kv_bytes(cache)
    assert held <= 1.05 * most * kv_per_token + state_bytes, (held, most, capacity)
    assert held <= 1.05 * kvcompress.kv_bytes(full) + state_bytes
