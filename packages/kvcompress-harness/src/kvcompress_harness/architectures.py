"""Named model architectures for ``--model random:NAME``: random-init models for speed and memory.

The configs are the published ones (hidden size, layers, heads, kv heads, vocab, RoPE), so a random-init
model has the real shapes, bytes and kernels; its weights are noise, so it measures speed and memory only,
never quality. ``random:NAME?layers=N`` cuts the layer count (e.g. ``random:llama-3-8b?layers=2`` on a CPU).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from .errors import ModelLoadError

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                   "sliding_window": None, "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
}
OPTIONS = {"layers": "num_hidden_layers"}


def parse_random(spec: str) -> tuple[str, dict[str, int]]:
    """``random:NAME?layers=N`` -> (NAME, {"layers": N}); a clear error for anything else."""
    body = spec[len("random:"):]
    name, _, query = body.partition("?")
    if name not in ARCHITECTURES:
        raise ModelLoadError(f"--model {spec!r}: unknown architecture {name!r}; allowed: "
                             f"{', '.join(f'random:{n}' for n in ARCHITECTURES)}")
    options: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in OPTIONS:
            raise ModelLoadError(f"--model {spec!r}: unknown option {key!r}; allowed: {', '.join(OPTIONS)}")
        if not value.isdigit() or int(value) < 1:
            raise ModelLoadError(f"--model {spec!r}: {key}={value!r}; allowed: an integer >= 1")
        options[key] = int(value)
    if query and not options:
        raise ModelLoadError(f"--model {spec!r}: cannot read options {query!r}; allowed: ?layers=N")
    return name, options


def random_config(spec: str) -> Any:
    """The transformers config of ``random:NAME?layers=N`` (sdpa attention)."""
    from transformers import AutoConfig

    name, options = parse_random(spec)
    values = dict(ARCHITECTURES[name])
    for key, value in options.items():
        values[OPTIONS[key]] = value
    model_type = values.pop("model_type")
    rope_theta = values.pop("rope_theta")
    config = AutoConfig.for_model(model_type, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                                  **values)
    config._attn_implementation = "sdpa"
    return config
