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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's log-sum-exp needs a CUDA GPU")
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("q,s,mask_kind", [(150, 150, None), (70, 200, "bool")])  # a prompt; a later chunk
def test_attend_and_observe_matches_sdpa_and_torch(reduce, q, s, mask_kind):
    g = torch.Generator(device="cuda").manual_seed(q * s)
    b, hkv, grp, d = 2, 2, 3, 64
    query = torch.randn(b, hkv * grp, q, d, device="cuda", generator=g).to(torch.bfloat16)
    keys = torch.randn(b, hkv, s, d, device="cuda", generator=g).to(torch.bfloat16)
    values = torch.randn(b, hkv, s, d, device="cuda", generator=g).to(torch.bfloat16)
    causal = torch.arange(s, device="cuda")[None, :] <= torch.arange(q, device="cuda")[:, None] + (s - q)
    mask = causal.expand(b, 1, q, s) if mask_kind else None
    acc = torch.rand(b, hkv, s + 8, device="cuda", generator=g)
    before = acc.clone()
    out = _prefill_kernels.attend_and_observe(query, keys, values, mask, d**-0.5, None, acc, reduce)
    assert out is not None and out.shape == (b, q, hkv * grp, d)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float().repeat_interleave(grp, 1), values.float().repeat_interleave(grp, 1),
        attn_mask=causal, scale=d**-0.5).transpose(1, 2)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    weights = _weights(query.float(), keys.float(), causal.expand(b, 1, q, s), d**-0.5, 0, q)
    reduced = weights.sum(2) if reduce == "sum" else weights.amax(2)
    expected = before.clone()
    expected[:, :, :s] += reduced.sum(2)
    torch.testing.assert_close(acc, expected, rtol=2e-2, atol=2e-2 * q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's log-sum-exp needs a CUDA GPU")
def test_attend_and_observe_leaves_padding_and_bias_to_the_two_passes():
    b, h, q, d = 2, 2, 16, 32
    query, keys = torch.randn(b, h, q, d, device="cuda").half(), torch.randn(b, h, q, d, device="cuda").half()
    acc = torch.zeros(b, h, q, device="cuda")
    padded = torch.ones(q, q, device="cuda").tril().bool().expand(b, 1, q, q).clone()
    padded[1, :, :, :3] = False
    bias = torch.zeros(b, h, q, device="cuda")
    assert _prefill_kernels.attend_and_observe(query, keys, keys, padded, d**-0.5, None, acc, "sum") is None
    assert _prefill_kernels.attend_and_observe(query, keys, keys, None, d**-0.5, bias, acc, "sum") is None
    assert _prefill_kernels.attend_and_observe(query.float(), keys.float(), keys.float(), None, d**-0.5, None, acc,
                                               "sum") is None
    assert not acc.any()  # nothing half-done


def _last_use(weights: torch.Tensor, qpos: torch.Tensor, before: torch.Tensor, thresh: float) -> torch.Tensor:
    """LRU's torch path: each slot raised to the position of the last query above ``thresh`` on any head."""
    used = (weights > thresh).any(2)  # [B, H, q, S]
    s = weights.shape[-1]
    expected = before.clone()
    expected[:, :, :s] = torch.maximum(before[:, :, :s], torch.where(used, qpos.view(1, 1, -1, 1), -1.0).amax(2))
    return expected


@pytest.mark.parametrize("mask_kind", [None, "bool"])
@pytest.mark.parametrize("q,s", [(150, 150), (70, 200)])
def test_last_use_matches_lru_torch_path(mask_kind, q, s):
    g = torch.Generator(device=DEVICE).manual_seed(7 * q + s)
    b, hkv, grp, d, thresh = 2, 2, 3, 32, 0.02
    query = torch.randn(b, hkv * grp, q, d, device=DEVICE, generator=g) * 2
    keys = torch.randn(b, hkv, s, d, device=DEVICE, generator=g)
    mask = None
    if mask_kind:
        causal = torch.arange(s, device=DEVICE)[None, :] <= torch.arange(q, device=DEVICE)[:, None] + (s - q)
        valid = causal.expand(b, q, s).clone()
        valid[1, :, :17] = False
        mask = valid[:, None]
    qpos = torch.arange(s - q, s, device=DEVICE, dtype=torch.float32) + 1000
    acc = torch.full((b, hkv, s + 8), -1.0, device=DEVICE)
    acc[:, :, :5] = 5000.0  # a later use already recorded stays
    before = acc.clone()
    assert _prefill_kernels.prompt_observe(query, keys, mask, d**-0.5, None, acc, "last", (qpos, thresh))
    weights = _weights(query, keys, mask, d**-0.5, 0, q)
    expected = _last_use(weights, qpos, before, thresh)
    agree = (acc == expected).float().mean()
    assert agree > 0.99, agree  # a weight within rounding of the threshold may go either way
    assert torch.equal(acc[:, :, :5], before[:, :, :5]) and (acc[:, :, :s] >= 1000).any()
    if mask_kind:  # padding is never used
        assert (acc[1, :, 5:17] == -1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's log-sum-exp needs a CUDA GPU")
def test_attend_and_observe_last_use():
    g = torch.Generator(device="cuda").manual_seed(3)
    b, hkv, grp, d, q, thresh = 2, 2, 4, 64, 180, 0.02
    query = (torch.randn(b, hkv * grp, q, d, device="cuda", generator=g) * 2).half()
    keys = torch.randn(b, hkv, q, d, device="cuda", generator=g).half()
    values = torch.randn(b, hkv, q, d, device="cuda", generator=g).half()
    qpos = torch.arange(q, device="cuda", dtype=torch.float32)
    acc = torch.full((b, hkv, q), -1.0, device="cuda")
    assert _prefill_kernels.attend_and_observe(query, keys, values, None, d**-0.5, None, acc, "last",
                                               (qpos, thresh)) is not None
    expected = _last_use(_weights(query.float(), keys.float(), None, d**-0.5, 0, q), qpos,
                         torch.full_like(acc, -1.0), thresh)
    assert (acc == expected).float().mean() > 0.98
