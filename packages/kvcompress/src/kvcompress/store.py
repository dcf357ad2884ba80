"""How a layer stores the keys and values it keeps: the representation side of a cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from . import _kernels
from .buffers import SlotBuffer

if TYPE_CHECKING:  # pragma: no cover
    from .context import LayerInfo


class Step:
    """What :meth:`KVStore.append` learns about the tokens it receives.

    ``start``: absolute position of the first new token (positions run ``start .. start+q-1``).
    ``cos``/``sin``: the RoPE the model applied to these keys, ``[B or 1, q, D]``, when the attention
    layer received them (stores with ``needs_rope``, caches made with ``model=``); else ``None``: use
    ``LayerInfo.rope(positions)``. ``cap``: the most slots the layer will hold (``None``: unbounded).
    A plain slotted class: one is made per layer and decode step, so it must cost next to nothing.
    """

    __slots__ = ("start", "cap", "cos", "sin")

    def __init__(self, start: int, cap: int | None = None, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> None:
        self.start, self.cap, self.cos, self.sin = start, cap, cos, sin

    def positions(self, q: int, device: torch.device) -> torch.Tensor:
        """The new tokens' positions ``[q]`` (int64)."""
        return torch.arange(self.start, self.start + q, device=device)


class Accumulate:
    """Where a fused decode kernel adds each slot's attention: the float32 slot state ``into``
    ``[B, H_kv, >= S]``, how the G query heads of a kv head combine (``reduce``: "sum" or "max"), and
    whether the step's attention replaces what is there instead of adding to it (``replace``)."""

    __slots__ = ("into", "reduce", "replace")

    def __init__(self, into: torch.Tensor, reduce: str, replace: bool = False) -> None:
        self.into, self.reduce, self.replace = into, reduce, replace


