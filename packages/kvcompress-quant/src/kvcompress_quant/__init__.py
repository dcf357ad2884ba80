"""kvcompress-quant: selective KV-cache quantization (fp sink + window, packed int8/int4/int2 middle)."""

from __future__ import annotations

from .policy import Quant

__version__ = "0.1.0"
__all__ = ["Quant", "QuantStore", "codec"]


def __getattr__(name: str):  # the store and codec need torch: loaded on first use
    import importlib

    if name == "QuantStore":
        return importlib.import_module(".store", __name__).QuantStore
    if name == "codec":
        return importlib.import_module(".codec", __name__)
    raise AttributeError(f"module 'kvcompress_quant' has no attribute {name!r}")
