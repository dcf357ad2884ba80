"""Decode steps of a cluster cache go through the core's fused Triton kernel, merged slots with their bias
and observed attention added in the kernel: the same logits, tokens and attention state as the torch path.
On a CUDA GPU with Triton; on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import kvcompress
from kvcompress import _kernels as kernels

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if kernels.INTERPRET else None)
pytestmark = pytest.mark.skipif(not (kernels.AVAILABLE and DEVICE),
                                reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")


@pytest.mark.parametrize("spec", ["cluster(budget=24,recent=8,clusters=4,step=4)",
                                  "cluster(budget=24,recent=8,clusters=4,step=4,share=size)",
                                  "cluster(budget=24,recent=8,clusters=4,step=4,mode=evict)"])
def test_fused_decode_matches_torch_path(spec, monkeypatch):
    model = tiny_model(device=DEVICE)
    ids = prompt(48, batch=2).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: decode steps carry a mask
    fused_calls = []
    original = kernels.fused_decode

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        bias = args[6] if len(args) > 6 else kwargs.get("bias")
        fused_calls.append((out is not None, bias is not None))
        return out

    monkeypatch.setattr(kernels, "fused_decode", counting)
    runs = []
    try:
        for fused in (True, False):
            kernels.ENABLED = fused
            cache = kvcompress.make_cache(spec, model=model)
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            runs.append((out, cache))
            if fused:  # merged slots: the kernel ran with their bias; evict: it ran observing attention
                want = (True, "evict" not in spec)
                assert want in fused_calls, f"no decode step ran the fused kernel as {want}"
    finally:
        kernels.ENABLED = True
    (fused_out, fused_cache), (torch_out, torch_cache) = runs
    fused_logits, torch_logits = torch.stack(fused_out.logits), torch.stack(torch_out.logits)
    torch.testing.assert_close(fused_logits, torch_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused_out.sequences, torch_out.sequences)
    for a, b in zip(fused_cache.layers, torch_cache.layers, strict=True):
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
        if "acc" in a.slots.tensors:
            torch.testing.assert_close(a.slots.view("acc"), b.slots.view("acc"), rtol=1e-4, atol=1e-5)
        if "evict" not in spec:
            torch.testing.assert_close(a.bias_view(), b.bias_view())
