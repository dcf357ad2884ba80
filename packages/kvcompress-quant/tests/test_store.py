"""QuantStore layout: full-precision sink and window bit-exact, packed middle, eviction, truncation."""

from __future__ import annotations

import pytest
import torch

from kvcompress_quant import QuantStore, codec

B, H, D = 2, 3, 64


def _fill(store: QuantStore, sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for q in sizes:
        k = torch.randn(B, H, q, D, generator=g).to(dtype)
        v = torch.randn(B, H, q, D, generator=g).to(dtype)
        store.append(k, v)
        ks.append(k)
        vs.append(v)
    store._fresh = None  # look at what is stored, not at this step's full-precision copy
    return torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axes", [("channel", "token"), ("token", "token"), ("channel", "channel")])
@pytest.mark.parametrize("rotate", [False, True])
def test_sink_and_window_bit_exact_middle_quantized(bits, axes, rotate):
    store = QuantStore(bits, 16, sink=4, window=32, key_axis=axes[0], value_axis=axes[1], rotate=rotate)
    keys, values = _fill(store, [7, 1, 1, 50, 1, 1, 1, 3, 100] + [1] * 37, dtype=torch.bfloat16)
    n = keys.shape[2]
    assert store.length == n and store.s == 4 and store.m % 16 == 0 and 32 <= store.w < 32 + 16
    got_k, got_v = store.keys_values()
    assert got_k.dtype == torch.bfloat16
    for got, ref in ((got_k, keys), (got_v, values)):
        assert torch.equal(got[:, :, :4], ref[:, :, :4])
        assert torch.equal(got[:, :, n - store.w :], ref[:, :, n - store.w :])
        mid = slice(4, 4 + store.m)
        err = float((got[:, :, mid].float() - ref[:, :, mid].float()).norm() / ref[:, :, mid].float().norm())
        assert 0 < err < {8: 0.01, 4: 0.12, 2: 0.5}[bits]


def test_fresh_tokens_attend_in_full_precision_once():
    store = QuantStore(4, 16, sink=2, window=8, key_axis="channel", value_axis="token")
    k = torch.randn(1, 1, 100, D)
    store.append(k, k)
    assert store.m == 80
    got, _ = store.keys_values()
    assert torch.equal(got, k)  # the prompt attends to itself exactly
    assert store.attend(torch.randn(1, 1, 100, D), None, 1.0) is None
    got, _ = store.keys_values()
    assert not torch.equal(got, k)  # afterwards the middle is what is stored


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bytes_are_packed(bits):
    store = QuantStore(bits, 64, sink=4, window=128, key_axis="channel", value_axis="token")
    _fill(store, [2048])
    assert store.m == 1856 and store.w == 188 and store.cap_m == 1856
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in store.tensors())
    codes = B * H * store.cap_m * D * bits // 8
    scales = 2 * 2 * (B * H * store.cap_m // 64 * D) + 2 * 2 * (B * H * store.cap_m * D // 64)
    fp = 2 * B * H * (4 + 128 + 64) * D * 4
    assert store.nbytes() == 2 * codes + scales + fp
    assert store.ck.dtype == torch.uint8 and store.ck.shape[-1] == D * bits // 8


@pytest.mark.parametrize("rotate", [False, True])
def test_keep_sliding_whole_groups_is_exact(rotate):
    store = QuantStore(4, 16, sink=4, window=32, key_axis="channel", value_axis="token", rotate=rotate)
    _fill(store, [200])
    before = store.keys_values()
    n = store.length
    index = torch.cat([torch.arange(4), torch.arange(4 + 32, n)]).expand(B, H, -1)
    store.keep(index)
    after = store.keys_values()
    for a, b in zip(before, after):
        assert torch.equal(a.gather(2, index[..., None].expand(-1, -1, -1, D)), b)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("rotate", [False, True])
def test_keep_arbitrary_rows(key_axis, rotate):
    store = QuantStore(8, 16, sink=4, window=16, key_axis=key_axis, value_axis="token", rotate=rotate)
    keys, _values = _fill(store, [150, 1, 1])
    before_k, before_v = store.keys_values()
    n = store.length
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.stack([torch.randperm(n, generator=g)[:90].sort().values for _ in range(H)])
                         for _ in range(B)])
    store.keep(index)
    assert store.length == 90
    after_k, after_v = store.keys_values()
    gather = index[..., None].expand(-1, -1, -1, D)
    # values are per token: tokens that stay quantized keep their codes, so they decode identically
    assert torch.allclose(after_v, before_v.gather(2, gather), atol=1e-6)
    ref = keys.gather(2, gather)
    assert float((after_k - ref).norm() / ref.norm()) < 0.01
    # the new tail is the last 90 - s - m kept tokens, stored as they were decoded
    assert torch.equal(after_k[:, :, -store.w :], before_k.gather(2, gather)[:, :, -store.w :])


