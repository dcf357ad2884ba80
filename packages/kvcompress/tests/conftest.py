"""Shared fixtures: tiny random-init models of real architectures, built from configs (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch
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


def greedy_logits(model, ids: torch.Tensor, cache, steps: int = 32, attention_mask=None) -> torch.Tensor:
    """Prefill ``ids`` then ``steps`` greedy decode steps; the logits of every step, ``[steps+1, B, V]``."""
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
            out = model(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)
