"""Results file: one JSON object per line, appended atomically, read back tolerantly."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KEY_FIELDS = ("model", "policy", "task", "params", "length", "device", "seed", "chunk", "data_source")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, tensors and numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(record: dict[str, Any]) -> str:
    """One line of JSON (no newline inside)."""
    return json.dumps(_clean(record), sort_keys=True, ensure_ascii=False, allow_nan=False)


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one line with a single ``os.write`` on an O_APPEND fd, then fsync.

    A reader never sees half a line from a finished call; a crash mid-call loses at most this line.
    """
    data = (dumps(record) + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record in ``path`` (a missing file is empty; a torn line is skipped with a warning)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{p}:{n}: skipping a line that is not complete JSON", stacklevel=2)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def cell_key(record: dict[str, Any]) -> str:
    """Identity of a cell: what was measured, on what, with which settings."""
    ident = {k: record.get(k) for k in KEY_FIELDS}
    return hashlib.sha256(dumps(ident).encode()).hexdigest()[:16]


def finished(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cells that finished without error, by key (the last one wins)."""
    return {cell_key(r): r for r in records if r.get("status") == "ok"}
