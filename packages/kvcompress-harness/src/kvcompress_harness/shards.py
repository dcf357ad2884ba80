"""Per-rank results files of a sharded run and their merge into ``--out``.

Rank ``K`` appends its finished cells to ``<out>.shards/rank-K.jsonl`` with the same writer as a single
process (``append_record``: one ``os.write`` on an O_APPEND descriptor, then fsync), so a killed rank loses at
most the cell it was running. When every rank is done, each sends its records to rank 0 (through gloo), and
rank 0 appends the shards' records and the ones sent to ``<out>`` in the grid's order (a new file written
beside it, fsynced and renamed over it: never half-written) and removes the shards. A run that was killed before that merge leaves the shards: the next run, sharded or not, counts their
cells as finished and merges them when it ends. The merge is idempotent: a record already in ``<out>`` (same
run, cell and start time) is not appended twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import cell_key, dumps, read_records


def shard_dir(out: str | os.PathLike) -> Path:
    """Where the ranks of a sharded run into ``out`` write."""
    p = Path(out)
    return p.parent / f"{p.name}.shards"


def shard_path(out: str | os.PathLike, rank: int) -> Path:
    """The results file of rank ``rank``."""
    return shard_dir(out) / f"rank-{rank}.jsonl"


def shard_files(out: str | os.PathLike) -> list[Path]:
    """Every rank's file left beside ``out``, by rank."""
    d = shard_dir(out)
    if not d.is_dir():
        return []
    files = [f for f in d.glob("rank-*.jsonl") if f.stem[5:].isdigit()]
    return sorted(files, key=lambda f: int(f.stem[5:]))


def _identity(record: dict[str, Any]) -> tuple:
    return record.get("run_id"), cell_key(record), record.get("started_at"), record.get("status")


def all_records(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``out`` and then of every shard beside it (what counts as finished)."""
    records = read_records(out)
    for f in shard_files(out):
        records += read_records(f)
    return records


def merge(out: str | os.PathLike, order: Callable[[dict[str, Any]], Any] | None = None,
          sent: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Append the shards' records that ``out`` lacks to ``out`` (sorted by ``order``, stably, from the shards'
    own order), atomically; remove the shard files; return the records appended. ``sent``: the records the
    ranks sent rank 0 at the end (each is on its shard too; a shard another node wrote may show late on a
    network filesystem, and a record sent is then merged all the same)."""
    files = shard_files(out)
    if not files and not sent:
        return []
    out = Path(out)
    have = {_identity(r) for r in read_records(out)}
    new: list[dict[str, Any]] = []
    for r in [r for f in files for r in read_records(f)] + list(sent or []):
        if _identity(r) not in have:
            have.add(_identity(r))
            new.append(r)
    if order is not None:
        new.sort(key=lambda r: (order(r), r.get("started_at") or 0))
    if new:
        _append_atomically(out, "".join(dumps(r) + "\n" for r in new).encode("utf-8"))
    for f in files:
        f.unlink()
    try:
        shard_dir(out).rmdir()
    except OSError:
        pass  # something else is there (a torn line set aside as .partial-N): leave it
    return new


def _append_atomically(out: Path, data: bytes) -> None:
    old = out.read_bytes() if out.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    tmp = out.parent / f".{out.name}.merge-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(old + data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
