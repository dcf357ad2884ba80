"""Decode attention from a :class:`LowRankStore` with torch ops (CPU, or a GPU without Triton).

The middle's keys are reconstructed and rotated for the layer (one ``[B, H, m, D]`` temporary); values are
never reconstructed: the attention weights meet the value coefficients (``p @ c``, ``r`` per slot instead of
``D``) and the result is projected once per query head (``@ basis``), plus the mean times the weight the
middle received. The exact head and window are attended where they lie (the window is a ring): each entry's
slot says which mask and bias apply to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvcompress import Accumulate

    from .store import LowRankStore


def _mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """The last query row of a 4-D decode mask as an additive float32 ``[B or 1, 1, 1, S]``."""
    row = mask[:, :, -1:]
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row, float("-inf"))
    return row.float()


def attend_torch(
    store: LowRankStore,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    accumulate: Accumulate | None = None,
) -> torch.Tensor:
    """One query per head ``[B, Hq, 1, D]`` -> ``[B, 1, Hq, D]``, with the per-slot ``bias`` and, if asked,
    each slot's attention added to ``accumulate.into``."""
    b, hq, _, d = query.shape
    h, s, w = store.h, store.s, store.w
    g, mid = hq // h, store.m - w
    q = query.reshape(b, h, g, d)
    fk, fv = store.fk[:, :, : s + w], store.fv[:, :, : s + w]  # the head, then the ring's entries
    scores = torch.matmul(q, fk.transpose(-1, -2).to(q.dtype)).float()
    slots = store.exact_slots()
    if mid:
        keys = store.mid_keys(q.dtype, mid)
        scores = torch.cat((scores, torch.matmul(q, keys.transpose(-1, -2)).float()), dim=-1)
        slots = torch.cat((slots, torch.arange(s, s + mid, device=slots.device)))
    scores = scores * scaling
    if bias is not None:
        scores = scores + bias.index_select(-1, slots)[:, :, None].float()
    if attention_mask is not None:
        scores = scores + _mask_bias(attention_mask).index_select(-1, slots)
    p = torch.softmax(scores, dim=-1)
    if attention_mask is not None:
        p = p.nan_to_num(0.0)
    if accumulate is not None:
        into = accumulate.into
        into.index_add_(-1, slots, p.amax(2) if accumulate.reduce == "max" else p.sum(2))
    out = torch.matmul(p[..., : s + w].to(fv.dtype), fv).float()
    if mid:
        pm = p[..., s + w :]
        cv = store.value_coefficients(store.basis.v_basis.dtype, mid)
        low = torch.matmul(pm.to(cv.dtype), cv)  # [B, H, G, r]: the attention in the value space
        basis = store.basis
        out = (
            out
            + torch.matmul(low, basis.v_basis[None]).float()
            + pm.sum(-1, keepdim=True) * basis.v_mean[None, :, None].float()
        )
    return out.to(query.dtype).reshape(b, hq, d).unsqueeze(1)
