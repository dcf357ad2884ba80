"""kvcompress-quant: selective KV-cache quantization (fp sink + window, packed int8/int4/int2 middle)."""

from __future__ import annotations

from . import codec
from .policy import Quant
from .store import QuantStore

__version__ = "0.1.0"
__all__ = ["Quant", "QuantStore", "codec"]