@pytest.mark.parametrize("rotate", [False, True])
def test_truncate_and_select_batch(rotate):
    store = QuantStore(4, 16, sink=4, window=16, key_axis="channel", value_axis="token", rotate=rotate)
    _fill(store, [100])
    full_k, _ = store.keys_values()
    store.truncate(30)
    assert store.length == 70
    got, _ = store.keys_values()
    assert torch.allclose(got, full_k[:, :, :70], atol=1e-6)
    store.select_batch(torch.tensor([1, 1, 0]))
    got2, _ = store.keys_values()
    assert got2.shape[0] == 3 and torch.equal(got2[0], got[1]) and torch.equal(got2[2], got[0])
    store.truncate(69)
    assert store.length == 1 and store.m == 0


def test_group_size_must_divide_head_dim():
    store = QuantStore(4, 48, sink=4, window=16, key_axis="channel", value_axis="token")
    with pytest.raises(ValueError, match=r"'group_size' is 48.*head_dim 64.*allowed: a divisor of 64"):
        store.append(torch.randn(1, 1, 5, D), torch.randn(1, 1, 5, D))


def test_codec_parts_layout_matches_kernel_convention():
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16) % 4
    packed = codec.pack(codes, 2)
    # byte j holds channels j, j+4, j+8, j+12 in bits 0-1, 2-3, 4-5, 6-7
    assert packed[0, 1].item() == (1 | 1 << 2 | 1 << 4 | 1 << 6)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_decode_attends_in_the_rotated_basis(bits, mask_kind, dtype):
    """A rotating store's one-query attention (no rotating back of the middle) equals decode-then-sdpa."""
    from kvcompress_quant import kernels

    store = QuantStore(bits, 16, sink=4, window=32, key_axis="channel", value_axis="token", rotate=True)
    _fill(store, [150, 1], dtype=dtype)
    store._last_q = 1
    assert store.stand_ins() is not None  # update() hands out placeholders; attend() takes the step
    n = store.length
    query = torch.randn(B, 2 * H, 1, D).to(dtype)  # GQA: 2 query heads per kv head
    mask = None
    if mask_kind:
        valid = torch.ones(B, n, dtype=torch.bool)
        valid[1, :20] = False  # left padding of row 1
        valid[0, 100] = False
        mask = valid[:, None, None, :]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    out = store.attend(query, mask, D**-0.5)
    ref = kernels.reference_attention(store, query, mask, D**-0.5)
    assert out.shape == (B, 1, 2 * H, D) and out.dtype == dtype
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def test_unrotated_store_leaves_cpu_attention_to_sdpa():
    store = QuantStore(4, 16, sink=4, window=32, key_axis="channel", value_axis="token")
    _fill(store, [150, 1])
    store._last_q = 1
    assert store.stand_ins() is None
    assert store.attend(torch.randn(B, H, 1, D), None, D**-0.5) is None


def test_channel_group_separate_from_token_group():
    store = QuantStore(2, 16, sink=4, window=32, key_axis="channel", value_axis="token", channel_group=64)
    keys, values = _fill(store, [200])
    assert (store.group, store.cgroup) == (16, 64)
    assert store.ks.shape[2:] == (store.cap_m // 16, D) and store.vs.shape[2:] == (store.cap_m, 1)
    got_k, got_v = store.keys_values()
    mid = slice(4, 4 + store.m)
    ref = codec.dequantize(*codec.quantize(values[:, :, mid], 2, "token", 64), 2, "token", 64)
    assert torch.equal(got_v[:, :, mid], ref)
    ref = codec.dequantize(*codec.quantize(keys[:, :, mid], 2, "channel", 16), 2, "channel", 16)
    assert torch.equal(got_k[:, :, mid], ref)
