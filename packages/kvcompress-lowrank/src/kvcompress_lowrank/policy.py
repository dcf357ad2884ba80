"""The ``lowrank`` representation policy (configuration only; torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcompress import Representation, param

if TYPE_CHECKING:  # pragma: no cover
    from kvcompress import LayerInfo, ModelInfo

    from .basis import Shared
    from .store import LowRankStore


@dataclass
class LowRank(Representation):
    """Calibrated low-rank K/V: keys projected before RoPE, values projected, exact sink and recent window."""

    name: ClassVar[str] = "lowrank"
    needs_rope: ClassVar[bool] = True

    calibration: str = param("", help="calibration .safetensors file (kvcompress-lowrank calibrate); default "
                                      "'': the one shipped for the model (SmolLM2-135M-Instruct)")
    basis: str = param("pca", choices=("pca", "random"),
                       help="the calibrated PCA basis, or a random orthonormal one (the baseline; with the "
                            "calibration's mean, whitening and ranks when a calibration is there)")
    k_rank: int | None = param(None, min=1, help="coefficients per key (default None: per layer by `energy`)")
    v_rank: int | None = param(None, min=1, help="coefficients per value (default None: by `energy`)")
    energy: float = param(0.99, min=0.0, min_exclusive=True, max=1.0,
                          help="share of the calibrated variance each layer's ranks keep (worst kv head)")
    k_energy: float | None = param(None, min=0.0, min_exclusive=True, max=1.0,
                                   help="`energy` for the keys only (default None: `energy`)")
    v_energy: float | None = param(None, min=0.0, min_exclusive=True, max=1.0,
                                   help="`energy` for the values only (default None: `energy`)")
    coeff_bits: int | None = param(4, choices=(4, 8), help="4 or 8: packed int4 / int8 coefficients "
                                   "(whitened), a float16 scale per token and head; None: the model's dtype")
    sink: int = param(4, min=0, help="first tokens kept exact")
    window: int = param(64, min=0, help="most recent tokens kept exact")
    seed: int = param(0, min=0, help="seed of the random basis (layer i draws from seed + i)")
    kernel: str = param("auto", choices=("auto", "triton", "torch"),
                        help="decode attention: fused Triton kernel on a CUDA GPU, or torch ops")

    def check(self) -> None:
        if self.kernel == "triton":
            from kvcompress import _kernels

            if not _kernels.AVAILABLE:
                raise ValueError(
                    "lowrank: parameter 'kernel' is 'triton' but Triton is not installed; allowed: "
                    "'auto' or 'torch', or install 'kvcompress-lowrank[gpu]'"
                )

    def static_refusal(self, cuda_graph: bool) -> str | None:
        """Static decode steps work everywhere; replayed as CUDA graphs through the fused kernels only."""
        from . import kernels

        if cuda_graph and (self.kernel == "torch" or not kernels.AVAILABLE):
            why = "kernel='torch'" if self.kernel == "torch" else "Triton is not installed"
            return f"CUDA graphs need the fused Triton kernels ({why})"
        return None

    def setup(self, model: ModelInfo) -> Shared:
        from .basis import Shared

        return Shared.load(self, model)

    def make_store(self, layer: LayerInfo) -> LowRankStore:
        from .store import LowRankStore

        return LowRankStore(layer, self)
