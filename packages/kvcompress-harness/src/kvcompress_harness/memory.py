"""Peak memory of a block: the CUDA allocator on GPU (per device for a model spread over several), sampled
process RSS on CPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import psutil
import torch


class PeakMemory:
    """Context manager measuring peak memory above the level at entry: ``.peak_bytes`` (summed over the CUDA
    devices), ``.by_device`` (``{"cuda:0": ..., "cuda:1": ...}``; ``{"cpu": ...}`` for RSS) and ``.kind``."""

    def __init__(self, device: torch.device | Sequence[torch.device | str], interval_s: float = 0.005) -> None:
        many = [device] if isinstance(device, (torch.device, str)) else list(device)
        self.devices = [torch.device(d) for d in many]
        self.cuda = [d for d in self.devices if d.type == "cuda"]
        self.device = self.devices[0]
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.by_device: dict[str, int] = {}
        self.kind = "cuda_allocator" if self.cuda else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base: dict[torch.device, int] = {}
        self._max = 0

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.cuda:
            for d in self.cuda:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
                self._base[d] = torch.cuda.memory_allocated(d)
        else:
            self._max = psutil.Process().memory_info().rss
            self._base[self.device] = self._max
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            for d in self.cuda:
                torch.cuda.synchronize(d)
                self.by_device[str(d)] = torch.cuda.max_memory_allocated(d) - self._base[d]
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.by_device["cpu"] = self._max - self._base[self.device]
        self.peak_bytes = sum(self.by_device.values())
