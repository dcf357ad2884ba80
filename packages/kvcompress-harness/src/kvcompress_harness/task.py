"""The task protocol: what a benchmark the harness can run looks like.

A task is any object with these attributes, registered through the ``kvcompress``
entry-point group's ``register_tasks(register)`` hook::

    class MyTask:
        name = "mytask"                       # unique name (``--task mytask``)
        primary = "accuracy"                  # headline metric key in what run() returns
        higher_is_better = True
        default_lengths = (512, 1024)         # prompt/context lengths in tokens
        defaults = {"trials": 3}              # parameters, overridable with --param mytask.trials=5

        def run(self, ctx: TaskContext) -> dict:   # metrics for ctx.spec at ctx.length
            cache = ctx.make_cache()               # the policy's cache ("full" -> DynamicCache)
            ...
            return {"accuracy": 1.0, "kv_bytes": kvcompress.kv_bytes(cache)}

``run`` returns JSON-serialisable metrics; include ``kv_bytes`` (bytes the cache
holds at the end) so reports can plot quality against compression. The harness
measures ``full`` with the same task, length and parameters as the reference,
records both, and catches what ``run`` raises (the cell is recorded as failed).

Optional attributes: ``limits`` (``{"param": (min, max)}``, either end ``None``: checked before any
cell runs), ``needs_text`` (default True: the task reads the tokenizer and text; False lets it run on
a ``random:`` model), ``supports_batch`` (the ``--batch`` axis applies), ``compress_modes`` (the
``--compress`` axis applies), ``labels`` (``{"metric": "words with units"}`` for reports), and
``run_group(ctx, specs) -> {spec: metrics}`` for a task that measures every policy of a cell at once
(``speed`` pairs decode steps this way), and ``check_params(params)`` to refuse a combination of parameters
(raise ``HarnessError``) before any cell runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .data import Text
from .errors import HarnessError

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Task(Protocol):
    """A benchmark: measures one policy spec at one length on one model."""

    name: str
    primary: str
    higher_is_better: bool
    default_lengths: tuple[int, ...]
    defaults: dict[str, Any]

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Measure ``ctx.spec`` at ``ctx.length``; return metrics."""
        ...


@dataclass
class TaskContext:
    """Everything a task gets for one cell."""

    model: Any
    tokenizer: Any
    device: torch.device
    spec: str
    length: int
    params: dict[str, Any]
    seed: int
    chunk: int | None
    text: Text
    progress: bool = True
    batch: int = 1
    compress: str | None = None
    task: str = ""
    devices: tuple[str, ...] = ()
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    _token_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def all_devices(self) -> list[torch.device]:
        """Every device the model computes on (several under ``--device-map``), the input device first."""
        import torch

        out = [self.device]
        for name in self.devices:
            dev = torch.device(name)
            if dev.type not in ("meta", "disk") and dev not in out:
                out.append(dev)
        return out

    def make_cache(self, spec: str | None = None) -> Any:
        """A fresh cache for ``spec`` (default: this cell's policy), attached to the model."""
        import kvcompress

        return kvcompress.make_cache(spec or self.spec, model=self.model)

    def text_ids(self) -> torch.Tensor:
        """The whole text tokenised once (1-D int64, on CPU)."""
        if self.tokenizer is None:
            raise HarnessError(f"task {self.task!r} needs text and a tokenizer; this model has none (a random: "
                               "model is for speed only); allowed: a real model (--model)")
        if "text" not in self._token_cache:
            ids = self.tokenizer(self.text.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            self._token_cache["text"] = ids
        return self._token_cache["text"]

    def tokens(self, n: int, offset: int = 0) -> torch.Tensor:
        """Tokens ``[offset, offset+n)`` of the text as a [1, n] int64 tensor on ``self.device``."""
        if offset < 0:
            raise HarnessError(f"offset: got {offset}; allowed: an integer >= 0")
        ids = self.text_ids()
        if offset + n > ids.numel():
            raise HarnessError(
                f"length {n} (offset {offset}) needs more tokens than the text has ({ids.numel()}, "
                f"source {self.text.source}); use a shorter --length or a longer --data-file"
            )
        return ids[offset:offset + n].unsqueeze(0).to(self.device)

    def remember(self, key: Any, compute: Any) -> Any:
        """``compute()`` once per run for ``key`` (e.g. full-cache references shared by the policies)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def rng(self) -> random.Random:
        """A random generator seeded by the cell's seed (same draws for a policy and full)."""
        return random.Random(self.seed)


def coerce_param(task: str, key: str, value: Any, default: Any) -> Any:
    """Convert a parameter to the type of its default; clear error on a bad value."""
    where = f"--param {task}.{key}"
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in items)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{where}: got {value!r}; allowed: a value like {default!r}") from exc


def _check_limit(task: str, key: str, value: Any, low: Any, high: Any) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            allowed = (f"{low} <= value <= {high}" if low is not None and high is not None
                       else f">= {low}" if low is not None else f"<= {high}")
            raise HarnessError(f"--param {task}.{key}: got {value!r}; allowed: {allowed}")


def resolve_params(task: Task, overrides: dict[str, Any]) -> dict[str, Any]:
    """The task's defaults updated by ``overrides``; unknown names and values outside ``task.limits`` are
    an error naming the parameter, the value and what is allowed."""
    params = dict(task.defaults)
    for key, value in overrides.items():
        if key not in params:
            allowed = ", ".join(sorted(params)) or "none"
            raise HarnessError(f"--param {task.name}.{key}: unknown parameter; allowed: {allowed}")
        params[key] = coerce_param(task.name, key, value, task.defaults[key])
    for key, (low, high) in (getattr(task, "limits", None) or {}).items():
        if key in params:
            _check_limit(task.name, key, params[key], low, high)
    check = getattr(task, "check_params", None)
    if check is not None:
        check(params)
    choices = getattr(task, "choices", None) or {}
    for key, allowed in choices.items():
        if key in params:
            values = params[key] if isinstance(params[key], (list, tuple)) else [params[key]]
            bad = [v for v in values if v not in allowed]
            if bad:
                raise HarnessError(f"--param {task.name}.{key}: got {params[key]!r}; allowed: "
                                   f"{', '.join(map(str, allowed))}")
    return params
