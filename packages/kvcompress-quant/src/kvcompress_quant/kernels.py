"""Fused decode attention straight from the packed store (Triton), flash-decoding style.

One program per (sequence split, batch row, kv head) attends all the query heads
of that kv head (GQA) to its slice of the tokens: the quantized middle is read as
packed bytes and decoded in registers (never a dequantized copy in memory), the
full-precision sink + tail form one more split. The last split of each (batch row, kv head)
to finish merges the splits' partial softmax states, so a decode step is one launch. Triton
is optional: without it ``AVAILABLE`` is False and the store falls back to dequantize-then-sdpa.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from kvcompress._kernels import is_compiled, kernel_mask, launch, resident_programs

from . import codec

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = tl = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the 'triton' package is not installed ({exc})"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N = 64  # tokens per tile
NUM_WARPS = 4
SPLIT_MIN = 128  # fewest tokens per split of the middle
PROGRAMS_PER_SM: int | None = None  # programs one SM runs at once (None: from the compiled kernel)
MAX_WAVES = 8  # most waves of programs the splits may take (kernels._splits)
NUM_STAGES = 3  # the best of a sweep on an H100 (gpu_bench.py kernel)
MAXNREG: int | None = None  # a cap on registers per thread (None: the compiler's choice)
MERGE_CHUNK = 16  # splits merged at a time by the last split to finish (0: a second launch merges)
LOG2E = 1.4426950408889634
CONV = 2  # codes to fp16: 0 int-to-float conversion, 1 bit trick in Triton, 2 bit trick in PTX


def _codes_ptx(bits: int, shift: int) -> str:
    """PTX turning 4 packed bytes into 4 fp16 codes (the ``bits`` at ``shift``), exactly.

    Each byte goes to a 16-bit half, ``lop3`` keeps the code's bits and ORs in 0x6400 (fp16 1024; the
    code lands in the mantissa as ``code << shift``), one ``fma`` scales by ``2**-shift`` and subtracts
    1024: two integer and one half2 op per two codes instead of an int-to-float conversion each.
    """
    mask = ((1 << bits) - 1) << shift
    scale = (15 - shift) << 10  # fp16 2**-shift
    offset = 0x8000 | ((25 - shift) << 10)  # fp16 -1024 * 2**-shift
    pair = lambda h: f"0x{h:04x}{h:04x}"  # noqa: E731
    return (f"{{ .reg .b32 t0, t1, s, o;\n"
            f"prmt.b32 t0, $2, $2, 0x0100;\nprmt.b32 t1, $2, $2, 0x0302;\n"
            f"lop3.b32 t0, t0, {pair(mask)}, 0x64006400, 0xEA;\n"
            f"lop3.b32 t1, t1, {pair(mask)}, 0x64006400, 0xEA;\n"
            f"mov.b32 s, {pair(scale)};\nmov.b32 o, {pair(offset)};\n"
            f"fma.rn.f16x2 $0, t0, s, o;\nfma.rn.f16x2 $1, t1, s, o; }}")


if AVAILABLE:
    from kvcompress._kernels import (  # the core's mask, bias, softmax, observation store
        add_column,
        mask_bias,
        online_softmax_step,
        slot_bias,
    )

    _ASM_8 = tl.constexpr(_codes_ptx(8, 0))
    _ASM_4_0 = tl.constexpr(_codes_ptx(4, 0))
    _ASM_4_4 = tl.constexpr(_codes_ptx(4, 4))
    _ASM_2_0 = tl.constexpr(_codes_ptx(2, 0))
    _ASM_2_2 = tl.constexpr(_codes_ptx(2, 2))
    _ASM_2_4 = tl.constexpr(_codes_ptx(2, 4))
    _ASM_2_6 = tl.constexpr(_codes_ptx(2, 6))

    @triton.jit
    def _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32: tl.constexpr):
        """One tile of flash attention over decoded keys/values ``[BLOCK_N, D]``."""
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        p, alpha, m_i, l_i = _softmax_step(s, valid, bias, m_i, l_i, qk_scale)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_i, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _piece(C, cbase, tok, valid, J: tl.constexpr, W: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
               CONV: tl.constexpr = 0):
        """Codes of piece ``J`` (channels ``J*W .. J*W+W``) of a tile, as fp16 ``[BLOCK_N, W]``."""
        offs_w = tl.arange(0, W)
        x = tl.load(C + cbase + tok[:, None] * DP + ((J * W) % DP + offs_w)[None, :], mask=valid[:, None],
                    other=0)
        SHIFT: tl.constexpr = (J * W) // DP * BITS
        if CONV == 1:  # 0x6400 | code is the fp16 1024 + code: bit operations, no int-to-float conversion
            y = ((x >> SHIFT) & ((1 << BITS) - 1)).to(tl.int16) | 0x6400
            return y.to(tl.float16, bitcast=True) - 1024.0
        if CONV == 2:
            return _codes_asm(x, BITS, SHIFT)
        if BITS < 8:
            x = (x >> SHIFT) & ((1 << BITS) - 1)
        return x.to(tl.float16)

    @triton.jit
    def _codes_asm(x, BITS: tl.constexpr, SHIFT: tl.constexpr):
        """fp16 codes of the ``BITS`` bits at ``SHIFT`` of each byte of ``x``: four bytes per PTX block."""
        if BITS == 8:
            asm: tl.constexpr = _ASM_8
        elif SHIFT == 0:
            asm: tl.constexpr = _ASM_4_0 if BITS == 4 else _ASM_2_0
        elif SHIFT == 2:
            asm: tl.constexpr = _ASM_2_2
        elif SHIFT == 4:
            asm: tl.constexpr = _ASM_4_4 if BITS == 4 else _ASM_2_4
        else:
            asm: tl.constexpr = _ASM_2_6
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _piece_qk(s, q, CK, KS, KZ, cbase, krow, tok, valid, J: tl.constexpr, W: tl.constexpr,
                  DP: tl.constexpr, BITS: tl.constexpr, CONV: tl.constexpr):
        """``s`` plus the scores of piece ``J`` of a tile, ``(q * ks) . codes + q . kz`` (one key group per
        tile). The zero points' ``q . kz`` comes out of a dot with ones, already broadcast over the tile's
        tokens: no reduction, no layout change."""
        offs_w = tl.arange(0, W)
        ks = tl.load(KS + krow + J * W + offs_w).to(tl.float32)
        kz = tl.load(KZ + krow + J * W + offs_w).to(tl.float32)
        x = _piece(CK, cbase, tok, valid, J, W, DP, BITS, CONV)
        s = tl.dot((q * ks[None, :]).to(tl.float16), tl.trans(x), s)
        ones = tl.full([W, x.shape[0]], 1.0, tl.float16)
        return tl.dot((q * kz[None, :]).to(tl.float16), ones, s)

    @triton.jit
    def _value_scale(VS, VZ, vrow, valid, J: tl.constexpr, W: tl.constexpr, GC: tl.constexpr):
        vs = tl.load(VS + vrow + (J * W) // GC, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(VZ + vrow + (J * W) // GC, mask=valid, other=0.0).to(tl.float32)
        return vs, vz

    @triton.jit
    def _value_scales(VS, VZ, vrow, valid, NP: tl.constexpr, W: tl.constexpr, GC: tl.constexpr):
        """Scale and zero point of each token of a tile for each of the ``NP`` pieces (4 pairs: unused
        pieces repeat piece 0's)."""
        vs0, vz0 = _value_scale(VS, VZ, vrow, valid, 0, W, GC)
        vs1, vz1 = vs0, vz0
        vs2, vz2 = vs0, vz0
        vs3, vz3 = vs0, vz0
        if NP > 1:
            vs1, vz1 = _value_scale(VS, VZ, vrow, valid, 1, W, GC)
        if NP > 2:
            vs2, vz2 = _value_scale(VS, VZ, vrow, valid, 2, W, GC)
            vs3, vz3 = _value_scale(VS, VZ, vrow, valid, 3, W, GC)
        return vs0, vz0, vs1, vz1, vs2, vz2, vs3, vz3

    @triton.jit
    def _piece_pv(acc, zacc, alpha, p, CV, vs, vz, cbase, tok, valid, J: tl.constexpr, W: tl.constexpr,
                  DP: tl.constexpr, BITS: tl.constexpr, CONV: tl.constexpr):
        """``acc`` rescaled plus ``p @ values`` of piece ``J``: token value scales fold into ``p``; the zero
        points' ``p . vz`` is kept per token in ``zacc`` (summed once, after the last tile)."""
        x = _piece(CV, cbase, tok, valid, J, W, DP, BITS, CONV)
        acc = tl.dot((p * vs[None, :]).to(tl.float16), x, acc * alpha[:, None])
        return acc, zacc * alpha[:, None] + p * vz[None, :]

    @triton.jit
    def _rot(x, HM, r0, c0, K: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
        """``x @ R[r0 : r0+K, c0 : c0+N]`` for float32 ``x`` ``[rows, K]``: ``R`` is the store's ``[D, D]``
        float32 Hadamard rotation at ``HM`` (3xTF32: close to float32, at tensor-core speed)."""
        r = tl.load(HM + (r0 + tl.arange(0, K))[:, None] * D + c0 + tl.arange(0, N)[None, :])
        return tl.dot(x, r, input_precision="tf32x3")

    @triton.jit
    def _softmax_step(s, valid, bias, m_i, l_i, qk_scale):
        """Online-softmax bookkeeping of one tile of raw scores ``s`` [BLOCK_H, BLOCK_N]."""
        s = tl.where(valid[None, :], s * qk_scale + bias[None, :], float("-inf"))
        p, alpha, m_new = online_softmax_step(s, m_i)
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit(do_not_specialize=["s_len", "m_len", "w_len", "cap_m", "capf", "split_tokens",
                                   "n_mid_splits", "stride_mb", "stride_ms", "stride_bias"],
                do_not_specialize_on_alignment=["Q", "M", "BIAS"])
    def _split_kernel(
        Q, FK, FV, CK, CV, KS, KZ, VS, VZ, M, PM, PL, PA, Out, LOCK, HM, BIAS, LSE, LENS,
        s_len, m_len, w_len, cap_m, capf, split_tokens, n_mid_splits, qk_scale, stride_mb, stride_ms,
        stride_bias,
        HKV: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        GT: tl.constexpr, GC: tl.constexpr, K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr,
        SINK: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
        PIECES: tl.constexpr, W: tl.constexpr, CONV: tl.constexpr, MERGE_CHUNK: tl.constexpr,
        GQA_P2: tl.constexpr, ROTATE: tl.constexpr, HAS_BIAS: tl.constexpr, OBSERVE: tl.constexpr,
        DEVICE_LENS: tl.constexpr,
    ):
        # Every store tensor is contiguous, so strides follow from the shapes: codes [B, HKV, cap_m, DP],
        # scales [B, HKV, cap_m // GT, D] (per channel) or [B, HKV, cap_m, D // GC] (per token),
        # full-precision buffers [B, HKV, capf, D], the query [B, HKV * GQA, D]; the per-slot bias
        # [B * HKV, >= s + m + w] (row stride stride_bias) in the slot table's order: sink, middle, tail.
        # DEVICE_LENS (a static layout, CUDA graphs): the lengths come from LENS, see _device_lens.
        if DEVICE_LENS:
            s_len, m_len, w_len = _device_lens(LENS, SINK)
        split = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        ns = n_mid_splits + 1
        DP: tl.constexpr = D * BITS // 8
        NGC: tl.constexpr = D // GC
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < GQA
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        qrow = Q + (bh * GQA + offs_h)[:, None] * D
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        row = (bh * GQA + offs_h) * ns + split
        cbase = bh * cap_m * DP
        if split < n_mid_splits and PIECES:
            # Keys per channel, values per token: the middle is read as NP pieces of W channels, each a
            # [BLOCK_N, W] tile of packed bytes shifted once (never unpacked into a [BLOCK_N, D] tile). The
            # key scale of the tile's token group folds into the query, each token's value scale into p;
            # codes (< 256) are exact in fp16, so the dots take fp16 operands with fp32 accumulation. The
            # query carries qk_scale, so scores leave the dots in log2 units. No per-tile reduction but the
            # row max: the softmax denominator and the value zero points accumulate per token.
            NP: tl.constexpr = D // W
            offs_w = tl.arange(0, W)
            if ROTATE:  # the codes encode keys and values times R: the query goes in rotated, piece by piece
                qf = tl.load(qrow + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
                q0 = _rot(qf, HM, 0, 0, D, W, D)
                q1 = q0
                q2 = q0
                q3 = q0
                if NP > 1:
                    q1 = _rot(qf, HM, 0, W, D, W, D)
                if NP > 2:
                    q2 = _rot(qf, HM, 0, 2 * W, D, W, D)
                    q3 = _rot(qf, HM, 0, 3 * W, D, W, D)
            else:
                q0 = tl.load(qrow + offs_w[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
                q1 = q0
                q2 = q0
                q3 = q0
                if NP > 1:
                    q1 = tl.load(qrow + (W + offs_w)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
                    q1 = q1 * qk_scale
                if NP > 2:
                    q2 = tl.load(qrow + (2 * W + offs_w)[None, :], mask=hmask[:, None], other=0.0)
                    q3 = tl.load(qrow + (3 * W + offs_w)[None, :], mask=hmask[:, None], other=0.0)
                    q2 = q2.to(tl.float32) * qk_scale
                    q3 = q3.to(tl.float32) * qk_scale
            a0 = tl.zeros([BLOCK_H, W], tl.float32)
            a1 = a0
            a2 = a0
            a3 = a0
            l_tok = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
            z0 = l_tok
            z1 = l_tok
            z2 = l_tok
            z3 = l_tok
            start = split * split_tokens
            end = tl.minimum(start + split_tokens, m_len)
            kbase = bh * (cap_m // GT) * D
            vbase = bh * cap_m * NGC
            # each token's value scale and zero point are loaded one tile ahead
            vrow = vbase + (start + offs_n) * NGC
            vmask = start + offs_n < end
            vs0, vz0, vs1, vz1, vs2, vz2, vs3, vz3 = _value_scales(VS, VZ, vrow, vmask, NP, W, GC)
            for n0 in range(0, end - start, BLOCK_N):  # whole tiles: m is a multiple of GT, GT of BLOCK_N
                tok = start + n0 + offs_n
                valid = tl.full([BLOCK_N], 1, tl.int1)
                vrow = vbase + (tok + BLOCK_N) * NGC
                vmask = tok + BLOCK_N < end
                ns0, nz0, ns1, nz1, ns2, nz2, ns3, nz3 = _value_scales(VS, VZ, vrow, vmask, NP, W, GC)
                krow = kbase + (start + n0) // GT * D
                s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
                s = _piece_qk(s, q0, CK, KS, KZ, cbase, krow, tok, valid, 0, W, DP, BITS, CONV)
                if NP > 1:
                    s = _piece_qk(s, q1, CK, KS, KZ, cbase, krow, tok, valid, 1, W, DP, BITS, CONV)
                if NP > 2:
                    s = _piece_qk(s, q2, CK, KS, KZ, cbase, krow, tok, valid, 2, W, DP, BITS, CONV)
                    s = _piece_qk(s, q3, CK, KS, KZ, cbase, krow, tok, valid, 3, W, DP, BITS, CONV)
                valid, bias = mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                if MASK_KIND != 0:
                    s = tl.where(valid[None, :], s + bias[None, :], float("-inf"))
                if HAS_BIAS:
                    s = s + slot_bias(BIAS, bh, s_len + tok, valid, stride_bias, HAS_BIAS)[None, :]
                p, alpha, m_i = online_softmax_step(s, m_i)
                l_tok = l_tok * alpha[:, None] + p
                a0, z0 = _piece_pv(a0, z0, alpha, p, CV, vs0, vz0, cbase, tok, valid, 0, W, DP, BITS, CONV)
                if NP > 1:
                    a1, z1 = _piece_pv(a1, z1, alpha, p, CV, vs1, vz1, cbase, tok, valid, 1, W, DP, BITS,
                                         CONV)
                if NP > 2:
                    a2, z2 = _piece_pv(a2, z2, alpha, p, CV, vs2, vz2, cbase, tok, valid, 2, W, DP, BITS,
                                         CONV)
                    a3, z3 = _piece_pv(a3, z3, alpha, p, CV, vs3, vz3, cbase, tok, valid, 3, W, DP, BITS,
                                         CONV)
                vs0, vz0, vs1, vz1, vs2, vz2, vs3, vz3 = ns0, nz0, ns1, nz1, ns2, nz2, ns3, nz3
            l_i = tl.sum(l_tok, 1)
            a0 += tl.sum(z0, 1)[:, None]
            if NP > 1:
                a1 += tl.sum(z1, 1)[:, None]
            if NP > 2:
                a2 += tl.sum(z2, 1)[:, None]
                a3 += tl.sum(z3, 1)[:, None]
            if ROTATE:  # back to the model's basis: every split's partial state is in the same one
                out = _rot(a0, HM, 0, 0, W, D, D)
                if NP > 1:
                    out += _rot(a1, HM, W, 0, W, D, D)
                if NP > 2:
                    out += _rot(a2, HM, 2 * W, 0, W, D, D) + _rot(a3, HM, 3 * W, 0, W, D, D)
                tl.store(PA + row[:, None] * D + offs_d[None, :], out, mask=hmask[:, None])
            else:
                tl.store(PA + row[:, None] * D + offs_w[None, :], a0, mask=hmask[:, None])
                if NP > 1:
                    tl.store(PA + row[:, None] * D + (W + offs_w)[None, :], a1, mask=hmask[:, None])
                if NP > 2:
                    tl.store(PA + row[:, None] * D + (2 * W + offs_w)[None, :], a2, mask=hmask[:, None])
                    tl.store(PA + row[:, None] * D + (3 * W + offs_w)[None, :], a3, mask=hmask[:, None])
        else:
            q = tl.load(qrow + offs_d[None, :], mask=hmask[:, None], other=0.0)
            acc = tl.zeros([BLOCK_H, D], tl.float32)
            if split < n_mid_splits:  # any axes: decode each tile to [BLOCK_N, D] in registers
                if ROTATE:  # the codes encode keys and values times R: the query goes in rotated
                    q = _rot(q.to(tl.float32), HM, 0, 0, D, D, D).to(q.dtype)
                LEVELS: tl.constexpr = (1 << BITS) - 1
                byte = offs_d % DP
                shift = (offs_d // DP) * BITS
                start = split * split_tokens
                for n0 in range(0, split_tokens, BLOCK_N):
                    tok = start + n0 + offs_n
                    valid = tok < m_len
                    cptr = cbase + tok[:, None] * DP + byte[None, :]
                    if K_TOKEN:
                        kp = (bh * cap_m + tok)[:, None] * NGC + (offs_d // GC)[None, :]
                    else:
                        kp = (bh * (cap_m // GT) + tok // GT)[:, None] * D + offs_d[None, :]
                    if V_TOKEN:
                        vp = (bh * cap_m + tok)[:, None] * NGC + (offs_d // GC)[None, :]
                    else:
                        vp = (bh * (cap_m // GT) + tok // GT)[:, None] * D + offs_d[None, :]
                    kc = tl.load(CK + cptr, mask=valid[:, None], other=0).to(tl.int32)
                    vc = tl.load(CV + cptr, mask=valid[:, None], other=0).to(tl.int32)
                    kc = (kc >> shift[None, :]) & LEVELS
                    vc = (vc >> shift[None, :]) & LEVELS
                    ks = tl.load(KS + kp, mask=valid[:, None], other=0.0).to(tl.float32)
                    kz = tl.load(KZ + kp, mask=valid[:, None], other=0.0).to(tl.float32)
                    vs = tl.load(VS + vp, mask=valid[:, None], other=0.0).to(tl.float32)
                    vz = tl.load(VZ + vp, mask=valid[:, None], other=0.0).to(tl.float32)
                    k = (kc.to(tl.float32) * ks + kz).to(q.dtype)
                    v = (vc.to(tl.float32) * vs + vz).to(q.dtype)
                    valid, bias = mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                    bias += slot_bias(BIAS, bh, s_len + tok, valid, stride_bias, HAS_BIAS)
                    m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
                if ROTATE:  # the output back to the model's basis, where the sink + tail split works
                    acc = _rot(acc, HM, 0, 0, D, D, D)
            else:  # the full-precision sink and tail
                total = SINK + w_len
                fbase = bh * capf * D
                for n0 in range(0, total, BLOCK_N):
                    j = n0 + offs_n
                    valid = (j < s_len) | ((j >= SINK) & (j < total))
                    slot = tl.where(j < SINK, j, j - SINK + s_len + m_len)
                    fptr = fbase + j[:, None] * D + offs_d[None, :]
                    k = tl.load(FK + fptr, mask=valid[:, None], other=0.0)
                    v = tl.load(FV + fptr, mask=valid[:, None], other=0.0)
                    valid, bias = mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND)
                    bias += slot_bias(BIAS, bh, slot, valid, stride_bias, HAS_BIAS)
                    m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            tl.store(PA + row[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
        tl.store(PM + row, m_i, mask=hmask)
        tl.store(PL + row, l_i, mask=hmask)
        # The last split of this (batch row, kv head) to finish merges every split's partial state into
        # Out (no second launch): the CTA's stores, a barrier, then one acq_rel atomic count per program.
        if MERGE_CHUNK > 0:
            tl.debug_barrier()
            if tl.atomic_add(LOCK + bh, 1, sem="acq_rel", scope="gpu") == ns - 1:
                _merge_rows(PM, PL, PA, Out, LSE, bh * GQA, GQA, GQA_P2, ns, D, MERGE_CHUNK, OBSERVE)
                tl.store(LOCK + bh, 0)  # ready for the next launch (stream order)

    @triton.jit
    def _device_lens(LENS, SINK: tl.constexpr):
        """(sink, middle, tail) lengths from a static layout's ``[at, m]`` (int64): ``at`` is the next free
        full-precision slot (the sink fills first, then the tail from ``SINK``), ``m`` the middle's length."""
        at = tl.load(LENS).to(tl.int32)
        m = tl.load(LENS + 1).to(tl.int32)
        s = tl.minimum(at, SINK)
        return s, m, at - s

    @triton.jit(do_not_specialize=["ns"])
    def _merge_kernel(PM, PL, PA, Out, LSE, ns, D: tl.constexpr, NS_P2: tl.constexpr, OBSERVE: tl.constexpr):
        """The merge as a second launch (``MERGE_CHUNK = 0``): one program per output row."""
        r = tl.program_id(0)
        offs_s = tl.arange(0, NS_P2)
        offs_d = tl.arange(0, D)
        smask = offs_s < ns
        m = tl.load(PM + r * ns + offs_s, mask=smask, other=float("-inf"))
        l_ = tl.load(PL + r * ns + offs_s, mask=smask, other=0.0)
        acc = tl.load(PA + (r * ns + offs_s)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(m - mx)
        denom = tl.sum(w * l_, 0)
        if OBSERVE:  # log2 of the softmax denominator, for the observation pass (+inf: nothing attended)
            tl.store(LSE + r, tl.where(denom == 0.0, float("inf"), mx + tl.log2(denom)))
        denom = tl.where(denom == 0.0, 1.0, denom)
        out = tl.sum(w[:, None] * acc, 0) / denom
        tl.store(Out + r * D + offs_d, out.to(Out.dtype.element_ty))

    @triton.jit
    def _merge_rows(PM, PL, PA, Out, LSE, r0, G: tl.constexpr, G_P2: tl.constexpr, ns, D: tl.constexpr,
                    CHUNK: tl.constexpr, OBSERVE: tl.constexpr):
        """Out rows ``r0 .. r0+G``: the splits' partial softmax states combined, all rows at once, ``CHUNK``
        splits at a time. The loads bypass L1 (``.cg``): other SMs wrote these partials."""
        offs_g = tl.arange(0, G_P2)
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, D)
        gmask = offs_g < G
        m_run = tl.full([G_P2], float("-inf"), tl.float32)
        l_run = tl.zeros([G_P2], tl.float32)
        acc = tl.zeros([G_P2, D], tl.float32)
        for s0 in range(0, ns, CHUNK):
            smask = gmask[:, None] & (s0 + offs_c < ns)[None, :]
            at = (r0 + offs_g)[:, None] * ns + s0 + offs_c[None, :]  # [G_P2, CHUNK]
            m = tl.load(PM + at, mask=smask, other=float("-inf"), cache_modifier=".cg")
            part_l = tl.load(PL + at, mask=smask, other=0.0, cache_modifier=".cg")
            part = tl.load(PA + at[:, :, None] * D + offs_d[None, None, :], mask=smask[:, :, None], other=0.0,
                           cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            keep = tl.exp2(m_run - m_safe)
            w = tl.exp2(m - m_safe[:, None])
            l_run = l_run * keep + tl.sum(w * part_l, 1)
            acc = acc * keep[:, None] + tl.sum(w[:, :, None] * part, 1)
            m_run = m_new
        if OBSERVE:  # log2 of each row's softmax denominator, for the observation pass
            lse = tl.where(l_run == 0.0, float("inf"), tl.where(m_run == float("-inf"), 0.0, m_run)
                           + tl.log2(tl.where(l_run == 0.0, 1.0, l_run)))
            tl.store(LSE + r0 + offs_g, lse, mask=gmask)
        out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
        tl.store(Out + (r0 + offs_g)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=gmask[:, None])


    @triton.jit(do_not_specialize=["s_len", "m_len", "w_len", "cap_m", "capf", "split_tokens",
                                   "n_mid_splits", "acap", "stride_mb", "stride_ms", "stride_bias"],
                do_not_specialize_on_alignment=["Q", "M", "BIAS"])
    def _observe_kernel(
        Q, FK, CK, KS, KZ, M, LSE, ACC, HM, BIAS, LENS,
        s_len, m_len, w_len, cap_m, capf, split_tokens, n_mid_splits, acap, qk_scale, stride_mb, stride_ms,
        stride_bias,
        HKV: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        GT: tl.constexpr, GC: tl.constexpr, K_TOKEN: tl.constexpr, SINK: tl.constexpr,
        MASK_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, ROTATE: tl.constexpr, REDUCE_MAX: tl.constexpr,
        HAS_BIAS: tl.constexpr, REPLACE: tl.constexpr, DEVICE_LENS: tl.constexpr,
    ):
        """Each slot's attention of this decode step, reduced over the GQA query heads of its kv head, added
        to the float32 slot state ``ACC`` ``[B * HKV, acap]``: the scores again (keys only) against each
        row's log2 softmax denominator ``LSE`` that the attention launch wrote. Same splits as the
        attention."""
        if DEVICE_LENS:
            s_len, m_len, w_len = _device_lens(LENS, SINK)
        split = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // HKV
        DP: tl.constexpr = D * BITS // 8
        NGC: tl.constexpr = D // GC
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < GQA
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + (bh * GQA + offs_h)[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0.0)
        lse = tl.load(LSE + bh * GQA + offs_h, mask=hmask, other=float("inf"))
        if split < n_mid_splits:
            if ROTATE:  # the codes encode keys times R: the query goes in rotated
                q = _rot(q.to(tl.float32), HM, 0, 0, D, D, D).to(q.dtype)
            LEVELS: tl.constexpr = (1 << BITS) - 1
            byte = offs_d % DP
            shift = (offs_d // DP) * BITS
            cbase = bh * cap_m * DP
            start = split * split_tokens
            for n0 in range(0, split_tokens, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < m_len
                if K_TOKEN:
                    kp = (bh * cap_m + tok)[:, None] * NGC + (offs_d // GC)[None, :]
                else:
                    kp = (bh * (cap_m // GT) + tok // GT)[:, None] * D + offs_d[None, :]
                kc = tl.load(CK + cbase + tok[:, None] * DP + byte[None, :], mask=valid[:, None], other=0)
                kc = (kc.to(tl.int32) >> shift[None, :]) & LEVELS
                ks = tl.load(KS + kp, mask=valid[:, None], other=0.0).to(tl.float32)
                kz = tl.load(KZ + kp, mask=valid[:, None], other=0.0).to(tl.float32)
                k = (kc.to(tl.float32) * ks + kz).to(q.dtype)
                _observe_tile(q, k, s_len + tok, valid, lse, hmask, M, b, stride_mb, stride_ms, BIAS, bh,
                              stride_bias, ACC, acap, qk_scale, MASK_KIND, DOT_F32, REDUCE_MAX, HAS_BIAS,
                              REPLACE)
        else:  # the full-precision sink and tail
            total = SINK + w_len
            fbase = bh * capf * D
            for n0 in range(0, total, BLOCK_N):
                j = n0 + offs_n
                valid = (j < s_len) | ((j >= SINK) & (j < total))
                slot = tl.where(j < SINK, j, j - SINK + s_len + m_len)
                k = tl.load(FK + fbase + j[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
                _observe_tile(q, k, slot, valid, lse, hmask, M, b, stride_mb, stride_ms, BIAS, bh,
                              stride_bias, ACC, acap, qk_scale, MASK_KIND, DOT_F32, REDUCE_MAX, HAS_BIAS,
                              REPLACE)

    @triton.jit
    def _observe_tile(q, k, slot, valid, lse, hmask, M, b, stride_mb, stride_ms, BIAS, bh, stride_bias, ACC,
                      acap, qk_scale, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
                      REDUCE_MAX: tl.constexpr, HAS_BIAS: tl.constexpr, REPLACE: tl.constexpr):
        """Add (or write, ``REPLACE``) one tile's attention, reduced over the query heads, into ``ACC``."""
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        live, bias = mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND)
        bias += slot_bias(BIAS, bh, slot, live, stride_bias, HAS_BIAS)
        s = tl.where(live[None, :], s * qk_scale + bias[None, :], float("-inf"))
        p = tl.where(hmask[:, None], tl.exp2(s - lse[:, None]), 0.0)
        add_column(ACC, bh * acap + slot, p, valid, REDUCE_MAX, REPLACE)


def _splits(m: int, batch_heads: int, slots: int, block: int = BLOCK_N) -> tuple[int, int]:
    """(number of splits of a quantized middle of ``m`` tokens, tokens per split: a multiple of ``block``).

    ``slots`` programs run at once on the whole GPU. The split count makes the middle's programs fill
    whole waves of them (the most even of up to ``MAX_WAVES`` waves), with at least ``SPLIT_MIN``
    tokens per split: a last wave that fills only part of the GPU costs as long as a full one. The sink +
    tail programs, one per (batch row, kv head), are short and not counted.
    """
    if m == 0:
        return 0, block
    most = max(1, _cdiv(m, SPLIT_MIN))
    best = (0.0, 1)
    for waves in range(1, MAX_WAVES + 1):
        ns = min(most, waves * slots // batch_heads)
        if ns:
            per = _cdiv(_cdiv(m, ns), block) * block
            ns = _cdiv(m, per)
            fill = batch_heads * ns / (_cdiv(batch_heads * ns, slots) * slots)
            if fill > best[0] + 0.02:
                best = (fill, ns)
    per = _cdiv(_cdiv(m, best[1]), block) * block
    return _cdiv(m, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


PIECES = True  # the folded path for keys per channel + values per token (False: always the generic path)


def _tile(store) -> int:
    """Tokens per tile: ``BLOCK_N``, or a key group smaller than it (int2's 16), so that the folded path's
    tiles each hold one group (its scale folds into the query)."""
    g = store.group
    return g if g < BLOCK_N and BLOCK_N % g == 0 and g >= 16 else BLOCK_N


def _piece_width(store, dtype: torch.dtype) -> int:
    """Channels per piece for the folded path, or 0 where it does not apply."""
    if not (PIECES and store.key_axis == "channel" and store.value_axis == "token"
            and dtype in (torch.float16, torch.bfloat16) and store.group % _tile(store) == 0):
        return 0
    w = min(store.d * store.bits // 8, store.cgroup)
    return w if store.d // w in (1, 2, 4) and w >= 16 else 0


_SMS: dict = {}
_WORK: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _workspace(device: torch.device, b_hkv: int, gqa: int, ns: int, d: int) -> tuple[torch.Tensor, ...]:
    """The splits' partial softmax states, the per-(batch row, kv head) arrival counts (zero between
    launches) and each row's log2 softmax denominator (for observation); shared by every layer (one stream
    runs them in order)."""
    key = (device, b_hkv, gqa, ns, d)
    work = _WORK.get(key)
    if work is None:
        if len(_WORK) > 64:
            _WORK.clear()
        pm = torch.empty((b_hkv * gqa, ns), dtype=torch.float32, device=device)
        work = _WORK[key] = (pm, torch.empty_like(pm), torch.empty((b_hkv * gqa, ns, d), dtype=torch.float32,
                                                                   device=device),
                             torch.zeros(b_hkv, dtype=torch.int32, device=device),
                             torch.empty(b_hkv * gqa, dtype=torch.float32, device=device))
    return work


_STORE_TENSORS = ("fk", "fv", "ck", "cv", "ks", "kz", "vs", "vz")


class _Plan(NamedTuple):
    grid: tuple[int, int]
    key: tuple  # the compiled kernel's key (kvcompress._kernels.launch)
    consts: dict
    n_mid: int  # splits of the quantized middle (the sink + tail is one more)
    per: int  # tokens per split
    fast: bool  # ``args`` are data pointers
    args: tuple  # the store's 8 tensors; the workspace's pm, pl, pa, lock; rotation, lse, lens (or pointers)
    tensors: tuple  # the same as tensors (held: their pointers stay valid while the plan lives)
    options: dict  # Triton's compile options


def _plan(store, query: torch.Tensor, mask: torch.Tensor, mask_kind: int, has_bias: bool,
          observe: bool, lens: torch.Tensor | None = None) -> _Plan:
    """What a decode step launches with, except what changes every step, cached on the store until its
    middle grows (every ``group`` tokens), its tensors move, or the query, mask or tunables change. With
    ``lens`` (a static layout) the kernel reads the lengths from that device tensor and the splits cover the
    middle's whole capacity (the programs past its length do nothing).

    Once the kernel is compiled, the store's and the workspace's tensors go to the launcher as data
    pointers: a tensor argument costs the launcher a ``data_ptr()`` call and a driver query per launch.
    """
    b, hq, _, d = query.shape
    m_splits = store.cap_m if lens is not None else store.m
    signature = (m_splits, lens is not None, b, hq, query.dtype, mask.dtype, mask_kind, has_bias, observe,
                 PIECES, BLOCK_N, NUM_WARPS, NUM_STAGES,
                 SPLIT_MIN, PROGRAMS_PER_SM, MAX_WAVES, CONV, MERGE_CHUNK, MAXNREG,
                 id(store.fk), id(store.fv), id(store.ck), id(store.cv), id(store.ks), id(store.kz),
                 id(store.vs), id(store.vz))
    hit = store.launch_cache.get("plan")
    if hit is not None and hit[0] == signature and (hit[1].fast or not is_compiled(hit[1].key)):
        return hit[1]
    hkv = store.h
    width = _piece_width(store, query.dtype)
    consts = dict(
        HKV=hkv, GQA=hq // hkv, BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)), D=d, BITS=store.bits,
        GT=store.group, GC=store.cgroup, K_TOKEN=store.key_axis == "token",
        V_TOKEN=store.value_axis == "token", SINK=store.sink, MASK_KIND=mask_kind,
        BLOCK_N=_tile(store) if width else BLOCK_N, DOT_F32=query.dtype == torch.float32, PIECES=width > 0,
        W=max(16, width),
        CONV=0 if INTERPRET else CONV, MERGE_CHUNK=MERGE_CHUNK, GQA_P2=triton.next_power_of_2(hq // hkv),
        ROTATE=bool(store.rotate), HAS_BIAS=has_bias, OBSERVE=observe, DEVICE_LENS=lens is not None,
    )  # MERGE_CHUNK 0: the merge runs as a second launch
    key = (query.device, query.dtype, store.dtype, mask.dtype, NUM_WARPS, NUM_STAGES, MAXNREG,
           *consts.values())
    resident = PROGRAMS_PER_SM or resident_programs(key, query.device) or 2  # 2: a guess until compiled
    n_mid, per = _splits(m_splits, b * hkv, resident * _sm_count(query.device), consts["BLOCK_N"])
    pm, pl, pa, lock, lse = _workspace(query.device, b * hkv, hq // hkv, n_mid + 1, d)
    rotation = codec.hadamard(d, query.device) if store.rotate else pm  # pm: never read
    tensors = (*(getattr(store, n) for n in _STORE_TENSORS), pm, pl, pa, lock, rotation, lse,
               lens if lens is not None else pm)  # pm: never read
    fast = is_compiled(key)  # the first launch compiles, and Triton specialises on tensors, not pointers
    args = tuple(t.data_ptr() for t in tensors) if fast else tensors
    options = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, **({"maxnreg": MAXNREG} if MAXNREG else {}))
    plan = _Plan((n_mid + 1, b * hkv), key, consts, n_mid, per, fast, args, tensors, options)
    store.launch_cache["plan"] = (signature, plan)
    return plan


def decode_attention(store, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                     bias: torch.Tensor | None = None, accumulate=None, lens: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
    """Attention of one query per head ``[B, Hq, 1, D]`` over ``store``; returns ``[B, 1, Hq, D]``.

    ``bias`` ``[B, H_kv, >= S]`` (float32) is added to each slot's score. With ``accumulate`` (the core's
    ``Accumulate``: a float32 slot state and "sum" or "max") a second launch adds each slot's attention,
    reduced over the query heads of its kv head, into that state. ``lens`` (a static layout's ``[at, m]``,
    int64 on the device): the lengths are read there, not from the store's host counters, so the launch can
    be captured once and replayed. Returns ``None`` (use the dense path) for shapes the kernel does not cover.
    """
    b, hq, q, d = query.shape
    if q != 1 or hq % store.h or d & (d - 1) or d < 16 or b != store.b:
        return None
    if bias is not None and not (bias.dtype == torch.float32 and bias.stride(-1) == 1
                                 and bias.stride(0) == store.h * bias.stride(1)):
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
    if not query.is_contiguous():
        query = query.contiguous()
    plan = _plan(store, query, mask, mask_kind, bias is not None, acc is not None, lens)
    a, ns = plan.args, plan.grid[0]
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    bias_in = bias if bias is not None else out  # out: never read without a bias
    if plan.fast:  # as data pointers, like the store's tensors (see _plan)
        q_in, mask_in, out_in, bias_in = query.data_ptr(), mask.data_ptr(), out.data_ptr(), bias_in.data_ptr()
    else:
        q_in, mask_in, out_in = query, mask, out
    stride_bias = bias.stride(1) if bias is not None else 0
    launch(_split_kernel, plan.grid, plan.key, (
        q_in, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], mask_in, a[8], a[9], a[10], out_in, a[11],
        a[12], bias_in, a[13], a[14], store.s, store.m, store.w, store.cap_m, store.fk.shape[2], plan.per,
        plan.n_mid,
        scaling * LOG2E, smb, sms, stride_bias,
    ), plan.consts, **plan.options)
    if not MERGE_CHUNK:
        pm, pl, pa = plan.tensors[8:11]
        merge = dict(D=d, NS_P2=max(2, triton.next_power_of_2(ns)), OBSERVE=acc is not None)
        launch(_merge_kernel, (b * hq,), (query.device, query.dtype, "merge", *merge.values()),
               (pm, pl, pa, out, plan.tensors[13], ns), merge)
    if acc is not None:
        names = ("HKV", "GQA", "BLOCK_H", "D", "BITS", "GT", "GC", "K_TOKEN", "SINK", "MASK_KIND", "BLOCK_N",
                 "DOT_F32", "ROTATE")
        consts = {name: plan.consts[name] for name in names}
        consts.update(REDUCE_MAX=accumulate.reduce == "max", HAS_BIAS=bias is not None,
                      REPLACE=bool(getattr(accumulate, "replace", False)), DEVICE_LENS=lens is not None)
        key = (query.device, query.dtype, store.dtype, mask.dtype, "observe", *consts.values())
        t = plan.tensors
        launch(_observe_kernel, plan.grid, key, (
            query, t[0], t[2], t[4], t[5], mask, t[13], acc, t[12], bias if bias is not None else out, t[14],
            store.s, store.m, store.w, store.cap_m, store.fk.shape[2], plan.per, plan.n_mid, acc.shape[2],
            scaling * LOG2E, smb, sms, stride_bias,
        ), consts, num_warps=NUM_WARPS)
    return out


def reference_attention(store, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize-then-sdpa in ``dtype`` (float32: the exact function), ``[B, 1, Hq, D]``."""
    query = query.to(dtype)
    keys, values = store._dense(dtype)
    g = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)
    elif mask is not None:
        mask = mask.to(dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)
