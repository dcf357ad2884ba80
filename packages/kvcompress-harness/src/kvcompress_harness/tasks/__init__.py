"""The harness's built-in tasks."""

from __future__ import annotations

from .agreement import AgreementTask
from .fidelity import FidelityTask
from .longbench import LongBenchTask
from .max_batch import MaxBatchTask
from .needle import NeedleTask
from .passkey import PasskeyTask
from .perplexity import PerplexityTask
from .speed import SpeedTask

BUILTIN_TASKS = (PerplexityTask, PasskeyTask, NeedleTask, LongBenchTask, AgreementTask, FidelityTask,
                 SpeedTask, MaxBatchTask)

__all__ = ["BUILTIN_TASKS", "AgreementTask", "FidelityTask", "LongBenchTask", "MaxBatchTask", "NeedleTask",
           "PasskeyTask", "PerplexityTask", "SpeedTask"]
