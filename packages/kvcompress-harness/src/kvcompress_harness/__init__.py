"""kvcompress-harness: the ``kvcompress`` CLI, default model and data, standard tasks and reports."""

from __future__ import annotations

from .data import Text, load_text
from .models import LoadedModel, load_model
from .results import append_record, read_records
from .runner import RunConfig, run
from .task import Task, TaskContext

__version__ = "0.1.0"

__all__ = ["LoadedModel", "RunConfig", "Task", "TaskContext", "Text", "append_record", "load_model",
           "load_text", "read_records", "run"]
