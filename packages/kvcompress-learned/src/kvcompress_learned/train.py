"""Training a model's scorer: collect attention inputs and labels on the first half of a text, fit, save.

The recipe, with its defaults, is what ``kvcompress-learned train`` runs:

1. the first half of the text file (by article), tokenised, its first ``tokens`` tokens fed in sequences of
   ``seq_len`` (each from an empty context) through the model, collecting each layer's attention input and,
   from its attention weights, the label (and the distance-binned future attention, for the age curve);
2. the scorer fitted to the log label (the last eighth of the sequences held out for its validation loss and
   rank correlation);
3. the age curve fitted to how the future attention fades with distance, in the units of the scores.

Every choice is written to the weights file's metadata, with the training text (file, half, sha256) and this
package's version.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .labels import LABELS

DEFAULTS = {"label": "h2o", "tokens": 16384, "seed": 0, "horizon": 1024, "units": 16, "epochs": 8,
            "seq_len": 2048}
EPS = {"future": 1e-3, "h2o": 1e-6}
HALF_PRECISION = ("w1", "w2")  # the big matrices are stored in float16: the file stays small


@dataclass
class Trained:
    """A written weights file and its metadata."""

    path: Path
    metadata: dict[str, str]
    also: Trained | None = None  # the file of train(also=...)


def targets(sums: torch.Tensor, counts: torch.Tensor, label: str, horizon: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log targets [L, H, T], usable [T])`` from label sums: ``future`` as the mean relative attention
    over a full horizon (tokens whose horizon the sequence cuts short are not used), ``h2o`` as H2O's
    accumulated attention itself."""
    if label == "h2o":
        return (sums + EPS["h2o"]).log(), counts >= 1
    total = counts.sum(-1)
    full = min(horizon, int(total.max()))
    return (sums.sum(-1) / total.clamp(min=1).float() + EPS["future"]).log(), total >= full


def binned_targets(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log mean relative attention per distance bin [L, H, T, bins], usable [T, bins])``."""
    return (sums / counts.clamp(min=1).float() + EPS["future"]).log(), counts >= 1


def collect_spec(labels: tuple[str, ...], horizon: int) -> dict[str, tuple[str, int, bool]]:
    """The label sums a training run collects: the binned future attention always (the age curve needs it)."""
    return {"future": ("future", horizon, True), **({"h2o": ("h2o", 0, False)} if "h2o" in labels else {})}


def fit_scorer(got: Any, label: str, horizon: int, units: int, epochs: int, seed: int, progress: bool = True
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, fit metadata)`` of a scorer and its age curve fitted to what :func:`collect` returned."""
    from .age import fit_age
    from .fit import fit, predict

    y, usable = targets(got.labels[label], got.counts[label], label, horizon)
    n = got.position.numel()
    sequence = (got.position == 0).cumsum(0) - 1
    held = sequence >= got.sequences - max(1, got.sequences // 8)  # the last eighth of sequences: validation
    if got.sequences == 1:
        held = torch.arange(n) >= n * 7 // 8
    index = torch.arange(n)
    result = fit(got.features, y, index[usable & ~held], index[usable & held], units=units, epochs=epochs,
                 seed=seed, progress=progress)
    tensors = {k: v.to(torch.float16) if k in HALF_PRECISION else v.float()
               for k, v in result.tensors.items()}
    z, bins_usable = binned_targets(got.labels["future"], got.counts["future"])
    train_tokens = index[~held]
    scores = predict(got.features, tensors, train_tokens)
    tensors["age"] = fit_age(scores, z[:, :, train_tokens], bins_usable[train_tokens], horizon)
    return tensors, {"val_loss": f"{result.val_loss:.5f}", "val_spearman": f"{result.val_spearman:.4f}"}


def train(model: Any, tokenizer: Any, data: str | Path, out: str | Path, label: str = DEFAULTS["label"],
          tokens: int = DEFAULTS["tokens"], seed: int = DEFAULTS["seed"], horizon: int = DEFAULTS["horizon"],
          units: int = DEFAULTS["units"], epochs: int = DEFAULTS["epochs"],
          seq_len: int = DEFAULTS["seq_len"], progress: bool = True,
          also: tuple[str, str | Path] | None = None) -> Trained:
    """Train ``model``'s scorer on the first half of the text file ``data`` (by article) and write it to
    ``out`` (``.safetensors``). Deterministic for a given ``seed`` on one machine and thread count.
    ``also=(label, path)``: fit a scorer for a second label from the same collected attention and write it
    to ``path`` too (to compare labels at the cost of one collection)."""
    import transformers

    import kvcompress

    from . import __version__
    from .collect import collect
    from .files import model_dims
    from .scorer import FORMAT
    from .text import half

    runs = [(label, out), *([also] if also else [])]
    for name, (which, path) in zip(("label", "also"), runs, strict=False):
        if which not in LABELS:
            raise ValueError(f"train: parameter {name!r} is {which!r}; allowed: {', '.join(LABELS)}")
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"train: parameter {'out' if name == 'label' else 'also'!r} is {str(path)!r}; "
                             "allowed: a path ending in .safetensors")
    for name, value, low in (("tokens", tokens, 16), ("horizon", horizon, 1), ("units", units, 0),
                             ("epochs", epochs, 1), ("seq_len", seq_len, 16)):
        if value < low:
            raise ValueError(f"train: parameter {name!r} is {value}; allowed: an integer >= {low}")
    torch.manual_seed(seed)
    text = half(data, "first")
    ids = tokenizer(text.text, add_special_tokens=False, return_tensors="pt").input_ids[0][:tokens]
    if ids.numel() < 16:
        raise ValueError(f"train: parameter 'data': the first half of {str(data)!r} has {ids.numel()} "
                         "tokens; "
                         "allowed: at least 16")
    got = collect(model.eval(), ids, seq_len, collect_spec(tuple(w for w, _ in runs), horizon),
                  progress=progress)
    info = kvcompress.ModelInfo.from_model(model)
    written = []
    for which, path in runs:
        tensors, fitted = fit_scorer(got, which, horizon, units, epochs, seed, progress)
        metadata = {
            "format": FORMAT, **model_dims(info), "model": str(info.name or ""),
            "features": "attention input",
            "label": which, "horizon": str(horizon), "relative": str(which == "future").lower(),
            "units": str(units), "epochs": str(epochs), "tokens": str(ids.numel()), "seq_len": str(seq_len),
            "seed": str(seed), "training_text": text.describe(), **fitted,
            "version": f"kvcompress-learned {__version__}",
            "trained_with": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                            f"python {platform.python_version()}",
        }
        written.append(Trained(kvcompress.save_weights(path, tensors, metadata), metadata))
    if also is not None:
        written[0].also = written[1]
    return written[0]
