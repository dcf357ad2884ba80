"""The harness's built-in tasks."""

from __future__ import annotations

from .agreement import AgreementTask
from .fidelity import FidelityTask
from .longbench import LongBenchTask
from .needle import NeedleTask
from .passkey import PasskeyTask
from .perplexity import PerplexityTask
from .speed import SpeedTask

BUILTIN_TASKS = (PerplexityTask, PasskeyTask, NeedleTask, LongBenchTask, AgreementTask, FidelityTask,
                 SpeedTask)

__all__ = [
                 "BUILTIN_TASKS",
                 "AgreementTask",
                 "FidelityTask",
                 "LongBenchTask",
                 "NeedleTask",
                 "PasskeyTask",
                 "PerplexityTask",
                 "SpeedTask",
]
