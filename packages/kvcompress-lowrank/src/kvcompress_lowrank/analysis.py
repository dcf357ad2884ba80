"""The explained-variance analysis of a calibration file (the numbers behind the choice of ranks)."""

from __future__ import annotations

from pathlib import Path

import torch

import kvcompress

from .calibrate import explained

_KINDS = (("keys", "keys before RoPE"), ("keys_rope", "keys after RoPE"), ("values", "values"))


def dims_for(curve: torch.Tensor, share: float) -> torch.Tensor:
    """Directions needed for ``share`` of the variance, per curve (last dim)."""
    return (curve < share - 1e-9).sum(-1) + 1


def report(path: str | Path, ranks: list[int]) -> str:
    """Markdown: explained variance at ``ranks`` (mean over layers and kv heads, and the worst layer), dims
    for 90/99%, per head and jointly over a layer's kv heads; then per layer at each rank."""
    tensors, meta = kvcompress.load_weights(path, what="analyze: file")
    lines = [
        f"Calibration `{Path(path).name}`: {meta.get('tokens')} tokens of {meta.get('source', '?')}, "
        f"{meta.get('num_layers')} layers x {meta.get('num_kv_heads')} kv heads x head_dim "
        f"{meta.get('head_dim')}.",
        "",
        "| kind | " + " | ".join(f"r={r}" for r in ranks) + " | dims 90% | dims 99% | joint dims 90% / 99% "
        "(of H*D) |",
        "|---|" + "---|" * (len(ranks) + 3),
    ]
    for kind, label in _KINDS:
        curve = explained(tensors[f"{kind}.eigenvalues"])  # [L, H, D]
        d = curve.shape[-1]
        cells = [
            f"{curve[..., min(r, d) - 1].mean():.3f} (min {curve[..., min(r, d) - 1].min():.3f})"
            for r in ranks
        ]
        joint = explained(tensors[f"joint.{kind}.eigenvalues"])
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {dims_for(curve, 0.9).float().mean():.1f} | "
            f"{dims_for(curve, 0.99).float().mean():.1f} | {dims_for(joint, 0.9).float().mean():.1f} / "
            f"{dims_for(joint, 0.99).float().mean():.1f} of {joint.shape[-1]} |"
        )
    lines += ["", "Per layer (mean over kv heads), explained variance at each rank:", ""]
    header = (
        "| layer | "
        + " | ".join(
            f"{lab.split()[0][0].upper()}{'r' if 'after' in lab else ''} r={r}"
            for _, lab in _KINDS
            for r in ranks
        )
        + " |"
    )
    lines += [header, "|---|" + "---|" * (len(ranks) * len(_KINDS))]
    curves = {kind: explained(tensors[f"{kind}.eigenvalues"]).mean(1) for kind, _ in _KINDS}
    for layer in range(curves["keys"].shape[0]):
        cells = [
            f"{curves[kind][layer, min(r, curves[kind].shape[-1]) - 1]:.2f}"
            for kind, _ in _KINDS
            for r in ranks
        ]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
