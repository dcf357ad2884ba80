"""The prompt-observation kernels (each slot's attention summed over a prompt's queries, no n x n matrix)
against the torch path. On a CUDA GPU with Triton; on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress import _kernels, _prefill_kernels
from kvcompress.attention import _weights

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if _kernels.INTERPRET else None)
pytestmark = pytest.mark.skipif(not (_kernels.AVAILABLE and DEVICE),
                                reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q,s", [(150, 150), (70, 200)])  # a whole prompt; a chunk after earlier tokens
def test_prompt_observation_matches_torch(reduce, mask_kind, with_bias, dtype, q, s):
    g = torch.Generator(device=DEVICE).manual_seed(q + s)
    b, hkv, grp, d = 2, 2, 3, 32
    query = torch.randn(b, hkv * grp, q, d, device=DEVICE, generator=g).to(dtype)
    keys = torch.randn(b, hkv, s, d, device=DEVICE, generator=g).to(dtype)
    bias = torch.rand(b, hkv, s, device=DEVICE, generator=g) * math.log(4) if with_bias else None
    mask = None
    if mask_kind:
        causal = torch.arange(s, device=DEVICE)[None, :] <= torch.arange(q, device=DEVICE)[:, None] + (s - q)
        valid = causal.expand(b, q, s).clone()
        valid[1, :, :17] = False  # left padding of row 1
        mask = valid[:, None]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype, device=DEVICE).masked_fill(~mask, torch.finfo(dtype).min)
    acc = torch.rand(b, hkv, s + 8, device=DEVICE, generator=g)
    before = acc.clone()
    assert _prefill_kernels.prompt_observe(query, keys, mask, d**-0.5, bias, acc, reduce)
    weights = _weights(query.float(), keys.float(), mask, d**-0.5, 0, q, bias)  # [B, H, G, q, S]
    reduced = weights.sum(2) if reduce == "sum" else weights.amax(2)
    expected = before.clone()
    expected[:, :, :s] += reduced.sum(2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(acc, expected, rtol=tol, atol=tol * q)
