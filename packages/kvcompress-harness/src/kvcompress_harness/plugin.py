"""Entry point of the harness in the ``kvcompress`` group: its tasks and metrics."""

from __future__ import annotations

from collections.abc import Callable

import kvcompress

from . import metrics
from .tasks import BUILTIN_TASKS


@kvcompress.hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    """Register the built-in tasks (one instance each)."""
    for cls in BUILTIN_TASKS:
        register(cls())


@kvcompress.hookimpl
def register_metrics(register: Callable[..., None]) -> None:
    """Register the metric functions tasks use."""
    for fn in metrics.ALL:
        register(fn)
