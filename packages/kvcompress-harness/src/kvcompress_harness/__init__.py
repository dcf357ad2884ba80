"""kvcompress-harness: the ``kvcompress`` CLI, default model and data, standard tasks and reports.

Names are imported on first use, so ``import kvcompress_harness`` (and ``kvcompress --help``) stays light:

- ``load_model(spec=None, device=None, dtype=None) -> LoadedModel``: the default SmolLM2-135M-Instruct
  (or a hub id, a directory, a ``.gguf``, ``random:NAME?layers=N``), with ``.model``, ``.tokenizer`` and
  ``.generate(ids, cache=..., ...)``;
- ``run(RunConfig(...))``: what ``kvcompress run`` does; ``report(...)``: what ``kvcompress report`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Text": "data", "load_text": "data",
    "LoadedModel": "models", "load_model": "models", "cache_argument": "models",
    "append_record": "results", "read_records": "results", "load_results": "results",
    "RunConfig": "runner", "run": "runner",
    "Task": "task", "TaskContext": "task",
    "report": "report",
}

__all__ = ["LoadedModel", "RunConfig", "Task", "TaskContext", "Text", "append_record", "cache_argument",
           "load_model", "load_results", "load_text", "read_records", "report", "run"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvcompress_harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
