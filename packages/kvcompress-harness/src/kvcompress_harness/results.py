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

from .errors import DataError, HarnessError

KEY_FIELDS = ("model", "policy", "task", "params", "length", "device", "seed", "chunk", "data_source", "batch",
              "compress")
RECORD_FIELDS = ("task", "policy", "status")
FINISHED = ("ok", "oom")  # an out-of-memory cell is a result, not a failure to retry


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


def is_record(value: Any) -> bool:
    """Whether ``value`` looks like a record ``kvcompress run`` wrote."""
    return isinstance(value, dict) and all(k in value for k in RECORD_FIELDS)


def prepare_out(path: str | os.PathLike) -> list[str]:
    """Make ``path`` ready for appending; return warnings.

    A directory, or a file whose lines are JSON but not our records, is an error naming ``--out``. A last
    line cut short (a crash or a full disk in the middle of a write) is moved to ``<path>.partial-N`` and
    the file truncated to its last complete line, so the next record starts on a line of its own.
    """
    p = Path(path)
    if p.is_dir():
        raise HarnessError(f"--out: {str(p)!r} is a directory; allowed: a file path for the results "
                           "(JSON lines, e.g. results.jsonl)")
    if not p.exists() or p.stat().st_size == 0:
        return []
    data = p.read_bytes()
    for n, line in enumerate(data.split(b"\n")[:50], 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not is_record(value):
            raise HarnessError(f"--out: {str(p)!r} line {n} is JSON but not a kvcompress result (no "
                               f"{', '.join(RECORD_FIELDS)}); allowed: a results file 'kvcompress run' wrote, "
                               "or a new path")
        break
    if data.endswith(b"\n"):
        return []
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    line_no = data.count(b"\n") + 1
    try:
        json.loads(tail)
        complete = True
    except (json.JSONDecodeError, UnicodeDecodeError):
        complete = False
    if complete:  # a whole record without its newline: end the line
        with open(p, "ab") as f:
            f.write(b"\n")
        return [f"{p}: line {line_no} had no newline at its end; added one before appending"]
    n = 1
    while Path(f"{p}.partial-{n}").exists():
        n += 1
    aside = Path(f"{p}.partial-{n}")
    aside.write_bytes(tail)
    with open(p, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    message = (f"{p}: line {line_no} was cut short ({len(tail)} bytes, not complete JSON); moved it to {aside} "
               "before appending")
    return [message]


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every record of the results files, for ``report``: a clear error for a missing file, a directory,
    or JSON that is not our records."""
    out: list[dict[str, Any]] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            raise DataError(f"report: {str(p)!r} is a directory; allowed: a results file (JSON lines) "
                            "'kvcompress run' wrote")
        if not p.is_file():
            raise DataError(f"report: results file {str(p)!r} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                if n == 1 and text.lstrip().startswith(("[", "{")) and len(text.splitlines()) > 1:
                    raise DataError(f"report: {str(p)!r} is not JSON lines (one record per line); allowed: a "
                                    "results file 'kvcompress run' wrote") from None
                warnings.warn(f"{p}:{n}: skipping a line that is not complete JSON", stacklevel=2)
                continue
            if not is_record(value):
                raise DataError(f"report: {str(p)!r} line {n} is JSON but not a kvcompress result (no "
                                f"{', '.join(RECORD_FIELDS)}); allowed: a results file 'kvcompress run' wrote")
            out.append(value)
    return out


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
    ident["batch"] = ident["batch"] or 1
    if record.get("device_map") is not None:  # only then: keys of cells on one device stay what they were
        ident["device_map"] = record["device_map"]
    return hashlib.sha256(dumps(ident).encode()).hexdigest()[:16]


def finished(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cells that finished (``ok``, or ``oom``: out of memory is a result), by key (the last one wins)."""
    return {cell_key(r): r for r in records if r.get("status") in FINISHED}
