"""Rotary position embeddings (RoPE) for stores that keep keys before RoPE.

transformers' decoder models rotate keys as ``k * cos + rotate_half(k) * sin`` with ``cos``/``sin`` of
shape ``[..., head_dim]`` (each frequency written twice, halves layout). :func:`unrotate` is the exact
inverse for the same ``cos``/``sin``; :func:`find_rope` gives the model's own rotary embedding as a function
of positions, so a store can rotate stored keys again at any position it knows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for ``x = (x1, x2)`` split in halves along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: ``x * cos + rotate_half(x) * sin`` (``cos``/``sin`` broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` for the same ``cos``/``sin``: ``(x * cos - rotate_half(x) * sin) / (cos² + sin²)``.

    The division makes it exact also for models that scale ``cos``/``sin`` (``attention_scaling`` != 1).
    """
    norm = (cos * cos + sin * sin)
    return (x * cos - rotate_half(x) * sin) / norm


def find_rope(model: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``positions [N] -> (cos, sin)`` ``[N, head_dim]`` float32 from the model's rotary embedding module
    (the first module with an ``inv_freq`` buffer whose class name ends in ``RotaryEmbedding``), or
    ``None`` for a model without RoPE (GPT-2)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            break
    else:
        return None

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = module.inv_freq.device
        dummy = torch.empty(0, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = module(dummy, positions.to(device=device, dtype=torch.long).reshape(1, -1))
        return cos[0].float(), sin[0].float()

    return rope
