"""The compressed cache layer: a transformers ``CacheLayerMixin`` driven by a policy."""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .buffers import SlotBuffer
from .context import LayerInfo, ModelInfo, SlotContext
from .errors import AttentionNotAttachedError, CacheReuseError
from .plan import Plan
from .policy import SelectionPolicy
from .store import Accumulate, DenseStore, Step

# The layer whose ``update`` ran last in this thread: the attention call that follows is its own.
current = threading.local()

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}


def state_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``slot_states`` dtype given by name (``"float32"``) or as a torch dtype."""
    return dtype if isinstance(dtype, torch.dtype) else _DTYPES[dtype]


class CompressedLayer(CacheLayerMixin):
    """One layer's cache under a selection policy and an optional representation.

    It owns one slot table (per (batch, kv-head, slot): position, validity, the policy's per-slot state,
    an optional attention bias) and a store holding the slots' keys and values. ``get_seq_length()`` is
    the number of tokens *seen* (so new tokens keep their true positions); ``get_mask_sizes()`` covers the
    tokens *stored*. Eviction runs right after the layer's attention (see :mod:`kvcompress.attention`),
    once ``step`` tokens have accumulated beyond the target; it applies the policy's plan to the slot
    table and the store at once. ``keys``/``values`` give what is stored, as transformers' layers do.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, selection, representation, layer_idx: int, cache: Any = None) -> None:
        super().__init__()
        self.selection = selection
        self.representation = representation
        self.layer_idx = layer_idx
        self.cache = cache
        self.slots = SlotBuffer()
        self.store = None
        self.bound: Any = None
        self.info: LayerInfo | None = None
        self.seen = 0
        self.returned_keys: torch.Tensor | None = None
        self.dense_returned = True
        self.awaiting_attention = False
        self.evictions = 0
        self.frozen = False  # True: no eviction until unfrozen (see CompressedCache.freeze)
        self.static = None  # set by kvcompress.static_generate: a fixed layout for CUDA-graph decode steps
        self.padded = False  # a padding mask was seen: padding may sit in some rows' slots
        self._shared_keep: dict[tuple[int, int], torch.Tensor] = {}
        self._on_tokens = getattr(type(selection), "on_tokens", None) not in (None, SelectionPolicy.on_tokens)
        self._needs_rope = bool(getattr(representation, "needs_rope", False))
        self._spread = getattr(selection, "adaptive", 1.0)
        acc = selection.accumulated_attention() if getattr(selection, "needs_attention", False) else None
        self._acc_spec = acc  # (state, reduce[, "set" | threshold]) or None: asked once, not per step
        self._decode_fused = acc is not None and acc[1] in ("sum", "max")  # a decode kernel can observe for it
        self._acc: Accumulate | None = None

    # -- transformers' layer contract ----------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The stored keys ``[B, H_kv, S, D]`` (after RoPE; decoded for packed stores), or None."""
        return self.store.keys_values()[0] if self.store is not None and self.slots.tensors else None

    @keys.setter
    def keys(self, value: Any) -> None:  # CacheLayerMixin.__init__ sets None; what is stored is the store's
        if value is not None:
            raise AttributeError("CompressedLayer.keys is what the store holds; it cannot be assigned")

    @property
    def values(self) -> torch.Tensor | None:
        """The stored values ``[B, H_kv, S, D]`` (decoded for packed stores), or None."""
        return self.store.keys_values()[1] if self.store is not None and self.slots.tensors else None

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("CompressedLayer.values is what the store holds; it cannot be assigned")

    @property
    def positions(self) -> torch.Tensor | None:
        """The token position each stored slot holds, ``[B, H_kv, S]`` int32, -1 where a slot holds padding
        or is unused (masked by a ``-inf`` bias), or None before the first update: which tokens a policy
        kept."""
        if not self.slots.tensors:
            return None
        pos, live = self.slots.view("positions"), self.slots.view("valid")
        if "bias" in self.slots.tensors:  # a slot an adaptive plan left unused is masked by its -inf bias
            live = live & (self.slots.view("bias") > float("-inf"))
        return torch.where(live, pos, torch.full_like(pos, -1))

    @property
    def is_croppable(self) -> bool:  # a rollback cannot bring evicted tokens back
        return self.evictions == 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        b, h, _, d = key_states.shape
        model = self.cache.model_info if self.cache is not None else ModelInfo()
        shared = self.cache.shared if self.cache is not None else {}
        base = dict(index=self.layer_idx, model=model, batch=b, kv_heads=h, head_dim=d, dtype=key_states.dtype,
                    device=key_states.device)
        self.info = LayerInfo(**base, shared=shared.get("selection"))
        self.bound = self.selection.bind(self.info)
        rep = self.representation
        if rep is None:
            self.store = DenseStore(self.info)
        else:
            self.store = rep.make_store(LayerInfo(**base, shared=shared.get("representation")))
        self.is_initialized = True

    def _kept(self, target: int) -> int:
        """Slots held right after an eviction to ``target`` (more with adaptive budgets)."""
        return target if self._spread == 1.0 else self.selection.kept_slots(target)

    def _capacity(self) -> int | None:
        """The most slots this layer holds between evictions (``None``: no fixed bound)."""
        target = self.selection.target(self.seen)
        if target is None or self.selection.ratio_driven:
            return None
        return self._kept(target) + self.selection.step

    def accumulate(self) -> Accumulate | None:
        """Where a fused decode kernel puts the policy's observation (``accumulated_attention()``), or None;
        made again only when the slot table reallocates."""
        spec = self._acc_spec
        if not self._decode_fused:  # nothing declared, or a last use: decode steps call observe()
            return None
        into = self.slots.tensors[spec[0]]
        acc = self._acc
        if acc is None or acc.into is not into:
            acc = self._acc = Accumulate(into, spec[1], len(spec) > 2 and spec[2] == "set")
        return acc

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static is not None:  # a decode step over the fixed layout (graph-safe: device-side only)
            keys, values = self.static.append(key_states, value_states)
            self.returned_keys = keys
            self.awaiting_attention = True
            current.layer = self
            return keys, values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_attention and (self.selection.target(self.seen) is not None
                                        or self.selection.needs_attention):
            raise AttentionNotAttachedError(
                "this kvcompress cache evicts after attention, but the model's attention did not go through "
                "kvcompress; pass the model when making the cache: kvcompress.make_cache(spec, model=model) "
                "(or call kvcompress.attach(model))"
            )
        b, h, q, _ = key_states.shape
        cap = self._capacity()
        if self.slots.tensors and self.slots.length + q <= self.slots.capacity:
            self.slots.length += q  # positions, validity, state and bias of free slots are pre-filled
        else:
            self._append_slots(b, h, q, key_states.device, cap)
        if self._needs_rope:
            cos, sin = _captured_inputs(self.layer_idx).get("rope", (None, None))
            self.store.append(key_states, value_states, Step(self.seen, cap, cos, sin))
        else:
            self.store.append(key_states, value_states, Step(self.seen, cap))
        self.seen += q
        # stand-ins when the store will attend: always, unless the policy observes what no kernel can
        stand_ins = None if self.selection.needs_attention and not self._decode_fused else self.store.stand_ins()
        keys, values = stand_ins if stand_ins is not None else self.store.keys_values()
        self.dense_returned = stand_ins is None
        self.returned_keys = keys
        self.awaiting_attention = True
        current.layer = self
        return keys, values

    def _append_slots(self, b: int, h: int, q: int, device: torch.device, cap: int | None) -> None:
        positions = torch.arange(self.seen, self.seen + q, device=device, dtype=torch.int32)
        new = {
            "positions": positions.view(1, 1, q).expand(b, h, q),
            "valid": torch.ones((1, 1, 1), dtype=torch.bool, device=device).expand(b, h, q),
        }
        for name, dtype in self.selection.slot_states.items():
            new[name] = torch.zeros((1, 1, 1), dtype=state_dtype(dtype), device=device).expand(b, h, q)
        if "bias" in self.slots.tensors:
            new["bias"] = torch.zeros((1, 1, 1), dtype=torch.float32, device=device).expand(b, h, q)
        self.slots.append(cap=cap, **new)
        self._prefill_free_slots(self.seen + q)

    def _prefill_free_slots(self, next_position: int) -> None:
        """Write the slot table of the not-yet-used slots once, so a decode step writes only K and V."""
        n, cap = self.slots.length, self.slots.capacity
        if n == cap:
            return
        t = self.slots.tensors
        t["positions"][:, :, n:] = torch.arange(next_position, next_position + cap - n,
                                                device=t["positions"].device, dtype=torch.int32)
        t["valid"][:, :, n:].fill_(True)  # fill_, not `= True`: a Python scalar set on a GPU tensor may copy
        for name in (*self.selection.slot_states, *(("bias",) if "bias" in t else ())):
            t[name][:, :, n:].fill_(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static is not None:  # the whole capacity is attended; the bias masks empty slots
            return self.slots.capacity, 0
        if query_length == 0 and self.seen:
            raise CacheReuseError(
                f"this cache already holds {self.seen} tokens of an earlier prompt and was given none new; "
                "make a new cache (kvcompress.make_cache) for each prompt, or call cache.reset() first"
            )
        stored = self.slots.length
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots.clear()
        self.store = None
        self.bound = None
        self.seen = 0
        self.evictions = 0
        self.padded = False
        self.awaiting_attention = False
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        """transformers' ``crop``: a negative value removes that many of the last tokens; a positive one is the
        length to keep (transformers' legacy meaning). Only tokens still stored can be removed."""
        n = -max_length if max_length < 0 else self.seen - max_length
        if n <= 0 or not self.is_initialized:
            return
        positions = self.slots.view("positions")
        tail_ok = self.slots.length >= n and bool((positions[..., self.slots.length - n:]
                                                   >= self.seen - n).all())
        if not tail_ok:
            raise ValueError(
                f"crop: parameter 'max_length' ({max_length}) asks to remove the last {n} tokens; allowed: at "
                f"most the last tokens this layer still stores unevicted"
            )
        self.slots.truncate(n)
        self.store.truncate(n)
        self.seen -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            batch = self.slots.tensors["valid"].shape[0]
            self._select_batch(torch.arange(batch, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._select_batch(torch.as_tensor(indices, device=self.device))

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.is_initialized and self.slots.length > 0:
            self.slots.select_batch(index)
            self.store.select_batch(index)
            select = getattr(self.bound, "select_batch", None)
            if select is not None:  # the policy's own per-batch-row state follows the rows
                select(index)

    def offload(self) -> None:  # the buffers stay where they are
        pass

    def prefetch(self) -> None:
        pass

    # -- what attention needs ------------------------------------------------------------------------------
    def bias_view(self) -> torch.Tensor | None:
        """The stored slots' additive attention bias ``[B, H_kv, S]`` (float32), or None (no slot has one)."""
        return self.slots.view("bias") if "bias" in self.slots.tensors else None

    def context(self, queries: torch.Tensor | None = None, new: int = 0) -> SlotContext:
        hidden = _captured_inputs(self.layer_idx).get("hidden") if self.selection.needs_hidden_states else None
        return SlotContext(self, queries, new, hidden)

    def finish_attention(self, new_valid: torch.Tensor | None, queries: torch.Tensor | None = None,
                         ctx: SlotContext | None = None) -> None:
        """Called after this layer's attention: record padding, let the policy see the new tokens, then
        evict if due."""
        self.awaiting_attention = False
        q = queries.shape[2] if queries is not None else 0
        if new_valid is not None:
            self.padded = True
            q = new_valid.shape[-1]
            self.slots.tensors["valid"][:, :, self.slots.length - q : self.slots.length] &= new_valid[:, None, :]
        if self._on_tokens:
            if ctx is None or ctx.queries is None:
                ctx = self.context(queries, q)
            self.selection.on_tokens(ctx)
        self.maybe_evict(new=q)

    def maybe_evict(self, force: bool = False, new: int = 0) -> None:
        """Evict down to the policy's target once ``step`` slots beyond it have accumulated (``force``:
        whenever the layer holds more than the target), unless the layer is frozen. ``new``: the tokens of
        the forward just attended (``ctx.new`` in the plan), 0 between forwards."""
        target = self.selection.target(self.seen)
        if target is None or self.frozen or not self.is_initialized:
            return
        if self.slots.length < self._kept(target) + (1 if force else self.selection.step):
            return
        n = self.slots.length
        if self.selection.positional and not self.padded and "bias" not in self.slots.tensors:
            self._keep(self._positional_keep(n, target))
        else:
            plan = self.selection.plan(self.context(new=new), target)
            self._apply(plan, target)
        self.evictions += 1
        if self.static is not None:  # static_generate holds every buffer where it is
            self._prefill_free_slots(self.seen)
            return
        cap = self._capacity()
        if cap is None:  # a ratio: room for the next `step` tokens and 1/32 of slack
            cap = self.slots.length + self.selection.step + self.slots.length // 32
        self.slots.shrink(cap)
        self.store.shrink(cap)
        self._prefill_free_slots(self.seen)

    def _keep(self, keep: torch.Tensor) -> None:
        if self.static is not None:  # static_generate may replay this rebuild as a captured graph
            self.static.keep(keep)
        else:
            self._rebuild(keep)

    def _rebuild(self, keep: torch.Tensor) -> None:
        """Keep slots ``keep`` ``[B, H_kv, K]`` of the slot table and the store."""
        self.slots.keep(keep)
        self.store.apply(keep, positions=self.slots.view("positions"))

    def _apply(self, plan: Plan, target: int) -> None:
        """Apply ``plan`` to the slot table and the store, in one place."""
        if plan.size > self._kept(target):
            raise ValueError(
                f"{self.selection.name}: its plan keeps {plan.size} slots; allowed: at most the target "
                f"{self._kept(target)}"
            )
        simple = plan.keys is None and plan.bias is None and not plan.states and plan.added is None
        if simple:
            self._keep(plan.keep)
            return
        keep = plan.keep
        b, h, k = keep.shape
        t = self.slots.tensors
        if (plan.bias is not None or (plan.added is not None and plan.added.bias is not None)) and "bias" not in t:
            self.slots.add("bias", torch.zeros((), dtype=torch.float32))
        d = self.info.head_dim
        device = keep.device
        changed = plan.changed
        if plan.keys is not None and changed is None:
            changed = torch.ones((b, h, k), dtype=torch.bool, device=device)
        new_keys, new_values = plan.keys, plan.values
        index = keep
        updates: dict[str, torch.Tensor] = {}
        if plan.bias is not None:
            updates["bias"] = plan.bias.float()
        for name, value in (plan.states or {}).items():
            updates[name] = value
        if plan.added is not None:
            add = plan.added
            a = add.keys.shape[2]
            if new_keys is None:
                new_keys = torch.zeros((b, h, k, d), dtype=add.keys.dtype, device=device)
                new_values = torch.zeros((b, h, k, d), dtype=add.values.dtype, device=device)
                changed = torch.zeros((b, h, k), dtype=torch.bool, device=device)
            pos = torch.cat([t["positions"].gather(2, keep), add.positions.to(torch.int32)], dim=2)
            order = pos.argsort(dim=-1, stable=True)
            index = torch.cat([keep, torch.full((b, h, a), -1, dtype=keep.dtype, device=device)], 2).gather(2, order)
            dk = order.unsqueeze(-1).expand(b, h, k + a, d)
            new_keys = torch.cat([new_keys, add.keys.to(new_keys.dtype)], 2).gather(2, dk)
            new_values = torch.cat([new_values, add.values.to(new_values.dtype)], 2).gather(2, dk)
            changed = torch.cat([changed, torch.ones((b, h, a), dtype=torch.bool, device=device)], 2).gather(2, order)
            fresh = {"positions": add.positions.to(torch.int32),
                     "valid": torch.ones((b, h, a), dtype=torch.bool, device=device)}
            if "bias" in t or add.bias is not None:
                fresh["bias"] = add.bias.float() if add.bias is not None else torch.zeros((b, h, a), device=device)
            for name, value in (add.states or {}).items():
                fresh[name] = value
            for name, value in fresh.items():  # the kept slots' current values, the added slots' new ones
                kept = updates.get(name)
                if kept is None:
                    kept = t[name].gather(2, keep)
                updates[name] = torch.cat([kept, value.to(t[name].dtype)], 2).gather(2, order)
        self.slots.keep(index.clamp(min=0))
        for name, value in updates.items():
            self.slots.view(name).copy_(value.to(t[name].dtype))
        self.store.apply(index, new_keys, new_values, changed, positions=self.slots.view("positions"))

    def _positional_keep(self, n: int, target: int) -> torch.Tensor:
        """Keep-indices of a recency policy with no padding: the same for every (batch, head)."""
        key = (n, target)
        index = self._shared_keep.get(key)
        if index is None:
            sink = min(self.selection.sink, target)
            index = torch.cat([torch.arange(sink), torch.arange(n - (target - sink), n)]).to(self.device)
            self._shared_keep = {key: index}  # one entry: a block cadence repeats the same (n, target)
        b, h = self.slots.tensors["valid"].shape[:2]
        return index.view(1, 1, -1).expand(b, h, -1)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds: stored K/V (however represented), the slot table, cached indices and
        the tensors of the policy's bound state, if that state lists them (``tensors()``)."""
        if not self.is_initialized:
            return []
        bound = getattr(self.bound, "tensors", None)
        own = list(bound()) if bound is not None else []
        return [*self.store.tensors(), *self.slots.tensors.values(), *self._shared_keep.values(), *own]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: stored K/V (however represented) and per-slot state."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())


def _captured_inputs(layer_idx: int) -> dict:
    """What the attention module of ``layer_idx`` received this step (hidden states, RoPE), if captured."""
    from .model import captured

    return captured(layer_idx)
