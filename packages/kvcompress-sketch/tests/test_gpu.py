"""On a CUDA GPU: the sketch keeps the same tokens as on the CPU. With Triton (on a GPU, or on a CPU under
its interpreter, TRITON_INTERPRET=1): the aggregate strategy's decode steps (slots with a bias, the core's
fused decode kernel) give the torch path's results."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import prompt, tiny_model
from kvcompress import _kernels as kernels

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if kernels.INTERPRET else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["sketch(budget=64,recent=16,step=8)",
                                  "sketch(budget=64,recent=16,step=8,width=16,depth=4,half_life=64)",
                                  "sketch(budget=80,recent=16,step=8,strategy=aggregate,buckets=8)"])
@torch.no_grad()
def test_gpu_sketch_and_kept_tokens_match_the_cpu(spec):
    """Same sketch of the queries (allclose) and nearly the same kept tokens (ties may break otherwise)."""
    caches = []
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", device=device)
        ids = prompt(300, batch=2).to(device)
        mask = torch.ones_like(ids)
        mask[1, :37] = 0
        cache = kvcompress.make_cache(spec, model=model)
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        caches.append(cache)
    for a, b in zip(*(c.layers for c in caches), strict=True):
        torch.testing.assert_close(b.bound.sketch.table.cpu(), a.bound.sketch.table, rtol=1e-3, atol=1e-3)
        pa, pb = a.slots.view("positions"), b.slots.view("positions").cpu()
        same = (pa.unsqueeze(-1) == pb.unsqueeze(-2)).any(-1).float().mean()
        assert a.evictions == b.evictions == 1 and same >= 0.95, same


@pytest.mark.skipif(not (kernels.AVAILABLE and KERNEL_DEVICE),
                    reason="the fused decode kernel needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
def test_aggregate_fused_decode_matches_torch_path():
    dtype = torch.float16 if KERNEL_DEVICE == "cuda" else torch.float32
    model = tiny_model(device=KERNEL_DEVICE, dtype=dtype)
    ids = prompt(120, batch=2).to(KERNEL_DEVICE)
    runs = []
    try:
        for fused in (True, False):
            kernels.ENABLED = fused
            cache = kvcompress.make_cache("sketch(budget=40,recent=8,step=8,strategy=aggregate,buckets=8)",
                                          model=model)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            assert cache.layers[0].bias_view() is not None  # decode steps attended aggregates
            runs.append(out)
    finally:
        kernels.ENABLED = True
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), rtol=2e-2, atol=2e-2)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
