"""RoPE for a store that keeps keys before it: the true position of each new token, and cos/sin by position.

The model rotates a key at its *true* position, which is not always its slot's: ``generate`` on a left-padded
batch numbers each row's real tokens from 0 (``attention_mask.cumsum(-1) - 1``). The store learns the true
positions from the ``cos``/``sin`` the model applied (:class:`PositionDecoder`: the angle of the lowest
frequency gives the position roughly, each higher frequency refines it; exact even from bfloat16 cos/sin),
and keeps them with the keys so it can rotate them again. :class:`RopeTable` holds cos/sin by position (one
table per cache and device, shared by the layers) so that rotating stored keys is a gather, not trigonometry.

transformers' RoPE writes each frequency twice (``cos[..., :F] == cos[..., F:]``, halves layout); models
whose RoPE does not (interleaved pairs, partial rotary) are refused with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Rope = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


class RopeError(ValueError):
    """The model's RoPE is not one this store can undo and redo."""


class RopeTable:
    """``cos``/``sin`` ``[P, F]`` (float32, the first half of the model's ``[P, head_dim]``) of positions
    ``0..P-1`` on one device, grown by 1/8 at a time as positions grow (the new rows only are computed)."""

    def __init__(self, rope: Rope, head_dim: int, device: torch.device) -> None:
        self.rope, self.half, self.device = rope, head_dim // 2, device
        self.cos = torch.empty((0, self.half), device=device)
        self.sin = torch.empty((0, self.half), device=device)

    def ensure(self, size: int) -> None:
        """Cover positions ``< size``."""
        have = self.cos.shape[0]
        if size <= have:
            return
        size = max(size + size // 8, 256)
        cos, sin = self.rope(torch.arange(have, size, device=self.device))
        cos, sin = cos.to(self.device, torch.float32), sin.to(self.device, torch.float32)
        if cos.shape[-1] != 2 * self.half or not (
            torch.equal(cos[:, : self.half], cos[:, self.half :])
            and torch.equal(sin[:, : self.half], sin[:, self.half :])
        ):
            raise RopeError(
                "lowrank: the model's RoPE does not rotate (i, i + head_dim/2) pairs over the whole "
                "head (partial or interleaved rotary); allowed: models with transformers' default "
                "RoPE layout (Llama, Qwen2/3, Mistral, Gemma, Phi-3)"
            )
        self.cos = torch.cat((self.cos, cos[:, : self.half]))
        self.sin = torch.cat((self.sin, sin[:, : self.half]))

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[*positions.shape, F]`` of ``positions`` (int, all ``>= 0``)."""
        flat = positions.reshape(-1).long()
        if flat.numel():
            self.ensure(int(flat.max()) + 1)
        shape = (*positions.shape, self.half)
        return self.cos.index_select(0, flat).view(shape), self.sin.index_select(0, flat).view(shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.cos, self.sin]


class PositionDecoder:
    """True positions ``[B or 1, q]`` of tokens from the ``cos``/``sin`` the model rotated them with."""

    def __init__(self, rope: Rope, head_dim: int) -> None:
        cos, sin = rope(torch.tensor([1]))
        half = head_dim // 2
        theta = torch.atan2(
            sin[0, :half].double().cpu(), cos[0, :half].double().cpu()
        )  # one step per frequency
        if not bool((theta > 0).all()):
            raise RopeError(
                "lowrank: cannot read the model's RoPE frequencies (cos/sin of position 1); allowed: "
                "models with transformers' default RoPE layout"
            )
        self.theta = theta
        self.low = int(theta.argmin())
        self._hops: dict[torch.dtype, list[int]] = {}
        self._on: dict[torch.device, torch.Tensor] = {}

    def tensors(self) -> list[torch.Tensor]:
        return [self.theta, *self._on.values()]

    def hops(self, dtype: torch.dtype) -> list[int]:
        """Frequencies to refine with, lowest first: each next one at most ``0.5 / error`` times the last."""
        if dtype not in self._hops:
            err = 4 * 2.0 ** -_MANTISSA.get(dtype, 24)  # angle error of cos/sin in `dtype`, with margin
            order = self.theta.argsort().tolist()
            chain, cur = [order[0]], float(self.theta[order[0]])
            top = float(self.theta.max())
            while cur < top:
                ok = [f for f in order if cur < float(self.theta[f]) <= cur * 0.5 / err]
                if not ok:
                    break
                chain.append(ok[-1])
                cur = float(self.theta[ok[-1]])
            self._hops[dtype] = chain
        return self._hops[dtype]

    def decode(self, cos: torch.Tensor, sin: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``[B', q]`` (int32) of ``cos``/``sin`` ``[B', q, head_dim]``.

        The lowest frequency repeats every ``2 pi / theta_min`` positions (427k for SmolLM2, 35k for a head of
        32 dims at base 10000); ``hint`` (the tokens' slot positions, which exceed the true ones by each row's
        left padding) picks the period: the decoded positions are the ones nearest to it."""
        theta = self._on.get(cos.device)
        if theta is None:
            theta = self._on[cos.device] = self.theta.to(cos.device)
        chain = self.hops(cos.dtype)
        sub = torch.tensor(chain, device=cos.device)
        angle = torch.atan2(sin.index_select(-1, sub).double(), cos.index_select(-1, sub).double())
        th = theta.index_select(0, sub)
        pos = torch.remainder(angle[..., 0], 2 * math.pi) / th[0]
        if hint is not None:
            period = 2 * math.pi / th[0]
            pos = pos + period * torch.round((hint.to(pos.device, pos.dtype) - pos) / period)
        for i in range(1, len(chain)):
            turns = torch.round((pos * th[i] - angle[..., i]) / (2 * math.pi))
            pos = (angle[..., i] + 2 * math.pi * turns) / th[i]
        return torch.round(pos).to(torch.int32)
