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


@pytest.mark.parametrize("d", [16, 64, 128, 96, 80])
def test_hadamard_is_orthonormal_symmetric_and_self_inverse(d):
    r = codec.hadamard(d)
    assert r.shape == (d, d) and r.dtype == torch.float32
    assert torch.equal(r, r.T)
    assert torch.allclose(r @ r, torch.eye(d), atol=1e-6)
    n = d & -d  # block size: the largest power of two dividing d
    assert torch.equal(r.abs() > 0, torch.block_diag(*[torch.ones(n, n, dtype=torch.bool)] * (d // n)))


def test_rotate_round_trips():
    x = _with_outliers(5)
    y = codec.rotate(x)
    assert not torch.allclose(y, x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # orthonormal: norms kept
    assert torch.allclose(codec.rotate(y), x, rtol=1e-5, atol=1e-3)  # outliers reach ~500 here
    assert codec.rotate(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_rotated_roundtrip_error_bounds(bits, axis):
    for seed in range(3):
        x = _with_outliers(seed)
        packed, scale, zero = codec.quantize(x, bits, axis, 32, rotated=True)
        y = codec.dequantize(packed, scale, zero, bits, axis, 32, rotated=True)
        err = float((y - x).norm() / x.norm())
        assert err < BOUNDS[bits], (bits, axis, err)
        # the codes are those of x @ R
        ref = codec.quantize(x @ codec.hadamard(64), bits, axis, 32)
        assert torch.equal(packed, ref[0]) and torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])


def test_rotation_spreads_an_outlier_channel_for_per_token_groups():
    x = _with_outliers(11)
    plain = codec.dequantize(*codec.quantize(x, 2, "token", 64), 2, "token", 64)
    rot = codec.dequantize(*codec.quantize(x, 2, "token", 64, rotated=True), 2, "token", 64, rotated=True)
    assert (rot - x).norm() < 0.8 * (plain - x).norm()


def test_rotated_dequantize_into_a_view():
    x = torch.randn(1, 2, 64, 64)
    packed, scale, zero = codec.quantize(x, 4, "token", 64, rotated=True)
    buf = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    codec.dequantize_into(buf[:, :, 10:74], packed, scale, zero, 4, "token", 64, rotated=True)
    ref = codec.dequantize(packed, scale, zero, 4, "token", 64, rotated=True)
    assert torch.equal(buf[:, :, 10:74], ref.to(torch.bfloat16))
    assert not buf[:, :, :10].any() and not buf[:, :, 74:].any()
