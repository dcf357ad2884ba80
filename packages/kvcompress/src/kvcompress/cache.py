"""Building caches from policy specs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, DynamicCache

from .layer import CompressedLayer
from .plugins import get_registry
from .policy import Policy, Representation
from .spec import parse_spec


@dataclass
class Full(Policy):
    """No compression: every token kept in the model's dtype (the reference)."""

    name: ClassVar[str] = "full"
    kind: ClassVar[str] = "selection"
    needs_attention: ClassVar[bool] = False
    slot_states: ClassVar[dict[str, torch.dtype]] = {}
    ratio_driven: ClassVar[bool] = False
    step: ClassVar[int] = 1
    sink: ClassVar[int] = 0
    recent: ClassVar[int] = 0

    def target(self, seen: int) -> None:
        return None


class _Composable:
    """``cache | representation`` composes a representation onto a cache's selection."""

    selection: Policy
    representation: Representation | None

    def __or__(self, other: Any) -> CompressedCache:
        if not isinstance(other, Representation):
            raise TypeError(
                f"cache | x: x must be a Representation policy (e.g. quant(bits=4)), got {type(other).__name__}"
            )
        if self.representation is not None:
            raise ValueError(
                f"cache | {other.spec()}: this cache already stores tokens as {self.representation.spec()}; "
                "a cache has at most one representation"
            )
        if self.get_seq_length() > 0:
            raise ValueError("cache | representation: compose before the cache is used")
        return CompressedCache(self.selection, other)

    @property
    def spec(self) -> str:
        """The policy spec of this cache."""
        parts = [self.selection.spec()]
        if self.representation is not None:
            parts.append(self.representation.spec())
        return "+".join(parts)


class FullCache(_Composable, DynamicCache):
    """The full cache: transformers' ``DynamicCache`` itself, so ``full`` is the honest reference."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.selection = Full()
        self.representation = None


class CompressedCache(_Composable, Cache):
    """A transformers ``Cache`` whose layers follow one selection and at most one representation."""

    def __init__(self, selection: Policy, representation: Representation | None = None) -> None:
        super().__init__(layers=[])
        self.selection = selection
        self.representation = representation

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            layer = CompressedLayer(self.selection, self.representation, len(self.layers))
            layer.frozen = getattr(self, "_frozen", False)
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def compress(self) -> None:
        """Evict every layer down to its policy's target now, whatever ``step`` says (e.g. right after a
        context was prefilled, to compress it once before a question is fed)."""
        for layer in self.layers:
            layer.maybe_evict(force=True)

    def freeze(self, frozen: bool = True) -> None:
        """Stop evicting (``frozen=True``) until ``freeze(False)``: the tokens fed meanwhile (a question,
        an answer) are all kept, as kvpress evaluates a compressed context."""
        for layer in self.layers:
            layer.frozen = frozen
        self._frozen = frozen

    def __repr__(self) -> str:
        return f"CompressedCache({self.spec!r}, layers={len(self.layers)})"


def build_policies(spec: str, **params: Any) -> tuple[Policy, Representation | None]:
    """Resolve a spec (plus keyword parameters for its first part) into policy objects."""
    parts = parse_spec(spec)
    if params:
        name, first = parts[0]
        for key in params:
            if key in first:
                raise ValueError(f"parameter {key!r} is given both in the spec {spec!r} and as a keyword")
        parts[0] = (name, {**first, **params})
    registry = get_registry()
    selection: Policy | None = None
    representation: Representation | None = None
    for name, kwargs in parts:
        cls = registry.policy(name).obj
        policy = cls.from_params(**kwargs)
        if policy.kind == "cache" and len(parts) > 1:
            raise ValueError(f"spec {spec!r}: {name!r} builds a cache of its own and composes with no other "
                             "policy; allowed: it alone")
        if policy.kind == "representation":
            if representation is not None:
                raise ValueError(f"spec {spec!r}: at most one representation policy, got "
                                 f"{representation.name!r} and {name!r}")
            representation = policy
        else:
            if selection is not None:
                raise ValueError(f"spec {spec!r}: at most one selection policy, got {selection.name!r} and {name!r}")
            selection = policy
    return selection or Full(), representation


def make_cache(spec: str, model: Any = None, **params: Any) -> Cache:
    """A transformers ``Cache`` for ``spec``, e.g. ``make_cache("sink", budget=128)``.

    ``full`` alone gives transformers' own ``DynamicCache`` (the reference).
    With ``model``, the model is checked and attached (see :func:`kvcompress.attach`).
    """
    from .model import attach

    selection, representation = build_policies(spec, **params)
    if selection.kind == "cache":
        return selection.build(model)
    if model is not None:
        attach(model)
    if isinstance(selection, Full) and representation is None:
        return FullCache()
    return CompressedCache(selection, representation)
