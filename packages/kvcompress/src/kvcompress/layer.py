"""The compressed cache layer: a transformers ``CacheLayerMixin`` driven by a policy."""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import CacheLayerMixin

from .buffers import SlotBuffer
from .errors import AttentionNotAttachedError
from .policy import Representation, SlotContext
from .store import DenseStore

# The layer whose ``update`` ran last in this thread: the attention call that follows is its own.
current = threading.local()


class CompressedLayer(CacheLayerMixin):
    """One layer's cache under a selection policy and an optional representation.

    ``get_seq_length()`` is the number of tokens *seen* (so new tokens keep their
    true positions); ``get_mask_sizes()`` covers the tokens *stored*. Eviction
    runs right after the layer's attention (see :mod:`kvcompress.attention`),
    once ``step`` tokens have accumulated beyond the budget.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, selection, representation: Representation | None, layer_idx: int) -> None:
        super().__init__()
        self.selection = selection
        self.representation = representation
        self.layer_idx = layer_idx
        self.slots = SlotBuffer()
        self.store = None
        self.seen = 0
        self.returned_keys: torch.Tensor | None = None
        self.dense_returned = True
        self.awaiting_attention = False
        self.evictions = 0
        self.padded = False  # a padding mask was seen: padding may sit in some rows' slots
        self._shared_keep: dict[tuple[int, int], torch.Tensor] = {}
        self.frozen = False  # True: no eviction until unfrozen (see CompressedCache.freeze)

    @property
    def is_croppable(self) -> bool:  # a rollback cannot bring evicted tokens back
        return self.evictions == 0

    # -- transformers API -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        rep = self.representation
        self.store = rep.make_store(self.layer_idx) if rep is not None else DenseStore()
        self.is_initialized = True

    def _capacity(self) -> int | None:
        target = self.selection.target(self.seen)
        return None if target is None or self.selection.ratio_driven else target + self.selection.step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_attention and self.selection.target(self.seen) is not None:
            raise AttentionNotAttachedError(
                "this kvcompress cache evicts after attention, but the model's attention did not go "
                "through kvcompress; load the model with attn_implementation='sdpa' or call "
                "kvcompress.attach(model)"
            )
        b, h, q, _ = key_states.shape
        cap = self._capacity()
        if self.slots.tensors and self.slots.length + q <= self.slots.capacity:
            self.slots.length += q  # positions, validity and state of free slots are pre-filled
        else:
            self._append_slots(b, h, q, key_states.device, cap)
        self.store.append(key_states, value_states, cap=cap)
        self.seen += q
        stand_ins = None if self.selection.needs_attention else self.store.stand_ins()
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
            new[name] = torch.zeros((1, 1, 1), dtype=dtype, device=device).expand(b, h, q)
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
        for name in self.selection.slot_states:
            t[name][:, :, n:].fill_(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.slots.length
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots.clear()
        self.store = None
        self.seen = 0
        self.evictions = 0
        self.awaiting_attention = False
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        n = abs(tokens_to_remove) if tokens_to_remove < 0 else self.seen - tokens_to_remove
        if n <= 0 or not self.is_initialized:
            return
        if n > self.slots.length:
            raise ValueError(
                f"crop: parameter 'tokens_to_remove' asks to remove {n} tokens; allowed: at most the "
                f"{self.slots.length} tokens this layer stores"
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

    def offload(self) -> None:  # the dense buffers stay where they are
        pass

    def prefetch(self) -> None:
        pass

    # -- policy machinery ---------------------------------------------------------------------------
    def context(self) -> SlotContext:
        return SlotContext(self.layer_idx, self.seen, self.slots, self.store, self.selection.slot_states)

    def finish_attention(self, new_valid: torch.Tensor | None) -> None:
        """Called after this layer's attention: record padding, then evict if due."""
        self.awaiting_attention = False
        if new_valid is not None:
            self.padded = True
            q = new_valid.shape[-1]
            self.slots.tensors["valid"][:, :, self.slots.length - q : self.slots.length] &= new_valid[:, None, :]
        self.maybe_evict()

    def maybe_evict(self, force: bool = False) -> None:
        """Evict down to the policy's target once ``step`` slots beyond it have accumulated (``force``:
        whenever the layer holds more than the target), unless the layer is frozen."""
        target = self.selection.target(self.seen)
        if target is None or self.frozen or not self.is_initialized:
            return
        if self.slots.length < target + (1 if force else self.selection.step):
            return
        n = self.slots.length
        if self.selection.positional and not self.padded:
            keep = self._positional_keep(n, target)
        else:
            keep = self._scored_keep(n, target)
        self.slots.keep(keep)
        self.store.keep(keep)
        self.evictions += 1
        cap = self._capacity()
        if cap is not None:
            self.slots.shrink(cap)
            self.store.shrink(cap)
        self._prefill_free_slots(self.seen)

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

    def _scored_keep(self, n: int, target: int) -> torch.Tensor:
        """Keep-indices from the policy's scores, protected tokens and padding."""
        ctx = self.context()
        scores = self.selection.score(ctx).float().nan_to_num(0.0, 1e30, -1e30)
        valid = ctx.valid
        protected = torch.zeros_like(valid)
        if self.selection.sink:
            rank = valid.to(torch.int32).cumsum(-1)
            protected |= rank <= self.selection.sink
        if self.selection.recent:
            protected[..., max(n - self.selection.recent, 0):].fill_(True)
        scores = scores.masked_fill(protected & valid, float("inf")).masked_fill(~valid, float("-inf"))
        return scores.topk(min(target, n), dim=-1, sorted=False).indices.sort(dim=-1).values

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds: stored K/V (however represented), the slot table, cached indices."""
        if not self.is_initialized:
            return []
        return [*self.store.tensors(), *self.slots.tensors.values(), *self._shared_keep.values()]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: stored K/V (however represented) and per-slot state."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())
