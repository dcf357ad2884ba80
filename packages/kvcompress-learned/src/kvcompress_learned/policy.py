"""``learned``: a tiny trained MLP scores each token once, when it enters the cache.

Per layer, the scorer maps the attention layer's input hidden state of each new token to one score per kv
head (trained on an attention-derived label: the shipped SmolLM2 scorer on H2O's accumulated attention,
or the attention a token receives from the next queries: ``kvcompress-learned train --label``). The score is
stored as per-slot state; an eviction keeps the highest scores plus the ``sink`` first and ``recent`` last
tokens. No attention weights are needed, so attention stays plain sdpa or a fused kernel.

This module imports no torch: the weights are loaded at ``setup()``, when the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvcompress import SelectionPolicy, param

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kvcompress import LayerInfo, ModelInfo, SlotContext


@dataclass
class Learned(SelectionPolicy):
    """Keep the tokens a small trained MLP scored highest when they arrived, plus sink and recent tokens."""

    name: ClassVar[str] = "learned"
    needs_hidden_states: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {"learned": "float32"}
    static_on_tokens: ClassVar[bool] = True  # on_tokens writes the new slots' scores only (CUDA graphs)

    sink: int = param(4, min=0, help="first tokens always kept (attention sinks)")
    recent: int = param(32, min=0, help="last tokens always kept")
    weights: str = param("auto", help="'auto' (the weights shipped for the model in use), a shipped name, "
                                      "a .safetensors path, or 'random' (right shape, random values)")
    seed: int = param(0, min=0, help="seed of weights='random'")
    age_weight: float = param(1.0, min=0.0, help="how much of the learned age curve is added to the scores "
                                                  "at eviction (0: scores as they arrived)")

    def setup(self, model: ModelInfo) -> dict[str, Any]:
        from .files import resolve

        tensors, metadata = resolve(self.weights, model, self.seed)
        return {"tensors": tensors, "metadata": metadata}

    def bind(self, layer: LayerInfo) -> Any:
        from .scorer import layer_scorer

        return layer_scorer(layer.shared["tensors"], layer.index, layer.device, layer.dtype)

    def on_tokens(self, ctx: SlotContext) -> None:
        ctx.state["learned"][..., -ctx.new:].copy_(ctx.bound(ctx.hidden_states))

    def score(self, ctx: SlotContext) -> torch.Tensor:
        if not self.age_weight:
            return ctx.state["learned"]
        return ctx.bound.aged(ctx.state["learned"], ctx.seen - ctx.positions, self.age_weight)
