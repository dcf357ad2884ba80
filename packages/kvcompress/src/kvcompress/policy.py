"""Policy base classes: what a plugin author subclasses.

A policy is a small dataclass of parameters (configuration only). Selection policies say which tokens to
keep, by scoring them (one method) or, for policies that merge, by planning; representation policies say
how kept tokens are stored. Everything a policy learns about a model or keeps between steps lives in the
per-layer state it returns from :meth:`SelectionPolicy.bind` (or in its store), never on the dataclass,
so one spec can serve many caches and layers.

This module imports neither torch nor transformers: listing and validating policies stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .params import check_known, param, validate

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .context import LayerInfo, ModelInfo, SlotContext
    from .plan import Plan
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

    def setup(self, model: ModelInfo) -> Any:
        """Called once per cache, when the model is known: at ``make_cache(..., model=model)``, else at the
        cache's first update (then ``model.config`` is ``None``). Load what every layer shares here (weights:
        :func:`kvcompress.load_weights`, safetensors only). Returns what each layer's :class:`LayerInfo`
        carries as ``shared``; the default returns ``None``."""
        return None


@dataclass
class SelectionPolicy(Policy):
    """Decides which tokens each (batch, kv-head) keeps.

    The one method to write is :meth:`score` (higher = kept). The core turns scores into a plan: it
    protects the first ``sink`` and last ``recent`` tokens, pushes padding below everything, keeps the top
    ``target`` per (batch, kv-head) and applies that to the whole slot table at once, every ``step`` tokens.

    Optional, in the order the core calls them:

    - :meth:`bind` once per layer: the layer's own mutable state (``ctx.bound`` later);
    - :meth:`on_tokens` after every attention call of the layer: the step's new tokens have entered;
    - :meth:`observe` with the attention weights, when ``needs_attention``;
    - :meth:`plan` when an eviction is due: override it to merge evicted tokens instead of dropping them.

    Class attributes: ``needs_attention`` (observe() gets attention weights), ``needs_hidden_states``
    (``ctx.hidden_states`` holds the attention layer's input; needs ``make_cache(..., model=model)``),
    ``positional`` (score() is recency, so the core may skip it), ``slot_states`` (per-slot state:
    name -> dtype name such as ``"float32"``, gathered with the kept tokens, zero for new tokens),
    ``static_on_tokens`` (on_tokens() only writes the new slots' state, ``ctx.state[name][..., -ctx.new:]``,
    with tensor operations on ``ctx.queries``, ``ctx.hidden_states`` and ``ctx.bound``, and changes nothing
    on the host: :func:`kvcompress.static_generate` then calls it inside the captured step, ``ctx.state``
    holding the step's slot alone, which the core writes at its slot on the device).
    """

    kind: ClassVar[str] = "selection"
    needs_attention: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False
    positional: ClassVar[bool] = False
    slot_states: ClassVar[dict[str, str]] = {}
    static_on_tokens: ClassVar[bool] = False

    budget: int = param(256, min=1, help="max tokens kept per (batch, kv-head)")
    ratio: float | None = param(None, min=0.0, min_exclusive=True, max=1.0,
                                help="keep this fraction of the tokens seen (replaces budget)")
    sink: int = param(0, min=0, help="first tokens always kept")
    recent: int = param(0, min=0, help="last tokens always kept")
    step: int = param(1, min=1, help="evict every `step` tokens (amortises the gather)")
    adaptive: float = param(1.0, min=1.0, max=8.0,
                            help="per-head adaptive budgets (AdaKV): a layer's heads share heads x budget slots "
                                 "by score, each keeping between budget/adaptive and budget*adaptive (the slots a "
                                 "head does not use are masked and still held); 1: every head keeps budget")

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

    def kept_slots(self, target: int) -> int:
        """Slots a layer holds right after an eviction to ``target`` tokens (more than ``target`` only with
        ``adaptive``: the heads' unused slots)."""
        return math.ceil(target * self.adaptive) if self.adaptive > 1.0 else target

    def bind(self, layer: LayerInfo) -> Any:
        """Called once per layer, at its first update: return the layer's own state (counters, generators,
        weights sliced for this layer, running statistics...). It is ``ctx.bound`` in every later call for
        that layer; two layers, or two caches from one spec, never share it. The default returns ``None``.

        A state that holds tensors of its own (a sketch, running statistics per batch row) lists them in a
        ``tensors()`` method, so that :func:`kvcompress.kv_bytes` counts them, and follows batch edits (beam
        reordering, ``batch_select_indices``) in a ``select_batch(index)`` method; the layer calls both when
        they exist."""
        return None

    def on_tokens(self, ctx: SlotContext) -> None:
        """Called after each attention call of a layer, before any eviction, with the step's ``ctx.new``
        new tokens in the last slots; ``ctx.queries`` (and ``ctx.hidden_states`` if
        ``needs_hidden_states``) are this step's. Write per-slot state for the new slots
        (``ctx.state[name][..., -ctx.new:]``) or update ``ctx.bound``. Not overriding it costs nothing."""

    def observed_queries(self, q: int) -> int:
        """How many of the last queries of a ``q``-token forward :meth:`observe` needs (default: all). The core
        computes attention weights for those only (TOVA: the last one)."""
        return q

    def observe(self, ctx: SlotContext, weights: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Called with attention weights ``[B, H_kv, G, q, S]`` (G query heads per kv head) when
        ``needs_attention``; update ``ctx.state`` in place.

        Prompt chunks come in float32; a decode step's weights (``q == 1``) come in the model's dtype,
        as eager attention rounds them, so accumulate them with ``dtype=torch.float32`` where it matters.
        """

    def accumulated_attention(self) -> tuple[str, ...] | None:
        """``(state, reduce)`` when, for a decode step, :meth:`observe` only adds into the float32 slot state
        ``state`` the attention each slot receives, reduced over the G query heads of its kv head by
        ``reduce`` ("sum" or "max"); ``(state, reduce, "set")`` when it writes that instead of adding (the
        latest query's attention). A store may then do that inside its decode kernel instead of the core
        calling :meth:`observe` (decode steps on a GPU). When it adds and :meth:`observed_queries` is every
        query, a prompt's observation may be fused too (no weights materialised). ``(state, "last",
        threshold)``: :meth:`observe` raises each slot's ``state`` to the position of the last query whose
        weight on it exceeds ``threshold`` on any query head of its kv head (-1 where none does); a prompt's
        observation may then be fused, decode steps still call :meth:`observe`. ``None``: always observe.
        """
        return None

    def score(self, ctx: SlotContext) -> torch.Tensor:
        """Importance ``[B, H_kv, S]`` of each stored slot; the top ones are kept."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def plan(self, ctx: SlotContext, target: int) -> Plan:
        """What an eviction does: by default keep the top ``target`` slots of :meth:`score` (with the
        protected tokens and padding handled by ``ctx.select``). Override to merge: return a
        :class:`kvcompress.Plan` with new contents and a per-slot bias for kept slots, or added slots
        (:func:`kvcompress.merge_into` builds the common weighted-mean merge)."""
        from .plan import Plan

        if self.adaptive > 1.0:
            keep, live = ctx.select_adaptive(self.score(ctx), target, self.adaptive)
            return Plan(keep=keep, bias=live.float().log())  # the slots a head does not use: bias -inf
        return Plan(keep=ctx.select(self.score(ctx), target))


@dataclass
class Representation(Policy):
    """Decides how kept tokens are stored (quantized, projected...)."""

    kind: ClassVar[str] = "representation"
    needs_rope: ClassVar[bool] = False  # True: the store's Step carries the RoPE cos/sin (needs model=)

    def make_store(self, layer: LayerInfo) -> KVStore:
        """A fresh store for one layer (``layer`` has its dims, device, dtype, RoPE and ``shared``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_store()")

    def static_refusal(self, cuda_graph: bool) -> str | None:
        """Called by :func:`kvcompress.static_generate` before it touches a cache: ``None`` when this
        representation's stores offer :meth:`KVStore.static_layout` (for steps replayed as CUDA graphs when
        ``cuda_graph``), else why not, in a few words (default: they do not)."""
        return "its store's layout is not static"


@dataclass
class CachePolicy(Policy):
    """A policy that builds a whole transformers ``Cache`` of its own (a peer's cache, such as transformers'
    ``QuantizedCache``), so that it is measured like any policy. It composes with no other policy."""

    kind: ClassVar[str] = "cache"

    def build(self, model: Any) -> Any:
        """A fresh cache for ``model`` (which may be ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")


__all__ = ["CachePolicy", "Policy", "Representation", "SelectionPolicy", "param"]
