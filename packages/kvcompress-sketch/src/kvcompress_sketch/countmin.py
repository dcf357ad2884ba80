"""A Count-Min sketch over integer items, one per (batch, kv-head) row, with seeded universal hashing.

Row ``j`` of ``depth`` sends item ``x`` (``0 <= x < 2**30``) to counter
``((a_j x + b_j) mod p) mod width`` with ``p = 2**31 - 1`` and ``a_j, b_j`` drawn from the seed: a
pairwise-independent family, so the classical guarantee holds (Cormode and Muthukrishnan, 2005): with
non-negative weights an estimate never undercounts, and it exceeds the true count by more than
``e / width`` times the total weight with probability at most ``exp(-depth)``.

Each counter may carry a vector beside its count (the policy keeps there the sum of the queries counted):
the table is ``[..., depth * width, 1 + extra]``, column 0 the count.
"""

from __future__ import annotations

import torch

PRIME = 2**31 - 1
MAX_ITEM = 2**30
CHUNK_ELEMENTS = 2**24  # one-hot elements per update chunk (64 MiB of float32)


class CountMin:
    """``depth`` x ``width`` counters for each of ``rows`` (e.g. ``(batch, kv_heads)``)."""

    def __init__(self, rows: tuple[int, ...], width: int, depth: int, seed: int, extra: int = 0,
                 device: torch.device | str = "cpu") -> None:
        g = torch.Generator().manual_seed(seed)
        self.width, self.depth = width, depth
        self.coef = torch.stack([torch.randint(1, PRIME, (depth,), generator=g),
                                 torch.randint(0, PRIME, (depth,), generator=g)]).to(device)  # [2, depth] int64
        self.offsets = torch.arange(depth, device=device) * width
        self.table = torch.zeros((*rows, depth * width, 1 + extra), dtype=torch.float32, device=device)

    @property
    def counts(self) -> torch.Tensor:
        """``[..., depth * width]``: the counts, row ``j`` at ``j * width .. (j + 1) * width - 1``."""
        return self.table[..., 0]

    def index(self, items: torch.Tensor) -> torch.Tensor:
        """The counter of each item in each row, ``[..., m, depth]``, as an index into ``depth * width``."""
        a, b = self.coef[0], self.coef[1]
        return (items.long().unsqueeze(-1) * a + b) % PRIME % self.width + self.offsets

    def add(self, items: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor | None = None) -> None:
        """Count ``items`` ``[..., m]`` with ``weights`` ``[..., m]`` (>= 0) and add ``weights * vectors``
        (``[..., m, extra]``, any float dtype) to the counters' vectors: one one-hot matmul per chunk of items
        (float32 copies of a chunk only)."""
        m = items.shape[-1]
        table = self.table.view(-1, *self.table.shape[-2:])  # [R, depth * width, 1 + extra]
        rows, counters = table.shape[0], self.depth * self.width
        flat_items = items.reshape(rows, m)
        flat_w = weights.reshape(rows, m).float()
        flat_v = vectors.reshape(rows, m, vectors.shape[-1]) if vectors is not None else None
        per_item = table.shape[-1] if self.width == 1 else counters + table.shape[-1]
        step = max(1, CHUNK_ELEMENTS // (rows * per_item))
        for start in range(0, m, step):
            w = flat_w[:, start:start + step].unsqueeze(-1)  # [R, c, 1]
            values = w if flat_v is None else torch.cat([w, flat_v[:, start:start + step].float() * w], -1)
            if self.width == 1:  # one counter per row: every item lands on it, no hashing needed
                table += values.sum(1, keepdim=True)
                continue
            index = self.index(flat_items[:, start:start + step])  # [R, c, depth]
            hot = torch.zeros((*index.shape[:2], counters), dtype=torch.float32, device=index.device)
            hot.scatter_(-1, index, 1.0)
            table.baddbmm_(hot.transpose(1, 2), values)  # writes self.table

    def estimate(self, items: torch.Tensor) -> torch.Tensor:
        """The Count-Min estimate of each item's count ``[..., m]``: the smallest of its ``depth`` counters."""
        index = self.index(items)
        counts = self.counts
        flat = counts.gather(-1, index.flatten(-2))
        return flat.view(index.shape).amin(-1)

    def scale_(self, factor: float) -> None:
        """Multiply every count and vector by ``factor`` (decay)."""
        self.table.mul_(factor)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat rows of the first dimension."""
        self.table = self.table.index_select(0, index.to(self.table.device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.table, self.coef, self.offsets]
