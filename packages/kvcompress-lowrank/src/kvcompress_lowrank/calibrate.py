"""Calibration: the mean and PCA basis of each layer's keys before RoPE and values, per kv head.

The model reads windows of calibration text through a cache that only accumulates moments (float64): per
layer and kv head the sum and the sum of outer products of the keys before RoPE (the model's keys with its
own rotation undone), of the keys after RoPE and of the values; and the same jointly over a layer's kv heads
(for the analysis only). The first ``skip`` tokens of every window are left out: the store keeps the first
tokens exact (``sink``), and the attention-sink token's outlier key would otherwise dominate the covariance.

The file written (safetensors, with the model's metadata) holds per kind ``<kind>.mean`` ``[L, H, D]``,
``<kind>.basis`` ``[L, H, D, D]`` (column ``i`` the ``i``-th principal direction) and
``<kind>.eigenvalues`` ``[L, H, D]`` (descending) for ``keys`` and ``values``; the eigenvalues only for
``keys_rope`` and for the joint analyses ``joint.<kind>.eigenvalues`` ``[L, H*D]``. Beside it,
``<name>.curves.json`` holds the explained-variance curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import kvcompress
from kvcompress import rope as kvrope

from .meta import FORMAT, model_metadata

KINDS = ("keys", "keys_rope", "values")


@dataclass
class Moments:
    """Running float64 moments of one kind of vector, per (layer, kv head) and jointly per layer."""

    layers: int
    heads: int
    dim: int
    count: int = 0
    sums: torch.Tensor = field(init=False)
    outer: torch.Tensor = field(init=False)
    joint: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        n, h, d = self.layers, self.heads, self.dim
        self.sums = torch.zeros(n, h, d, dtype=torch.float64)
        self.outer = torch.zeros(n, h, d, d, dtype=torch.float64)
        self.joint = torch.zeros(n, h * d, h * d, dtype=torch.float64)
        self.counts = [0] * n

    def add(self, layer: int, x: torch.Tensor) -> None:
        """Add ``x`` ``[B, H, q, D]``."""
        x = x.detach().to("cpu", torch.float64)
        b, h, q, d = x.shape
        self.sums[layer] += x.sum(dim=(0, 2))
        self.outer[layer] += torch.einsum("bhqd,bhqe->hde", x, x)
        flat = x.permute(0, 2, 1, 3).reshape(b * q, h * d)
        self.joint[layer] += flat.T @ flat
        self.counts[layer] += b * q

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean [L,H,D], basis [L,H,D,D], eigenvalues [L,H,D], joint eigenvalues [L,H*D])``, float32,
        eigenvalues descending and each basis column signed so its largest entry is positive."""
        n = torch.tensor(self.counts, dtype=torch.float64).clamp(min=1)
        mean = self.sums / n.view(-1, 1, 1)
        cov = self.outer / n.view(-1, 1, 1, 1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(-1).clamp(min=0), vectors.flip(-1)
        pivot = vectors.abs().argmax(dim=-2, keepdim=True)
        vectors = vectors * torch.gather(vectors, -2, pivot).sign()
        jmean = mean.reshape(self.layers, -1)
        jcov = self.joint / n.view(-1, 1, 1) - jmean.unsqueeze(-1) * jmean.unsqueeze(-2)
        jvalues = torch.linalg.eigvalsh(jcov).flip(-1).clamp(min=0)
        return mean.float(), vectors.float(), values.float(), jvalues.float()


class _MomentCache(DynamicCache):
    """A ``DynamicCache`` that adds each layer's new keys (before and after RoPE) and values to moments."""

    def __init__(self, moments: dict[str, Moments], rope: Any, skip: int) -> None:
        super().__init__()
        self.moments, self.rope, self.skip = moments, rope, skip

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
        q = key_states.shape[2]
        first = max(self.skip - start, 0)
        if first < q:
            keys = key_states[:, :, first:].float()
            raw = keys
            if self.rope is not None:
                cos, sin = self.rope(torch.arange(start + first, start + q, device=keys.device))
                raw = kvrope.unrotate(keys, cos.to(keys.device), sin.to(keys.device))
            self.moments["keys"].add(layer_idx, raw)
            self.moments["keys_rope"].add(layer_idx, keys)
            self.moments["values"].add(layer_idx, value_states[:, :, first:])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def windows(ids: torch.Tensor, tokens: int, seq_len: int) -> list[torch.Tensor]:
    """``tokens // seq_len`` windows of ``seq_len`` tokens spread evenly over ``ids`` ``[N]``."""
    count = max(1, min(tokens // seq_len, ids.numel() // seq_len))
    if ids.numel() < seq_len:
        raise ValueError(
            f"--seq-len: {seq_len} tokens per window but the text has only {ids.numel()}; "
            "allowed: at most the text's length"
        )
    stride = (ids.numel() - seq_len) // max(count - 1, 1)
    return [ids[i * stride : i * stride + seq_len] for i in range(count)]


def collect(
    model: Any,
    ids: torch.Tensor,
    tokens: int = 16384,
    seq_len: int = 1024,
    skip: int = 4,
    progress: bool = True,
) -> dict[str, Moments]:
    """Run ``model`` over windows of ``ids`` and return the moments of keys (before/after RoPE) and values."""
    info = kvcompress.ModelInfo.from_model(model)
    layers, heads, dim = info.num_layers, info.num_kv_heads, info.head_dim
    moments = {kind: Moments(layers, heads, dim) for kind in KINDS}
    chunks = windows(ids, tokens, seq_len)
    device = next(model.parameters()).device
    bar = _progress(len(chunks), progress)
    with torch.no_grad():
        for chunk in chunks:
            cache = _MomentCache(moments, info.rope, skip)
            model(chunk.view(1, -1).to(device), past_key_values=cache, use_cache=True)
            bar.update(1)
    bar.close()
    return moments


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="window", disable=not enabled)


def calibrate(
    model: Any,
    tokenizer: Any,
    text: str,
    out: str | Path,
    tokens: int = 16384,
    seq_len: int = 1024,
    skip: int = 4,
    progress: bool = True,
    source: str = "",
) -> Path:
    """Calibrate ``model`` on ``text`` and write the file ``out`` (``.safetensors``) and its curves beside
    it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: {str(out)!r} must end in .safetensors (pickle files are not written)")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    t0, c0 = time.perf_counter(), time.process_time()
    moments = collect(model, ids, tokens, seq_len, skip, progress)
    tensors: dict[str, torch.Tensor] = {}
    for kind, m in moments.items():
        mean, basis, eig, joint = m.pca()
        tensors[f"{kind}.eigenvalues"] = eig
        tensors[f"joint.{kind}.eigenvalues"] = joint
        if kind != "keys_rope":
            tensors[f"{kind}.mean"] = mean
            tensors[f"{kind}.basis"] = basis
    used = moments["keys"].counts[0]
    meta = {
        **model_metadata(model),
        "format": FORMAT,
        "tokens": str(used),
        "seq_len": str(seq_len),
        "skip": str(skip),
        "source": source,
        "wall_s": f"{time.perf_counter() - t0:.1f}",
        "cpu_s": f"{time.process_time() - c0:.1f}",
        "created": time.strftime("%Y-%m-%d"),
    }
    kvcompress.save_weights(out, tensors, meta)
    curves = {kind: _rounded(explained(tensors[f"{kind}.eigenvalues"])) for kind in KINDS}
    curves.update(
        {f"joint.{kind}": _rounded(explained(tensors[f"joint.{kind}.eigenvalues"])) for kind in KINDS}
    )
    curves_path(out).write_text(json.dumps({"metadata": meta, "explained_variance": curves}) + "\n")
    return out


def _rounded(curve: torch.Tensor) -> list:
    return (curve.double() * 1e5).round().div(1e5).tolist()


def explained(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Explained-variance curve: entry ``r - 1`` is the share of variance in the first ``r`` directions."""
    total = eigenvalues.sum(-1, keepdim=True).clamp(min=1e-30)
    return eigenvalues.cumsum(-1) / total


def curves_path(path: str | Path) -> Path:
    """Where the explained-variance curves of calibration file ``path`` are written:
    ``<stem>.curves.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".curves.json")
