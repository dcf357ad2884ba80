"""Weights and calibration files a policy loads at setup: safetensors only, with a metadata header.

Pickle-based files (``.pt``, ``.bin``, ``.pkl``) are refused: loading one can run arbitrary code. The
metadata header (string keys and values) records what the file was made for (architecture, dims, how it
was trained); :func:`load_weights` checks it against what the caller expects and names the mismatch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _check_safetensors(path: Path, what: str) -> None:
    if path.suffix in _PICKLE_SUFFIXES:
        raise WeightsError(f"{what}: {str(path)!r} is a pickle file ({path.suffix}); allowed: .safetensors files "
                           "only (pickle can run code when loaded)")
    try:
        with path.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            head = f.read(min(size, 1 << 26))
        json.loads(head)
    except (OSError, struct.error, ValueError) as exc:
        raise WeightsError(f"{what}: {str(path)!r} is not a safetensors file ({type(exc).__name__}); allowed: "
                           ".safetensors files only (pickle files are refused)") from None


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with the string ``metadata`` header to ``path`` (``.safetensors``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"save_weights: path {str(path)!r} must end in .safetensors")
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise WeightsError(f"save_weights: metadata values must be strings; got {bad!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_weights(path: str | Path, expect: dict[str, str] | None = None, device: str = "cpu",
                 what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``.

    ``expect`` maps metadata keys to the values this model needs (e.g. ``{"architecture":
    "LlamaForCausalLM", "num_layers": "30"}``); a file made for another model raises :class:`WeightsError`
    naming each key, the file's value and the model's. ``what`` names the parameter in errors.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: file {str(path)!r} does not exist")
    _check_safetensors(path, what)
    with safe_open(str(path), framework="pt", device=device) as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    wrong = {k: (metadata.get(k), v) for k, v in (expect or {}).items() if metadata.get(k) != str(v)}
    if wrong:
        detail = ", ".join(f"{k}: file has {got!r}, model has {want!r}" for k, (got, want) in wrong.items())
        raise WeightsError(f"{what}: {str(path)!r} was made for another model ({detail})")
    return tensors, metadata
