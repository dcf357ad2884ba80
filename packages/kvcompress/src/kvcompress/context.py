"""What a policy sees: the model (``ModelInfo``), one layer (``LayerInfo``) and one layer's slots at a
step (``SlotContext``). Everything in a ``SlotContext`` is made on first access, so a decode step pays
only for what the policy reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .layer import CompressedLayer


@dataclass(frozen=True)
class ModelInfo:
    """The model a cache is made for, as :meth:`Policy.setup` sees it.

    ``config`` is the model's ``PretrainedConfig``, or ``None`` when the cache was made without
    ``model=`` (then only what the first update shows is known: kv heads, head dim, dtype, device).
    ``architecture`` is e.g. ``"LlamaForCausalLM"``; ``name`` the config's ``_name_or_path``.
    """

    config: Any = None
    architecture: str | None = None
    model_type: str | None = None
    name: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def from_model(cls, model: Any) -> ModelInfo:
        """What the model's config says, and its rotary embedding if it has one."""
        from .rope import find_rope

        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
        hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
        archs = getattr(config, "architectures", None) or [type(model).__name__]
        return cls(config=config, architecture=archs[0], model_type=getattr(config, "model_type", None),
                   name=getattr(config, "_name_or_path", None) or None,
                   num_layers=getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None),
                   hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                   rope=find_rope(model))


@dataclass(frozen=True)
class LayerInfo:
    """One layer, as :meth:`SelectionPolicy.bind` and :meth:`Representation.make_store` see it."""

    index: int
    model: ModelInfo
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    shared: Any = None  # what the policy's setup() returned

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` ``[N, head_dim]`` (float32) of the model's rotary embedding at ``positions``
        ``[N]``, or ``None`` for a model without one (or a cache made without ``model=``). Keys after RoPE
        are ``k * cos + rotate_half(k) * sin``; :mod:`kvcompress.rope` undoes and redoes it."""
        if self.model.rope is None:
            return None
        cos, sin = self.model.rope(positions)
        return cos.to(self.device), sin.to(self.device)  # a model split over devices: where this layer lives


class SlotContext:
    """One layer's stored slots at one step, as a selection policy's methods see them.

    ``positions``, ``valid``, ``bias`` and each ``state[name]`` are ``[B, H_kv, S]`` over the stored slots
    in temporal order; ``keys`` and ``values`` are ``[B, H_kv, S, D]`` (decoded, after RoPE). During an
    attention call ``queries`` is the step's ``[B, H_q, q, D]`` (after RoPE), ``new`` the number of new
    tokens (the last ``new`` slots) and ``hidden_states`` the attention layer's input ``[B, q, hidden]``
    (policies with ``needs_hidden_states``). ``bound`` is what the policy's ``bind()`` returned for this
    layer; ``info`` the layer's :class:`LayerInfo`; ``seen`` the tokens seen so far.
    """

    def __init__(self, layer: CompressedLayer, queries: torch.Tensor | None = None, new: int = 0,
                 hidden_states: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        if state is not None:  # the core's own tensors in place of the slot table's (a static decode step)
            self.__dict__["state"] = state
        self._layer = layer
        self.layer_idx = layer.layer_idx
        self.seen = layer.seen
        self.bound = layer.bound
        self.info = layer.info
        self.queries = queries
        self.new = new
        self._hidden = hidden_states

    @cached_property
    def positions(self) -> torch.Tensor:
        """Absolute token position of each slot (int32); a merged slot carries its representative's."""
        return self._layer.slots.view("positions")

    @cached_property
    def valid(self) -> torch.Tensor:
        """False where a slot holds padding."""
        return self._layer.slots.view("valid")

    @cached_property
    def bias(self) -> torch.Tensor | None:
        """Per-slot additive attention bias (float32; ``log n`` for a slot standing for n tokens), or None."""
        return self._layer.bias_view()

    @cached_property
    def state(self) -> dict[str, torch.Tensor]:
        """The policy's per-slot state (``slot_states``), as views: update them in place."""
        return {name: self._layer.slots.view(name) for name in self._layer.selection.slot_states}

    @cached_property
    def _keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layer.store.keys_values()

    @property
    def keys(self) -> torch.Tensor:
        return self._keys_values[0]

    @property
    def values(self) -> torch.Tensor:
        return self._keys_values[1]

    @property
    def hidden_states(self) -> torch.Tensor:
        """The attention layer's input for this step's tokens ``[B, q, hidden]``."""
        if self._hidden is None:
            from .errors import ModelRequiredError

            raise ModelRequiredError(
                f"{self._layer.selection.name}: ctx.hidden_states is only set for policies with "
                "needs_hidden_states = True, during an attention call, on a cache made with "
                "make_cache(..., model=model)"
            )
        return self._hidden

    def select_adaptive(self, scores: torch.Tensor, k: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaKV-style selection: the heads of a batch row share ``H * k`` live slots by score, each head
        keeping between ``ceil(k / spread)`` and ``min(S, ceil(k * spread))``. Returns ``(keep, live)``, both
        ``[B, H_kv, K]`` with ``K = min(S, ceil(k * spread))``: ``keep`` ascending as from :meth:`select`,
        ``live`` False for the slots a head holds but does not use (the plan masks them with bias -inf)."""
        import math

        import torch

        n = scores.shape[-1]
        kmax = min(n, math.ceil(k * spread))
        floor = min(kmax, math.ceil(k / spread))
        ranked = self.select(scores, kmax)  # ascending indices of each head's top kmax
        scores = scores.float().nan_to_num(0.0, 1e30, -1e30)
        b, h, _ = ranked.shape
        top = self._protected_scores(scores).gather(2, ranked)  # [B, H, kmax]
        order = top.argsort(dim=-1, descending=True)
        rank = order.argsort(dim=-1)  # 0 = the head's best
        forced = rank < floor
        pool = torch.where(forced, float("inf"), top).reshape(b, h * kmax)
        take = min(h * k, h * kmax)
        chosen = torch.zeros_like(pool, dtype=torch.bool)
        chosen.scatter_(1, pool.topk(take, dim=-1).indices, True)
        return ranked, chosen.view(b, h, kmax) | forced

    def _protected_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with the protected tokens at +inf and padding at -inf (what :meth:`select` ranks)."""
        import torch

        policy = self._layer.selection
        n = scores.shape[-1]
        valid = self.valid
        protected = torch.zeros_like(valid)
        if policy.sink:
            rank = valid.to(torch.int32).cumsum(-1)
            protected |= rank <= policy.sink
        if policy.recent:
            protected[..., max(n - policy.recent, 0):].fill_(True)
        return scores.masked_fill(protected & valid, float("inf")).masked_fill(~valid, float("-inf"))

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Keep-indices ``[B, H_kv, min(k, S)]`` (ascending) of the top ``k`` of ``scores`` ``[B, H_kv, S]``,
        after the policy's protected tokens (the first ``sink`` real tokens, the last ``recent`` slots) and
        below every real token, padding. NaN scores count as 0."""
        n = scores.shape[-1]
        scores = self._protected_scores(scores.float().nan_to_num(0.0, 1e30, -1e30))
        return scores.topk(min(k, n), dim=-1, sorted=False).indices.sort(dim=-1).values
