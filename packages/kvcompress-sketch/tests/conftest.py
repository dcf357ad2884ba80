"""Tiny random-init models built from configs (no downloads)."""

from __future__ import annotations

import functools
import warnings

import pytest
from kvcompress import testing
from kvcompress.testing import VOCAB, random_ids, tiny_model  # noqa: F401 (tests import them from here)

warnings.filterwarnings("ignore", category=FutureWarning)



@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_model("qwen2", heads=6, kv_heads=2)


prompt = random_ids  # [batch, n] seeded ids: prompt(n, seed=0, batch=1)


greedy_logits = functools.partial(testing.greedy_logits, steps=8)  # prefill + greedy steps' logits
