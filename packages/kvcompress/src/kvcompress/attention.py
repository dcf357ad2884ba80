"""The attention function kvcompress registers with transformers' ``AttentionInterface``.

It wraps sdpa and is set only on models given to :func:`kvcompress.attach` (or
``make_cache(..., model=model)``). For a call whose keys come from a
:class:`CompressedLayer` it also (1) adds the layer's per-slot attention bias,
(2) lets the store attend from its own form (a fused kernel), (3) hands the
active policy the attention weights when the policy asks for them, computed in
the same pass for a decode step and in chunks of queries for a prompt (never a
full n x n matrix per head at once), (4) tells the layer which new tokens are
padding, and (5) lets the layer evict once attention is done. Calls from any
other cache pass straight through to sdpa.
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

from . import _kernels, _prefill_kernels
from .layer import CompressedLayer, _captured_inputs, current

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
             start: int, stop: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention weights ``[B, H_kv, G, stop-start, S]`` of queries ``start:stop``.

    The G query heads of a kv head are stacked as rows of one matmul against that head's keys,
    so K is read once, never expanded G times. ``bias`` ``[B, H_kv, S]`` is added to every score.
    """
    b, hq, q_total, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g, c = hq // hkv, stop - start
    qc = query[:, :, start:stop].reshape(b, hkv, g * c, d)
    scores = (torch.matmul(qc, key.transpose(-1, -2)).float() * scaling).view(b, hkv, g, c, s)
    if bias is not None:
        scores = scores + bias[:, :, None, None, :]
    if mask is not None:
        bias_rows = _mask_bias(mask[:, :, start:stop])
        if mask.dtype != torch.bool:  # "-min" is masked: a padding query that sees nothing observes nothing
            bias_rows = bias_rows.masked_fill(bias_rows <= torch.finfo(bias_rows.dtype).min / 2, float("-inf"))
        scores = scores + bias_rows.unsqueeze(1)
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
                     scaling: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head ``[B, Hq, 1, D]`` against ``key``/``value`` ``[B, H_kv, S, D]`` (``mask``: the
    model's 4-D mask over those S slots, or None; ``bias``: a per-slot ``[B, H_kv, S]`` float32 term, or
    None): the output ``[B, 1, Hq, D]`` and the attention weights ``[B, H_kv, G, 1, S]``, in one pass over K
    and V. Also for a store's own ``attend``.

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
    if bias is not None:
        scores = scores + bias.reshape(b * hkv, 1, s).to(scores.dtype)
    if mask is not None:
        mb = _mask_bias(mask[:, :, -1:]).to(scores.dtype)  # [B, 1, 1, S]
        scores = (scores.view(b, hkv, g, s) + mb).view(b * hkv, g, s)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.nan_to_num(0.0)
    out = torch.bmm(weights, value.reshape(b * hkv, s, d))
    return out.view(b, 1, hq, d), weights.view(b, hkv, g, 1, s)


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor
               ) -> torch.Tensor:
    """The model's mask (bool, additive or None: causal) plus the per-slot bias, as one additive mask
    ``[B, Hq, q, S]`` in the query's dtype for sdpa."""
    b, hq, q, _ = query.shape
    hkv, s = key.shape[1], key.shape[2]
    per_head = bias.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]  # [B, Hq, 1, S]
    if mask is None:
        base = torch.zeros((q, s), dtype=torch.float32, device=key.device)
        if q > 1:  # sdpa's implicit causal mask, bottom-right aligned
            qpos = torch.arange(q, device=key.device).view(-1, 1) + (s - q)
            base = base.masked_fill(torch.arange(s, device=key.device).view(1, -1) > qpos, float("-inf"))
        base = base.view(1, 1, q, s)
    else:
        base = _mask_bias(mask).float()
    return (base + per_head).to(query.dtype)


def _sdpa(module, query, key, value, mask, dropout, scaling, bias, kwargs) -> torch.Tensor:
    if bias is not None:
        mask = _with_bias(mask, bias, query, key)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out


def _record(layer_idx: int, weights: torch.Tensor, positions: torch.Tensor) -> None:
    b, hkv, g, q, s = weights.shape
    _capture.records.append(AttentionRecord(layer_idx, weights.reshape(b, hkv * g, q, s).float(), positions))


