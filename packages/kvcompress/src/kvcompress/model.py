"""Attaching a model: its attention goes through kvcompress's attention function, and, for policies
that ask, its attention modules' inputs (hidden states, RoPE) are captured with forward pre-hooks.

Only the model given is touched: other models in the process keep transformers' own attention.
"""

from __future__ import annotations

import threading
from typing import Any

_inputs = threading.local()
_EMPTY: dict = {}
_ORIGINAL = "_kvc_original_attn_implementation"
_HOOKS = "_kvc_input_hooks"


def captured(layer_idx: int) -> dict:
    """What the attention module of layer ``layer_idx`` last received in this thread: ``"hidden"``
    ``[B, q, hidden]`` and ``"rope"`` ``(cos, sin)``, where hooks are installed; else empty."""
    by_layer = getattr(_inputs, "by_layer", None)
    return by_layer.get(layer_idx, _EMPTY) if by_layer is not None else _EMPTY


def _capture(module: Any, args: tuple, kwargs: dict) -> None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    entry = {"hidden": hidden}
    rope = kwargs.get("position_embeddings")
    if rope is not None:
        entry["rope"] = rope
    by_layer = getattr(_inputs, "by_layer", None)
    if by_layer is None:
        by_layer = _inputs.by_layer = {}
    by_layer[module.layer_idx] = entry


def attention_modules(model: Any) -> list:
    """The model's self-attention modules: those with a ``layer_idx`` whose class name ends in Attention."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def check_model(model: Any) -> None:
    """Raise ``ValueError`` if ``model`` cannot carry a kvcompress cache."""
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


def attach(model: Any, inputs: bool = False) -> Any:
    """Route ``model``'s attention through kvcompress (its attention implementation becomes
    ``"kvcompress"``, which is sdpa plus what kvcompress caches need); return the model.

    With ``inputs``, also capture what each attention module receives (hidden states, RoPE) for policies
    and stores that read them. ``make_cache(spec, model=model)`` calls this. A model whose layers do not use
    transformers' Cache API and attention interface raises ``ValueError``. :func:`detach` undoes it.
    """
    from .attention import NAME, register

    check_model(model)
    register()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != NAME:
        setattr(model, _ORIGINAL, impl)
        model.set_attn_implementation(NAME)
    if inputs and not getattr(model, _HOOKS, None):
        modules = attention_modules(model)
        if not modules:
            raise ValueError(f"model: {type(model).__name__} has no attention modules with a layer_idx; "
                             "policies that read hidden states cannot be used with it")
        handles = [m.register_forward_pre_hook(_capture, with_kwargs=True) for m in modules]
        setattr(model, _HOOKS, handles)
    return model


def detach(model: Any) -> Any:
    """Give ``model`` back its own attention implementation and remove kvcompress's hooks."""
    for handle in getattr(model, _HOOKS, None) or []:
        handle.remove()
    if hasattr(model, _HOOKS):
        delattr(model, _HOOKS)
    original = getattr(model, _ORIGINAL, None)
    if original is not None:
        model.set_attn_implementation(original)
        delattr(model, _ORIGINAL)
    return model
