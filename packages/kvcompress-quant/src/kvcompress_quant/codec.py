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
"""

from __future__ import annotations

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


def _group_view(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> a view with the group as the reduced dim (-2 for channel axis, -1 for token)."""
    if axis == "token":
        return x.unflatten(-1, (x.shape[-1] // group, group))  # [B, H, T, D/G, G]
    return x.unflatten(-2, (x.shape[-2] // group, group))  # [B, H, T/G, G, D]


def quantize(x: torch.Tensor, bits: int, axis: str, group: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[B, H, T, D]``; return packed codes, scale and zero point (see module doc)."""
    xf = _group_view(x.float(), axis, group)
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
                    bits: int, axis: str, group: int) -> torch.Tensor:
    """Decode packed ``[B, H, T, Dp]`` into ``out`` ``[B, H, T, D]`` (any float dtype, may be a view)."""
    unpack(packed, bits, out=out)
    view = _group_view(out, axis, group)
    dim = -1 if axis == "token" else -2
    s = scale.unsqueeze(dim).to(out.dtype)
    z = zero.unsqueeze(dim).to(out.dtype)
    view.mul_(s).add_(z)
    return out


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, axis: str,
               group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode packed codes into a new ``[B, H, T, D]`` tensor of ``dtype``."""
    shape = (*packed.shape[:-1], packed.shape[-1] * parts(bits))
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    return dequantize_into(out, packed, scale, zero, bits, axis, group)