def kvcompress_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, plus the per-slot bias, observation, padding tracking and eviction for kvcompress layers."""
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
    if layer.static is not None:
        return _static_attention(layer, query, key, value, scaling), None
    q = query.shape[2]
    policy = layer.selection
    observe = policy.needs_attention
    bias = layer.bias_view()
    new_valid = _new_valid(attention_mask, q)
    if q == 1 and not capturing:
        accumulate = layer.accumulate() if observe else None
        if not observe or accumulate is not None:
            out = layer.store.attend(query, attention_mask, scaling, bias=bias, accumulate=accumulate)
            if out is not None:  # the store attended (and observed) from its own form
                layer.finish_attention(new_valid, query)
                return out, None
    if not layer.dense_returned:  # update() handed out stand-ins: decode for real
        key, value = layer.store.keys_values()
    if not (observe or capturing):
        if q == 1 and bias is not None:
            out, _ = decode_attention(query, key, value, attention_mask, scaling, bias)
        else:
            out = _sdpa(module, query, key, value, attention_mask, dropout, scaling, bias, kwargs)
        layer.finish_attention(new_valid, query)
        return out, None
    if q == 1:
        out, weights = decode_attention(query, key, value, attention_mask, scaling, bias)
        chunks = [(0, 1, weights)]
    else:
        needed = q if capturing else min(q, policy.observed_queries(q))
        acc = layer._acc_spec
        if needed == q and not capturing and acc is not None and (len(acc) < 3 or acc[2] != "set"):
            state = layer.slots.tensors[acc[0]]
            last = None
            if acc[1] == "last":  # (query positions, threshold): LRU's last use
                first = layer.slots.length - q
                last = (layer.slots.tensors["positions"][0, 0, first:first + q], acc[2])
            out = _prefill_kernels.attend_and_observe(query, key, value, attention_mask, scaling, bias, state, acc[1],
                                                      last)
            if out is not None:  # flash attention's own log-sum-exp, then one kernel pass adds each slot's share
                layer.finish_attention(new_valid, query)
                return out, None
            out = _sdpa(module, query, key, value, attention_mask, dropout, scaling, bias, kwargs)
            if _prefill_kernels.prompt_observe(query, key, attention_mask, scaling, bias, state, acc[1], last):
                layer.finish_attention(new_valid, query)  # each slot's prompt attention added in two kernel passes
                return out, None
        else:
            out = _sdpa(module, query, key, value, attention_mask, dropout, scaling, bias, kwargs)
        chunks = ((i, min(i + QUERY_CHUNK, q), None) for i in range(q - needed, q, QUERY_CHUNK))
    table = layer.slots.tensors["positions"]  # the new tokens' slots: [n - q, n)
    first = layer.slots.length - q
    ctx = layer.context(query, q) if observe else None
    for start, stop, weights in chunks:
        if weights is None:
            weights = _weights(query, key, attention_mask, scaling, start, stop, bias)
        if observe:
            policy.observe(ctx, weights, table[0, 0, first + start : first + stop])
        if capturing:
            _record(layer.layer_idx, weights, layer.slots.view("positions").clone())
    layer.finish_attention(new_valid, query, ctx)
    return out, None


def _static_attention(layer: CompressedLayer, query, key, value, scaling) -> torch.Tensor:
    """A decode step over a layer's whole fixed capacity (kvcompress.static_generate): the bias masks empty
    slots and padding, the model's mask is not needed; observation goes into the policy's state in place.
    Graph-safe: no host reads of device values, no allocation that depends on them."""
    static = layer.static
    bias = layer.slots.tensors["bias"]
    fused = static.observation  # (state, reduce, replace) the kernel fills, or None
    out = static.layout.attend(query, scaling, bias, static.accumulate)
    if out is None:  # the layout handed out keys and values over the whole capacity
        out = _kernels.fused_decode(query, key, value, key.shape[2], None, scaling, bias, fused)
    if out is None:
        out, weights = decode_attention(query, key, value, None, scaling, bias)
        if fused is not None:
            reduced = (weights.amax(2) if fused[1] == "max" else weights.sum(2)).sum(2).float()  # [B, H, cap]
            if fused[2]:
                fused[0].copy_(reduced)
            else:
                fused[0].add_(reduced)
    hidden = _captured_inputs(layer.layer_idx).get("hidden") if layer.selection.needs_hidden_states else None
    static.after_attention(query, hidden)
    layer.awaiting_attention = False
    static.count.add_(1)
    return out


_REGISTERED = False


def register() -> None:
    """Register ``"kvcompress"`` with transformers' attention and mask interfaces (once; under its own name,
    so no other model's attention changes). :func:`kvcompress.attach` calls it."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(NAME, kvcompress_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
