"""Sharded grids under torchrun: one process per rank, the grid's groups of cells split over the ranks.

``torchrun --nproc-per-node N -m kvcompress_harness run ...`` starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous address; this module joins the process
group they describe (``nccl`` on GPU, ``gloo`` on CPU: torch.distributed's env:// contract, so any launcher that
sets those variables works) and opens a second, ``gloo`` group for what the ranks tell each other: host objects
(the finished cells, once) and the wait at the end while the slowest rank finishes its cells, which can be hours
and which NCCL's watchdog would cut short.

Who does what is decided once, by rank 0, from the results on disk, and sent to every rank (``broadcast``), so
every rank runs on the same picture even on a network filesystem that shows other nodes' appends late.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import HarnessError

WAIT = timedelta(days=7)  # how long a rank waits for the others at the end (they may have hours of cells left)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def leader(self) -> bool:
        """Rank 0: reads the results, decides who runs what, merges the shards at the end."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.strip().isdigit():
        raise HarnessError(f"environment {name}={raw!r}: allowed: an integer >= 0 (torchrun sets it; launch with "
                           "torchrun --nproc-per-node N -m kvcompress_harness run ...)")
    return int(raw)


def from_env(env: Mapping[str, str] | None = None) -> Rank | None:
    """The torchrun rank of this process, or None outside torchrun (no ``RANK`` / ``WORLD_SIZE``)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", rank)
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    if world < 1 or rank >= world or local_rank >= max(local_world, 1):
        raise HarnessError(f"environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                           f"LOCAL_WORLD_SIZE={local_world}: allowed: 0 <= RANK < WORLD_SIZE and "
                           "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE")
    return Rank(rank, world, local_rank, local_world)


class Group:
    """The joined process group and the gloo group the ranks coordinate through."""

    def __init__(self, rank: Rank, device_type: str) -> None:
        import torch
        import torch.distributed as dist

        self.rank = rank
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(rank.local_rank)
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group(backend=self.backend)
        if dist.get_world_size() != rank.world or dist.get_rank() != rank.rank:
            raise HarnessError(f"torch.distributed has rank {dist.get_rank()} of {dist.get_world_size()}, the "
                               f"environment says {rank.rank} of {rank.world}; allowed: one process group per job")
        self.coord = dist.new_group(backend="gloo", timeout=WAIT)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, by rank, on rank 0 (None elsewhere); returns once every rank sent its own."""
        import torch.distributed as dist

        box: list[Any] | None = [None] * self.rank.world if self.rank.leader else None
        dist.gather_object(value, box, dst=0, group=self.coord)
        return box

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (pickled through gloo)."""
        import torch.distributed as dist

        box = [value if self.rank.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.coord)
        return box[0]

    def close(self) -> None:
        """Leave the process group (only if this module joined it)."""
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each item: longest first, each to the rank with the least work so far (ties: the lower
    rank, then the earlier item), so the same costs always give the same split."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def rank_device(requested: str | None, rank: Rank) -> str | None:
    """The device of this rank for ``--device``: ``cuda:LOCAL_RANK`` where CUDA is used, else what was asked."""
    import torch

    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return requested
    if requested not in (None, "cuda"):
        if rank.local_world > 1:
            raise HarnessError(f"--device {requested}: under torchrun each rank takes cuda:LOCAL_RANK; allowed: "
                               "cuda or cpu")
        return requested
    if not torch.cuda.is_available():
        raise HarnessError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if rank.local_rank >= torch.cuda.device_count():
        raise HarnessError(f"torchrun LOCAL_RANK={rank.local_rank} but this node has {torch.cuda.device_count()} "
                           "GPU(s); allowed: --nproc-per-node <= the GPUs of a node")
    return f"cuda:{rank.local_rank}"
