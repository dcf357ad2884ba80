"""Asymmetric group quantization with real bit packing (the codec; no cache logic here).

Codes are packed along the channel axis in *split parts*: with ``P = 8 // bits``
codes per byte, byte ``j`` of a token row holds channel ``i * D/P + j`` in bits
``[i*bits, (i+1)*bits)`` for part ``i = 0..P-1``. Unpacking is then ``P`` shifts of
one contiguous ``[.., D/P]`` byte tile, which is what the Triton kernel reads too.

Two grouping axes, as in KIVI (arXiv 2402.02750):

- ``"token"``: each token's channels in groups of ``G`` share a scale and zero point;
  scales are ``[.., T, D/G]``.
- ``"channel"``: each channel's tokens in groups of ``G`` share them (outlier
  channels get their own range); scales are ``[.., T/G, D]`` and ``T`` is a multiple of ``G``.

Scales and zero points (the group minimum) are float16: ``x ~= code * scale + zero``.

Optionally (``rotated=True``) the codes encode ``x @ R`` instead of ``x``, with ``R`` = :func:`hadamard`
along the channels: an orthonormal, symmetric (so self-inverse) matrix that spreads outlier channels
over all channels before the low-bit grid is laid, as in QuaRot (arXiv 2404.00456). Decoding multiplies
by ``R`` again. Scores and outputs can also be computed in the rotated basis: ``(q R) . (k R) = q . k``.
"""

from __future__ import annotations

import functools

import torch

SCALE_DTYPE = torch.float16
_F16_MAX = 65504.0


def parts(bits: int) -> int:
    """Codes per byte."""
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[.., D]`` uint8 codes (< 2**bits) -> ``[.., D * bits // 8]`` packed bytes."""
    p = parts(bits)
    if p == 1:
        return codes
    d = codes.shape[-1]
    split = codes.view(*codes.shape[:-1], p, d // p)
    out = split[..., 0, :].clone()
    for i in range(1, p):
        out |= split[..., i, :] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed bytes ``[.., Dp]`` -> codes ``[.., Dp * 8 // bits]`` (into ``out`` if given, any dtype)."""
    p = parts(bits)
    dp = packed.shape[-1]
    if out is None:
        out = torch.empty((*packed.shape[:-1], dp * p), dtype=torch.uint8, device=packed.device)
    if p == 1:
        out.copy_(packed)
        return out
    mask = (1 << bits) - 1
    for i in range(p):
        part = packed >> (i * bits) if i else packed
        if i < p - 1:
            part = part & mask
        out[..., i * dp : (i + 1) * dp] = part
    return out


@functools.lru_cache(maxsize=16)
def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[d, d]`` orthonormal, symmetric Hadamard rotation (``R @ R = I``).

    Sylvester's construction when ``d`` is a power of two; otherwise block-diagonal, with blocks of the
    largest power of two dividing ``d`` (e.g. 3 blocks of 32 for ``d = 96``).
    """
    n = d & -d  # largest power of two dividing d
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    h = torch.block_diag(*[h / n**0.5] * (d // n))
    return h.to(device)


def rotate(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ R`` along the last dim (:func:`hadamard`), computed in float32, returned as ``dtype``
    (default ``x``'s). The rotation is its own inverse, so this also un-rotates."""
    y = x.float() @ hadamard(x.shape[-1], x.device)
    return y.to(dtype or x.dtype)


def _group_view(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> a view with the group as the reduced dim (-2 for channel axis, -1 for token)."""
    if axis == "token":
        return x.unflatten(-1, (x.shape[-1] // group, group))  # [B, H, T, D/G, G]
    return x.unflatten(-2, (x.shape[-2] // group, group))  # [B, H, T/G, G, D]


def quantize(x: torch.Tensor, bits: int, axis: str, group: int, rotated: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[B, H, T, D]`` (``x @ R`` if ``rotated``); return packed codes, scale and zero point
    (see module doc)."""
    xf = _group_view(rotate(x, torch.float32) if rotated else x.float(), axis, group)
    dim = -1 if axis == "token" else -2
    lo = xf.amin(dim=dim, keepdim=True).clamp(-_F16_MAX, _F16_MAX)
    hi = xf.amax(dim=dim, keepdim=True).clamp(-_F16_MAX, _F16_MAX)
    levels = (1 << bits) - 1
    zero = lo.to(SCALE_DTYPE)
    scale = ((hi - zero.float()) / levels).clamp(min=1e-6, max=_F16_MAX).to(SCALE_DTYPE)
    codes = ((xf - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    codes = codes.flatten(-2, -1) if axis == "token" else codes.flatten(-3, -2)
    return pack(codes, bits), scale.squeeze(dim), zero.squeeze(dim)


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bits: int, axis: str, group: int, rotated: bool = False) -> torch.Tensor:
    """Decode packed ``[B, H, T, Dp]`` into ``out`` ``[B, H, T, D]`` (any float dtype, may be a view);
    ``rotated`` codes (see :func:`quantize`) are decoded in float32 and rotated back."""
    if rotated:
        out.copy_(rotate(dequantize(packed, scale, zero, bits, axis, group, torch.float32)))
        return out
    unpack(packed, bits, out=out)
    view = _group_view(out, axis, group)
    dim = -1 if axis == "token" else -2
    s = scale.unsqueeze(dim).to(out.dtype)
    z = zero.unsqueeze(dim).to(out.dtype)
    view.mul_(s).add_(z)
    return out


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, axis: str,
               group: int, dtype: torch.dtype = torch.float32, rotated: bool = False) -> torch.Tensor:
    """Decode packed codes into a new ``[B, H, T, D]`` tensor of ``dtype``."""
    shape = (*packed.shape[:-1], packed.shape[-1] * parts(bits))
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    return dequantize_into(out, packed, scale, zero, bits, axis, group, rotated)
