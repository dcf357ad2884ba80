"""Text the tasks run on: WikiText-2 through ``datasets``, a local file, or the shipped excerpt."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import DataError
from .paths import package_data

EXCERPT = "wikitext2_test_excerpt.txt"
SOURCES = ("auto", "wikitext", "excerpt")
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Text:
    """A text and a description of where it came from (recorded in every result)."""

    text: str
    source: str
    note: str = ""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """True when the user told Hugging Face libraries to stay offline."""
    return any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub endpoint (DNS included), so offline runs fail fast."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def normalise(text: str) -> str:
    """CRLF/CR to LF, so files and ``datasets`` rows tokenise the same."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_file(path: str | os.PathLike) -> Text:
    """A local UTF-8 text file (``--data-file``)."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
        text = normalise(raw.decode("utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"--data-file: {str(p)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--data-file: cannot read {str(p)!r} as UTF-8 text: {exc}") from exc
    if not text.strip():
        raise DataError(f"--data-file: {str(p)!r} is empty")
    return Text(text, f"file:{p.resolve()}")


def excerpt() -> Text:
    """The WikiText-2 test excerpt shipped with the harness (CC BY-SA 3.0, see data/README.md)."""
    return Text(package_data(EXCERPT).read_text(encoding="utf-8"), "wikitext-2-raw-v1:test (shipped excerpt)")


def wikitext() -> Text:
    """WikiText-2 raw test split through ``datasets`` (raises DataError when it cannot be reached)."""
    if offline():
        raise DataError("WikiText-2 through datasets: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise DataError("WikiText-2 through datasets: the hub is unreachable")
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as exc:
        raise DataError(f"WikiText-2 through datasets failed: {type(exc).__name__}: {exc}") from exc
    joiner = "" if all(r.endswith("\n") or not r for r in rows[:50]) else "\n"
    return Text(normalise(joiner.join(rows)), "wikitext-2-raw-v1:test (datasets)")


def load_text(source: str = "auto", data_file: str | None = None) -> Text:
    """The run's text: ``data_file`` if given, else WikiText-2 (``auto`` falls back to the excerpt)."""
    if data_file is not None:
        return read_file(data_file)
    if source not in SOURCES:
        raise DataError(f"--data: got {source!r}; allowed: {', '.join(SOURCES)}")
    if source == "excerpt":
        return excerpt()
    if source == "wikitext":
        return wikitext()
    try:
        return wikitext()
    except DataError as exc:
        shipped = excerpt()
        return Text(shipped.text, shipped.source, note=f"fell back to the shipped excerpt: {exc}")


def describe(text: Text) -> str:
    """Where the run's text comes from, in words (printed when a run starts)."""
    if text.source.endswith("(shipped excerpt)"):
        why = text.note.split(": ", 1)[-1] if text.note else "asked for with --data excerpt"
        return (f"the WikiText-2 test excerpt shipped with the harness ({len(text.text) // 1000} KB; {why}); "
                "pass --data-file PATH for the whole text")
    return text.source


def shared_wikitext(repo_root: str | os.PathLike) -> Path:
    """``<repo root>/../shared/data/wikitext-2-raw/wiki.test.raw`` (tests and benchmarks use it)."""
    return Path(repo_root).resolve().parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
