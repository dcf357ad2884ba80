"""Observing a prompt's attention without its n x n matrix (Triton; private).

A policy that accumulates the attention each slot receives (H2O) needs, after a prompt, the column sums of
the prompt's softmax attention. Materialising the weights in chunks of queries costs several times the
prompt's own attention. Here two flash-style passes over the keys do it, never holding more than a tile:

1. ``_lse_kernel``: per query row (one per query head), the log2 of its softmax denominator;
2. ``_colsum_kernel``: per tile of keys, ``exp2(score - lse)`` over every query that sees it, reduced over
   the G query heads of the kv head (sum or max) and summed over queries, added to the policy's state; or
   (``reduce="last"``, LRU) the position of the last query that gave the slot more than a threshold on any of
   the G heads, kept where it is later than the state's.

The causal mask (queries bottom-right aligned, as sdpa's) or the model's 4-D mask and the per-slot bias
apply as in attention.

:func:`attend_and_observe` saves the first pass where it can: for a causal prompt (no padding, no bias) on a
GPU, flash attention computes the output and hands back each query's log-sum-exp on the way, so only the
second pass is added to the prompt's own attention.
"""

from __future__ import annotations

import torch

from ._kernels import AVAILABLE, INTERPRET, LOG2E, launch

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_scores(q, k, M, BIAS, rows, cols, qmask, kmask, mbase, bbase, stride_mq, stride_mk, qk_scale, offset,
                     MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
        """Scores (log2 units) of query tile ``q`` (rows ``rows``) against key tile ``k`` (slots ``cols``),
        ``-inf`` where not attended."""
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        live = qmask[:, None] & kmask[None, :]
        if MASK_KIND == 0:  # causal: query i sits at key position offset + i
            live = live & (cols[None, :] <= offset + rows[:, None])
        else:
            mv = tl.load(M + mbase + rows[:, None] * stride_mq + cols[None, :] * stride_mk, mask=live, other=0)
            if MASK_KIND == 1:
                live = live & (mv != 0)
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
                live = live & (mv.to(tl.float32) > -1e30)
        if HAS_BIAS:
            s = s + tl.load(BIAS + bbase + cols, mask=kmask, other=0.0)[None, :] * 1.4426950408889634
        return tl.where(live, s, float("-inf"))

    @triton.jit(do_not_specialize=["q_len", "s_len", "offset", "stride_k", "stride_mb", "stride_mq", "stride_mk"])
    def _lse_kernel(Q, K, M, BIAS, LSE, q_len, s_len, offset, stride_k, qk_scale, stride_mb, stride_mq, stride_mk,
                    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
        pid_m = tl.program_id(0)
        bq = tl.program_id(1).to(tl.int64)  # batch row * HQ + query head
        b, hq = bq // HQ, bq % HQ
        bk = b * (HQ // G) + hq // G
        offs_d = tl.arange(0, D)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qmask = rows < q_len
        q = tl.load(Q + bq * q_len * D + rows[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        end = s_len
        if MASK_KIND == 0:
            end = tl.minimum(s_len, offset + pid_m * BLOCK_M + BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kmask = cols < s_len
            k = tl.load(K + bk * stride_k + cols[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0)
            s = _tile_scores(q, k, M, BIAS, rows, cols, qmask, kmask, b * stride_mb, bk * s_len, stride_mq,
                             stride_mk, qk_scale, offset, MASK_KIND, HAS_BIAS, DOT_F32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        lse = tl.where(l_i == 0.0, float("inf"), m_fin + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + bq * q_len + rows, lse, mask=qmask)

    @triton.jit(do_not_specialize=["q_len", "s_len", "offset", "stride_k", "acap", "stride_mb", "stride_mq",
                                   "stride_mk", "thresh"])
    def _colsum_kernel(Q, K, M, BIAS, LSE, ACC, QPOS, q_len, s_len, offset, stride_k, acap, qk_scale, stride_mb,
                       stride_mq, stride_mk, thresh, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, REDUCE: tl.constexpr):
        pid_n = tl.program_id(0)
        bk = tl.program_id(1).to(tl.int64)  # batch row * HKV + kv head
        hkv = HQ // G
        b, h = bk // hkv, bk % hkv
        offs_d = tl.arange(0, D)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = cols < s_len
        k = tl.load(K + bk * stride_k + cols[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0)
        if REDUCE == 2:
            total = tl.full([BLOCK_N], -1.0, tl.float32)  # no query used the slot (as LRU's torch path writes)
        else:
            total = tl.zeros([BLOCK_N], tl.float32)
        start = 0
        if MASK_KIND == 0:  # queries before the tile's first key see none of it
            start = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        for m0 in range(start, q_len, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            qmask = rows < q_len
            red = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for g in range(G):
                bq = b * HQ + h * G + g
                q = tl.load(Q + bq * q_len * D + rows[:, None] * D + offs_d[None, :], mask=qmask[:, None],
                            other=0.0)
                s = _tile_scores(q, k, M, BIAS, rows, cols, qmask, kmask, b * stride_mb, bk * s_len, stride_mq,
                                 stride_mk, qk_scale, offset, MASK_KIND, HAS_BIAS, DOT_F32)
                lse = tl.load(LSE + bq * q_len + rows, mask=qmask, other=float("inf"))
                p = tl.exp2(s - lse[:, None])
                if REDUCE == 0:
                    red += p
                elif REDUCE == 1:
                    red = tl.maximum(red, p)
                else:
                    red = tl.maximum(red, tl.where(p > thresh, 1.0, 0.0))
            if REDUCE == 2:
                qpos = tl.load(QPOS + rows, mask=qmask, other=-1.0)
                total = tl.maximum(total, tl.max(tl.where(red > 0.0, qpos[:, None], -1.0), 0))
            else:
                total += tl.sum(red, 0)
        aptr = ACC + bk * acap + cols
        if REDUCE == 2:
            tl.store(aptr, tl.maximum(tl.load(aptr, mask=kmask, other=0.0), total), mask=kmask)
        else:
            tl.store(aptr, tl.load(aptr, mask=kmask, other=0.0) + total, mask=kmask)


BLOCK_M = 64
BLOCK_N = 64


REDUCE = {"sum": 0, "max": 1, "last": 2}


def _applies(query: torch.Tensor, keys: torch.Tensor, acc: torch.Tensor, reduce: str) -> bool:
    hq, d, hkv = query.shape[1], query.shape[3], keys.shape[1]
    return (AVAILABLE and (query.device.type == "cuda" or INTERPRET) and not hq % hkv and not d & (d - 1)
            and d >= 16 and reduce in REDUCE and acc.dtype == torch.float32 and acc.is_contiguous())


def _as_tiles(keys: torch.Tensor) -> torch.Tensor:
    d, hkv = keys.shape[3], keys.shape[1]
    if not (keys.stride(-1) == 1 and keys.stride(-2) == d and keys.stride(0) == hkv * keys.stride(1)):
        keys = keys.contiguous()  # a narrow view of a [B, H, cap, D] buffer needs no copy
    return keys


_CAUSAL: dict = {}


def _is_causal(mask: torch.Tensor | None, q: int, s: int) -> bool:
    """Whether the model's mask is exactly the causal one, queries bottom-right aligned (no padding, no window):
    one comparison on the device (a prompt's chunk, not a decode step, pays its synchronisation)."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (q, s):
        return False
    key = (mask.device, q, s)
    if key not in _CAUSAL:
        _CAUSAL.clear()  # one prompt's chunk shapes at a time
        rows = torch.arange(q, device=mask.device).view(-1, 1) + (s - q)
        _CAUSAL[key] = torch.arange(s, device=mask.device).view(1, -1) <= rows
    return bool((mask[:, 0] == _CAUSAL[key]).all())


def attend_and_observe(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, bias: torch.Tensor | None,
                       acc: torch.Tensor, reduce: str, last: tuple[torch.Tensor, float] | None = None
                       ) -> torch.Tensor | None:
    """A causal prompt's attention output ``[B, q, H_q, D]`` (transformers' layout) from flash attention, with
    each slot's attention added to ``acc`` as :func:`prompt_observe` does, from the log-sum-exp flash returns
    (on a CUDA GPU a Triton pass; on a CPU, for a whole prompt, torch ops in ``_prompt_observe_cpu``).
    ``None``, having done nothing, where this does not apply (a bias, padding or another mask, a dtype or head
    size flash does not take, another device): then attend and call :func:`prompt_observe`."""
    q, d, s = query.shape[2], query.shape[3], keys.shape[2]
    if (query.device.type == "cpu" and q == s and q > 1 and bias is None and reduce in REDUCE
            and acc.dtype == torch.float32 and (reduce != "last" or last is not None)
            and query.dtype in (torch.float32, torch.bfloat16) and _is_causal(attention_mask, q, s)):
        from . import _prompt_observe_cpu

        return _prompt_observe_cpu.attend_and_observe(query, keys, values, scaling, acc, reduce, last)
    if (query.device.type != "cuda" or bias is not None or query.dtype not in (torch.float16, torch.bfloat16)
            or d > 256 or q > s or not _applies(query, keys, acc, reduce) or not _is_causal(attention_mask, q, s)):
        return None
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    out, lse = flash(query, keys, values, 0.0, q > 1, False, scale=scaling)[:2]  # lse: [B, H_q, q], natural log
    _colsum(query, _as_tiles(keys), None, scaling, None, (lse * LOG2E).contiguous(), acc, reduce, last)
    return out.transpose(1, 2).contiguous()


def prompt_observe(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                   bias: torch.Tensor | None, acc: torch.Tensor, reduce: str,
                   last: tuple[torch.Tensor, float] | None = None) -> bool:
    """Add to ``acc`` ``[B, H_kv, >= S]`` (float32) the attention each of the ``S`` slots of ``keys``
    ``[B, H_kv, S, D]`` receives from the ``q`` queries ``[B, H_q, q, D]`` (queries bottom-right aligned
    when ``attention_mask`` is None; else the model's ``[B, 1, q, S]`` mask), reduced over the G query heads
    of each kv head by ``reduce`` ("sum" or "max") and summed over queries; ``bias`` ``[B, H_kv, S]`` as in
    attention. ``reduce="last"`` with ``last = (positions [q] float32, threshold)`` instead raises each slot's
    ``acc`` to the position of the last query whose weight on it exceeds ``threshold`` on any of the G heads
    (-1 where none does). Returns False, having done nothing, where the kernels do not apply (then use torch
    ops)."""
    b, hq, q, d = query.shape
    s = keys.shape[2]
    if not _applies(query, keys, acc, reduce):
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q, s)):
        return False
    query, keys = query.contiguous(), _as_tiles(keys)
    lse = torch.empty((b, hq, q), dtype=torch.float32, device=query.device)
    consts, args = _consts(query, keys, attention_mask, bias)
    mask, bias_in, smb, smq, smk = args
    bias_in = bias_in if bias_in is not None else lse
    launch(_lse_kernel, (triton.cdiv(q, BLOCK_M), b * hq), (query.device, query.dtype, mask.dtype, "lse",
                                                            *consts.values()),
           (query, keys, mask, bias_in, lse, q, s, s - q, keys.stride(1), scaling * LOG2E, smb, smq, smk), consts,
           num_warps=4)
    _colsum(query, keys, attention_mask, scaling, bias, lse, acc, reduce, last)
    return True


def _consts(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None,
            bias: torch.Tensor | None) -> tuple[dict, tuple]:
    """The kernels' constexprs, and (mask, bias or None, mask strides) as they take them."""
    hq, d, hkv = query.shape[1], query.shape[3], keys.shape[1]
    if attention_mask is None:
        mask_kind, mask, smb, smq, smk = 0, query, 0, 0, 0
    else:
        mask = attention_mask[:, 0]
        mask_kind = 1 if mask.dtype == torch.bool else 2
        smb = mask.stride(0) if mask.shape[0] > 1 else 0
        smq, smk = mask.stride(1), mask.stride(2)
    consts = dict(HQ=hq, G=hq // hkv, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASK_KIND=mask_kind,
                  HAS_BIAS=bias is not None, DOT_F32=query.dtype == torch.float32)
    return consts, (mask, bias.float().contiguous() if bias is not None else None, smb, smq, smk)


def _colsum(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
            bias: torch.Tensor | None, lse: torch.Tensor, acc: torch.Tensor, reduce: str,
            last: tuple[torch.Tensor, float] | None) -> None:
    """The second pass: ``acc`` += each slot's attention (or its last use), given every query's log2-sum-exp2
    ``lse``."""
    b, hq, q, _ = query.shape
    hkv, s = keys.shape[1], keys.shape[2]
    query = query.contiguous()
    consts, (mask, bias_in, smb, smq, smk) = _consts(query, keys, attention_mask, bias)
    bias_in = bias_in if bias_in is not None else lse
    consts["REDUCE"] = REDUCE[reduce]
    if reduce == "last":
        if last is None:
            raise ValueError("prompt observation: reduce 'last' needs last=(query positions, threshold)")
        qpos, thresh = last[0].to(torch.float32).contiguous(), float(last[1])
    else:
        qpos, thresh = lse, 0.0  # never read
    launch(_colsum_kernel, (triton.cdiv(s, BLOCK_N), b * hkv), (query.device, query.dtype, mask.dtype, "colsum",
                                                                 *consts.values()),
           (query, keys, mask, bias_in, lse, acc, qpos, q, s, s - q, keys.stride(1), acc.shape[2], scaling * LOG2E,
            smb, smq, smk, thresh),
           consts, num_warps=4)
