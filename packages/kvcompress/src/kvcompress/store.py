"""How a layer stores the keys and values it keeps: the representation side of a cache."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from . import kernels
from .buffers import SlotBuffer


class KVStore(ABC):
    """Storage of one layer's kept keys/values, in temporal order per (batch, kv-head).

    A representation plugin (e.g. quantization) implements this; the core's
    :class:`DenseStore` keeps them in the model's dtype.
    """

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of stored slots."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, cap: int | None = None) -> None:
        """Append ``[B, H, q, D]`` keys and values; ``cap`` is the capacity the layer will need at most."""

    @abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, length, D]`` for attention (decoded if stored otherwise)."""

    @abstractmethod
    def keep(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` (``[B, H, K]``, ascending per row)."""

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

    def attend(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> torch.Tensor | None:
        """Attention straight from the stored form (a fused kernel), or ``None`` to use ``keys_values``."""
        return None

    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class DenseStore(KVStore):
    """Keys and values in the model's dtype, in preallocated buffers."""

    def __init__(self) -> None:
        self.buf = SlotBuffer()

    @property
    def length(self) -> int:
        return self.buf.length

    def append(self, keys: torch.Tensor, values: torch.Tensor, cap: int | None = None) -> None:
        buf, q = self.buf, keys.shape[2]
        if buf.tensors and buf.length + q <= buf.capacity and kernels.append_pair(
                buf.tensors["keys"], buf.tensors["values"], buf.length, keys, values):
            buf.length += q  # a decode step on the GPU: one launch writes both
            return
        buf.append(cap=cap, keys=keys, values=values)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf.view("keys"), self.buf.view("values")

    def keep(self, index: torch.Tensor) -> None:
        self.buf.keep(index)

    def truncate(self, n: int) -> None:
        self.buf.truncate(n)

    def select_batch(self, index: torch.Tensor) -> None:
        self.buf.select_batch(index)

    def shrink(self, capacity: int) -> None:
        self.buf.shrink(capacity)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buf.tensors.values())
