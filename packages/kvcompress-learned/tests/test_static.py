"""learned under kvcompress.static_generate: its on_tokens (the new token's score from its hidden state) runs
inside the static step and writes the step's slot; the same tokens, kept positions and scores as eager
decoding (on a GPU each step is a replayed CUDA graph; "emulated": the same captures on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import kvcompress
from kvcompress.testing import eager_generate, static_devices, static_generate_on, torch_device

SPECS = ["learned(budget=40,step=4,recent=8,weights=random)",
         "learned(budget=20,recent=4,step=6,weights=random,age_weight=0)"]
if "quant" in kvcompress.get_registry().policies:  # composed with a packed store's static layout
    SPECS.append("learned(budget=40,step=4,recent=8,weights=random)+quant(bits=4,group_size=16,window=8)")


@pytest.mark.parametrize("device", static_devices())
@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_equals_eager(spec, device):
    model = tiny_model("llama").to(torch_device(device))
    ids = prompt(30, seed=2, batch=2).to(model.device)
    want, eager, _ = eager_generate(model, spec, ids, 40)
    cache = kvcompress.make_cache(spec, model=model)
    # emulated: the scorer inside the captured step (a packed store's step needs a GPU kernel to be captured)
    got, graphs = static_generate_on(device, model, cache, ids, 40, decode_steps="quant" not in spec)
    assert torch.equal(got, want)
    assert graphs is None or graphs.replays["rebuild"] > 0
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert a.evictions == b.evictions > 0
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
        torch.testing.assert_close(a.slots.view("learned"), b.slots.view("learned"))
