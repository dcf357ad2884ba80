"""The fused decode kernel with a per-slot bias and with observation (attention accumulated per slot),
against float32 torch references. On a CUDA GPU with Triton; on a CPU under Triton's interpreter
(TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.attention import decode_attention
from kvcompress.store import Accumulate
from kvcompress_quant import QuantStore, kernels

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if kernels.INTERPRET else None)
pytestmark = pytest.mark.skipif(not (kernels.AVAILABLE and DEVICE),
                                reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")


@pytest.fixture(autouse=True, params=[True, False] if DEVICE == "cuda" else [False])
def pieces(request, monkeypatch):
    """Both layouts of the middle on a GPU: packed pieces (keys per channel, values per token) and the generic
    tile decode. Triton's interpreter runs the generic one only (it cannot run the pieces loop's bounds)."""
    monkeypatch.setattr(kernels, "PIECES", request.param)
    return request.param


def _store(bits, axes, rotate, n, b=2, h=2, d=64, group=64):
    store = QuantStore(bits, group, sink=4, window=64, key_axis=axes[0], value_axis=axes[1], rotate=rotate)
    g = torch.Generator(device=DEVICE).manual_seed(bits + n)
    dtype = torch.float16
    for q in (n - 3, 1, 1, 1):
        k = torch.randn(b, h, q, d, device=DEVICE, generator=g, dtype=dtype)
        k[..., 5] *= 6
        store.append(k, torch.randn(b, h, q, d, device=DEVICE, generator=g, dtype=dtype))
    store._fresh = None
    return store


@pytest.mark.parametrize("bits,axes,rotate", [(4, ("channel", "token"), False),
                                              (2, ("channel", "token"), True),
                                              (8, ("token", "token"), False),
                                              (4, ("token", "channel"), False)])
@pytest.mark.parametrize("observe", [None, "sum", "max", "set"])
@pytest.mark.parametrize("masked", [False, True])
def test_bias_and_observation_match_float32_reference(bits, axes, rotate, observe, masked):
    n = 300
    store = _store(bits, axes, rotate, n)
    b, h, d = store.b, store.h, store.d
    g = torch.Generator(device=DEVICE).manual_seed(1)
    query = torch.randn(b, 4 * h, 1, d, device=DEVICE, generator=g, dtype=torch.float16)
    cap = n + 16
    bias = torch.zeros(b, h, cap, device=DEVICE)
    bias[:, :, :n] = torch.rand(b, h, n, device=DEVICE, generator=g) * math.log(8)  # slots standing for 1..8
    mask = None
    if masked:
        valid = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
        valid[1, :40] = False
        mask = valid[:, None, None, :]
    acc = torch.rand(b, h, cap, device=DEVICE, generator=g)
    before = acc.clone()
    accumulate = None
    if observe:
        accumulate = Accumulate(acc, "sum" if observe == "set" else observe, observe == "set")
    out = kernels.decode_attention(store, query, mask, d**-0.5, bias[:, :, :n], accumulate)
    keys, values = store._dense(torch.float32)
    ref, weights = decode_attention(query.float(), keys, values, mask, d**-0.5, bias[:, :, :n])
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 2e-2, rel
    if observe:
        reduced = weights.amax(2) if observe == "max" else weights.sum(2)
        expected = before.clone()
        if observe == "set":
            expected[:, :, :n] = reduced.sum(2)
        else:
            expected[:, :, :n] += reduced.sum(2)
        torch.testing.assert_close(acc, expected, rtol=2e-2, atol=2e-3)
        if masked and observe != "set":
            assert torch.equal(acc[1, :, :40], before[1, :, :40])  # padding receives nothing
    else:
        assert torch.equal(acc, before)


def test_bias_identity_in_the_kernel():
    """Slot 10 stored 5 times without bias == stored once with bias log 5 (the kernel's own two runs; the
    tokens stay in full precision, so both stores hold exactly the same values)."""
    n = 40
    query = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.float16)
    dup = torch.cat([torch.arange(n), torch.full((4,), 10)]).sort().values.to(DEVICE)
    dup = dup.view(1, 1, -1).expand(1, 2, -1)
    once = torch.arange(n, device=DEVICE).view(1, 1, -1).expand(1, 2, -1)
    a, c = _store(4, ("channel", "token"), False, n, b=1), _store(4, ("channel", "token"), False, n, b=1)
    a.apply(dup)
    c.apply(once)
    bias = torch.zeros(1, 2, n, device=DEVICE)
    bias[..., 10] = math.log(5)
    want = kernels.decode_attention(a, query, None, 0.125)
    got = kernels.decode_attention(c, query, None, 0.125, bias)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-3
