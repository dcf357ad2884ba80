"""``fidelity``: next-token KL and per-layer attention-distribution distances against the full cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..metrics import distribution_distances, next_token_kl
from ..task import TaskContext
from .common import kv_bytes, mean

if TYPE_CHECKING:
    import torch


def _dense(weights: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter weights [B, Hq, S_kept] over key positions [B, Hkv, S_kept] into [B, Hq, size]."""
    import torch

    b, hq, _ = weights.shape
    group = hq // positions.shape[1]
    pos = positions.repeat_interleave(group, dim=1).long()
    valid = (pos >= 0) & (pos < size)
    out = torch.zeros(b, hq, size, dtype=torch.float32)
    out.scatter_add_(-1, pos.clamp(0, size - 1), torch.where(valid, weights, torch.zeros_like(weights)))
    return out


def _teacher_forced(ctx: TaskContext, ids: torch.Tensor, spec: str, steps: int) -> tuple[list, list, int]:
    """Per-step last logits and attention (layer -> [B, Hq, S_seen]) while feeding the last ``steps`` tokens."""
    import kvcompress

    from ..decoding import forward, prefill

    cache = ctx.make_cache(spec)
    prefill(ctx.model, ids[:, :-steps], cache, chunk=ctx.chunk)
    logits, attention = [], []
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        with kvcompress.capture_attention() as records:
            logits.append(forward(ctx.model, ids[:, t:t + 1], cache, last_only=True)[:, -1].cpu())
        layers = {}
        for rec in records:
            weights = rec.weights[:, :, -1].float().cpu()
            layers[rec.layer_idx] = _dense(weights, rec.positions.cpu(), t + 1)
        attention.append(layers)
    return logits, attention, kv_bytes(cache)


class FidelityTask:
    """Teacher-forced decoding of the same text with the policy and with full: how far the model moves."""

    name = "fidelity"
    primary = "next_token_kl"
    higher_is_better = False
    default_lengths = (512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"steps": 16}
    limits: ClassVar[dict[str, tuple]] = {"steps": (1, None)}
    labels: ClassVar[dict[str, str]] = {"next_token_kl": "next-token KL from full (nats, lower is better)"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """KL(full || policy) of next-token distributions and attention distances for the last ``steps``."""
        import torch

        steps = int(ctx.params["steps"])
        ids = ctx.tokens(ctx.length)
        ref_logits, ref_attn, _ = ctx.remember(("fidelity", ctx.length, steps, ctx.chunk),
                                               lambda: _teacher_forced(ctx, ids, "full", steps))
        logits, attn, kv = _teacher_forced(ctx, ids, ctx.spec, steps)
        kl = next_token_kl(torch.cat(ref_logits), torch.cat(logits))
        agree = (torch.cat(ref_logits).argmax(-1) == torch.cat(logits).argmax(-1)).float()
        per_layer: dict[str, dict[str, float]] = {}
        for layer in sorted(ref_attn[0]):
            if layer not in attn[0]:
                continue
            dists = [distribution_distances(r[layer], c[layer]) for r, c in zip(ref_attn, attn)]
            per_layer[str(layer)] = {k: mean([d[k] for d in dists]) for k in dists[0]}
        summary = {f"attention_{k}": mean([v[k] for v in per_layer.values()])
                   for k in ("kl", "cosine", "l1", "l2", "peak_shift")} if per_layer else {}
        return {"next_token_kl": float(kl.mean()), "next_token_kl_max": float(kl.max()),
                "top1_agreement": float(agree.mean()), "steps": steps, **summary,
                "attention_by_layer": per_layer, "kv_bytes": kv}
