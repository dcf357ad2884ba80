"""A fused decode step for attention-observing policies (Triton; optional).

A decode step of a policy such as H2O needs the attention output *and* the attention
every stored slot received. Done with torch ops that is five or six kernel launches
per layer where sdpa is one, and a decode step is bound by the host's launches. This
kernel does both in one launch: one program per (batch row, kv head) attends the G
query heads of that kv head over the stored slots (online softmax), writes the output,
then adds each slot's attention, reduced over the G heads (sum or max), to the
policy's float32 slot state. Without Triton, or off the GPU, the core uses torch ops.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (for checking on a CPU)
ENABLED = True  # False: attention-observing decode steps always take the torch path
BLOCK_N = 64
NUM_WARPS = 4
LOG2E = 1.4426950408889634

if AVAILABLE:

    @triton.jit
    def _scores(q, K, kbase, tok, valid, offs_d, M, b, stride_mb, stride_ms, qk_scale, D: tl.constexpr,
                MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr):
        """Scaled scores (log2 units) of one tile of slots, ``-inf`` where not attended; and the tile mask."""
        k = tl.load(K + kbase + tok[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASK_KIND == 1:
            mv = tl.load(M + b * stride_mb + tok * stride_ms, mask=valid, other=0)
            valid = valid & (mv != 0)
        elif MASK_KIND == 2:
            bias = tl.load(M + b * stride_mb + tok * stride_ms, mask=valid, other=0.0).to(tl.float32)
            s = s + bias[None, :] * 1.4426950408889634
        return tl.where(valid[None, :], s, float("-inf")), valid

    @triton.jit(do_not_specialize=["n", "cap", "acap", "stride_mb", "stride_ms"],
                do_not_specialize_on_alignment=["Q", "M"])
    def _observed_decode_kernel(
        Q, K, V, M, ACC, OUT, n, cap, acap, qk_scale, stride_mb, stride_ms,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_KIND: tl.constexpr, REDUCE_MAX: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        b = bh // HKV
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + (bh * G + offs_h)[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
        kbase = bh * cap * D
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for n0 in range(0, n, BLOCK_N):  # pass 1: the output, flash-attention style
            tok = n0 + offs_n
            s, valid = _scores(q, K, kbase, tok, tok < n, offs_d, M, b, stride_mb, stride_ms, qk_scale, D,
                               MASK_KIND, DOT_F32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kbase + tok[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(OUT + (bh * G + offs_h)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=hmask[:, None])
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        for n0 in range(0, n, BLOCK_N):  # pass 2: each slot's attention, reduced over the G heads
            tok = n0 + offs_n
            s, valid = _scores(q, K, kbase, tok, tok < n, offs_d, M, b, stride_mb, stride_ms, qk_scale, D,
                               MASK_KIND, DOT_F32)
            p = tl.exp2(s - m_safe[:, None]) / l_safe[:, None]
            p = tl.where(hmask[:, None], p, 0.0)
            col = tl.max(p, 0) if REDUCE_MAX else tl.sum(p, 0)
            aptr = ACC + bh * acap + tok
            live = tok < n
            tl.store(aptr, tl.load(aptr, mask=live, other=0.0) + col, mask=live)


def observed_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
                    attention_mask: torch.Tensor | None, scaling: float, acc: torch.Tensor, reduce: str
                    ) -> torch.Tensor | None:
    """Decode attention of ``query`` ``[B, Hq, 1, D]`` over the first ``n`` slots of the contiguous
    buffers ``keys``/``values`` ``[B, H_kv, cap, D]``; adds each slot's attention, reduced over the
    query heads of its kv head by ``reduce`` ("sum" or "max"), into ``acc`` ``[B, H_kv, >= n]`` (float32).

    Returns the output ``[B, 1, Hq, D]``, or ``None`` where the kernel does not apply (the caller
    then uses torch ops).
    """
    b, hq, q, d = query.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    if (not AVAILABLE or (query.device.type != "cuda" and not INTERPRET) or q != 1 or hq % hkv or d & (d - 1) or d < 16
            or not (keys.is_contiguous() and values.is_contiguous() and acc.is_contiguous())
            or acc.dtype != torch.float32 or keys.dtype != query.dtype or reduce not in ("sum", "max")):
        return None
    decode_mask = kernel_mask(attention_mask, n, query)
    if decode_mask is None:
        return None
    mask_kind, mask, smb, sms = decode_mask
    if not query.is_contiguous():
        query = query.contiguous()
    g = hq // hkv
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    consts = dict(HKV=hkv, G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=BLOCK_N,
                  MASK_KIND=mask_kind, REDUCE_MAX=reduce == "max", DOT_F32=query.dtype == torch.float32)
    key = (query.device, query.dtype, mask.dtype, *consts.values())
    launch(_observed_decode_kernel, (b * hkv,), key,
           (query, keys, values, mask, acc, out, n, cap, acc.shape[2], scaling * LOG2E, smb, sms), consts,
           num_warps=NUM_WARPS)
    return out


def kernel_mask(attention_mask: torch.Tensor | None, n: int, dummy: torch.Tensor
                ) -> tuple[int, torch.Tensor, int, int] | None:
    """A decode step's mask as a kernel reads it: ``(kind, row, stride_batch, stride_slot)``.

    ``kind`` is 0 (no mask; ``row`` is ``dummy``, never read), 1 (bool, True = attend) or 2 (additive);
    ``row`` is the last query's ``[B or 1, n]`` row. ``None`` for a mask of another shape.
    """
    if attention_mask is None:
        return 0, dummy, 0, 0
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != n:
        return None
    row = attention_mask[:, 0, -1]
    return (1 if row.dtype == torch.bool else 2), row, (row.stride(0) if row.shape[0] > 1 else 0), row.stride(1)


_COMPILED: dict = {}


def launch(kernel, grid: tuple, key: tuple, args: tuple, consts: dict, **options) -> None:
    """Launch a Triton kernel, skipping Triton's per-call Python dispatch after the first call per ``key``.

    ``kernel[grid](...)`` binds and specialises every argument and looks its cache up on every call:
    tens of microseconds of host time, per layer and token. The compiled kernel that call returns is
    kept under ``key``, which must hold everything the kernel is specialised on (constexprs, dtypes,
    options); integer arguments should be ``do_not_specialize`` and possibly unaligned pointers
    ``do_not_specialize_on_alignment``.
    """
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **consts, **options)
    else:
        compiled[(*grid, 1, 1)[:3]](*args, *consts.values())
