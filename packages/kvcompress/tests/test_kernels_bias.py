"""The core's fused decode kernel with a per-slot bias, observing or not, against the torch path. On a CUDA GPU
with Triton; on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress import _kernels as kernels
from kvcompress.attention import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if kernels.INTERPRET else None)
pytestmark = pytest.mark.skipif(not (kernels.AVAILABLE and DEVICE),
                                reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")


@pytest.mark.parametrize("split", [True, False])  # slots split over programs and merged, or one program each
@pytest.mark.parametrize("observe", [None, "sum", "max", "set"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_decode_with_bias_matches_torch(observe, masked, dtype, split, monkeypatch):
    monkeypatch.setattr(kernels, "SPLIT", "always" if split else "never")
    assert kernels._splits(torch.device(DEVICE), 4, 130)[0] > 1  # 4 programs over 130 slots: split where asked
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, hkv, grp, d, cap, n = 2, 2, 4, 64, 160, 130
    keys = torch.randn(b, hkv, cap, d, device=DEVICE, generator=g).to(dtype)
    values = torch.randn(b, hkv, cap, d, device=DEVICE, generator=g).to(dtype)
    query = torch.randn(b, hkv * grp, 1, d, device=DEVICE, generator=g).to(dtype)
    bias = torch.zeros(b, hkv, cap, device=DEVICE)
    bias[:, :, :n] = torch.rand(b, hkv, n, device=DEVICE, generator=g) * math.log(6)
    mask = None
    if masked:
        valid = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
        valid[1, :30] = False
        mask = valid[:, None, None, :]
    acc = torch.rand(b, hkv, cap, device=DEVICE, generator=g)
    before = acc.clone()
    accumulate = (acc, "sum" if observe == "set" else observe, observe == "set") if observe else None
    out = kernels.fused_decode(query, keys, values, n, mask, d**-0.5, bias, accumulate)
    ref, weights = decode_attention(query.float(), keys[:, :, :n].float(), values[:, :, :n].float(), mask,
                                    d**-0.5, bias[:, :, :n])
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < (1e-2 if dtype == torch.float16 else 1e-5), rel
    if observe:
        reduced = weights.amax(2) if observe == "max" else weights.sum(2)
        expected = before.clone()
        if observe == "set":
            expected[:, :, :n] = reduced.sum(2)
        else:
            expected[:, :, :n] += reduced.sum(2)
        torch.testing.assert_close(acc, expected, rtol=1e-3, atol=1e-4)
    else:
        assert torch.equal(acc, before)


def test_bias_identity_in_the_kernel():
    """Slot 7 stored 4 times without bias == stored once with bias log 4."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    b, hkv, d, n = 1, 2, 64, 50
    keys = torch.randn(b, hkv, n, d, device=DEVICE, generator=g)
    values = torch.randn(b, hkv, n, d, device=DEVICE, generator=g)
    query = torch.randn(b, 2 * hkv, 1, d, device=DEVICE, generator=g)
    dup = torch.cat([torch.arange(n), torch.full((3,), 7)]).to(DEVICE)
    bias = torch.zeros(b, hkv, n, device=DEVICE)
    bias[..., 7] = math.log(4)
    want = kernels.fused_decode(query, keys[:, :, dup].contiguous(), values[:, :, dup].contiguous(), n + 3, None,
                                0.125, torch.zeros(b, hkv, n + 3, device=DEVICE))
    got = kernels.fused_decode(query, keys, values, n, None, 0.125, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
