"""What the user sees while a run goes: progress lines on stderr, bars only on a terminal.

On a terminal the run shows a bar of cells and, inside long cells, a bar of chunks under it. Anywhere
else (a log file, CI, a pipe) there are no bars and no escape codes: one plain line per stage and cell.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_active: dict[str, Any] = {"bars": 0, "enabled": True, "prefix": ""}


def interactive() -> bool:
    """True when stderr is a terminal (bars allowed)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def set_enabled(enabled: bool) -> None:
    """Turn bars and progress lines on or off for this process (``--no-progress``)."""
    _active["enabled"] = enabled


def set_rank(rank: int, world: int) -> None:
    """Under torchrun: every line starts with ``rank K/N:`` and there are no bars (ranks share a terminal)."""
    _active["prefix"] = f"rank {rank}/{world}: "


def say(message: str) -> None:
    """One progress line on stderr, printed above any bar on a terminal."""
    if not _active["enabled"]:
        return
    message = _active["prefix"] + message
    if _active["bars"]:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class _Bar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __enter__(self) -> Any:
        _active["bars"] += 1
        return self.bar

    def __exit__(self, *exc: object) -> None:
        _active["bars"] -= 1
        self.bar.close()


def bar(total: int, desc: str, unit: str = "it", level: int = 0) -> _Bar | None:
    """A tqdm bar on a terminal (``level`` 1 nests under the cells bar and disappears when done), else None."""
    if not (_active["enabled"] and interactive()) or _active["prefix"]:
        return None
    from tqdm.auto import tqdm

    return _Bar(tqdm(total=total, desc=desc, unit=unit, position=level, leave=level == 0, file=sys.stderr,
                     dynamic_ncols=True))


def track(items: Iterable[T], total: int, desc: str, enabled: bool = True, min_items: int = 8) -> Iterator[T]:
    """Iterate ``items`` with a nested bar on a terminal when there are at least ``min_items``."""
    handle = bar(total, desc, level=1) if enabled and total >= min_items else None
    if handle is None:
        yield from items
        return
    with handle as b:
        for item in items:
            yield item
            b.update(1)
