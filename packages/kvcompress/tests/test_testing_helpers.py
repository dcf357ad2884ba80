"""kvcompress.testing: the tiny models plugin tests build on are seeded, shaped as asked, and refuse unknown
architectures."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import random_ids, tiny_model


def test_tiny_model_is_seeded_and_shaped_as_asked():
    a, b = tiny_model("qwen2", heads=6, kv_heads=2, layers=3), tiny_model("qwen2", heads=6, kv_heads=2, layers=3)
    assert a.config.num_hidden_layers == 3 and a.config.num_key_value_heads == 2
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(tiny_model(seed=1).parameters()), next(tiny_model(seed=0).parameters()))
    ids = random_ids(12, seed=3, batch=2)
    assert ids.shape == (2, 12) and int(ids.min()) >= 2 and torch.equal(ids, random_ids(12, seed=3, batch=2))
    assert a(ids).logits.shape == (2, 12, a.config.vocab_size)


def test_tiny_model_refuses_an_unknown_architecture():
    with pytest.raises(ValueError, match="parameter 'arch' is 'gpt9'; allowed: llama, qwen2"):
        tiny_model("gpt9")
