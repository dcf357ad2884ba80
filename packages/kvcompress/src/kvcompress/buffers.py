"""Preallocated per-slot tensors of shape ``[batch, heads, capacity, ...]``.

One mechanism for everything a cache layer keeps per stored token: keys,
values, positions, validity, attention bias, policy state. Appends write in
place (no ``torch.cat`` per step); eviction gathers the kept slots of every
(batch, head) with one ``index_select`` per tensor. Capacity grows by 1/32 at a
time (reserved room is held memory), never beyond the layer's fixed capacity.
"""

from __future__ import annotations

import torch

GROWTH = 32  # capacity grows by 1/GROWTH of what is needed


class SlotBuffer:
    """Named tensors sharing the slot axis (dim 2) and a length."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.length = 0

    @property
    def capacity(self) -> int:
        return next(iter(self.tensors.values())).shape[2] if self.tensors else 0

    def view(self, name: str) -> torch.Tensor:
        """The first ``length`` slots of tensor ``name``."""
        return self.tensors[name].narrow(2, 0, self.length)  # narrow: far less host time than [:, :, :n]

    def views(self) -> dict[str, torch.Tensor]:
        return {k: t.narrow(2, 0, self.length) for k, t in self.tensors.items()}

    def _reallocate(self, capacity: int) -> None:
        for name, old in self.tensors.items():
            new = old.new_empty((old.shape[0], old.shape[1], capacity, *old.shape[3:]))
            new[:, :, : self.length] = old[:, :, : self.length]
            self.tensors[name] = new

    def reserve(self, needed: int, cap: int | None = None) -> None:
        """Make room for ``needed`` slots plus 1/32 of slack, but never beyond ``cap`` when ``cap`` suffices."""
        if needed <= self.capacity:
            return
        target = needed + needed // GROWTH
        if cap is not None and cap >= needed:
            target = min(target, cap)
        self._reallocate(target)

    def add(self, name: str, fill: torch.Tensor) -> None:
        """A new per-slot tensor ``name`` shaped like the others (``[B, H, capacity]``), filled with ``fill``
        (a 0-d tensor giving dtype and value)."""
        like = self.tensors["valid"]
        self.tensors[name] = fill.to(like.device).expand(like.shape).clone()

    def shrink(self, capacity: int) -> None:
        """Free memory beyond ``capacity`` slots (after a long prompt was compressed)."""
        if self.capacity > max(capacity, self.length):
            self._reallocate(max(capacity, self.length))

    def append(self, cap: int | None = None, **new: torch.Tensor) -> None:
        """Append ``q`` slots; every tensor in ``new`` is ``[B, H, q, ...]``."""
        q = next(iter(new.values())).shape[2]
        if not self.tensors:
            capacity = q
            for name, t in new.items():
                self.tensors[name] = t.new_empty((t.shape[0], t.shape[1], capacity, *t.shape[3:]))
        else:
            self.reserve(self.length + q, cap)
        for name, t in new.items():
            self.tensors[name].narrow(2, self.length, q).copy_(t)
        self.length += q

    def keep(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` (``[B, H, K]``, ascending) of every (batch, head), in that order."""
        b, h, k = index.shape
        if index.stride(0) == 0 and index.stride(1) == 0:  # one index shared by every (batch, head)
            shared = index[0, 0]
            for t in self.tensors.values():
                t[:, :, :k] = t.index_select(2, shared)
            self.length = k
            return
        base = torch.arange(b * h, device=index.device).view(b, h, 1) * self.capacity
        flat = (index + base).reshape(-1)
        for t in self.tensors.values():
            rows = t.reshape(b * h * t.shape[2], -1).index_select(0, flat)
            t[:, :, :k] = rows.view(b, h, k, *t.shape[3:])
        self.length = k

    def truncate(self, n: int) -> None:
        """Drop the last ``n`` slots."""
        self.length -= n

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) batch rows ``index``."""
        for name, t in self.tensors.items():
            self.tensors[name] = t.index_select(0, index.to(t.device))

    def clear(self) -> None:
        self.tensors = {}
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of the tensors held (their full capacity)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
