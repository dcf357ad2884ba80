"""Shared fixtures: tiny random-init models of real architectures, built from configs (no download)."""

from __future__ import annotations

import functools
import warnings

import pytest
import transformers

from kvcompress import testing

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

ARCHITECTURES = testing.ARCHITECTURES


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random-init model of ``arch`` with a few layers, in eval mode, float32 (:func:`kvcompress.testing.tiny_model`
    with vocabulary 96 and positions up to 256)."""
    return testing.tiny_model(arch, seed=seed, vocab=96, **{"max_position_embeddings": 256, **overrides}) \
        if arch != "gpt2" else testing.tiny_model(arch, seed=seed, vocab=96, **{"n_positions": 256, **overrides})


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


greedy_logits = functools.partial(testing.greedy_logits, steps=32)  # prefill + greedy steps' logits
