"""Observing a causal prompt's attention on a CPU (private): flash attention's log-sum-exp, then torch ops.

The CPU twin of the Triton path in ``_prefill_kernels``: sdpa's CPU flash attention computes the prompt's
output (the same op ``full`` runs) and hands back each query's log-sum-exp, so each chunk of queries needs
one matmul against the keys it can see (causal: never the later ones), one subtraction and one ``exp``, then
the policy's reduction straight into its slot state. No softmax, no mask over the whole chunk (only its
diagonal block), no full n x n matrix.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 256


def attend_and_observe(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                       acc: torch.Tensor, reduce: str, last: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """A whole causal prompt (``q == S``, no past, no padding, no bias): the attention output ``[B, q, H_q, D]``
    (transformers' layout), each slot's observation reduced into ``acc`` ``[B, H_kv, >= S]`` as
    ``_prefill_kernels.prompt_observe`` describes (``reduce``: "sum", "max" or "last" with ``last``)."""
    b, hq, q, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(query, keys, values, 0.0, True, scale=scaling)  # lse: [B, H_q, q], natural log, float32
    lse = lse.view(b, hkv, g, q, 1)
    for start in range(0, q, QUERY_CHUNK):
        stop = min(q, start + QUERY_CHUNK)
        c = stop - start
        qc = (query[:, :, start:stop] * scaling).reshape(b, hkv, g * c, d)
        scores = torch.matmul(qc, keys[:, :, :stop].transpose(-1, -2)).view(b, hkv, g, c, stop).float()
        scores.sub_(lse[:, :, :, start:stop])
        later = torch.ones(c, c, dtype=torch.bool, device=query.device).triu_(1)  # key after the query
        scores[..., start:stop].masked_fill_(later, float("-inf"))
        weights = scores.exp_()  # [B, H_kv, G, c, stop]
        seen = acc[:, :, :stop]
        if reduce == "sum":
            seen.add_(weights.sum((2, 3)))
        elif reduce == "max":
            seen.add_(weights.amax(2).sum(2))
        else:
            positions, threshold = last
            when = positions[start:stop].to(torch.float32).view(1, 1, c, 1)
            used = (weights > threshold).any(2)  # [B, H_kv, c, stop]
            seen.copy_(torch.maximum(seen, torch.where(used, when, -1.0).amax(2)))
    return out.transpose(1, 2).contiguous()
