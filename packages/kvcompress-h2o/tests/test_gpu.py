"""On a GPU with Triton, h2o's decode steps run the core's fused observed-decode kernel: same result."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from kvcompress import _kernels as kernels

from kvcompress_h2o import H2OCache, LRUCache

pytestmark = pytest.mark.skipif(
    not (kernels.AVAILABLE and torch.cuda.is_available()),
    reason="the fused decode kernel needs Triton and a CUDA GPU",
)


@pytest.mark.parametrize("gqa", ["sum", "max"])
def test_fused_decode_matches_torch_path(gqa):
    model = tiny_model(device="cuda")
    ids = prompt(300, batch=2).cuda()
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding: decode steps carry a mask
    runs = []
    try:
        for fused in (True, False):
            kernels.ENABLED = fused
            cache = H2OCache(model, budget=128, step=8, gqa=gqa)
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            runs.append((out, cache))
    finally:
        kernels.ENABLED = True
    (fused_out, fused_cache), (torch_out, torch_cache) = runs
    assert fused_cache.mode == "prompt+decode"
    torch.testing.assert_close(torch.stack(fused_out.logits), torch.stack(torch_out.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(fused_out.sequences, torch_out.sequences)
    for a, b in zip(fused_cache.layers, torch_cache.layers, strict=True):
        torch.testing.assert_close(a.slots.view("acc"), b.slots.view("acc"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])  # flash attention's log-sum-exp; the two-pass kernels
def test_lru_prompt_observation_kernel_matches_torch(padded, monkeypatch):
    from kvcompress import _prefill_kernels

    model = tiny_model(device="cuda", dtype=torch.bfloat16)
    ids = prompt(300, batch=2).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :37] = 0
    runs = []
    for kernel in (True, False):
        monkeypatch.setattr(_prefill_kernels, "AVAILABLE", kernel)
        cache = LRUCache(model, budget=4096)  # nothing evicted: the prompt's last uses compared
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        runs.append([layer.slots.view("last").clone() for layer in cache.layers])
    for a, b in zip(*runs, strict=True):
        assert (a == b).float().mean() > 0.98  # a weight within rounding of the threshold may go either way
