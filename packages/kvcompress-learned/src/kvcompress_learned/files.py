"""Which scorer weights a cache uses: ``auto`` (those shipped for the model in use, found by architecture and
dimensions), a shipped name, a ``.safetensors`` path, or ``random`` (right shape, random values: for speed
measurements). Every file's metadata is checked against the model; pickle files are refused by
:func:`kvcompress.load_weights`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import kvcompress

SHIPPED = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "kvcompress-learned train --model M --data FILE --out weights.safetensors"
MODEL_KEYS = ("architecture", "num_layers", "hidden_size", "num_kv_heads", "head_dim")
RANDOM_UNITS = 16  # hidden units per head of weights='random' (the shipped scorers' shape)


def model_dims(model: Any) -> dict[str, str]:
    """What a weights file must have been made for: ``MODEL_KEYS`` of a :class:`kvcompress.ModelInfo`."""
    return {k: str(getattr(model, k)) for k in MODEL_KEYS}


def header(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, read from its JSON header alone."""
    with path.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return dict(json.loads(f.read(size)).get("__metadata__", {}) or {})


def shipped() -> dict[str, Path]:
    """Shipped weights by name (the file name without ``.safetensors``)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.safetensors"))}


def _describe(dims: dict[str, str]) -> str:
    return (f"{dims['architecture']} ({dims['num_layers']} layers, hidden size {dims['hidden_size']}, "
            f"{dims['num_kv_heads']} kv heads of dim {dims['head_dim']})")


def find_shipped(dims: dict[str, str]) -> Path:
    """The shipped file made for a model of these dims, or a :class:`kvcompress.WeightsError` naming the
    train command."""
    for path in shipped().values():
        meta = header(path)
        if all(meta.get(k) == v for k, v in dims.items()):
            return path
    names = ", ".join(shipped()) or "none"
    raise kvcompress.WeightsError(
        f"learned: parameter 'weights' is 'auto' but no shipped weights fit {_describe(dims)} "
        f"(shipped: {names}); "
        f"train them with `{TRAIN_COMMAND}` and pass learned(weights='weights.safetensors')")


def resolve(weights: str, model: Any, seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of the scorer weights ``weights`` for ``model`` (a ModelInfo)."""
    if model.config is None or model.num_layers is None or model.hidden_size is None:
        raise kvcompress.ModelRequiredError(
            "learned: the scorer is chosen for the model in use; make the cache with "
            "kvcompress.make_cache('learned', model=model)")
    dims = model_dims(model)
    if weights == "random":
        from .scorer import FORMAT, random_tensors

        tensors = random_tensors(model.num_layers, model.hidden_size, model.num_kv_heads, RANDOM_UNITS, seed)
        return tensors, {"format": FORMAT, **dims, "label": "random", "units": str(RANDOM_UNITS)}
    if weights == "auto":
        path = find_shipped(dims)
    elif weights in shipped():
        path = shipped()[weights]
    else:
        path = Path(weights).expanduser()
    tensors, meta = kvcompress.load_weights(path, expect=dims, what="learned: parameter 'weights'")
    from .scorer import FORMAT

    if meta.get("format") != FORMAT:
        raise kvcompress.WeightsError(
            f"learned: parameter 'weights': {str(path)!r} is not a learned scorer (metadata 'format' is "
            f"{meta.get('format')!r}; allowed: {FORMAT!r}, as `{TRAIN_COMMAND}` writes)")
    return tensors, meta
