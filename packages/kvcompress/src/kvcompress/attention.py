"""The attention function kvcompress registers with transformers' ``AttentionInterface``.

It wraps sdpa. For a call whose keys come from a :class:`CompressedLayer` it
also (1) hands the active policy the attention weights when the policy asks
for them, computed in the same pass for a decode step and in chunks of queries
for a prompt (never a full n x n matrix per head at once), (2) tells the layer
which new tokens are padding, and (3) lets the layer evict once attention is
done. Calls from any other cache pass straight through to sdpa.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import kernels
from .layer import CompressedLayer, current
from .store import DenseStore

NAME = "kvcompress"
QUERY_CHUNK = 256  # queries per chunk when a prompt's attention weights are observed

_capture = threading.local()


@dataclass
class AttentionRecord:
    """One attention call seen under :func:`capture_attention`."""

    layer_idx: int
    weights: torch.Tensor  # [B, H_q, q, S] float32
    positions: torch.Tensor  # [B, H_kv, S] absolute token positions of the keys


@contextlib.contextmanager
def capture_attention() -> Iterator[list[AttentionRecord]]:
    """Record the attention distribution of every call through kvcompress (for fidelity metrics)."""
    records: list[AttentionRecord] = []
    previous = getattr(_capture, "records", None)
    _capture.records = records
    try:
        yield records
    finally:
        _capture.records = previous


def _mask_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An additive float mask from a bool (True = attend) or additive mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))


def _new_valid(mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """Which of the ``q`` new tokens are real (not padding): the last query row sees them all."""
    if mask is None or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -q:]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
             start: int, stop: int) -> torch.Tensor:
    """Softmax attention weights ``[B, H_kv, G, stop-start, S]`` of queries ``start:stop``.

    The G query heads of a kv head are stacked as rows of one matmul against that head's keys,
    so K is read once, never expanded G times.
    """
    b, hq, q_total, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g, c = hq // hkv, stop - start
    qc = query[:, :, start:stop].reshape(b, hkv, g * c, d)
    scores = (torch.matmul(qc, key.transpose(-1, -2)).float() * scaling).view(b, hkv, g, c, s)
    if mask is not None:
        scores = scores + _mask_bias(mask[:, :, start:stop]).unsqueeze(1)
    elif q_total > 1:  # sdpa's implicit causal mask, bottom-right aligned
        qpos = torch.arange(start, stop, device=key.device).view(-1, 1) + (s - q_total)
        scores = scores.masked_fill(torch.arange(s, device=key.device).view(1, -1) > qpos, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


_IGNORED: dict = {}


def _ignored(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d tensor for ``baddbmm``'s ``input`` when ``beta=0`` (never read)."""
    key = (like.device, like.dtype)
    if key not in _IGNORED:
        _IGNORED[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return _IGNORED[key]


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head ``[B, Hq, 1, D]`` against ``key``/``value`` ``[B, H_kv, S, D]`` (``mask``: the
    model's 4-D mask over those S slots, or None): the output ``[B, 1, Hq, D]`` and the attention weights
    ``[B, H_kv, G, 1, S]``, in one pass over K and V. Also for a store's own ``attend``.

    Few kernels on purpose (a decode step is bound by the host's launches): the scaled scores in one
    batched matmul, the softmax in float32 written in the model's dtype (as eager attention casts it),
    then the output in a second matmul. The G query heads of a kv head are rows of one matmul.
    """
    b, hq, _, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    q3 = query.reshape(b * hkv, g, d)
    k3 = key.reshape(b * hkv, s, d)
    scores = torch.baddbmm(_ignored(q3).expand(b * hkv, g, s), q3, k3.transpose(1, 2), beta=0.0, alpha=scaling)
    if mask is not None:
        bias = _mask_bias(mask[:, :, -1:]).to(scores.dtype)  # [B, 1, 1, S]
        scores = (scores.view(b, hkv, g, s) + bias).view(b * hkv, g, s)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.nan_to_num(0.0)
    out = torch.bmm(weights, value.reshape(b * hkv, s, d))
    return out.view(b, 1, hq, d), weights.view(b, hkv, g, 1, s)


def _fused_decode(layer: CompressedLayer, query, mask, scaling) -> torch.Tensor | None:
    """The decode step's attention and the policy's observation in one kernel, where both allow it."""
    if not (kernels.ENABLED and kernels.AVAILABLE and query.device.type == "cuda"
            and isinstance(layer.store, DenseStore)):
        return None
    accumulated = layer.selection.accumulated_attention()
    if accumulated is None:
        return None
    buf = layer.store.buf.tensors
    return kernels.observed_decode(query, buf["keys"], buf["values"], layer.store.length, mask, scaling,
                                   layer.slots.tensors[accumulated[0]], accumulated[1])


def _record(layer_idx: int, weights: torch.Tensor, positions: torch.Tensor) -> None:
    b, hkv, g, q, s = weights.shape
    _capture.records.append(AttentionRecord(layer_idx, weights.reshape(b, hkv * g, q, s).float(), positions))


def kvcompress_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, plus observation, padding tracking and eviction for kvcompress layers."""
    layer: CompressedLayer | None = getattr(current, "layer", None)
    capturing = getattr(_capture, "records", None) is not None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None or key is not layer.returned_keys:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, **kwargs)
        if capturing and key.shape[1] <= query.shape[1]:
            b, hkv, s = key.shape[0], key.shape[1], key.shape[2]
            pos = torch.arange(s, device=key.device).view(1, 1, s).expand(b, hkv, s)
            _record(getattr(module, "layer_idx", -1), _weights(query, key, attention_mask, scaling, 0,
                                                               query.shape[2]), pos)
        return out
    current.layer = None
    layer.returned_keys = None  # don't pin a decoded copy (a quantized store's) past this call
    q = query.shape[2]
    observe = layer.selection.needs_attention
    out = layer.store.attend(query, attention_mask, scaling)
    if out is not None and not (observe or capturing):
        layer.finish_attention(_new_valid(attention_mask, q))
        return out, None
    if not layer.dense_returned:  # update() handed out stand-ins: decode for real
        key, value = layer.store.keys_values()
    if not (observe or capturing):
        if out is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
        layer.finish_attention(_new_valid(attention_mask, q))
        return out, None
    if q == 1 and out is None and observe and not capturing:
        out = _fused_decode(layer, query, attention_mask, scaling)
        if out is not None:
            layer.finish_attention(_new_valid(attention_mask, q))
            return out, None
    if q == 1 and out is None:
        out, weights = decode_attention(query, key, value, attention_mask, scaling)
        chunks = [(0, 1, weights)]
    else:
        if out is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
        chunks = ((i, min(i + QUERY_CHUNK, q), None) for i in range(0, q, QUERY_CHUNK))
    table = layer.slots.tensors["positions"]  # the new tokens' slots: [n - q, n)
    first = layer.slots.length - q
    ctx = layer.context() if observe else None
    for start, stop, weights in chunks:
        if weights is None:
            weights = _weights(query, key, attention_mask, scaling, start, stop)
        if observe:
            layer.selection.observe(ctx, weights, table[0, 0, first + start : first + stop])
        if capturing:
            _record(layer.layer_idx, weights, layer.slots.view("positions").clone())
    layer.finish_attention(_new_valid(attention_mask, q))
    return out, None


def register() -> None:
    """Register ``"kvcompress"`` with transformers and route ``"sdpa"`` through it.

    Wrapping ``sdpa`` makes a kvcompress cache work with a model loaded the
    default way; calls from any other cache pass straight through to sdpa.
    """
    AttentionInterface.register(NAME, kvcompress_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register("sdpa", kvcompress_attention)
