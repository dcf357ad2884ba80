"""The fused observed-decode kernel against the torch path (GPU only)."""

from __future__ import annotations

import pytest
import torch

from kvcompress import _kernels as kernels
from kvcompress.attention import decode_attention

pytestmark = pytest.mark.skipif(
    not (kernels.AVAILABLE and torch.cuda.is_available()),
    reason="the fused decode kernel needs Triton and a CUDA GPU "
    + ("(no CUDA device here)" if kernels.AVAILABLE else "(Triton is not installed)"),
)


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_observed_decode_matches_torch_ops(reduce, mask_kind, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hkv, grp, d, cap, n = 2, 4, 4, 128, 1100, 1029
    keys = torch.randn(b, hkv, cap, d, device="cuda", generator=g).to(dtype)
    values = torch.randn(b, hkv, cap, d, device="cuda", generator=g).to(dtype)
    query = torch.randn(b, hkv * grp, 1, d, device="cuda", generator=g).to(dtype)
    mask = None
    if mask_kind:
        valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
        valid[1, :300] = False  # left padding of row 1
        valid[0, 700] = False
        mask = valid[:, None, None, :]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype, device="cuda").masked_fill(~mask, torch.finfo(dtype).min)
    acc = torch.rand(b, hkv, cap, device="cuda", generator=g)
    before = acc.clone()
    out = kernels.observed_decode(query, keys, values, n, mask, d**-0.5, acc, reduce)
    ref, weights = decode_attention(query.float(), keys[:, :, :n].float(), values[:, :, :n].float(),
                                     mask, d**-0.5)
    reduced = weights.sum(2) if reduce == "sum" else weights.amax(2)
    expected = before.clone()
    expected[:, :, :n] += reduced.sum(2)
    assert out.shape == (b, 1, hkv * grp, d) and out.dtype == dtype
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel
    torch.testing.assert_close(acc, expected, rtol=1e-3, atol=1e-5)
    if mask_kind:  # padding receives no attention
        assert torch.equal(acc[1, :, :300], before[1, :, :300])


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_append_pair_writes_exactly_the_new_slots(q, dtype):
    g = torch.Generator(device="cuda").manual_seed(q)
    b, h, d, cap, at = 2, 3, 64, 40, 17
    keys = torch.randn(b, h, cap, d, device="cuda", generator=g).to(dtype)
    values = torch.randn(b, h, cap, d, device="cuda", generator=g).to(dtype)
    # as a model hands them over: [B, q, H, D] projections transposed to [B, H, q, D] (not contiguous)
    new_k = torch.randn(b, q, h, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    new_v = torch.randn(b, q, h, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    want_k, want_v = keys.clone(), values.clone()
    want_k[:, :, at : at + q], want_v[:, :, at : at + q] = new_k, new_v
    assert kernels.append_pair(keys, values, at, new_k, new_v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_append_pair_declines_what_it_does_not_cover():
    keys = torch.zeros(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    new = torch.ones(1, 2, 1, 64, device="cuda", dtype=torch.float32)  # another dtype
    assert not kernels.append_pair(keys, keys.clone(), 0, new, new)
    assert not keys.any()  # nothing half-written


def test_resident_programs_of_compiled_kernels_only():
    query = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(1, 2, 300, device="cuda")
    assert kernels.observed_decode(query, keys, keys.clone(), 300, None, 0.125, acc, "sum") is not None
    device = query.device
    assert kernels.resident_programs(("not", "compiled"), device) is None
    counts = [kernels.resident_programs(key, device) for key in kernels._COMPILED]
    threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor
    assert counts and all(isinstance(n, int) and 1 <= n <= threads // 32 for n in counts)
