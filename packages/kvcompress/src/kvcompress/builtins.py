"""The core's built-in policies, registered through the same entry-point group as any plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .hookspecs import hookimpl
from .params import param
from .policy import Policy, SelectionPolicy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .context import LayerInfo, SlotContext


@dataclass
class Full(Policy):
    """No compression: every token kept in the model's dtype (the reference)."""

    name: ClassVar[str] = "full"
    kind: ClassVar[str] = "selection"
    needs_attention: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    positional: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {}
    ratio_driven: ClassVar[bool] = False
    step: ClassVar[int] = 1
    sink: ClassVar[int] = 0
    recent: ClassVar[int] = 0

    def target(self, seen: int) -> None:
        return None

    def bind(self, layer: Any) -> None:
        return None


@dataclass
class Dense(Full):
    """No compression, in kvcompress's own layer: every token kept in the model's dtype, written in place
    (no per-step copy of the whole cache as transformers' DynamicCache does), so the same decode path as the
    compressing policies, CUDA graphs included."""

    name: ClassVar[str] = "dense"


@dataclass
class Window(SelectionPolicy):
    """Sliding window: keep the most recent `budget` tokens."""

    name: ClassVar[str] = "window"
    positional: ClassVar[bool] = True

    def score(self, ctx: SlotContext) -> torch.Tensor:
        return ctx.positions.float()


@dataclass
class Sink(SelectionPolicy):
    """StreamingLLM: the first `sink` tokens plus a window of the most recent ones."""

    name: ClassVar[str] = "sink"
    positional: ClassVar[bool] = True
    sink: int = param(4, min=0, help="first tokens always kept (attention sinks)")

    def score(self, ctx: SlotContext) -> torch.Tensor:
        return ctx.positions.float()


@dataclass
class Random(SelectionPolicy):
    """Random eviction (after protected tokens): the floor any policy must beat."""

    name: ClassVar[str] = "random"
    seed: int = param(0, min=0, help="random generator seed (layer i draws from seed + i)")

    def bind(self, layer: LayerInfo) -> Any:
        import torch

        return torch.Generator(device=layer.device).manual_seed(self.seed + layer.index)

    def score(self, ctx: SlotContext) -> torch.Tensor:
        import torch

        return torch.rand(ctx.positions.shape, generator=ctx.bound, device=ctx.positions.device)


@dataclass
class KeyDiff(SelectionPolicy):
    """KeyDiff (2025): keep the keys least like the mean key direction (attention-free, any attention kernel)."""

    name: ClassVar[str] = "keydiff"

    def score(self, ctx: SlotContext) -> torch.Tensor:
        import torch.nn.functional as F

        keys = F.normalize(ctx.keys.float(), dim=-1)
        valid = ctx.valid.unsqueeze(-1)
        anchor = F.normalize((keys * valid).sum(2), dim=-1)  # the mean direction of the real keys
        return -(keys * anchor.unsqueeze(2)).sum(-1)  # far from it: distinctive, kept


@hookimpl
def register_policies(register) -> None:
    register(Full)
    register(Dense)
    register(Window)
    register(Sink)
    register(Random)
    register(KeyDiff)
