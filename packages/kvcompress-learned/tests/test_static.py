"""learned under kvcompress.static_generate: its on_tokens (the new token's score from its hidden state) runs
inside the static step and writes the step's slot; the same tokens, kept positions and scores as eager
decoding (on a GPU each step is a replayed CUDA graph)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import kvcompress
from kvcompress.testing import eager_generate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


SPECS = ["learned(budget=40,step=4,recent=8,weights=random)",
         "learned(budget=20,recent=4,step=6,weights=random,age_weight=0)"]
if "quant" in kvcompress.get_registry().policies:  # composed with a packed store's static layout
    SPECS.append("learned(budget=40,step=4,recent=8,weights=random)+quant(bits=4,group_size=16,window=8)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_equals_eager(spec, device):
    model = tiny_model("llama").to(device)
    ids = prompt(30, seed=2, batch=2).to(device)
    want, eager, _ = eager_generate(model, spec, ids, 40)
    cache = kvcompress.make_cache(spec, model=model)
    assert torch.equal(kvcompress.static_generate(model, cache, ids, 40), want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert a.evictions == b.evictions > 0
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
        torch.testing.assert_close(a.slots.view("learned"), b.slots.view("learned"))
