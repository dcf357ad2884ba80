"""Where the harness keeps converted models and finds its data."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "KVCOMPRESS_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache dir of kvcompress (``$KVCOMPRESS_CACHE_DIR`` overrides it)."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("kvcompress"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_data(name: str) -> Path:
    """Path of a file shipped in ``kvcompress_harness/data``."""
    return Path(__file__).resolve().parent / "data" / name
