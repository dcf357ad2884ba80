"""The ``quant`` representation policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcompress import Representation, param

if TYPE_CHECKING:  # pragma: no cover
    from kvcompress import LayerInfo

    from .store import QuantStore


@dataclass
class Quant(Representation):
    """KIVI-style KV quantization: fp sink + recent window, older tokens packed int8/int4/int2."""

    name: ClassVar[str] = "quant"

    bits: int = param(4, choices=(8, 4, 2), help="bits per stored code (packed 1, 2 or 4 per byte)")
    group_size: int | None = param(None, min=1, help="elements sharing one scale and zero point: tokens on "
                                   "the per-channel axis and, unless channel_group is given, channels on the "
                                   "per-token axis (default None: 16 at bits=2, 64 at bits=4 and 8)")
    channel_group: int | None = param(None, min=1, help="channels sharing one scale and zero point on the "
                                      "per-token axis (default None: group_size if given, else 64; at most "
                                      "head_dim)")
    sink: int = param(4, min=0, help="first tokens kept in the model's dtype")
    window: int = param(128, min=0, help="most recent tokens kept in the model's dtype")
    key_axis: str = param("channel", choices=("channel", "token"),
                          help="keys quantized per channel (groups of tokens) or per token")
    value_axis: str = param("token", choices=("token", "channel"),
                            help="values quantized per token (groups of channels) or per channel")
    rotate: bool | None = param(None, help="quantize keys and values times a Hadamard rotation of the "
                                           "channels (spreads outlier channels); default None: true at "
                                           "bits=2 only, where it is needed (+17% -> +6.5% ppl)")
    kernel: str = param("auto", choices=("auto", "triton", "torch"),
                        help="decode attention: fused Triton kernel on GPU, or dequantize (torch)")

    def check(self) -> None:
        if self.kernel == "triton":
            from . import kernels

            if not kernels.AVAILABLE:
                raise ValueError(
                    f"quant: parameter 'kernel' is 'triton' but Triton cannot be used here "
                    f"({kernels.UNAVAILABLE_REASON}); allowed: 'auto' or 'torch', or install "
                    "'kvcompress-quant[gpu]'"
                )

    @property
    def rotated(self) -> bool:
        """``rotate``, or its default for ``bits``: rotation buys int4 0.5 points of perplexity (+0.40% ->
        -0.11%) for four small matmuls per layer and decode step, so only int2 rotates by default."""
        return self.rotate if self.rotate is not None else self.bits == 2

    @property
    def group(self) -> int:
        """``group_size``, or its default for ``bits`` (16 at int2, where 64 measured +17% and 16 +6.5%)."""
        if self.group_size is not None:
            return self.group_size
        return 16 if self.bits == 2 else 64

    @property
    def cgroup(self) -> int | None:
        """``channel_group``; else None if ``group_size`` is given (the store follows it); else 64."""
        if self.channel_group is not None or self.group_size is not None:
            return self.channel_group
        return 64

    def static_refusal(self, cuda_graph: bool) -> str | None:
        """Static decode steps work everywhere; replayed as CUDA graphs through the fused kernel only."""
        from . import kernels

        if cuda_graph and (self.kernel == "torch" or not kernels.AVAILABLE):
            why = "kernel='torch'" if self.kernel == "torch" else kernels.UNAVAILABLE_REASON
            return f"CUDA graphs need the fused Triton kernel ({why})"
        return None

    def make_store(self, layer: LayerInfo) -> QuantStore:
        from .store import QuantStore

        return QuantStore(self.bits, self.group, self.sink, self.window, self.key_axis,
                          self.value_axis, self.kernel, self.rotated, self.cgroup)
