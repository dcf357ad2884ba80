"""Attaching a model: routing its attention through kvcompress."""

from __future__ import annotations

from typing import Any

from .attention import NAME

_PASS_THROUGH = ("sdpa", NAME)


def attach(model: Any) -> Any:
    """Route ``model``'s attention through kvcompress; return the model.

    Models loaded with the default ``sdpa`` attention already are (kvcompress
    wraps sdpa); one loaded with ``eager`` is switched. A model whose layers do
    not use transformers' Cache API and attention interface raises ``ValueError``.
    """
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"model: a {cls} is not a transformers PreTrainedModel; allowed: decoder-only transformers "
            "models that use the Cache API (Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-2...)"
        )
    if getattr(model, "_is_stateful", False) or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"model: {cls} does not use transformers' Cache API with a pluggable attention function "
            "(_supports_attention_backend is False); allowed: models such as Llama, Qwen2/3, Mistral, "
            "Gemma, Phi-3, GPT-2"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _PASS_THROUGH:
        model.set_attn_implementation(NAME)
    return model
