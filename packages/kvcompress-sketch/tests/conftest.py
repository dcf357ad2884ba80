"""Tiny random-init models built from configs (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from kvcompress.testing import VOCAB, random_ids, tiny_model  # noqa: F401 (tests import them from here)

warnings.filterwarnings("ignore", category=FutureWarning)



@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_model("qwen2", heads=6, kv_heads=2)


prompt = random_ids  # [batch, n] seeded ids: prompt(n, seed=0, batch=1)


def greedy_logits(model, ids: torch.Tensor, cache, steps: int = 8, attention_mask=None) -> torch.Tensor:
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
