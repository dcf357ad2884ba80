"""The GPU's own time of a decode step (``--param speed.profile_steps=N``): torch.profiler over N eager steps.

A decode step's wall time is the GPU's work plus whatever the host adds (Python, launches, waits). The sum
of the device time of every kernel those steps ran, divided by N, is the step's GPU time: what a decode
without the host in the way (CUDA graph replay) could at best approach. CUDA only; elsewhere there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def gpu_ms_per_step(step: Callable[[], Any], steps: int, devices: Sequence[Any]) -> float | None:
    """Kernel time per call of ``step`` (ms) summed over every CUDA device, from ``steps`` profiled calls;
    None without a CUDA device."""
    if steps < 1 or not any(d.type == "cuda" for d in devices):
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ..decoding import sync

    sync(devices)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(devices)
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return total_us / 1000 / steps
