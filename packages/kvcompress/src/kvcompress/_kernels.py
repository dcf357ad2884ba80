"""The core's private Triton kernels and launch machinery (optional: without Triton, torch ops).

A decode step of a policy such as H2O needs the attention output *and* the attention
every stored slot received; a merging policy needs a per-slot bias on the scores. Done with
torch ops that is five or six kernel launches per layer where sdpa is one, and a decode step
is bound by the host's launches. :func:`fused_decode` does it in one launch: one program per
(batch row, kv head) attends the G query heads of that kv head over the stored slots (online
softmax) with the per-slot bias, writes the output, then (observing) adds each slot's attention,
reduced over the G heads (sum or max), to the policy's float32 slot state.

One program per (batch row, kv head) is 8 programs for a Llama-3-8B layer at batch 1: a long context
then leaves most of the GPU idle, which shows as soon as the host is out of the way (CUDA graphs). So
where there are too few programs for the GPU, the slots are split (flash-decoding): ``_split_kernel``
attends each split and writes its partial output, softmax max and sum (and, observing, the scores),
and ``_combine_kernel`` merges the splits per (batch row, kv head), writes the output and then each
slot's attention from the kept scores. Two launches instead of one: the split pays where the GPU's
time is what counts, under CUDA graph capture (``SPLIT = "graphs"``). An eager decode step is bound by the
host, which the extra launch costs more than the split saves (measured on an H200: h2o's eager step went
from 1.05x to 1.11x of ``full``'s at 16k, batch 1, while its graph decode went from 12.4 to 9.7 ms a token).

Plugins' kernels (quant) use :func:`launch`, :func:`kernel_mask`, :func:`mask_bias`,
:func:`slot_bias` and :func:`online_softmax_step` from here; none of this is public API.
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
SPLIT = "graphs"  # split the slots over programs: "graphs" (under CUDA graph capture), "always" or "never"
SPLIT_PROGRAMS = 2  # split the slots when (batch rows x kv heads) is below this many programs per SM
LOG2E = 1.4426950408889634

if AVAILABLE:

    @triton.jit
    def mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND: tl.constexpr):
        """A tile of a decode step's mask as :func:`kernel_mask` hands it to a kernel: ``(valid, bias)``
        for slots ``slot`` of batch row ``b``. Kind 1 (bool) narrows ``valid``; kind 2 (additive) gives
        the bias in log2 units (to add to scores already in log2 units); the bias is zero otherwise."""
        if MASK_KIND == 1:
            mv = tl.load(M + b * stride_mb + slot * stride_ms, mask=valid, other=0)
            valid = valid & (mv != 0)
            bias = tl.zeros(slot.shape, tl.float32)
        elif MASK_KIND == 2:
            bias = tl.load(M + b * stride_mb + slot * stride_ms, mask=valid, other=0.0).to(tl.float32)
            bias = bias * 1.4426950408889634
        else:
            bias = tl.zeros(slot.shape, tl.float32)
        return valid, bias

    @triton.jit
    def slot_bias(BIAS, bh, slot, valid, stride_bh, HAS_BIAS: tl.constexpr):
        """The per-slot attention bias of slots ``slot`` of (batch row, kv head) ``bh``, in log2 units (to add
        to scores already in log2 units); zero without a bias. ``BIAS`` is ``[B * H_kv, >= S]`` float32 with
        row stride ``stride_bh``."""
        if HAS_BIAS:
            return tl.load(BIAS + bh * stride_bh + slot, mask=valid, other=0.0) * 1.4426950408889634
        return tl.zeros(slot.shape, tl.float32)

    @triton.jit
    def online_softmax_step(s, m_i):
        """One tile of online softmax over scores ``s`` ``[rows, tile]`` in log2 units (``-inf`` where not
        attended), given the running row max ``m_i``: ``(p, alpha, m_new)``, with ``p = 2**(s - m_new)``
        and ``alpha`` the factor that rescales what was accumulated before. Rows with nothing attended yet
        keep ``m_new = -inf`` and get ``p = alpha = 0``."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        return tl.exp2(s - m_safe[:, None]), alpha, m_new

    @triton.jit
    def _scores(q, K, kbase, tok, valid, offs_d, M, b, stride_mb, stride_ms, qk_scale, BIAS, bh, stride_bias,
                D: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Scaled scores (log2 units) of one tile of slots, ``-inf`` where not attended; and the tile mask."""
        k = tl.load(K + kbase + tok[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        valid, bias = mask_bias(M, b, tok, valid, stride_mb, stride_ms, MASK_KIND)
        if MASK_KIND == 2:
            s = s + bias[None, :]
        if HAS_BIAS:
            s = s + slot_bias(BIAS, bh, tok, valid, stride_bias, HAS_BIAS)[None, :]
        return tl.where(valid[None, :], s, float("-inf")), valid

    @triton.jit
    def _attend_tile(s, valid, V, kbase, tok, offs_d, m_i, l_i, acc, D: tl.constexpr, DOT_F32: tl.constexpr):
        """One tile of flash attention: the scores ``s`` of slots ``tok`` (``valid``) folded into the running
        max ``m_i``, sum ``l_i`` and unnormalised output ``acc``."""
        p, alpha, m_new = online_softmax_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kbase + tok[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def add_column(ACC, at, p, live, REDUCE_MAX: tl.constexpr, REPLACE: tl.constexpr):
        """Each slot's attention ``p`` ``[heads, slots]`` reduced over the heads (max or sum) and added to
        (``REPLACE``: written in) the float32 state at pointers ``ACC + at``, where ``live``."""
        col = tl.max(p, 0) if REDUCE_MAX else tl.sum(p, 0)
        if REPLACE:
            tl.store(ACC + at, col, mask=live)
        else:
            tl.store(ACC + at, tl.load(ACC + at, mask=live, other=0.0) + col, mask=live)

    @triton.jit(do_not_specialize=["n", "cap", "acap", "stride_mb", "stride_ms", "stride_bias"],
                do_not_specialize_on_alignment=["Q", "M", "BIAS"])
    def _observed_decode_kernel(
        Q, K, V, M, ACC, OUT, BIAS, n, cap, acap, qk_scale, stride_mb, stride_ms, stride_bias,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_KIND: tl.constexpr, REDUCE_MAX: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
        OBSERVE: tl.constexpr, REPLACE: tl.constexpr,
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
            s, valid = _scores(q, K, kbase, tok, tok < n, offs_d, M, b, stride_mb, stride_ms, qk_scale, BIAS,
                               bh, stride_bias, D, MASK_KIND, DOT_F32, HAS_BIAS)
            m_i, l_i, acc = _attend_tile(s, valid, V, kbase, tok, offs_d, m_i, l_i, acc, D, DOT_F32)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(OUT + (bh * G + offs_h)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=hmask[:, None])
        if OBSERVE:
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            for n0 in range(0, n, BLOCK_N):  # pass 2: each slot's attention, reduced over the G heads
                tok = n0 + offs_n
                s, valid = _scores(q, K, kbase, tok, tok < n, offs_d, M, b, stride_mb, stride_ms, qk_scale,
                                   BIAS, bh, stride_bias, D, MASK_KIND, DOT_F32, HAS_BIAS)
                p = tl.exp2(s - m_safe[:, None]) / l_safe[:, None]
                add_column(ACC, bh * acap + tok, tl.where(hmask[:, None], p, 0.0), tok < n, REDUCE_MAX, REPLACE)

    @triton.jit(do_not_specialize=["n", "cap", "chunk", "splits", "stride_mb", "stride_ms", "stride_bias"],
                do_not_specialize_on_alignment=["Q", "M", "BIAS"])
    def _split_kernel(
        Q, K, V, M, PART, STATS, SCORES, BIAS, n, cap, chunk, splits, qk_scale, stride_mb, stride_ms, stride_bias,
        HKV: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr, OBSERVE: tl.constexpr,
    ):
        """Split ``program_id(1)`` of (batch row, kv head) ``program_id(0)``: slots ``[split * chunk, ...)``;
        writes the unnormalised output ``PART`` ``[BH, splits, BLOCK_H, D]``, the running max and sum
        ``STATS`` ``[BH, splits, 2, BLOCK_H]`` and, observing, the scores ``SCORES`` ``[BH, G, n]``."""
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
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
        start = split * chunk
        stop = tl.minimum(start + chunk, n)
        for n0 in range(start, stop, BLOCK_N):
            tok = n0 + offs_n
            s, valid = _scores(q, K, kbase, tok, tok < stop, offs_d, M, b, stride_mb, stride_ms, qk_scale, BIAS,
                               bh, stride_bias, D, MASK_KIND, DOT_F32, HAS_BIAS)
            if OBSERVE:
                tl.store(SCORES + (bh * G + offs_h)[:, None] * n + tok[None, :], s,
                         mask=hmask[:, None] & (tok < stop)[None, :])
            m_i, l_i, acc = _attend_tile(s, valid, V, kbase, tok, offs_d, m_i, l_i, acc, D, DOT_F32)
        row = bh * splits + split
        tl.store(PART + (row * BLOCK_H + offs_h)[:, None] * D + offs_d[None, :], acc)
        tl.store(STATS + row * 2 * BLOCK_H + offs_h, m_i)
        tl.store(STATS + row * 2 * BLOCK_H + BLOCK_H + offs_h, l_i)

    @triton.jit(do_not_specialize=["n", "acap", "splits"])
    def _combine_kernel(
        PART, STATS, SCORES, OUT, ACC, n, acap, splits,
        G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        REDUCE_MAX: tl.constexpr, OBSERVE: tl.constexpr, REPLACE: tl.constexpr,
    ):
        """The splits of (batch row, kv head) ``program_id(0)`` merged: the output, then (observing) each
        slot's attention from the kept scores, reduced over the G heads, added to (or written in) ``ACC``."""
        bh = tl.program_id(0).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        offs_d = tl.arange(0, D)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for sp in range(0, splits):
            row = bh * splits + sp
            m_s = tl.load(STATS + row * 2 * BLOCK_H + offs_h)
            l_s = tl.load(STATS + row * 2 * BLOCK_H + BLOCK_H + offs_h)
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_old, a_s = tl.exp2(m_i - m_safe), tl.exp2(m_s - m_safe)
            part = tl.load(PART + (row * BLOCK_H + offs_h)[:, None] * D + offs_d[None, :])
            acc = acc * a_old[:, None] + part * a_s[:, None]
            l_i = l_i * a_old + l_s * a_s
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = (acc / l_safe[:, None]).to(OUT.dtype.element_ty)
        tl.store(OUT + (bh * G + offs_h)[:, None] * D + offs_d[None, :], out, mask=hmask[:, None])
        if OBSERVE:
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            offs_n = tl.arange(0, BLOCK_N)
            for n0 in range(0, n, BLOCK_N):
                tok = n0 + offs_n
                live = tok < n
                s = tl.load(SCORES + (bh * G + offs_h)[:, None] * n + tok[None, :],
                            mask=hmask[:, None] & live[None, :], other=float("-inf"))
                p = tl.exp2(s - m_safe[:, None]) / l_safe[:, None]
                add_column(ACC, bh * acap + tok, p, live, REDUCE_MAX, REPLACE)

    @triton.jit(do_not_specialize=["at", "cap", "q", "heads", "stride_b", "stride_h", "stride_t"],
                do_not_specialize_on_alignment=["SK", "SV"])
    def _append_pair_kernel(K, V, SK, SV, at, cap, q, heads, stride_b, stride_h, stride_t, D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        bh = r // q
        t = r % q
        src = (bh // heads) * stride_b + (bh % heads) * stride_h + t * stride_t + tl.arange(0, D)
        dst = (bh * cap + at + t) * D + tl.arange(0, D)
        tl.store(K + dst, tl.load(SK + src))
        tl.store(V + dst, tl.load(SV + src))


APPEND_MAX = 32  # appends of up to this many tokens take the kernel (a decode step's one token, mostly)


def append_pair(keys: torch.Tensor, values: torch.Tensor, at: int, new_keys: torch.Tensor,
                new_values: torch.Tensor) -> bool:
    """Write ``new_keys``/``new_values`` ``[B, H, q, D]`` into slots ``at .. at+q`` of the contiguous
    buffers ``keys``/``values`` ``[B, H, cap, D]`` with one kernel launch (two ``copy_`` calls cost
    twice the host time, and a decode step is bound by it). Returns ``False``, having written nothing,
    where the kernel does not apply (no Triton or GPU, other shapes): the caller then copies.
    """
    b, h, q, d = new_keys.shape
    if (not (AVAILABLE and ENABLED) or (keys.device.type != "cuda" and not INTERPRET) or q > APPEND_MAX
            or d & (d - 1) or new_keys.dtype != keys.dtype or new_values.dtype != keys.dtype):
        return False
    stride = new_keys.stride()
    if stride[3] != 1 or new_values.stride() != stride or not (keys.is_contiguous() and values.is_contiguous()):
        return False
    key = (keys.device, keys.dtype, d, "append")
    if key in _COMPILED:  # data pointers: the launcher would query the driver for each tensor
        buffers = (keys.data_ptr(), values.data_ptr(), new_keys.data_ptr(), new_values.data_ptr())
    else:  # the first launch compiles, specialised on tensors
        buffers = (keys, values, new_keys, new_values)
    launch(_append_pair_kernel, (b * h * q,), key, (*buffers, at, keys.shape[2], q, h, *stride[:3]), dict(D=d),
           num_warps=1)
    return True


_FUSED: dict = {}


def fused_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
                 attention_mask: torch.Tensor | None, scaling: float, bias: torch.Tensor | None = None,
                 accumulate: tuple | None = None) -> torch.Tensor | None:
    """Decode attention of ``query`` ``[B, Hq, 1, D]`` over the first ``n`` slots of the contiguous
    buffers ``keys``/``values`` ``[B, H_kv, cap, D]``, plus the per-slot ``bias`` ``[B, H_kv, >= n]``
    (float32, or None); with ``accumulate = (acc, reduce[, replace])`` adds each slot's attention, reduced
    over the query heads of its kv head by ``reduce`` ("sum" or "max"), into ``acc`` ``[B, H_kv, >= n]``
    (float32), or writes it there with ``replace``.

    Returns the output ``[B, 1, Hq, D]``, or ``None`` where the kernel does not apply (the caller
    then uses torch ops).
    """
    b, hq, q, d = query.shape
    hkv, cap = keys.shape[1], keys.shape[2]
    acc, reduce, replace = (*accumulate, False)[:3] if accumulate is not None else (None, "sum", False)
    if (not (AVAILABLE and ENABLED) or (query.device.type != "cuda" and not INTERPRET) or q != 1 or hq % hkv
            or d & (d - 1) or d < 16 or not (keys.is_contiguous() and values.is_contiguous())
            or keys.dtype != query.dtype
            or reduce not in ("sum", "max")):
        return None
    if acc is not None and not (acc.is_contiguous() and acc.dtype == torch.float32):
        return None
    if bias is not None and not (bias.dtype == torch.float32 and bias.stride(-1) == 1
                                 and bias.stride(0) == hkv * bias.stride(1)):
        return None
    decode_mask = kernel_mask(attention_mask, n, query)
    if decode_mask is None:
        return None
    mask_kind, mask, smb, sms = decode_mask
    if not query.is_contiguous():
        query = query.contiguous()
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    spec = (query.device, query.dtype, mask.dtype, hkv, hq, d, mask_kind, reduce, bias is not None, acc is not None,
            bool(replace))
    hit = _FUSED.get(spec)  # the launch constants of this kind of call, built once (a decode step is host-bound)
    if hit is None:
        g = hq // hkv
        consts = dict(HKV=hkv, G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=BLOCK_N,
                      MASK_KIND=mask_kind, REDUCE_MAX=reduce == "max", DOT_F32=query.dtype == torch.float32,
                      HAS_BIAS=bias is not None, OBSERVE=acc is not None, REPLACE=bool(replace))
        hit = _FUSED[spec] = ((query.device, query.dtype, mask.dtype, *consts.values()), consts)
    key, consts = hit
    bias_in, stride_bias = (bias, bias.stride(1)) if bias is not None else (out, 0)
    split = SPLIT == "always" or (SPLIT == "graphs" and query.device.type == "cuda"
                                  and torch.cuda.is_current_stream_capturing())
    splits, chunk = _splits(query.device, b * hkv, n) if split else (1, n)
    if splits == 1:
        launch(_observed_decode_kernel, (b * hkv,), key,
               (query, keys, values, mask, acc if acc is not None else out, out, bias_in,
                n, cap, acc.shape[2] if acc is not None else 0, scaling * LOG2E, smb, sms, stride_bias), consts,
               num_warps=NUM_WARPS)
        return out
    c = consts
    block_h = c["BLOCK_H"]
    part = torch.empty((b * hkv, splits, block_h, d), dtype=torch.float32, device=query.device)
    stats = torch.empty((b * hkv, splits, 2, block_h), dtype=torch.float32, device=query.device)
    scores = torch.empty((b * hkv, hq // hkv, n) if acc is not None else (1,), dtype=torch.float32,
                         device=query.device)
    split_consts = dict(HKV=hkv, G=c["G"], BLOCK_H=block_h, D=d, BLOCK_N=BLOCK_N, MASK_KIND=c["MASK_KIND"],
                        DOT_F32=c["DOT_F32"], HAS_BIAS=c["HAS_BIAS"], OBSERVE=c["OBSERVE"])
    launch(_split_kernel, (b * hkv, splits), (*key, "split"),
           (query, keys, values, mask, part, stats, scores, bias_in, n, cap, chunk, splits, scaling * LOG2E, smb, sms,
            stride_bias), split_consts, num_warps=NUM_WARPS)
    combine_consts = dict(G=c["G"], BLOCK_H=block_h, D=d, BLOCK_N=4 * BLOCK_N, REDUCE_MAX=c["REDUCE_MAX"],
                          OBSERVE=c["OBSERVE"], REPLACE=c["REPLACE"])
    launch(_combine_kernel, (b * hkv,), (*key, "combine"),
           (part, stats, scores, out, acc if acc is not None else out, n, acc.shape[2] if acc is not None else 0,
            splits), combine_consts, num_warps=NUM_WARPS)
    return out


_SMS: dict = {}


def _splits(device: torch.device, programs: int, n: int) -> tuple[int, int]:
    """(splits, slots per split) for ``programs`` (batch rows x kv heads) over ``n`` slots: enough programs
    for ``SPLIT_PROGRAMS`` per SM (an interpreted run counts 8 SMs), each split a whole number of tiles."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    tiles = -(-n // BLOCK_N)
    want = -(-SPLIT_PROGRAMS * _SMS[device] // programs)
    if want <= 1 or tiles < 2:
        return 1, n
    per = -(-tiles // min(want, tiles))
    chunk = per * BLOCK_N
    return -(-n // chunk), chunk


def observed_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
                    attention_mask: torch.Tensor | None, scaling: float, acc: torch.Tensor, reduce: str
                    ) -> torch.Tensor | None:
    """:func:`fused_decode` accumulating into ``acc`` with no bias."""
    return fused_decode(query, keys, values, n, attention_mask, scaling, None, (acc, reduce))


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
DIRECT_TRITON = ("3.6.",)  # Triton versions whose C launcher `_direct` calls (checked on an H100)
_HOOKS = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton's launch hooks (profilers)


def launch(kernel, grid: tuple, key: tuple, args: tuple, consts: dict, **options) -> None:
    """Launch a Triton kernel, skipping Triton's per-call Python dispatch after the first call per ``key``.

    ``kernel[grid](...)`` binds and specialises every argument and looks its cache up on every call:
    tens of microseconds of host time, per layer and token. The compiled kernel that call returns is
    kept under ``key``, which must hold everything the kernel is specialised on (constexprs, dtypes,
    options, device); integer arguments should be ``do_not_specialize`` and possibly unaligned pointers
    ``do_not_specialize_on_alignment``. Later calls go straight to Triton's C launcher (see
    :func:`_direct`) unless a launch hook (a profiler) is set.

    ``key[0]`` is the device of the kernel's tensors (every caller's key starts with it). Triton launches on
    the *current* CUDA device, and nothing sets it for a layer of a model spread over GPUs (accelerate's
    hooks move tensors only): a kernel on another GPU than the current one is launched with its GPU current.
    """
    device = key[0] if key and isinstance(key[0], torch.device) else None
    if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _launch(kernel, grid, key, args, consts, options)
        return
    _launch(kernel, grid, key, args, consts, options)


def _launch(kernel, grid: tuple, key: tuple, args: tuple, consts: dict, options: dict) -> None:
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **consts, **options)
        if compiled is not None:  # None under Triton's interpreter: every call goes through kernel[grid]
            _COMPILED[key] = (compiled, _direct(compiled, args[0].device))
        return
    compiled, direct = hit
    grid = (*grid, 1, 1)
    if direct is None or _HOOKS.launch_enter_hook is not None or _HOOKS.launch_exit_hook is not None:
        compiled[grid[:3]](*args, *consts.values())
    else:
        direct(grid, args, consts)


def is_compiled(key: tuple) -> bool:
    """Whether :func:`launch` has compiled a kernel under ``key`` (later calls may pass a tensor that
    does not change as its ``data_ptr()``, sparing the launcher a driver query per argument)."""
    return key in _COMPILED


def resident_programs(key: tuple, device: torch.device) -> int | None:
    """How many programs of the kernel :func:`launch` compiled under ``key`` one SM of ``device`` runs at
    once, as its registers, shared memory and warps allow; ``None`` before it is compiled (or where Triton
    does not say). A grid of a whole multiple of this times the SM count leaves no SM idle in a last wave."""
    hit = _COMPILED.get(key)
    if hit is None or device.type != "cuda":
        return None
    compiled = hit[0]
    try:
        compiled._init_handles()
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        warps, regs, smem = compiled.metadata.num_warps, compiled.n_regs, compiled.metadata.shared
        reg_file, smem_sm = props["max_num_regs"], props["max_shared_mem"]
    except (AttributeError, KeyError, TypeError):
        return None
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers go to warps 256 at a time
    threads = torch.cuda.get_device_properties(device).max_threads_per_multi_processor
    limits = [reg_file // per_warp // warps, threads // (32 * warps)]
    if smem:
        limits.append(smem_sm // (smem + 1024))  # the hardware reserves 1 KiB per program
    return max(1, min(limits))


def _direct(compiled, device: torch.device):
    """``launch(grid, args, consts)`` calling ``compiled``'s C launcher with the arguments Triton's own
    per-call wrapper would pass (current stream, no scratch, no hooks), or ``None`` where this Triton
    does not expose them (then every call takes the wrapper) or the kernel needs scratch memory.
    The C launcher's positional arguments are Triton's internals: used on the versions checked against
    (``DIRECT_TRITON``) only."""
    if device.type != "cuda" or _HOOKS is None or not triton.__version__.startswith(DIRECT_TRITON):
        return None
    try:
        compiled._init_handles()
        run = compiled.run
        c_launch, function, meta = run.launch, compiled.function, compiled.packed_metadata
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl
        if run.global_scratch_size or run.profile_scratch_size:
            return None
    except AttributeError:
        return None
    stream_of, index = torch._C._cuda_getCurrentRawStream, device.index or 0

    def direct(grid: tuple, args: tuple, consts: dict) -> None:
        c_launch(grid[0], grid[1], grid[2], stream_of(index), function, coop, pdl, None, None, meta, None,
                 None, None, *args, *consts.values())

    return direct
