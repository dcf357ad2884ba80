"""Running a model over text to collect what the scorer learns from: each layer's attention input (the
feature) and, from that layer's attention weights, the labels of every token.

The model's attention goes, for the collection only, through an attention function of this module's own
(registered under its own name, set on this model and restored afterwards): sdpa for the output, plus the
softmax weights of chunks of queries, which are folded into label sums at once (an n x n matrix per head is
never held). The attention inputs are captured by forward pre-hooks on the attention modules.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .labels import LabelSums, counts

NAME = "kvcompress-learned-labels"
QUERY_CHUNK = 256
_active = threading.local()


@dataclass
class Collected:
    """Features and labels of ``T`` tokens (the sequences one after another)."""

    features: torch.Tensor  # [layers, T, hidden] float16: attention-layer inputs
    labels: dict[str, torch.Tensor]  # name -> [layers, H_kv, T] (h2o) or [layers, H_kv, T, bins] (future)
    counts: dict[str, torch.Tensor]  # name -> [T] or [T, bins]: queries each label sums over
    position: torch.Tensor  # [T] position of the token in its sequence
    sequences: int = 0
    spec: dict[str, tuple[str, int, bool]] = field(default_factory=dict)  # name -> (label, horizon, relative)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    sums: dict[str, LabelSums] | None = getattr(_active, "by_layer", {}).get(module.layer_idx)
    if sums is None:
        return out
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, hq, n, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    with torch.no_grad():
        for start in range(0, n, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, n)
            c = stop - start
            qc = query[:, :, start:stop].reshape(b, hkv, g * c, d).float()
            scores = (qc @ key.float().transpose(-1, -2) * scaling).view(b, hkv, g, c, s)
            i = torch.arange(start, stop, device=key.device).view(c, 1) + (s - n)
            scores = scores.masked_fill(torch.arange(s, device=key.device).view(1, s) > i, float("-inf"))
            weights = scores.softmax(-1)
            for label in sums.values():
                label.add(weights, start + (s - n))
    return out


@contextlib.contextmanager
def _labelling(model: Any, spec: dict[str, tuple[str, int, bool]], hidden: dict[int, torch.Tensor]
               ) -> Iterator[dict[int, dict[str, LabelSums]]]:
    """The model's attention through :func:`_attention` and its attention inputs captured, meanwhile."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from kvcompress.model import attention_modules

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"model: {type(model).__name__} has no attention modules with a layer_idx")

    def grab(module, args, kwargs):
        hidden[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    original = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    by_layer = {m.layer_idx: {} for m in modules}
    _active.by_layer = by_layer
    try:
        yield by_layer
    finally:
        _active.by_layer = {}
        model.set_attn_implementation(original)
        for h in handles:
            h.remove()


def collect(model: Any, ids: torch.Tensor, seq_len: int, spec: dict[str, tuple[str, int, bool]],
            progress: bool = True) -> Collected:
    """Features and labels of the token ids ``ids`` ``[T]``, fed in sequences of ``seq_len`` tokens
    (each sequence from an empty context). ``spec``: label name -> ``(label, horizon, relative)``."""
    from tqdm.auto import tqdm

    pieces = [ids[s:s + seq_len] for s in range(0, ids.numel(), seq_len)]
    pieces = [p for p in pieces if p.numel() >= 2]
    feats, labels, cnts, pos = [], {k: [] for k in spec}, {k: [] for k in spec}, []
    hidden: dict[int, torch.Tensor] = {}
    device = next(model.parameters()).device
    with _labelling(model, spec, hidden) as by_layer, torch.no_grad():
        for piece in tqdm(pieces, desc="collect", unit="seq", disable=not progress):
            for sums in by_layer.values():
                sums.clear()
                sums.update({k: LabelSums(*v) for k, v in spec.items()})
            model(input_ids=piece.view(1, -1).to(device), use_cache=False)
            layers = sorted(by_layer)
            feats.append(torch.stack([hidden[i][0].to("cpu", torch.float16) for i in layers]))
            n = piece.numel()
            for k, (label, horizon, _) in spec.items():
                labels[k].append(torch.stack([by_layer[i][k].result()[0].cpu() for i in layers]))
                cnts[k].append(counts(label, horizon, n))
            pos.append(torch.arange(n))
    return Collected(features=torch.cat(feats, 1), labels={k: torch.cat(v, 2) for k, v in labels.items()},
                     counts={k: torch.cat(v) for k, v in cnts.items()}, position=torch.cat(pos),
                     sequences=len(pieces), spec=dict(spec))
