"""sketch under kvcompress.static_generate: its on_tokens (queries buffered on the host, folded every ``step``)
runs between the static steps on each step's recorded queries; the same tokens, kept positions and counts as
eager decoding (the decode step a replayed CUDA graph on a GPU, an emulated one on the CPU)."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import prompt, tiny_model
from kvcompress.testing import eager_generate, static_devices, static_generate_on, torch_device


@pytest.mark.parametrize("device", static_devices())
@pytest.mark.parametrize("spec", ["sketch(budget=24,recent=4,step=4,planes=6)",
                                  "sketch(budget=24,recent=4,step=6,strategy=aggregate,buckets=8)"])
def test_static_decoding_equals_eager(spec, device):
    model = tiny_model("llama").to(torch_device(device))
    ids = prompt(30, seed=3, batch=2).to(model.device)
    want, eager, _ = eager_generate(model, spec, ids, 30)
    cache = kvcompress.make_cache(spec, model=model)
    got, graphs = static_generate_on(device, model, cache, ids, 30)
    assert torch.equal(got, want)
    assert graphs is None or graphs.replays["step"] == 30 - 4
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert a.evictions == b.evictions > 0
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
        assert a.bound.pending_tokens == b.bound.pending_tokens
        for x, y in zip(a.bound.sketch.tensors(), b.bound.sketch.tensors(), strict=True):
            torch.testing.assert_close(x, y)
