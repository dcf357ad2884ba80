"""Bases and everything else the stores of one cache share: set up once per cache (``LowRank.setup``).

A layer's basis is its kv heads' means and first ``rank`` principal directions (``[H, rank, D]``, rows
orthonormal), for keys before RoPE and for values: from a calibration file (``basis="pca"``), or random
orthonormal directions (``basis="random"``, the baseline) with the calibration's means and ranks when one is
given, zero means otherwise. Ranks are fixed (``k_rank``, ``v_rank``) or, per layer, the fewest directions
that keep ``energy`` of the calibrated variance in every kv head of the layer.
"""

from __future__ import annotations

import importlib.resources
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kvcompress

from .meta import CHECKED, expected
from .positions import PositionDecoder, RopeTable

if TYPE_CHECKING:  # pragma: no cover
    from .policy import LowRank


@dataclass
class LayerBasis:
    """One layer's means ``[H, D]``, bases ``[H, rank, D]`` and whitening ``[H, rank]`` for keys and values.

    A basis row is a principal direction times the coefficient's calibrated deviation ``sigma`` (all ones for
    coefficients kept in the model's dtype); ``inv`` is ``1 / sigma**2``, so the stored coefficient of ``x``
    is ``((x - mean) @ basis.T) * inv`` and its reconstruction ``mean + c @ basis``."""

    k_mean: torch.Tensor
    k_basis: torch.Tensor
    k_inv: torch.Tensor
    v_mean: torch.Tensor
    v_basis: torch.Tensor
    v_inv: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerBasis:
        moved = [
            t.to(device, torch.float32 if i in (2, 5) else dtype).contiguous()
            for i, t in enumerate(self.tensors())
        ]
        return LayerBasis(*moved)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_mean, self.k_basis, self.k_inv, self.v_mean, self.v_basis, self.v_inv]


def shipped() -> list[Path]:
    """The calibration files shipped in the package."""
    root = importlib.resources.files("kvcompress_lowrank") / "data"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".safetensors"))


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def find_shipped(info: kvcompress.ModelInfo) -> Path | None:
    """The shipped calibration made for the model of ``info``, if there is one."""
    want = expected(info)
    for path in shipped():
        meta = _header(path)
        if all(meta.get(k) == want[k] for k in CHECKED):
            return path
    return None


def whitening(
    directions: torch.Tensor, tensors: dict[str, torch.Tensor] | None, kind: str, layer: int
) -> torch.Tensor:
    """Each direction's calibrated standard deviation ``[H, r]`` (``directions`` ``[H, D, r]``): from the
    calibration's covariance, ones without one."""
    if tensors is None:
        return torch.ones(directions.shape[0], directions.shape[2])
    u, lam = tensors[f"{kind}.basis"][layer].double(), tensors[f"{kind}.eigenvalues"][layer].double()
    d = directions.double()
    var = torch.einsum("hdr,hdk,hk,hek,her->hr", d, u, lam, u, d)  # d_r' C d_r, C = U diag(lam) U'
    floor = 1e-6 * lam.max(-1, keepdim=True).values.clamp(min=1e-30)
    return var.clamp(min=floor).sqrt().float()


def ranks_for(eigenvalues: torch.Tensor, energy: float) -> list[int]:
    """Per layer, the fewest directions keeping ``energy`` of the variance in every kv head (``[L, H,
    D]``)."""
    share = eigenvalues.cumsum(-1) / eigenvalues.sum(-1, keepdim=True).clamp(min=1e-30)
    need = (share < energy - 1e-9).sum(-1) + 1  # [L, H]
    return need.clamp(max=eigenvalues.shape[-1]).max(-1).values.tolist()


