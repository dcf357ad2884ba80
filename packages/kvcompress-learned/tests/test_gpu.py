"""On a CUDA GPU (skipped elsewhere): the learned policy in bf16, alone and composed with quant, keeps what
the CPU path keeps and decodes through the core's fused kernel (no attention weights are needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model

import kvcompress
from kvcompress import _kernels as kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@torch.no_grad()
def run(model, spec: str, ids: torch.Tensor, steps: int = 24):
    cache = kvcompress.make_cache(spec, model=model)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    logits = [out[:, -1]]
    for _ in range(steps):
        out = model(input_ids=out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
        logits.append(out[:, -1])
    return cache, torch.stack(logits)


def test_bf16_cuda_scores_match_the_cpu_bf16_scores():
    # the same bf16 model on both devices: a random-init model in bf16 against one in float32 decorrelates a
    # random scorer's scores (corr 0.38 and 0.07 at its two layers, on a CPU as on an H200)
    spec = "learned(budget=4096,weights=random,seed=2)"  # nothing evicted: the same tokens are scored
    ids = prompt(200, batch=2)
    cpu, _ = run(tiny_model(dtype=torch.bfloat16), spec, ids)
    gpu, _ = run(tiny_model(dtype=torch.bfloat16).cuda(), spec, ids.cuda())
    for i, (a, b) in enumerate(zip(cpu.layers, gpu.layers, strict=True)):
        # kernels of another device move single scores by rounding, not the ranking the policy uses
        x, y = a.slots.view("learned").float(), b.slots.view("learned").float().cpu()
        corr = float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])
        assert corr > 0.98, f"layer {i}: correlation {corr:.3f}"
        half = x.shape[-1] // 2
        top_x, top_y = x.topk(half, -1).indices, y.topk(half, -1).indices
        for i in range(x.shape[0]):
            for h in range(x.shape[1]):
                shared = set(top_x[i, h].tolist()) & set(top_y[i, h].tolist())
                assert len(shared) >= 0.9 * half  # the kept halves agree


@pytest.mark.skipif(not kernels.AVAILABLE, reason="the fused decode kernel needs Triton")
def test_fused_decode_and_torch_decode_keep_the_same_tokens():
    model = tiny_model(dtype=torch.bfloat16).cuda()
    ids = prompt(400, batch=2).cuda()
    runs = []
    try:
        for fused in (True, False):
            kernels.ENABLED = fused
            runs.append(run(model, "learned(budget=96,step=8,weights=random)", ids, steps=40))
    finally:
        kernels.ENABLED = True
    (fused, fused_logits), (plain, plain_logits) = runs
    torch.testing.assert_close(fused_logits.float(), plain_logits.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(fused.layers, plain.layers, strict=True):
        assert a.slots.length < 96 + 8 and a.evictions > 1
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))


def test_composed_with_quant_holds_the_budget_and_shrinks_memory():
    pytest.importorskip("kvcompress_quant")
    model = tiny_model(dtype=torch.bfloat16).cuda()
    ids = prompt(400, batch=2).cuda()
    alone, _ = run(model, "learned(budget=128,step=16,weights=random)", ids, steps=32)
    # quant keeps its last `window` tokens in the model's dtype: a window under the budget packs the rest
    spec = "learned(budget=128,step=16,weights=random)+quant(bits=4,window=32)"
    both, logits = run(model, spec, ids, steps=32)
    assert torch.isfinite(logits.float()).all()
    assert all(layer.slots.length < 128 + 16 for layer in both.layers)
    assert kvcompress.kv_bytes(both) < kvcompress.kv_bytes(alone)
