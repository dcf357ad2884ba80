"""Building caches from policy specs."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from .builtins import Full
from .context import ModelInfo
from .errors import ModelRequiredError
from .layer import CompressedLayer
from .policy import Policy, Representation
from .resolve import build_policies


class _Composable:
    """``cache | representation`` composes a representation onto a cache's selection."""

    selection: Policy
    representation: Representation | None
    _model: Any = None

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
        if self._model is not None and getattr(other, "needs_rope", False):
            from .model import attach

            attach(self._model, inputs=True)
        return CompressedCache(self.selection, other, model=self._model)

    @property
    def spec(self) -> str:
        """The policy spec of this cache."""
        parts = [self.selection.spec()]
        if self.representation is not None:
            parts.append(self.representation.spec())
        return "+".join(parts)


class FullCache(_Composable, DynamicCache):
    """The full cache: transformers' ``DynamicCache`` itself, so ``full`` is the honest reference."""

    def __init__(self, config=None, model: Any = None) -> None:
        super().__init__(config=config)
        self.selection = Full()
        self.representation = None
        self._model = model


class CompressedCache(_Composable, Cache):
    """A transformers ``Cache`` whose layers follow one selection and at most one representation.

    Made with the model (``make_cache(spec, model=model)``), the policies' ``setup()`` runs at once with
    what the model's config says; otherwise at the first update, with what it shows. ``cache[i]`` is
    layer ``i``'s stored ``(keys, values)``.
    """

    def __init__(self, selection: Policy, representation: Representation | None = None, model: Any = None) -> None:
        super().__init__(layers=[])
        self.selection = selection
        self.representation = representation
        self._model = model
        self.model_info: ModelInfo | None = None
        self.shared: dict[str, Any] | None = None
        self._frozen = False
        if model is not None:
            self._setup(ModelInfo.from_model(model))

    def _setup(self, info: ModelInfo) -> None:
        self.model_info = info
        rep = self.representation
        self.shared = {"selection": self.selection.setup(info),
                       "representation": rep.setup(info) if rep is not None else None}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.shared is None:
            self._setup(ModelInfo(num_kv_heads=key_states.shape[1], head_dim=key_states.shape[-1]))
        while len(self.layers) <= layer_idx:
            layer = CompressedLayer(self.selection, self.representation, len(self.layers), cache=self)
            layer.frozen = self._frozen
            self.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        layer = self.layers[layer_idx]
        return layer.keys, layer.values

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


def make_cache(spec: str, model: Any = None, **params: Any) -> Cache:
    """A transformers ``Cache`` for ``spec``, e.g. ``make_cache("sink", budget=128, model=model)``.

    ``full`` alone gives transformers' own ``DynamicCache`` (the reference). With ``model``, the model's
    attention is routed through kvcompress (:func:`kvcompress.attach`) and the policies are set up for it;
    a policy that observes attention or reads hidden states needs it.
    """
    from .model import attach

    selection, representation = build_policies(spec, **params)
    if selection.kind == "cache":
        return selection.build(model)
    needs_inputs = bool(getattr(selection, "needs_hidden_states", False)
                        or getattr(representation, "needs_rope", False))
    if model is None and (getattr(selection, "needs_attention", False) or needs_inputs):
        what = "observes attention" if getattr(selection, "needs_attention", False) else "reads the model's inputs"
        raise ModelRequiredError(
            f"{spec!r}: this policy {what}; pass the model: kvcompress.make_cache({spec!r}, model=model)"
        )
    if model is not None:
        attach(model, inputs=needs_inputs)
    if type(selection) is Full and representation is None:
        return FullCache(model=model)
    return CompressedCache(selection, representation, model=model)
