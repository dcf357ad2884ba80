"""The GPU kernel's packed-code decode, checked on any machine (no GPU or Triton needed)."""

from __future__ import annotations

import re

import pytest
import torch

from kvcompress_quant import kernels


@pytest.mark.parametrize(("bits", "shift"), [(8, 0), (4, 0), (4, 4), (2, 0), (2, 2), (2, 4), (2, 6)])
def test_ptx_code_conversion_is_exact_for_every_byte(bits, shift):
    """The kernel's PTX decode (``lop3`` into fp16 1024 + code, then one ``fma``), replayed in torch
    from the constants in the PTX text: every byte value gives its code exactly."""
    ptx = kernels._codes_ptx(bits, shift)
    mask = int(re.search(r"lop3\.b32 t0, t0, 0x([0-9a-f]{4})\1, 0x64006400, 0xEA", ptx).group(1), 16)
    scale = int(re.search(r"mov\.b32 s, 0x([0-9a-f]{4})\1;", ptx).group(1), 16)
    offset = int(re.search(r"mov\.b32 o, 0x([0-9a-f]{4})\1;", ptx).group(1), 16)
    half = lambda bits16: torch.tensor(bits16, dtype=torch.int32).to(torch.int16).view(torch.float16)  # noqa: E731
    byte = torch.arange(256, dtype=torch.int32)
    biased = half(((byte & mask) | 0x6400).tolist())  # the byte's bits OR 0x6400, read as fp16
    got = (biased.double() * half(scale).double() + half(offset).double()).to(torch.float16)  # one rounding
    want = ((byte >> shift) & ((1 << bits) - 1)).to(torch.float16)
    assert torch.equal(got, want)
