"""The codec: packing is exact and dense, round-trip error is bounded per bit width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress_quant import codec


def _with_outliers(seed: int, shape=(2, 3, 128, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 3] *= 25.0  # an outlier channel (keys have these)
    x[:, :, 17] *= 10.0  # an outlier token
    return x


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 9), width=st.sampled_from([8, 16, 64, 128]),
       seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_is_exact(bits, rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, width), generator=g, dtype=torch.uint8)
    packed = codec.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, width * bits // 8)
    assert torch.equal(codec.unpack(packed, bits), codes)


# relative Frobenius error bounds on N(0,1) data with an outlier channel and token
BOUNDS = {8: 0.012, 4: 0.15, 2: 0.55}


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_roundtrip_error_bounds(bits, axis):
    for seed in range(3):
        x = _with_outliers(seed)
        packed, scale, zero = codec.quantize(x, bits, axis, 32)
        y = codec.dequantize(packed, scale, zero, bits, axis, 32)
        err = float((y - x).norm() / x.norm())
        assert err < BOUNDS[bits], (bits, axis, err)
        # every element within half a step of its group's scale (plus fp16 rounding of the zero point)
        view = codec._group_view((y - x).abs(), axis, 32)
        dim = -1 if axis == "token" else -2
        step = scale.float().unsqueeze(dim)
        slack = zero.float().abs().unsqueeze(dim) * 2**-10 + 1e-6
        assert bool((view <= step / 2 + slack + step * 1e-2).all())


def test_more_bits_less_error():
    x = _with_outliers(7)
    errs = []
    for bits in (2, 4, 8):
        y = codec.dequantize(*codec.quantize(x, bits, "channel", 32), bits, "channel", 32)
        errs.append(float((y - x).norm()))
    assert errs[0] > errs[1] > errs[2]


def test_channel_axis_handles_outlier_channel_better_for_keys():
    x = _with_outliers(3)
    tok = codec.dequantize(*codec.quantize(x, 2, "token", 64), 2, "token", 64)
    chan = codec.dequantize(*codec.quantize(x, 2, "channel", 64), 2, "channel", 64)
    normal = [c for c in range(64) if c != 3]
    assert (chan - x)[..., normal].norm() < 0.8 * (tok - x)[..., normal].norm()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_byte_counts(bits):
    x = torch.randn(1, 2, 64, 128)
    packed, scale, zero = codec.quantize(x, bits, "token", 64)
    assert packed.numel() * packed.element_size() == 1 * 2 * 64 * 128 * bits // 8
    assert scale.dtype == zero.dtype == torch.float16
    assert scale.shape == (1, 2, 64, 2)
    _, scale_c, _ = codec.quantize(x, bits, "channel", 64)
    assert scale_c.shape == (1, 2, 1, 128)


def test_constant_group_decodes_exactly():
    x = torch.full((1, 1, 32, 16), 0.375)
    for axis in ("token", "channel"):
        y = codec.dequantize(*codec.quantize(x, 2, axis, 16), 2, axis, 16)
        assert torch.equal(y, x)
