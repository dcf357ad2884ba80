"""Tiny random-init models built from configs (no downloads), and scorer weights files made for them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from kvcompress.testing import VOCAB, random_ids, tiny_model  # noqa: F401 (tests import them from here)

warnings.filterwarnings("ignore", category=FutureWarning)

WIKITEXT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_model("qwen2", heads=6, kv_heads=2)


prompt = random_ids  # [batch, n] seeded ids: prompt(n, seed=0, batch=1)


def weights_file(path: Path, model, units: int = 8, seed: int = 0, **meta: str) -> Path:
    """A scorer file with random values made for ``model`` (metadata overridable)."""
    import kvcompress
    from kvcompress_learned.files import model_dims
    from kvcompress_learned.scorer import FORMAT, random_tensors

    info = kvcompress.ModelInfo.from_model(model)
    tensors = random_tensors(info.num_layers, info.hidden_size, info.num_kv_heads, units, seed)
    metadata = {"format": FORMAT, **model_dims(info), "label": "random", "units": str(units), **meta}
    return kvcompress.save_weights(path, tensors, metadata)
