"""``--grid grid.toml`` and ``--param TASK.KEY=VALUE``.

A grid file holds any of the ``run`` options; what the command line gives wins::

    policies = ["window(budget=128)", "sink(budget=128)"]
    tasks = ["perplexity", "passkey"]
    lengths = [256, 512]
    chunk = 16
    [params.passkey]
    depths = [0.0, 0.5, 1.0]

and, so that adding a policy to a grid is one word, a table that crosses names with settings::

    [expand]
    names = ["window", "sink", "h2o"]            # each at every setting below
    settings = ["budget=128", "budget=256"]      # -> window(budget=128), window(budget=256), sink(...), ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

from .errors import HarnessError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GRID_KEYS = {"policies": "policy", "tasks": "task", "lengths": "length", "model": "model", "out": "out",
             "device": "device", "dtype": "dtype", "chunk": "chunk", "seed": "seed", "data": "data",
             "data_file": "data_file", "params": "param", "batches": "batch", "compress": "compress",
             "expand": "policy", "device_map": "device_map"}
_FIELDS = {"policies": "policies", "tasks": "tasks", "lengths": "lengths", "model": "model", "out": "out",
           "device": "device", "dtype": "dtype", "chunk": "chunk", "seed": "seed", "data": "data",
           "data_file": "data_file", "batches": "batches", "compress": "compress", "device_map": "device_map"}
_LISTS = ("policies", "tasks", "lengths", "batches", "compress")


def expand(table: Any, path: str) -> list[str]:
    """``[expand] names x settings`` as policy specs (``name(setting)``; an empty setting is the name)."""
    if not isinstance(table, dict) or set(table) - {"names", "settings"} or "names" not in table:
        raise HarnessError(f"--grid {path!r}: [expand] takes names = [...] and settings = [...]")
    names, settings = table["names"], table.get("settings", [""])
    if not all(isinstance(x, str) for x in [*names, *settings]):
        raise HarnessError(f"--grid {path!r}: [expand] names and settings must be lists of strings")
    return [f"{n}({s})" if s else n for n in names for s in settings]
_CLI_DEFAULTS = {"out": "results.jsonl", "seed": 0, "data": "auto"}


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["passkey.trials=3", ...]`` -> ``{"passkey": {"trials": 3}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, raw = item.partition("=")
        task, dot, key = head.partition(".")
        if not sep or not dot or not task or not key:
            raise HarnessError(f"--param: got {item!r}; allowed form: TASK.KEY=VALUE (e.g. passkey.trials=3)")
        out.setdefault(task, {})[key] = _value(raw)
    return out


def apply_grid(config: Any, path: str, given: dict[str, Any]) -> Any:
    """``config`` with the grid file's values for every option the command line left unset."""
    try:
        with open(path, "rb") as f:
            grid = tomllib.load(f)
    except OSError as exc:
        raise HarnessError(f"--grid: cannot read {path!r}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"--grid: {path!r} is not valid TOML: {exc}") from exc
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise HarnessError(f"--grid {path!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                           f"allowed: {', '.join(GRID_KEYS)}")
    updates: dict[str, Any] = {}
    for key, field in _FIELDS.items():
        if key not in grid:
            continue
        cli = given.get(GRID_KEYS[key])
        if cli is None or (key in _CLI_DEFAULTS and cli == _CLI_DEFAULTS[key]):
            value = grid[key]
            if key in _LISTS and not isinstance(value, list):
                raise HarnessError(f"--grid {path!r}: {key} must be a list, got {value!r}")
            updates[field] = value
    if "expand" in grid and not given.get("policy"):
        updates["policies"] = [*updates.get("policies", []), *expand(grid["expand"], path)]
    params = grid.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise HarnessError(f"--grid {path!r}: params must be tables like [params.passkey]")
    merged = {task: {**values, **config.params.get(task, {})} for task, values in params.items()}
    merged.update({t: v for t, v in config.params.items() if t not in merged})
    return replace(config, params=merged, grid=path, **updates)
