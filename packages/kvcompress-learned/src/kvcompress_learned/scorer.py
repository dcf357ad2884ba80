"""The scorer: per layer, one small MLP from the attention layer's input to one score per kv head, and an
age table that lowers a stored score as the token gets older.

Tensors of a weights file (``L`` layers, ``F`` input features, ``H`` kv heads, ``U`` hidden units shared by
the layer's kv heads): ``w1 [L, F, U]``, ``b1 [L, U]``, ``w2 [L, U, H]``, ``b2 [L, H]``, ``age [L, H, A]``
(see :mod:`kvcompress_learned.age`). With ``U == 0`` the scorer is linear: ``w1 [L, F, H]``, ``b1 [L, H]``.
Input standardisation is folded into ``w1``/``b1`` when a file is saved, so scoring one step of one layer is
``addmm``, GELU, ``addmm``: every kv head and token of the step in one batched op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMAT = "kvcompress-learned/1"
AGE_BINS = 20


@dataclass
class LayerScorer:
    """One layer's scorer on the layer's device, in its dtype, and its age table ``[H, AGE_BINS]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor | None
    b2: torch.Tensor | None
    age: torch.Tensor  # float32

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, H, q]`` (in the weights' dtype: the caller's copy into float32 state converts them) of
        the step's tokens from their attention inputs ``[B, q, F]``."""
        b, q, f = hidden.shape
        x = hidden.reshape(b * q, f).to(self.w1.dtype)
        z = torch.addmm(self.b1, x, self.w1)
        if self.w2 is not None:
            z = torch.addmm(self.b2, F.gelu(z), self.w2)
        return z.view(b, q, -1).transpose(1, 2)

    def aged(self, scores: torch.Tensor, age: torch.Tensor, weight: float) -> torch.Tensor:
        """``scores + weight * age_table[floor(log2(age))]`` per slot (``scores``, ``age`` ``[B, H, S]``)."""
        k = (torch.frexp(age.float().clamp(min=1.0))[1] - 1).clamp(max=self.age.shape[-1] - 1).long()
        table = self.age.unsqueeze(0).expand(scores.shape[0], -1, -1)
        return scores + weight * table.gather(2, k)


def layer_scorer(tensors: dict[str, torch.Tensor], index: int, device: torch.device, dtype: torch.dtype
                 ) -> LayerScorer:
    """Layer ``index``'s scorer from a weights file's tensors, on ``device`` in ``dtype``."""
    move = lambda name: tensors[name][index].to(device=device, dtype=dtype).contiguous()  # noqa: E731
    hidden = "w2" in tensors
    heads = tensors["b2" if hidden else "b1"].shape[-1]
    age = tensors["age"][index] if "age" in tensors else torch.zeros(heads, AGE_BINS)
    return LayerScorer(move("w1"), move("b1"), move("w2") if hidden else None, move("b2") if hidden else None,
                       age.to(device=device, dtype=torch.float32).contiguous())


def random_tensors(layers: int, features: int, heads: int, units: int, seed: int) -> dict[str, torch.Tensor]:
    """Random scorer weights of the right shape (speed measurements only: their scores mean nothing)."""
    g = torch.Generator().manual_seed(seed)
    width = units or heads
    t = {"w1": torch.randn(layers, features, width, generator=g) / features**0.5,
         "b1": torch.zeros(layers, width)}
    if units:
        t["w2"] = torch.randn(layers, units, heads, generator=g) / units**0.5
        t["b2"] = torch.zeros(layers, heads)
    t["age"] = -torch.arange(AGE_BINS, dtype=torch.float32).expand(layers, heads, AGE_BINS).contiguous() / 2
    return t
