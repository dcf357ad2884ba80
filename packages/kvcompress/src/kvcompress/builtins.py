"""The core's built-in policies, registered through the same entry-point group as any plugin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .cache import Full
from .hookspecs import hookimpl
from .params import param
from .policy import SelectionPolicy, SlotContext


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
    seed: int = param(0, min=0, help="random generator seed")
    _generators: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def score(self, ctx: SlotContext) -> torch.Tensor:
        device = ctx.positions.device
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(ctx.positions.shape, generator=gen, device=device)


@hookimpl
def register_policies(register) -> None:
    register(Full)
    register(Window)
    register(Sink)
    register(Random)
