"""Kernels and caches on a GPU that is not the current one, as for the layers of a model spread over GPUs
(accelerate's device map moves tensors, it never changes the current device): Triton launches on the current
device, so ``_kernels.launch`` makes the tensors' GPU current for the launch. Needs two CUDA GPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits, tiny_model

import kvcompress
from kvcompress import _kernels as kernels
from kvcompress.attention import decode_attention

pytestmark = pytest.mark.skipif(
    not (kernels.AVAILABLE and torch.cuda.device_count() >= 2),
    reason="needs Triton and two CUDA GPUs (this machine has "
    + f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})",
)


def test_kernels_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    b, hkv, grp, d, cap, n = 2, 2, 4, 64, 300, 257
    keys = torch.randn(b, hkv, cap, d, device=dev, generator=g, dtype=torch.bfloat16)
    values = torch.randn(b, hkv, cap, d, device=dev, generator=g, dtype=torch.bfloat16)
    ref, weights = None, None
    for _ in range(2):  # the first call compiles, the second takes the direct launcher
        query = torch.randn(b, hkv * grp, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
        acc = torch.zeros(b, hkv, cap, device=dev)
        out = kernels.observed_decode(query, keys, values, n, None, d**-0.5, acc, "sum")
        ref, weights = decode_attention(query.float(), keys[:, :, :n].float(), values[:, :, :n].float(), None,
                                        d**-0.5)
        assert out is not None and out.device == dev
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
        torch.testing.assert_close(acc[:, :, :n], weights.sum(2).sum(2), rtol=1e-3, atol=1e-5)
        new = torch.randn(b, hkv, 1, d, device=dev, generator=g, dtype=torch.bfloat16)
        want = keys.clone()
        want[:, :, n : n + 1] = new
        assert kernels.append_pair(keys, values, n, new, new.clone())
        assert torch.equal(keys, want)
        n += 1
    assert torch.cuda.current_device() == 0  # launch put it back


def _specs() -> list[str]:
    reg = kvcompress.get_registry().policies
    return ["dense", "sink(budget=24,step=8)", *(s for s in ("h2o(budget=20,step=8)",) if s.split("(")[0] in reg)]


@pytest.mark.parametrize("spec", _specs())
def test_a_model_on_the_second_gpu_decodes_as_on_the_first(spec):
    torch.cuda.set_device(0)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = []
    for dev in ("cuda:0", "cuda:1"):
        model = tiny_model("llama").to(dev)
        cache = kvcompress.make_cache(spec, model=model)
        logits.append(greedy_logits(model, ids.to(dev), cache, steps=24).cpu())
        held = [t for layer in cache.layers for t in layer.held_tensors()]
        assert held and {t.device for t in held} == {torch.device(dev)}
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
