"""Policy base classes: what a plugin author subclasses.

A policy is a small dataclass. Selection policies say which tokens to keep by
scoring them; representation policies say how kept tokens are stored. The
machinery (budgets, protected tokens, block eviction, gathering, attention
observation, byte accounting) lives in the core, once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from .buffers import SlotBuffer
from .params import check_known, param, validate
from .store import KVStore


@dataclass
class Policy:
    """Common base: a named, validated dataclass of parameters."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate(self)
        self.check()

    def check(self) -> None:
        """Cross-parameter checks; raise ``ValueError`` naming the parameters."""

    @classmethod
    def from_params(cls, **params: Any) -> Policy:
        """Build from user parameters, rejecting unknown names."""
        check_known(cls, params)
        return cls(**params)

    def spec(self) -> str:
        """The spec string that rebuilds this policy (non-default parameters only)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.init and value != f.default:
                parts.append(f"{f.name}={value}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


class SlotContext:
    """What a selection policy sees of one layer when it scores or observes.

    ``positions``, ``valid`` and each ``state[name]`` are ``[B, H_kv, S]`` over the stored slots, in
    temporal order; ``keys`` and ``values`` are ``[B, H_kv, S, D]``. Each is made on first access, so a
    decode step pays only for what the policy reads.
    """

    def __init__(self, layer_idx: int, seen: int, slots: SlotBuffer, store: KVStore,
                 state_names: Iterable[str] = ()) -> None:
        self.layer_idx = layer_idx
        self.seen = seen
        self._slots, self._store, self._state_names = slots, store, state_names

    @cached_property
    def positions(self) -> torch.Tensor:
        """Absolute token position of each slot."""
        return self._slots.view("positions")

    @cached_property
    def valid(self) -> torch.Tensor:
        """False where a slot holds padding."""
        return self._slots.view("valid")

    @cached_property
    def state(self) -> dict[str, torch.Tensor]:
        """The policy's per-slot state (``slot_states``), as views: update them in place."""
        return {name: self._slots.view(name) for name in self._state_names}

    @cached_property
    def _keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._store.keys_values()

    @property
    def keys(self) -> torch.Tensor:
        return self._keys_values[0]

    @property
    def values(self) -> torch.Tensor:
        return self._keys_values[1]


@dataclass
class SelectionPolicy(Policy):
    """Decides which tokens each (batch, kv-head) keeps.

    Subclasses implement :meth:`score` (higher = keep). If they set
    ``needs_attention = True`` the core calls :meth:`observe` with the attention
    weights of every query. Per-slot state (e.g. accumulated attention) is
    declared in ``slot_states`` and is gathered with the kept tokens.
    """

    kind: ClassVar[str] = "selection"
    needs_attention: ClassVar[bool] = False
    positional: ClassVar[bool] = False  # True: score() is recency, so the core may skip scoring
    slot_states: ClassVar[dict[str, torch.dtype]] = {}

    budget: int = param(256, min=1, help="max tokens kept per (batch, kv-head)")
    ratio: float | None = param(None, min=0.0, min_exclusive=True, max=1.0,
                                help="keep this fraction of the tokens seen (replaces budget)")
    sink: int = param(0, min=0, help="first tokens always kept")
    recent: int = param(0, min=0, help="last tokens always kept")
    step: int = param(1, min=1, help="evict every `step` tokens (amortises the gather)")

    @classmethod
    def from_params(cls, **params: Any) -> Policy:
        if params.get("ratio") is not None and "budget" in params:
            raise ValueError(
                f"{cls.name}: give either parameter 'budget' ({params['budget']!r}) or 'ratio' "
                f"({params['ratio']!r}), not both"
            )
        return super().from_params(**params)

    def check(self) -> None:
        if self.ratio is None and self.budget < self.sink + self.recent:
            raise ValueError(
                f"{self.name}: parameter 'budget' is {self.budget}; allowed: >= sink + recent "
                f"= {self.sink} + {self.recent} = {self.sink + self.recent}"
            )

    @property
    def ratio_driven(self) -> bool:
        """Whether the budget grows with the tokens seen."""
        return self.ratio is not None

    def target(self, seen: int) -> int | None:
        """Tokens to keep after an eviction, given ``seen`` tokens (``None``: keep all)."""
        if self.ratio is not None:
            return max(math.ceil(self.ratio * seen), self.sink + self.recent, 1)
        return self.budget

    def score(self, ctx: SlotContext) -> torch.Tensor:
        """Importance ``[B, H_kv, S]`` of each stored slot; the top ones are kept."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def accumulated_attention(self) -> tuple[str, str] | None:
        """``(state, reduce)`` when :meth:`observe` only adds, into the float32 slot state ``state``, the
        attention each slot receives, reduced over the G query heads of its kv head by ``reduce`` ("sum"
        or "max") and summed over queries. The core may then do that inside one fused decode kernel
        instead of calling :meth:`observe` (decode steps on a GPU with Triton). ``None``: always observe.
        """
        return None

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Called with attention weights ``[B, H_kv, G, q, S]`` (G query heads per kv head) when
        ``needs_attention``; update ``ctx.state`` in place.

        Prompt chunks come in float32; a decode step's weights (``q == 1``) come in the model's dtype,
        as eager attention rounds them, so accumulate them with ``dtype=torch.float32`` where it matters.
        """


@dataclass
class Representation(Policy):
    """Decides how kept tokens are stored (quantized, projected...)."""

    kind: ClassVar[str] = "representation"

    def make_store(self, layer_idx: int) -> KVStore:
        """A fresh store for layer ``layer_idx``."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_store()")


@dataclass
class CachePolicy(Policy):
    """A policy that builds a whole transformers ``Cache`` of its own (a peer's cache, such as transformers'
    ``QuantizedCache``), so that it is measured like any policy. It composes with no other policy."""

    kind: ClassVar[str] = "cache"

    def build(self, model: Any) -> Any:
        """A fresh cache for ``model`` (which may be ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")
