"""Fused Triton decode attention straight from a :class:`LowRankStore` (flash-decoding style).

One program per (split of the middle, batch row, kv head) attends the G query heads of that kv head to its
slice of the middle, tile by tile: the tile's key coefficients (int8 or the model's dtype) meet the layer's
basis in two dots (``c @ basis[:, :D/2]``, ``c @ basis[:, D/2:]``), the mean is added, and the halves are
rotated at the tile's positions (cos/sin computed in registers from the positions, after reducing the angle
modulo 2 pi; or read from the cache's RoPE table) before the score dots; the values are never reconstructed:
``p`` (times each token's int8 scale) meets the value coefficients, and the split projects its ``[G, r]``
result once (``@ basis + mean * sum(p)``). One more program per (batch row, kv head) attends the exact head
and tail. The last program of each (batch row, kv head) to finish merges the splits' partial softmax states,
so a decode step is one launch; observing (a policy's accumulated attention) adds a second launch.

No ``[S, D]`` key or value is ever written to memory. Without Triton ``AVAILABLE`` is False and the store
attends with torch ops. Checked on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvcompress import _kernels
from kvcompress._kernels import is_compiled, kernel_mask, launch

AVAILABLE = _kernels.AVAILABLE
INTERPRET = _kernels.INTERPRET
if AVAILABLE:
    import triton
    import triton.language as tl

    from kvcompress._kernels import mask_bias, online_softmax_step, slot_bias

BLOCK_N = 64  # slots per tile
NUM_WARPS = 4
SPLIT_MIN = 256  # fewest middle slots per split
WAVES = 2  # splits aim at this many programs per SM slot: B * H * splits ~ WAVES * SMs * PER_SM
PER_SM = 2
MERGE_CHUNK = 16  # splits merged at a time by the last program to finish (0: a second launch merges)
ROPE_FROM = "compute"  # "compute": cos/sin from positions in registers; "table": read the cache's RoPE table
LOG2E = 1.4426950408889634
TWO_PI_HI = 6.28125  # 2 pi = HI + LO, HI with 8 significant bits: k * HI is exact for k < 2**16
TWO_PI_LO = 2 * math.pi - 6.28125


def usable(device: torch.device) -> bool:
    """Whether the kernel runs on ``device`` (a CUDA GPU with Triton, or the interpreter on a CPU)."""
    return AVAILABLE and _kernels.ENABLED and (device.type == "cuda" or INTERPRET)


if AVAILABLE:

    @triton.jit
    def _cos_sin(pos, INV, COS, SIN, rope_scale, F: tl.constexpr, TABLE: tl.constexpr):
        """cos/sin ``[BLOCK_N, F]`` of int32 positions ``pos``: the model's ``pos * inv_freq`` (float32, the
        same product the model takes), reduced modulo 2 pi in two steps (Cody-Waite), times the RoPE's scale;
        or rows of the table."""
        offs_f = tl.arange(0, F)
        if TABLE:
            at = pos.to(tl.int64)[:, None] * F + offs_f[None, :]
            return tl.load(COS + at), tl.load(SIN + at)
        inv = tl.load(INV + offs_f)
        ang = pos.to(tl.float32)[:, None] * inv[None, :]
        turns = tl.floor(ang * 0.15915494309189535 + 0.5)
        r = (ang - turns * 6.28125) - turns * 0.0019353071795864769
        return tl.cos(r) * rope_scale, tl.sin(r) * rope_scale

    @triton.jit
    def _codes(C, row, valid, W: tl.constexpr, BLOCK_W: tl.constexpr, PACKED: tl.constexpr, dt: tl.constexpr):
        """A tile's stored coefficients ``[BLOCK_N, BLOCK_W]`` as ``dt``: ``(all, None-like)``, or for packed
        int4 the low and high nibbles (coefficients ``j`` and ``j + W``), sign-extended."""
        offs_w = tl.arange(0, BLOCK_W)
        x = tl.load(
            C + row[:, None] * W + offs_w[None, :], mask=valid[:, None] & (offs_w < W)[None, :], other=0
        )
        if PACKED:  # int8 nibbles: the casts keep the shifts in 8 bits whatever the literals promote to
            return ((x << 4).to(tl.int8) >> 4).to(dt), (x >> 4).to(dt)
        return x.to(dt), x.to(dt)

    @triton.jit
    def _dot(a, b, DOT_F32: tl.constexpr):
        if DOT_F32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _mid_scores(
        q1,
        q2,
        CK,
        KS,
        MPOS,
        kb1a,
        kb2a,
        kb1b,
        kb2b,
        km1,
        km2,
        INV,
        COS,
        SIN,
        rope_scale,
        bh,
        cap_m,
        tok,
        valid,
        WK: tl.constexpr,
        BLOCK_RK: tl.constexpr,
        F: tl.constexpr,
        QUANT: tl.constexpr,
        PACKED: tl.constexpr,
        DOT_F32: tl.constexpr,
        TABLE: tl.constexpr,
        ROPE: tl.constexpr,
    ):
        """Raw scores ``[BLOCK_H, BLOCK_N]`` of a tile of the middle: keys reconstructed from their
        coefficients (``c @ basis + mean``, in halves of the head dim; packed int4 in halves of the rank too)
        and rotated at their positions."""
        row = bh * cap_m + tok
        dt: tl.constexpr = tl.float32 if DOT_F32 else kb1a.dtype  # int8/int4 codes are exact in 16-bit floats
        ca, cb = _codes(CK, row, valid, WK, BLOCK_RK, PACKED, dt)
        a1 = _dot(ca, kb1a, DOT_F32)
        a2 = _dot(ca, kb2a, DOT_F32)
        if PACKED:
            a1 += _dot(cb, kb1b, DOT_F32)
            a2 += _dot(cb, kb2b, DOT_F32)
        if QUANT:
            ks = tl.load(KS + row, mask=valid, other=0.0).to(tl.float32)
            a1 = a1 * ks[:, None]
            a2 = a2 * ks[:, None]
        a1 = a1 + km1[None, :]
        a2 = a2 + km2[None, :]
        if ROPE:
            pos = tl.load(MPOS + row, mask=valid, other=0)
            cos, sin = _cos_sin(pos, INV, COS, SIN, rope_scale, F, TABLE)
            k1 = a1 * cos - a2 * sin
            k2 = a2 * cos + a1 * sin
        else:
            k1 = a1
            k2 = a2
        if DOT_F32:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
            s = tl.dot(q2, tl.trans(k2), s, input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1.to(q1.dtype)))
            s = tl.dot(q2, tl.trans(k2.to(q2.dtype)), s)
        return s

    @triton.jit
    def _mask_scores(
        s,
        slot,
        valid,
        M,
        b,
        stride_mb,
        stride_ms,
        BIAS,
        bh,
        stride_bias,
        qk_scale,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """Scores in log2 units with the model's mask and the per-slot bias; ``-inf`` where not attended."""
        valid, bias = mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND)
        s = s * qk_scale
        if MASK_KIND == 2:
            s = s + bias[None, :]
        if HAS_BIAS:
            s = s + slot_bias(BIAS, bh, slot, valid, stride_bias, HAS_BIAS)[None, :]
        return tl.where(valid[None, :], s, float("-inf")), valid

    @triton.jit
    def _halves(X, base, F: tl.constexpr, BLOCK_H: tl.constexpr, hmask):
        offs_f = tl.arange(0, F)
        x1 = tl.load(X + base[:, None] + offs_f[None, :], mask=hmask[:, None], other=0.0)
        x2 = tl.load(X + base[:, None] + F + offs_f[None, :], mask=hmask[:, None], other=0.0)
        return x1, x2

    @triton.jit
    def _basis_halves(
        B,
        h,
        R: tl.constexpr,
        r0: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        D: tl.constexpr,
        F: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Rows ``r0 .. r0+ROWS`` of ``basis[h]`` ``[R, D]`` as two ``[BLOCK_R, F]`` halves of the head dim
        (rows past ``ROWS`` zero)."""
        offs_r = tl.arange(0, BLOCK_R)
        offs_f = tl.arange(0, F)
        at = (h * R + r0 + offs_r)[:, None] * D + offs_f[None, :]
        rmask = (offs_r < ROWS)[:, None]
        x1, x2 = tl.load(B + at, mask=rmask, other=0.0), tl.load(B + at + F, mask=rmask, other=0.0)
        if DOT_F32:
            return x1.to(tl.float32), x2.to(tl.float32)
        return x1, x2

    @triton.jit
    def _key_basis(
        KB,
        KM,
        h,
        RK: tl.constexpr,
        WK: tl.constexpr,
        BLOCK_RK: tl.constexpr,
        D: tl.constexpr,
        F: tl.constexpr,
        PACKED: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """The layer's key basis for head ``h`` as the tiles the middle's dots take, and the mean's halves."""
        kb1a, kb2a = _basis_halves(KB, h, RK, 0, WK, BLOCK_RK, D, F, DOT_F32)
        kb1b, kb2b = kb1a, kb2a
        if PACKED:
            kb1b, kb2b = _basis_halves(KB, h, RK, WK, WK, BLOCK_RK, D, F, DOT_F32)
        offs_f = tl.arange(0, F)
        km1 = tl.load(KM + h * D + offs_f).to(tl.float32)
        km2 = tl.load(KM + h * D + F + offs_f).to(tl.float32)
        return kb1a, kb2a, kb1b, kb2b, km1, km2

    @triton.jit
    def _device_lens(LENS, window):
        """(head, middle, window) lengths from a static layout's ``[s, m]`` (int64 on the device): the window
        is the last ``min(window, m)`` of the rest's ``m`` slots, the middle the others."""
        s = tl.load(LENS).to(tl.int32)
        m = tl.load(LENS + 1).to(tl.int32)
        w = tl.minimum(m, window)
        return s, m - w, w

    @triton.jit(
        do_not_specialize=[
            "s_len",
            "m_len",
            "w_len",
            "win",
            "cap_m",
            "capf",
            "split_tokens",
            "n_mid",
            "stride_mb",
            "stride_ms",
            "stride_bias",
        ],
        do_not_specialize_on_alignment=["Q", "M", "BIAS"],
    )
    def _split_kernel(
        Q,
        FK,
        FV,
        CK,
        CV,
        KS,
        VS,
        MPOS,
        KB,
        KM,
        VB,
        VM,
        INV,
        COS,
        SIN,
        M,
        BIAS,
        PM,
        PL,
        PA,
        LOCK,
        LSE,
        Out,
        LENS,
        s_len,
        m_len,
        w_len,
        win,
        cap_m,
        capf,
        split_tokens,
        n_mid,
        qk_scale,
        rope_scale,
        stride_mb,
        stride_ms,
        stride_bias,
        HKV: tl.constexpr,
        G: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        RK: tl.constexpr,
        RV: tl.constexpr,
        WK: tl.constexpr,
        WV: tl.constexpr,
        BLOCK_RK: tl.constexpr,
        BLOCK_RV: tl.constexpr,
        BLOCK_N: tl.constexpr,
        QUANT: tl.constexpr,
        PACKED: tl.constexpr,
        DOT_F32: tl.constexpr,
        TABLE: tl.constexpr,
        ROPE: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        MERGE_CHUNK: tl.constexpr,
        OBSERVE: tl.constexpr,
        DEVICE_LENS: tl.constexpr,
    ):
        # Contiguous store tensors: coefficients [B, HKV, cap_m, R], scales and positions [B, HKV, cap_m],
        # exact buffers [B, HKV, capf, D] (the head [0, s), then the window's ring of `win` entries), bases
        # [HKV, R, D], means [HKV, D], the query [B, HKV * G, D], the per-slot bias [B * HKV, >= s + m + w]
        # (row stride stride_bias) in slot order: head, middle (m_len slots attended from coefficients),
        # window. DEVICE_LENS (a static layout): the lengths from the device, see _device_lens.
        F: tl.constexpr = D // 2
        if DEVICE_LENS:
            s_len, m_len, w_len = _device_lens(LENS, w_len)
        split = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        ns = n_mid + 1
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        row = (bh * G + offs_h) * ns + split
        if split < n_mid:
            q1, q2 = _halves(Q, (bh * G + offs_h) * D, F, BLOCK_H, hmask)
            if DOT_F32:
                q1 = q1.to(tl.float32)
                q2 = q2.to(tl.float32)
            kb1a, kb2a, kb1b, kb2b, km1, km2 = _key_basis(KB, KM, h, RK, WK, BLOCK_RK, D, F, PACKED, DOT_F32)
            dt: tl.constexpr = tl.float32 if DOT_F32 else VB.dtype.element_ty
            low_a = tl.zeros([BLOCK_H, BLOCK_RV], tl.float32)
            low_b = tl.zeros([BLOCK_H, BLOCK_RV], tl.float32)
            start = split * split_tokens
            end = tl.minimum(start + split_tokens, m_len)
            for n0 in range(0, end - start, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < end
                s = _mid_scores(
                    q1,
                    q2,
                    CK,
                    KS,
                    MPOS,
                    kb1a,
                    kb2a,
                    kb1b,
                    kb2b,
                    km1,
                    km2,
                    INV,
                    COS,
                    SIN,
                    rope_scale,
                    bh,
                    cap_m,
                    tok,
                    valid,
                    WK,
                    BLOCK_RK,
                    F,
                    QUANT,
                    PACKED,
                    DOT_F32,
                    TABLE,
                    ROPE,
                )
                s, valid = _mask_scores(
                    s,
                    s_len + tok,
                    valid,
                    M,
                    b,
                    stride_mb,
                    stride_ms,
                    BIAS,
                    bh,
                    stride_bias,
                    qk_scale,
                    MASK_KIND,
                    HAS_BIAS,
                )
                p, alpha, m_i = online_softmax_step(s, m_i)
                l_i = l_i * alpha + tl.sum(p, 1)
                vrow = bh * cap_m + tok
                va, vb_ = _codes(CV, vrow, valid, WV, BLOCK_RV, PACKED, dt)
                if QUANT:  # each token's scale folds into p; the codes are exact in 16-bit floats
                    p = p * tl.load(VS + vrow, mask=valid, other=0.0).to(tl.float32)[None, :]
                pd = p.to(dt)
                low_a = low_a * alpha[:, None] + _dot(pd, va, DOT_F32)
                if PACKED:
                    low_b = low_b * alpha[:, None] + _dot(pd, vb_, DOT_F32)
            # the split's output in the model's basis, once: low @ basis + mean * (weight of the middle)
            offs_rv = tl.arange(0, BLOCK_RV)
            vba = tl.load(
                VB + (h * RV + offs_rv)[:, None] * D + offs_d[None, :],
                mask=(offs_rv < WV)[:, None],
                other=0.0,
            )
            acc = _dot(low_a.to(dt), vba.to(dt), DOT_F32)
            if PACKED:
                vbb = tl.load(
                    VB + (h * RV + WV + offs_rv)[:, None] * D + offs_d[None, :],
                    mask=(offs_rv < WV)[:, None],
                    other=0.0,
                )
                acc += _dot(low_b.to(dt), vbb.to(dt), DOT_F32)
            vm = tl.load(VM + h * D + offs_d).to(tl.float32)
            acc = acc + l_i[:, None] * vm[None, :]
        else:  # the exact head and tail
            q = tl.load(Q + (bh * G + offs_h)[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
            acc = tl.zeros([BLOCK_H, D], tl.float32)
            total = s_len + w_len  # the head [0, s), then the window's ring entries right after it
            fbase = bh * capf * D
            for n0 in range(0, total, BLOCK_N):
                j = n0 + offs_n
                valid = j < total
                turn = ((j - s_len - m_len % win) % win + win) % win  # ring entry -> place in the window
                slot = tl.where(j < s_len, j, s_len + m_len + turn)
                fptr = fbase + j[:, None] * D + offs_d[None, :]
                k = tl.load(FK + fptr, mask=valid[:, None], other=0.0)
                v = tl.load(FV + fptr, mask=valid[:, None], other=0.0)
                if DOT_F32:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s, valid = _mask_scores(
                    s,
                    slot,
                    valid,
                    M,
                    b,
                    stride_mb,
                    stride_ms,
                    BIAS,
                    bh,
                    stride_bias,
                    qk_scale,
                    MASK_KIND,
                    HAS_BIAS,
                )
                p, alpha, m_i = online_softmax_step(s, m_i)
                l_i = l_i * alpha + tl.sum(p, 1)
                if DOT_F32:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        tl.store(PA + row[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
        tl.store(PM + row, m_i, mask=hmask)
        tl.store(PL + row, l_i, mask=hmask)
        if MERGE_CHUNK > 0:  # the last program of this (batch row, kv head) to finish merges: one launch
            tl.debug_barrier()
            if tl.atomic_add(LOCK + bh, 1, sem="acq_rel", scope="gpu") == ns - 1:
                _merge_rows(PM, PL, PA, Out, LSE, bh * G, G, BLOCK_H, ns, D, MERGE_CHUNK, OBSERVE)
                tl.store(LOCK + bh, 0)  # ready for the next launch (stream order)

    @triton.jit
    def _merge_rows(
        PM,
        PL,
        PA,
        Out,
        LSE,
        r0,
        G: tl.constexpr,
        BLOCK_H: tl.constexpr,
        ns,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        OBSERVE: tl.constexpr,
    ):
        """Output rows ``r0 .. r0+G`` from the splits' partial states, ``CHUNK`` splits at a time (loads past
        L1: other SMs wrote them)."""
        offs_g = tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, D)
        gmask = offs_g < G
        m_run = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for s0 in range(0, ns, CHUNK):
            smask = gmask[:, None] & (s0 + offs_c < ns)[None, :]
            at = (r0 + offs_g)[:, None] * ns + s0 + offs_c[None, :]
            m = tl.load(PM + at, mask=smask, other=float("-inf"), cache_modifier=".cg")
            part_l = tl.load(PL + at, mask=smask, other=0.0, cache_modifier=".cg")
            part = tl.load(
                PA + at[:, :, None] * D + offs_d[None, None, :],
                mask=smask[:, :, None],
                other=0.0,
                cache_modifier=".cg",
            )
            m_new = tl.maximum(m_run, tl.max(m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            keep = tl.exp2(m_run - m_safe)
            w = tl.exp2(m - m_safe[:, None])
            l_run = l_run * keep + tl.sum(w * part_l, 1)
            acc = acc * keep[:, None] + tl.sum(w[:, :, None] * part, 1)
            m_run = m_new
        if OBSERVE:  # log2 of each row's softmax denominator, for the observation launch
            lse = tl.where(
                l_run == 0.0,
                float("inf"),
                tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log2(tl.where(l_run == 0.0, 1.0, l_run)),
            )
            tl.store(LSE + r0 + offs_g, lse, mask=gmask)
        out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
        tl.store(
            Out + (r0 + offs_g)[:, None] * D + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=gmask[:, None],
        )

    @triton.jit(do_not_specialize=["ns"])
    def _merge_kernel(
        PM,
        PL,
        PA,
        Out,
        LSE,
        ns,
        G: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        OBSERVE: tl.constexpr,
    ):
        """The merge as a second launch (``MERGE_CHUNK = 0`` in the split kernel): one program per
        (batch row, kv head)."""
        bh = tl.program_id(0).to(tl.int64)
        _merge_rows(PM, PL, PA, Out, LSE, bh * G, G, BLOCK_H, ns, D, CHUNK, OBSERVE)

    @triton.jit(
        do_not_specialize=[
            "s_len",
            "m_len",
            "w_len",
            "win",
            "cap_m",
            "capf",
            "split_tokens",
            "n_mid",
            "acap",
            "stride_mb",
            "stride_ms",
            "stride_bias",
        ],
        do_not_specialize_on_alignment=["Q", "M", "BIAS"],
    )
    def _observe_kernel(
        Q,
        FK,
        CK,
        KS,
        MPOS,
        KB,
        KM,
        INV,
        COS,
        SIN,
        M,
        BIAS,
        LSE,
        ACC,
        LENS,
        s_len,
        m_len,
        w_len,
        win,
        cap_m,
        capf,
        split_tokens,
        n_mid,
        acap,
        qk_scale,
        rope_scale,
        stride_mb,
        stride_ms,
        stride_bias,
        HKV: tl.constexpr,
        G: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        RK: tl.constexpr,
        WK: tl.constexpr,
        BLOCK_RK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        QUANT: tl.constexpr,
        PACKED: tl.constexpr,
        DOT_F32: tl.constexpr,
        TABLE: tl.constexpr,
        ROPE: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        REDUCE_MAX: tl.constexpr,
        DEVICE_LENS: tl.constexpr,
    ):
        """Each slot's attention of this step (the scores again, against each row's log2 denominator that the
        attention launch wrote), reduced over the G query heads, added to the float32 slot state ``ACC``
        ``[B * HKV, acap]``. Same splits as the attention."""
        F: tl.constexpr = D // 2
        if DEVICE_LENS:
            s_len, m_len, w_len = _device_lens(LENS, w_len)
        split = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        lse = tl.load(LSE + bh * G + offs_h, mask=hmask, other=float("inf"))
        if split < n_mid:
            q1, q2 = _halves(Q, (bh * G + offs_h) * D, F, BLOCK_H, hmask)
            if DOT_F32:
                q1 = q1.to(tl.float32)
                q2 = q2.to(tl.float32)
            kb1a, kb2a, kb1b, kb2b, km1, km2 = _key_basis(KB, KM, h, RK, WK, BLOCK_RK, D, F, PACKED, DOT_F32)
            start = split * split_tokens
            end = tl.minimum(start + split_tokens, m_len)
            for n0 in range(0, end - start, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < end
                s = _mid_scores(
                    q1,
                    q2,
                    CK,
                    KS,
                    MPOS,
                    kb1a,
                    kb2a,
                    kb1b,
                    kb2b,
                    km1,
                    km2,
                    INV,
                    COS,
                    SIN,
                    rope_scale,
                    bh,
                    cap_m,
                    tok,
                    valid,
                    WK,
                    BLOCK_RK,
                    F,
                    QUANT,
                    PACKED,
                    DOT_F32,
                    TABLE,
                    ROPE,
                )
                _observe_tile(
                    s,
                    s_len + tok,
                    valid,
                    lse,
                    hmask,
                    M,
                    b,
                    stride_mb,
                    stride_ms,
                    BIAS,
                    bh,
                    stride_bias,
                    ACC,
                    acap,
                    qk_scale,
                    MASK_KIND,
                    HAS_BIAS,
                    REDUCE_MAX,
                )
        else:
            q = tl.load(Q + (bh * G + offs_h)[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
            total = s_len + w_len  # the head [0, s), then the window's ring entries right after it
            fbase = bh * capf * D
            for n0 in range(0, total, BLOCK_N):
                j = n0 + offs_n
                valid = j < total
                turn = ((j - s_len - m_len % win) % win + win) % win  # ring entry -> place in the window
                slot = tl.where(j < s_len, j, s_len + m_len + turn)
                k = tl.load(FK + fbase + j[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
                if DOT_F32:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                _observe_tile(
                    s,
                    slot,
                    valid,
                    lse,
                    hmask,
                    M,
                    b,
                    stride_mb,
                    stride_ms,
                    BIAS,
                    bh,
                    stride_bias,
                    ACC,
                    acap,
                    qk_scale,
                    MASK_KIND,
                    HAS_BIAS,
                    REDUCE_MAX,
                )

    @triton.jit
    def _observe_tile(
        s,
        slot,
        valid,
        lse,
        hmask,
        M,
        b,
        stride_mb,
        stride_ms,
        BIAS,
        bh,
        stride_bias,
        ACC,
        acap,
        qk_scale,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        REDUCE_MAX: tl.constexpr,
    ):
        s, live = _mask_scores(
            s, slot, valid, M, b, stride_mb, stride_ms, BIAS, bh, stride_bias, qk_scale, MASK_KIND, HAS_BIAS
        )
        p = tl.where(hmask[:, None], tl.exp2(s - lse[:, None]), 0.0)
        col = tl.max(p, 0) if REDUCE_MAX else tl.sum(p, 0)
        aptr = ACC + bh * acap + slot
        tl.store(aptr, tl.load(aptr, mask=valid, other=0.0) + col, mask=valid)


if AVAILABLE:

    @triton.jit
    def _project_row(
        x,
        B,
        M,
        W,
        h,
        offs_d,
        R: tl.constexpr,
        r0: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        D: tl.constexpr,
        QUANT: tl.constexpr,
    ):
        """Coefficients ``r0 .. r0+ROWS`` of ``(x - mean) @ basis.T`` for one vector ``[BLOCK_R]``, whitened
        (times ``W``) when they are quantized."""
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < ROWS
        basis = tl.load(
            B + (h * R + r0 + offs_r)[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0
        )
        mean = tl.load(M + h * D + offs_d).to(tl.float32)
        c = tl.sum(basis.to(tl.float32) * (x - mean)[None, :], 1)
        if QUANT:
            c = c * tl.load(W + h * R + r0 + offs_r, mask=rmask, other=0.0)
        return c

    @triton.jit
    def _store_row(
        x,
        B,
        M,
        W,
        C,
        S,
        h,
        row,
        offs_d,
        R: tl.constexpr,
        WIDTH: tl.constexpr,
        BLOCK_R: tl.constexpr,
        D: tl.constexpr,
        QUANT: tl.constexpr,
        PACKED: tl.constexpr,
    ):
        """Project one vector and store its coefficients (and scale) at ``row``: int8 or packed int4 codes
        (symmetric, a float16 scale), or the model's dtype. Ties round up (codec.quantize: to even)."""
        offs_w = tl.arange(0, BLOCK_R)
        wmask = offs_w < WIDTH
        a = _project_row(x, B, M, W, h, offs_d, R, 0, WIDTH, BLOCK_R, D, QUANT)
        if QUANT:
            top = tl.max(tl.abs(a), 0)
            b = a
            if PACKED:
                b = _project_row(x, B, M, W, h, offs_d, R, WIDTH, WIDTH, BLOCK_R, D, QUANT)
                top = tl.maximum(top, tl.max(tl.abs(b), 0))
            qmax = 7.0 if PACKED else 127.0
            scale = (top / qmax).to(tl.float16).to(tl.float32)
            safe = tl.maximum(scale, 6.103515625e-05)  # float16 tiny, as codec.quantize
            ca = tl.minimum(tl.maximum(tl.floor(a / safe + 0.5), -qmax), qmax).to(tl.int8)
            if PACKED:
                cb = tl.minimum(tl.maximum(tl.floor(b / safe + 0.5), -qmax), qmax).to(tl.int8)
                ca = ((ca & 15) | (cb << 4)).to(tl.int8)
            tl.store(C + row * WIDTH + offs_w, ca, mask=wmask)
            tl.store(S + row + tl.arange(0, 1), (tl.full([1], 0.0, tl.float32) + scale).to(tl.float16))
        else:
            tl.store(C + row * WIDTH + offs_w, a.to(C.dtype.element_ty), mask=wmask)

    @triton.jit(
        do_not_specialize=["at", "ring_at", "window", "cap_m", "capf", "stride_pb", "stride_kb", "stride_kh"],
        do_not_specialize_on_alignment=["K", "V", "POS"],
    )
    def _append_kernel(
        K,
        V,
        POS,
        FK,
        FV,
        CK,
        CV,
        KS,
        VS,
        MPOS,
        KB,
        KM,
        KW,
        VB,
        VM,
        VW,
        INV,
        LENS,
        rope_scale,
        at,
        ring_at,
        window,
        cap_m,
        capf,
        stride_pb,
        stride_kb,
        stride_kh,
        HKV: tl.constexpr,
        D: tl.constexpr,
        RK: tl.constexpr,
        RV: tl.constexpr,
        WK: tl.constexpr,
        WV: tl.constexpr,
        BLOCK_RK: tl.constexpr,
        BLOCK_RV: tl.constexpr,
        QUANT: tl.constexpr,
        PACKED: tl.constexpr,
        ROPE: tl.constexpr,
        RING: tl.constexpr,
        DEVICE_LENS: tl.constexpr,
    ):
        """A decode step's new token of one (batch row, kv head): its exact key and value into the ring entry
        ``ring_at``, its coefficients (key un-rotated at its position first) and position into rest slot
        ``at``. ``DEVICE_LENS`` (a static layout): ``at`` and ``ring_at`` from the device's ``LENS``
        ``[s, m]`` and the ring's ``window`` entries."""
        F: tl.constexpr = D // 2
        if DEVICE_LENS:
            at = tl.load(LENS + 1).to(tl.int32)
            ring_at = tl.load(LENS).to(tl.int32) + at % window
        bh = tl.program_id(0).to(tl.int64)
        b = bh // HKV
        h = bh % HKV
        offs_d = tl.arange(0, D)
        src = b * stride_kb + h * stride_kh + offs_d
        k = tl.load(K + src)
        v = tl.load(V + src)
        pos = tl.load(POS + b * stride_pb)
        if RING:
            dst = (bh * capf + ring_at) * D + offs_d
            tl.store(FK + dst, k)
            tl.store(FV + dst, v)
        x = k.to(tl.float32)
        if ROPE:  # un-rotate: the pair (i, i + F) turns back by pos * inv_freq[i]
            inv = tl.load(INV + offs_d % F)
            ang = pos.to(tl.float32) * inv
            turns = tl.floor(ang * 0.15915494309189535 + 0.5)
            r = (ang - turns * 6.28125) - turns * 0.0019353071795864769
            cos = tl.cos(r) * rope_scale
            sin = tl.sin(r) * rope_scale
            partner = tl.load(K + b * stride_kb + h * stride_kh + (offs_d + F) % D).to(tl.float32)
            sign = tl.where(offs_d < F, 1.0, -1.0)
            x = (x * cos + sign * partner * sin) / (cos * cos + sin * sin)
        row = bh * cap_m + at
        _store_row(x, KB, KM, KW, CK, KS, h, row, offs_d, RK, WK, BLOCK_RK, D, QUANT, PACKED)
        _store_row(v.to(tl.float32), VB, VM, VW, CV, VS, h, row, offs_d, RV, WV, BLOCK_RV, D, QUANT, PACKED)
        tl.store(MPOS + row, pos)


def append_token(store, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                 lens: torch.Tensor | None = None) -> bool:
    """One decode token ``[B, H, 1, D]`` per (batch row, kv head) at true positions ``rows`` ``[B or 1, 1]``
    into ``store`` in one launch (ring entry, coefficients, position); ``False`` where the kernel does not
    apply. ``lens`` (a static layout's ``[s, m]``, int64 on the device): the slot and ring entry are read
    there, not from the store's host counters, so the launch can be captured once and replayed."""
    b, h, q, d = keys.shape
    same = values.stride(0) == keys.stride(0) and values.stride(1) == keys.stride(1)  # dim 2 has size 1
    if q != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1 or not same or keys.dtype != store.dtype:
        return False
    rope = rope_consts(store)
    dummy = store.ck
    win = store.window
    consts = dict(
        HKV=h,
        D=d,
        **_widths(store),
        QUANT=store.quantized,
        PACKED=store.bits == 4,
        ROPE=rope is not None,
        RING=win > 0 or lens is not None,  # static, window 0: the head's next slot gets the exact token
        DEVICE_LENS=lens is not None,
    )
    key = (keys.device, keys.dtype, store.ck.dtype, "lowrank-append", *consts.values())
    rows = rows.to(torch.int32)
    tensors = (
        keys,
        values,
        rows,
        store.fk,
        store.fv,
        store.ck,
        store.cv,
        store.ks if store.quantized else dummy,
        store.vs if store.quantized else dummy,
        store.mpos,
        store.basis.k_basis,
        store.basis.k_mean,
        store.basis.k_inv,
        store.basis.v_basis,
        store.basis.v_mean,
        store.basis.v_inv,
        rope.inv_freq if rope is not None else dummy,
        lens if lens is not None else dummy,  # dummy: never read
    )
    args = tuple(t.data_ptr() for t in tensors) if is_compiled(key) and not INTERPRET else tensors
    ring_at = store.hc + store.m % win if win else 0
    launch(
        _append_kernel,
        (b * h,),
        key,
        (
            *args,
            rope.scale if rope is not None else 1.0,
            store.m,
            ring_at,
            max(win, 1),
            store.cap_m,
            store.fk.shape[2],
            rows.stride(0) if rows.shape[0] > 1 else 0,
            keys.stride(0),
            keys.stride(1),
        ),
        consts,
        num_warps=1,
    )
    return True


def _widths(store) -> dict[str, int]:
    """Ranks, stored widths (packed int4: half the rank; the halves' dots take rows ``[0, W)`` and ``[W, R)``)
    and the blocks of the store's coefficients."""
    wk, wv = (store.rk // 2, store.rv // 2) if store.bits == 4 else (store.rk, store.rv)
    return dict(
        RK=store.rk,
        RV=store.rv,
        WK=wk,
        WV=wv,
        BLOCK_RK=max(16, triton.next_power_of_2(wk)),
        BLOCK_RV=max(16, triton.next_power_of_2(wv)),
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SMS: dict = {}
_WORK: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def splits(m: int, batch_heads: int, device: torch.device) -> tuple[int, int]:
    """``(splits of a middle of m slots, slots per split)``: about ``WAVES * PER_SM`` programs per SM over
    the batch rows and kv heads, at least ``SPLIT_MIN`` slots each, whole tiles."""
    if m == 0:
        return 0, BLOCK_N
    want = max(1, WAVES * PER_SM * _sm_count(device) // batch_heads)
    n = max(1, min(want, _cdiv(m, SPLIT_MIN)))
    per = _cdiv(_cdiv(m, n), BLOCK_N) * BLOCK_N
    return _cdiv(m, per), per


def _workspace(device: torch.device, b_hkv: int, g: int, ns: int, d: int) -> tuple[torch.Tensor, ...]:
    """Partial softmax states of the splits, the arrival counts (zero between launches) and each row's log2
    denominator; shared by every layer and cache on the device (one stream runs them in order)."""
    key = (device, b_hkv, g, ns, d)
    work = _WORK.get(key)
    if work is None:
        if len(_WORK) > 64:
            _WORK.clear()
        pm = torch.empty((b_hkv * g, ns), dtype=torch.float32, device=device)
        work = _WORK[key] = (
            pm,
            torch.empty_like(pm),
            torch.empty((b_hkv * g, ns, d), dtype=torch.float32, device=device),
            torch.zeros(b_hkv, dtype=torch.int32, device=device),
            torch.empty(b_hkv * g, dtype=torch.float32, device=device),
        )
    return work


class RopeConsts(NamedTuple):
    inv_freq: torch.Tensor  # [F] float32: the model's frequencies, as it multiplies positions by them
    scale: float  # the RoPE's attention scaling (cos/sin magnitude), 1.0 for most models


def static_workspace(store, query: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The workspace :func:`decode_attention` takes with ``lens`` for ``query``'s shape (splits over the
    middle's whole capacity), for a static layout to hold."""
    b, hq, _, d = query.shape
    n_mid, _ = splits(store.cap_m, b * store.h, query.device)
    return _workspace(query.device, b * store.h, hq // store.h, n_mid + 1, d)


def rope_consts(store) -> RopeConsts | None:
    """The model's RoPE frequencies and scale, recovered from its own cos/sin once per cache and device:
    each frequency is the float32 value whose products with large positions reproduce the model's cos/sin."""
    table = store.table
    if table is None:
        return None
    shared = store.shared
    hit = shared.rope_consts.get(store.device)
    if hit is not None:
        return hit
    dec = shared.decoder
    probe = torch.tensor([1, 777, 4093, 8191])
    cos, sin = shared.info.rope(probe)
    cos, sin = cos[:, : table.half].double().cpu(), sin[:, : table.half].double().cpu()
    scale = float(torch.sqrt(cos[0] ** 2 + sin[0] ** 2).mean())
    theta = dec.theta.float()
    best = theta.clone()
    err_best = torch.full_like(theta, float("inf"), dtype=torch.float64)
    for k in range(-3, 4):
        cand = (
            torch.nextafter(theta, torch.full_like(theta, math.inf if k > 0 else -math.inf)) if k else theta
        )
        for _ in range(abs(k) - 1):
            cand = torch.nextafter(cand, torch.full_like(cand, math.inf if k > 0 else -math.inf))
        ang = (probe.float()[:, None] * cand[None, :]).double()
        err = ((torch.cos(ang) * scale - cos).abs() + (torch.sin(ang) * scale - sin).abs()).sum(0)
        better = err < err_best
        best, err_best = torch.where(better, cand, best), torch.where(better, err, err_best)
    consts = RopeConsts(best.to(store.device).contiguous(), scale)
    shared.rope_consts[store.device] = consts
    return consts


def decode_attention(
    store,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    accumulate=None,
    lens: torch.Tensor | None = None,
    work: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor | None:
    """Attention of one query per head ``[B, Hq, 1, D]`` over ``store``, ``[B, 1, Hq, D]``; with the per-slot
    ``bias`` ``[B, H, >= S]`` (float32) and, with ``accumulate``, each slot's attention (reduced over the
    query heads of its kv head) added to ``accumulate.into``. ``None`` where the kernel does not apply.

    ``lens`` (a static layout's ``[s, m]``, int64 on the device): the lengths are read there, the splits
    cover the middle's whole capacity (the programs past its length do nothing), and ``work``
    (:func:`static_workspace`, held by the layout: a captured graph keeps its pointers) is the workspace."""
    b, hq, q, d = query.shape
    h = store.h
    if q != 1 or hq % h or d & (d - 1) or d < 32 or b != store.b or query.dtype != store.dtype:
        return None
    if bias is not None and not (
        bias.dtype == torch.float32 and bias.stride(-1) == 1 and bias.stride(0) == h * bias.stride(1)
    ):
        return None
    acc = None
    if accumulate is not None:
        acc = accumulate.into
        if accumulate.reduce not in ("sum", "max") or acc.dtype != torch.float32 or not acc.is_contiguous():
            return None
    decode_mask = kernel_mask(attention_mask, store.length, query)
    if decode_mask is None:
        return None
    mask_kind, mask, smb, sms = decode_mask
    query = query.contiguous()
    g = hq // h
    rope = rope_consts(store)
    table = ROPE_FROM == "table" and rope is not None and lens is None
    m_len, w = store.m - store.w, store.w
    n_mid, per = splits(m_len if lens is None else store.cap_m, b * h, query.device)
    ns = n_mid + 1
    pm, pl, pa, lock, lse = work if lens is not None else _workspace(query.device, b * h, g, ns, d)
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    bs = store.basis
    dummy = out
    ks = store.ks if store.quantized else dummy
    vs = store.vs if store.quantized else dummy
    inv = rope.inv_freq if rope is not None else dummy
    cos_t = sin_t = dummy
    if table:  # the table must cover the middle's positions (a sync: the table mode is for measuring only)
        store.table.ensure(int(store.mpos[:, :, :m_len].max()) + 1 if m_len else 1)
        cos_t, sin_t = store.table.cos, store.table.sin
    bias_in = bias if bias is not None else dummy
    stride_bias = bias.stride(1) if bias is not None else 0
    consts = dict(
        HKV=h,
        G=g,
        BLOCK_H=max(16, triton.next_power_of_2(g)),
        D=d,
        **_widths(store),
        BLOCK_N=BLOCK_N,
        QUANT=store.quantized,
        PACKED=store.bits == 4,
        DOT_F32=query.dtype == torch.float32,
        TABLE=table,
        ROPE=rope is not None,
        MASK_KIND=mask_kind,
        HAS_BIAS=bias is not None,
        MERGE_CHUNK=MERGE_CHUNK,
        OBSERVE=acc is not None,
        DEVICE_LENS=lens is not None,
    )
    key = (query.device, query.dtype, store.ck.dtype, mask.dtype, "lowrank", NUM_WARPS, *consts.values())
    scale = rope.scale if rope is not None else 1.0
    tensors = (
        query,
        store.fk,
        store.fv,
        store.ck,
        store.cv,
        ks,
        vs,
        store.mpos,
        bs.k_basis,
        bs.k_mean,
        bs.v_basis,
        bs.v_mean,
        inv,
        cos_t,
        sin_t,
        mask,
        bias_in,
        pm,
        pl,
        pa,
        lock,
        lse,
        out,
        lens if lens is not None else dummy,  # dummy: never read
    )
    args = tuple(t.data_ptr() for t in tensors) if is_compiled(key) and not INTERPRET else tensors
    win = max(store.window, 1)
    if lens is not None:
        w = store.window  # the kernel reads s and m from lens; w_len carries the window
    launch(
        _split_kernel,
        (ns, b * h),
        key,
        (
            *args,
            store.s,
            m_len,
            w,
            win,
            store.cap_m,
            store.fk.shape[2],
            per,
            n_mid,
            scaling * LOG2E,
            scale,
            smb,
            sms,
            stride_bias,
        ),
        consts,
        num_warps=NUM_WARPS,
    )
    if not MERGE_CHUNK:
        mc = dict(G=g, BLOCK_H=consts["BLOCK_H"], D=d, CHUNK=16, OBSERVE=acc is not None)
        launch(
            _merge_kernel,
            (b * h,),
            (query.device, "lowrank-merge", *mc.values()),
            (pm, pl, pa, out, lse, ns),
            mc,
        )
    if acc is not None:
        oc = {
            k: consts[k]
            for k in (
                "HKV",
                "G",
                "BLOCK_H",
                "D",
                "RK",
                "WK",
                "BLOCK_RK",
                "BLOCK_N",
                "QUANT",
                "PACKED",
                "DOT_F32",
                "TABLE",
                "ROPE",
                "MASK_KIND",
                "HAS_BIAS",
                "DEVICE_LENS",
            )
        }
        oc["REDUCE_MAX"] = accumulate.reduce == "max"
        okey = (query.device, query.dtype, store.ck.dtype, mask.dtype, "lowrank-observe", *oc.values())
        launch(
            _observe_kernel,
            (ns, b * h),
            okey,
            (
                query,
                store.fk,
                store.ck,
                ks,
                store.mpos,
                bs.k_basis,
                bs.k_mean,
                inv,
                cos_t,
                sin_t,
                mask,
                bias_in,
                lse,
                acc,
                lens if lens is not None else dummy,
                store.s,
                m_len,
                w,
                win,
                store.cap_m,
                store.fk.shape[2],
                per,
                n_mid,
                acc.shape[2],
                scaling * LOG2E,
                scale,
                smb,
                sms,
                stride_bias,
            ),
            oc,
            num_warps=NUM_WARPS,
        )
    return out
