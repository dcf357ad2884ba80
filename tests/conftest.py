"""Cross-package tests: fixtures every repo-level test shares.

The real model comes from one loader, the harness's (``kvcompress_harness.load_model``): tests that need
SmolLM2-135M-Instruct use the ``real_model`` fixture (or ``load_real_model()``), never a loader of their own.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def load_real_model():
    """The default model through the harness's loader, on CPU, loaded once per process."""
    from kvcompress_harness import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def real_model():
    """``LoadedModel`` of SmolLM2-135M-Instruct (``.model``, ``.tokenizer``, ``.generate(ids, cache=...)``)."""
    return load_real_model()


def shared_wikitext() -> Path | None:
    """``shared/data/wikitext-2-raw/wiki.test.raw`` beside the checkout (or one level further up)."""
    for base in (REPO.parent, REPO.parent.parent):
        path = base / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def wikitext_file() -> Path:
    """The WikiText-2 raw test file beside the checkout (skipped, saying where it was looked for, if absent)."""
    path = shared_wikitext()
    if path is None:
        pytest.skip(f"shared WikiText-2 file not found beside {REPO}")
    return path
