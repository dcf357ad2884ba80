"""Quantized coefficients: symmetric int8 or int4, one float16 scale per (token, head) over its coefficients.

The coefficients are whitened first (each divided by its calibrated standard deviation, folded into the
basis): the trailing, small coefficients then get as many levels as the leading ones, so each keeps the same
share of its variance (int4: about 1.3% of it lost, as much as an ``energy`` of 0.987). Without the whitening
one int4 step sized by the largest coefficient would round most trailing ones to zero.

int4 codes (-7..7) are packed two per byte: byte ``j`` holds coefficient ``j`` in its low nibble and ``j +
r/2`` in its high nibble (``r`` even), so unpacking gives two contiguous halves, no interleaving.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
QMAX = {8: 127, 4: 7}


def quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale float16 [...])`` with ``x ~= unpacked codes * scale``: codes int8 ``[..., r]`` (8 bits)
    or packed int8 ``[..., r/2]`` (4 bits)."""
    qmax = QMAX[bits]
    scale = (x.abs().amax(-1).float() / qmax).to(SCALE_DTYPE)
    safe = scale.float().clamp(min=torch.finfo(SCALE_DTYPE).tiny).unsqueeze(-1)
    codes = torch.round(x.float() / safe).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        lo, hi = codes.chunk(2, dim=-1)
        codes = (lo & 0x0F) | (hi << 4)
    return codes, scale


def unpack(codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """int8 codes ``[..., r]`` from stored ones (4 bits: sign-extended nibbles, low halves first)."""
    if bits == 8:
        return codes
    return torch.cat(((codes << 4) >> 4, codes >> 4), dim=-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bits: int = 8) -> torch.Tensor:
    """``codes * scale`` ``[..., r]`` in ``dtype``."""
    return unpack(codes, bits).to(dtype) * scale.to(dtype).unsqueeze(-1)


def stored_width(rank: int, bits: int | None) -> int:
    """Bytes-or-elements per token and head of ``rank`` coefficients as stored."""
    return rank // 2 if bits == 4 else rank
