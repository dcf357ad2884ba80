"""A causal prompt observed on a CPU from flash attention's log-sum-exp: the same output as sdpa and the same
slot state as the policy's own observe() over materialised weights, and end to end the same cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import kvcompress
from kvcompress import _prefill_kernels
from kvcompress.attention import _weights


@pytest.mark.parametrize("reduce", ["sum", "max", "last"])
@pytest.mark.parametrize("q", [40, 600])  # one chunk of queries; several
def test_matches_sdpa_and_the_materialised_weights(reduce, q):
    g = torch.Generator().manual_seed(q)
    b, hkv, grp, d, thresh = 2, 2, 3, 32, 0.02
    query = torch.randn(b, hkv * grp, q, d, generator=g) * 2
    keys, values = torch.randn(b, hkv, q, d, generator=g), torch.randn(b, hkv, q, d, generator=g)
    acc = torch.rand(b, hkv, q + 8, generator=g) - (2.0 if reduce == "last" else 0.0)
    before = acc.clone()
    positions = torch.arange(q) + 100
    out = _prefill_kernels.attend_and_observe(query, keys, values, None, d**-0.5, None, acc, reduce,
                                              (positions, thresh) if reduce == "last" else None)
    want = torch.nn.functional.scaled_dot_product_attention(query, keys.repeat_interleave(grp, 1),
                                                            values.repeat_interleave(grp, 1), is_causal=True,
                                                            scale=d**-0.5)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    weights = _weights(query, keys, None, d**-0.5, 0, q)  # [B, H, G, q, S]
    expected = before.clone()
    if reduce == "last":
        used = (weights > thresh).any(2)
        when = torch.where(used, positions.float().view(1, 1, -1, 1), -1.0).amax(2)
        expected[:, :, :q] = torch.maximum(before[:, :, :q], when)
        assert (acc == expected).float().mean() > 0.99  # a weight within rounding of the threshold may flip
    else:
        expected[:, :, :q] += (weights.sum(2) if reduce == "sum" else weights.amax(2)).sum(2)
        torch.testing.assert_close(acc, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(acc[:, :, q:], before[:, :, q:])


def test_padding_a_past_or_a_bias_is_left_to_the_chunked_path():
    query, keys = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    acc = torch.zeros(1, 2, 8)
    padded = torch.ones(8, 8).tril().bool().expand(1, 1, 8, 8).clone()
    padded[..., :2] = False
    assert _prefill_kernels.attend_and_observe(query, keys, keys, padded, 0.25, None, acc, "sum") is None
    assert _prefill_kernels.attend_and_observe(query, keys, keys, None, 0.25, torch.zeros(1, 2, 8), acc, "sum") is None
    assert _prefill_kernels.attend_and_observe(query[:, :, 5:], keys, keys, None, 0.25, None, acc, "sum") is None
    assert not acc.any()


@pytest.mark.parametrize("spec", ["h2o(budget=24,step=4)", "h2o(budget=24,step=4,gqa=max)", "lru(budget=24,step=4)"])
def test_a_cache_compresses_as_through_the_materialised_weights(spec, monkeypatch):
    if spec.split("(")[0] not in kvcompress.get_registry().policies:
        pytest.skip("kvcompress-h2o is not installed")
    model = tiny_model("llama")
    ids = torch.randint(2, 96, (2, 300), generator=torch.Generator().manual_seed(5))
    runs = []
    for fused in (True, False):
        if not fused:  # the chunked path: weights materialised, the policy's observe() called
            monkeypatch.setattr(_prefill_kernels, "attend_and_observe", lambda *a, **k: None)
        cache = kvcompress.make_cache(spec, model=model)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        runs.append((out, cache))
    (a, ca), (b, cb) = runs
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-4, atol=1e-4)
    for x, y in zip(ca.layers, cb.layers, strict=True):
        assert torch.equal(x.slots.view("positions"), y.slots.view("positions"))