class KVStore(ABC):
    """Storage of one layer's kept keys/values, in temporal order per (batch, kv-head).

    A representation plugin (quantization, low rank) implements this; the core's :class:`DenseStore`
    keeps them in the model's dtype. Slot ``i`` of the store is slot ``i`` of the layer's slot table.
    """

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of stored slots."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, step: Step | None = None) -> None:
        """Append ``[B, H, q, D]`` keys (after RoPE, as the model hands them over) and values; ``step``
        (``None`` when a store is driven by hand: no RoPE known, no capacity bound) says what the layer knows."""

    @abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE) and values ``[B, H, length, D]`` for attention, decoded if stored otherwise."""

    @abstractmethod
    def apply(self, index: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
              changed: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Rebuild the store from a plan: new slot ``j`` holds old slot ``index[..., j]`` (``[B, H, N]``,
        in the new temporal order), except where ``changed[..., j]`` (or ``index < 0``: an added slot),
        where it holds ``keys``/``values[..., j, :]`` (``[B, H, N, D]``, after RoPE). ``positions``
        ``[B, H, N]``: the new slots' positions (for a store that rotates keys itself)."""

    def keep(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` (``[B, H, K]``, ascending per row)."""
        self.apply(index)

    @abstractmethod
    def truncate(self, n: int) -> None:
        """Drop the last ``n`` slots."""

    @abstractmethod
    def select_batch(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat batch rows."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (for byte accounting)."""

    def shrink(self, capacity: int) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release memory beyond ``capacity`` slots, if the store preallocates."""

    def stand_ins(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cheap ``[B, H, length, D]`` placeholders for ``update()`` to return when :meth:`attend` will
        take this step (a fused kernel), or ``None`` (default) to return :meth:`keys_values`.

        The core asks ``keys_values()`` again if the dense tensors turn out to be needed.
        """
        return None

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               bias: torch.Tensor | None = None, accumulate: Accumulate | None = None) -> torch.Tensor | None:
        """Attention of one query per head ``[B, Hq, 1, D]`` straight from the stored form, ``[B, 1, Hq, D]``,
        adding ``bias`` ``[B, H_kv, S]`` (float32, or None) to each slot's score and, with ``accumulate``,
        each slot's attention to ``accumulate.into``; or ``None`` to let the core attend over
        :meth:`keys_values` (and observe there). A store must do all it is asked or nothing."""
        return None

    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def static_layout(self, capacity: int, cuda_graph: bool) -> StaticLayout | None:
        """This store held at ``capacity`` slots for :func:`kvcompress.static_generate`'s decode steps, or
        ``None`` (default): the store cannot keep its tensors in place (static_generate refuses it). Called
        once, after the prompt; ``cuda_graph``: the steps will be captured and replayed."""
        return None


class StaticLayout(ABC):
    """A store held in place for static decode steps (:func:`kvcompress.static_generate`).

    :meth:`append` and :meth:`attend` run inside the captured step: device-side work only, no host reads of
    device values, no allocation whose size depends on them, and every tensor they touch stays where it is
    between replays. :meth:`prepare`, :meth:`advance` and :meth:`rebind` run eagerly between steps. The core
    keeps the slot table (its per-slot bias masks the slots not in use) and the device-side slot counter.
    """

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's ``[B, H, 1, D]`` key and value; ``slot`` ``[1]`` (int64, on the device) is its slot
        index. Returns what the layer hands the model: ``[B, H, capacity, D]`` keys and values, or stand-ins
        of that shape when :meth:`attend` takes the step."""

    def attend(self, query: torch.Tensor, scaling: float, bias: torch.Tensor,
               accumulate: Accumulate | None) -> torch.Tensor | None:
        """The step's attention ``[B, 1, Hq, D]`` from the stored form over the whole capacity (``bias``
        ``[B, H_kv, capacity]`` masks unused slots with ``-inf``), observing into ``accumulate``; or ``None``:
        the core attends over what :meth:`append` returned."""
        return None

    def prepare(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Host work due before the next step, after any eviction (a store that packs tokens packs them
        here, as its eager ``append`` would have on this step's token)."""

    def advance(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Host bookkeeping after each step: the step's token is stored (before the policy may evict)."""

    def rebind(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """After an eviction rebuilt the store eagerly: put its contents back into the held tensors."""

    def host_state(self) -> Hashable | None:
        """The host-side state (counters, sizes: hashable) that an eviction's rebuild reads and writes, the
        store's :meth:`KVStore.apply` of a plan of kept slots followed by :meth:`rebind`; or ``None`` (default):
        every rebuild runs eagerly. Where it is given, static_generate captures the rebuild the second time it
        meets the same state (with as many slots and as many kept), replays it after, then puts back the state
        the capture left with :meth:`set_host_state`. The rebuild must then do device work alone (no host read
        of a device value) and leave nothing it keeps outside the held tensors: :meth:`rebind` puts it there."""
        return None

    def set_host_state(self, state: Hashable) -> None:  # noqa: B027 - optional hook, with host_state
        """Put back a state :meth:`host_state` returned (after a replayed rebuild)."""

    def release(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The static steps are over: the store goes back to eager use."""


def restore_held(store: object, held: dict[str, torch.Tensor], layout: str) -> None:
    """For a :meth:`StaticLayout.rebind`: each of ``store``'s tensors named in ``held`` that an eager rebuild
    replaced is copied into the first rows of its held tensor, which takes its place again (the held ones
    never move; ``layout`` names the caller in the error when a rebuilt one outgrew it)."""
    for name, kept in held.items():
        now = getattr(store, name)
        if now is not kept:
            rows = now.shape[2]
            if rows > kept.shape[2]:
                raise RuntimeError(f"{layout}.rebind: {name} grew to {rows} rows, past the {kept.shape[2]} held")
            kept[:, :, :rows].copy_(now)
            setattr(store, name, kept)


class _DenseLayout(StaticLayout):
    """The dense buffers at exactly ``capacity`` slots: a step's key and value written at its slot."""

    def __init__(self, store: DenseStore, capacity: int) -> None:
        self.store = store
        buf, n = store.buf, store.buf.length
        buf._reallocate(capacity)  # exactly: the buffers never move again
        for t in buf.tensors.values():  # empty slots hold zeros, never garbage (0 * -inf bias is not NaN-free)
            t[:, :, n:].zero_()

    def append(self, keys, values, slot):
        buf = self.store.buf.tensors
        buf["keys"].index_copy_(2, slot, keys)
        buf["values"].index_copy_(2, slot, values)
        return buf["keys"], buf["values"]

    def advance(self) -> None:
        self.store.buf.length += 1

    def host_state(self) -> tuple[int]:
        return (self.store.buf.length,)

    def set_host_state(self, state: tuple[int]) -> None:
        self.store.buf.length = state[0]


class DenseStore(KVStore):
    """Keys and values in the model's dtype, in preallocated buffers written in place."""

    def __init__(self, layer: LayerInfo | None = None) -> None:
        self.buf = SlotBuffer()

    @property
    def length(self) -> int:
        return self.buf.length

    def append(self, keys: torch.Tensor, values: torch.Tensor, step: Step | None = None) -> None:
        buf, q = self.buf, keys.shape[2]
        if buf.tensors and buf.length + q <= buf.capacity and _kernels.append_pair(
                buf.tensors["keys"], buf.tensors["values"], buf.length, keys, values):
            buf.length += q  # a decode step on the GPU: one launch writes both
            return
        buf.append(cap=step.cap if step is not None else None, keys=keys, values=values)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf.view("keys"), self.buf.view("values")

    def apply(self, index, keys=None, values=None, changed=None, positions=None) -> None:
        self.buf.keep(index.clamp(min=0) if keys is not None else index)
        if keys is None:
            return
        write = (index < 0) if changed is None else (changed | (index < 0))
        mask = write.unsqueeze(-1)
        for name, new in (("keys", keys), ("values", values)):
            view = self.buf.view(name)
            view.copy_(torch.where(mask, new.to(view.dtype), view))

    def truncate(self, n: int) -> None:
        self.buf.truncate(n)

    def select_batch(self, index: torch.Tensor) -> None:
        self.buf.select_batch(index)

    def shrink(self, capacity: int) -> None:
        self.buf.shrink(capacity)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buf.tensors.values())

    def attend(self, query, attention_mask, scaling, bias=None, accumulate=None):
        if bias is None and accumulate is None:
            return None  # sdpa is as fast
        buf = self.buf.tensors
        acc = (accumulate.into, accumulate.reduce, accumulate.replace) if accumulate is not None else None
        return _kernels.fused_decode(query, buf["keys"], buf["values"], self.buf.length, attention_mask,
                                     scaling, bias, acc)

    def static_layout(self, capacity: int, cuda_graph: bool) -> StaticLayout:
        return _DenseLayout(self, capacity)