def random_orthonormal(heads: int, dim: int, seed: int) -> torch.Tensor:
    """``[H, D, D]`` random orthogonal matrices (QR of a Gaussian, signs fixed: Haar distributed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)).float()


class Shared:
    """What the stores of one cache share: each layer's basis (moved once to its device and dtype), the
    RoPE table per device and the decoder of true positions (with the last positions it decoded)."""

    def __init__(
        self,
        policy: LowRank,
        info: kvcompress.ModelInfo,
        bases: list[LayerBasis],
        k_ranks: list[int],
        v_ranks: list[int],
        source: str,
    ) -> None:
        self.policy, self.info, self.bases = policy, info, bases
        self.k_ranks, self.v_ranks, self.source = k_ranks, v_ranks, source
        self.tables: dict[torch.device, tuple[int, RopeTable]] = {}  # device -> (owner layer, table)
        self.decoder = PositionDecoder(info.rope, info.head_dim) if info.rope is not None else None
        self.last: tuple[Any, torch.Tensor] | None = None  # (weakref to the cos decoded, its positions)
        self.rope_consts: dict[torch.device, Any] = {}  # the fused kernel's RoPE frequencies (kernels.py)

    @classmethod
    def load(cls, policy: LowRank, info: kvcompress.ModelInfo) -> Shared:
        if info.config is None:
            raise kvcompress.ModelRequiredError(
                "lowrank: pass the model: kvcompress.make_cache(spec, model=model)"
            )
        layers, heads, dim = info.num_layers, info.num_kv_heads, info.head_dim
        for name in ("k_rank", "v_rank"):
            value = getattr(policy, name)
            if value is not None and value > dim:
                raise ValueError(f"lowrank: parameter {name!r} is {value}; allowed: 1..head_dim ({dim})")
        tensors, source = cls._calibration(policy, info)
        ranks = {}
        for kind, given, energy in (
            ("keys", policy.k_rank, policy.k_energy),
            ("values", policy.v_rank, policy.v_energy),
        ):
            if given is not None:
                ranks[kind] = [given] * layers
            elif tensors is not None:
                ranks[kind] = ranks_for(tensors[f"{kind}.eigenvalues"], energy or policy.energy)
            else:
                raise ValueError(
                    "lowrank: basis='random' without a calibration needs parameters 'k_rank' and "
                    "'v_rank' (ranks by 'energy' come from a calibration)"
                )
        if policy.coeff_bits == 4:  # two codes per byte: an even number of coefficients
            ranks = {kind: [min(r + r % 2, dim) for r in rs] for kind, rs in ranks.items()}
        bases = []
        for i in range(layers):
            parts = []
            for kind in ("keys", "values"):
                r = ranks[kind][i]
                if policy.basis == "pca":
                    full = tensors[f"{kind}.basis"][i]  # [H, D, D], columns = directions
                else:
                    full = random_orthonormal(heads, dim, policy.seed + i + (0 if kind == "keys" else 7919))
                mean = tensors[f"{kind}.mean"][i] if tensors is not None else torch.zeros(heads, dim)
                directions = full[:, :, :r].float()
                sigma = torch.ones(heads, r)
                if policy.coeff_bits is not None:
                    sigma = whitening(directions, tensors, kind, i)
                basis = (directions * sigma[:, None, :]).transpose(1, 2).contiguous()  # [H, r, D]
                parts += [mean.float(), basis, (1.0 / sigma**2).contiguous()]
            bases.append(LayerBasis(*parts))
        return cls(policy, info, bases, ranks["keys"], ranks["values"], source)

    @staticmethod
    def _calibration(
        policy: LowRank, info: kvcompress.ModelInfo
    ) -> tuple[dict[str, torch.Tensor] | None, str]:
        path: str | Path | None = policy.calibration or find_shipped(info)
        if path is None:
            if policy.basis == "random":
                return None, "random (no calibration)"
            raise kvcompress.WeightsError(
                f"lowrank: parameter 'calibration' is '' and no calibration ships for this model "
                f"({info.architecture}, {info.num_layers} layers, {info.num_kv_heads} kv heads, head_dim "
                f"{info.head_dim}); allowed: a file from 'kvcompress-lowrank calibrate --model M --data FILE "
                "--out calib.safetensors', or basis='random' with k_rank and v_rank"
            )
        want = {k: v for k, v in expected(info).items() if k in CHECKED}
        tensors, _ = kvcompress.load_weights(path, expect=want, what="lowrank: parameter 'calibration'")
        return tensors, str(path)

    def layer(self, index: int, device: torch.device, dtype: torch.dtype) -> LayerBasis:
        """Layer ``index``'s basis on ``device`` in ``dtype`` (converted once: the cache holds one copy)."""
        basis = self.bases[index]
        if basis.k_basis.device != device or basis.k_basis.dtype != dtype:
            basis = self.bases[index] = basis.to(device, dtype)
        return basis

    def table(self, index: int, device: torch.device) -> RopeTable | None:
        """The RoPE table on ``device``; the first layer to ask owns it (reports its bytes)."""
        if self.info.rope is None:
            return None
        if device not in self.tables:
            self.tables[device] = (index, RopeTable(self.info.rope, self.info.head_dim, device))
        return self.tables[device][1]

    def owned(self, index: int) -> list[torch.Tensor]:
        """The shared tensors layer ``index`` reports (each once per cache): the RoPE tables it owns and, for
        the first owner, the position decoder's, the kernel's RoPE constants and the last decoded
        positions."""
        out = [t for owner, table in self.tables.values() if owner == index for t in table.tensors()]
        if index == min((owner for owner, _ in self.tables.values()), default=-1):
            out += self.decoder.tensors()
            out += [c.inv_freq for c in self.rope_consts.values()]
            if self.last is not None:
                out.append(self.last[1])
        return out

    def positions(self, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        """True positions ``[B', q]`` of the tokens the model rotated with ``cos``/``sin``, slot positions
        ``start..`` (decoded once per forward: every layer of a forward gets the same tensors)."""
        last = self.last
        if last is not None and last[0]() is cos:
            return last[1]
        q = cos.shape[-2]
        pos = self.decoder.decode(cos, sin, torch.arange(start, start + q, device=cos.device).view(1, q))
        self.last = (weakref.ref(cos), pos)
        return pos
