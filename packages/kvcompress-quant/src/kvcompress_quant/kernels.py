"""Fused decode attention straight from the packed store (Triton), flash-decoding style.

One program per (sequence split, batch row, kv head) attends all the query heads
of that kv head (GQA) to its slice of the tokens: the quantized middle is read as
packed bytes and decoded in registers (never a dequantized copy in memory), the
full-precision sink + tail form one more split. A second small kernel merges the
splits' partial softmax states. Triton is optional: without it ``AVAILABLE`` is
False and the store falls back to dequantize-then-sdpa.
"""

from __future__ import annotations

import math
import os

import torch

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
SPLIT_MIN = 256  # fewest tokens per split of the middle
LOG2E = 1.4426950408889634

if AVAILABLE:

    @triton.jit
    def _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32: tl.constexpr):
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if len(bias.shape) == 1:
            s = s * qk_scale + bias[None, :]
        else:
            s = s * qk_scale + bias
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND: tl.constexpr):
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

    @triton.jit(do_not_specialize=["s_len", "m_len", "w_len", "split_tokens", "n_mid_splits"])
    def _split_kernel(
        Q, FK, FV, CK, CV, KS, KZ, VS, VZ, M, PM, PL, PA,
        s_len, m_len, w_len, sink_cap, split_tokens, n_mid_splits, qk_scale,
        stride_qb, stride_qh, stride_fb, stride_fh, stride_ft, stride_cb, stride_ch, stride_ct,
        stride_ksb, stride_ksh, stride_kst, stride_vsb, stride_vsh, stride_vst, stride_mb, stride_ms,
        HKV: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        GT: tl.constexpr, GC: tl.constexpr, K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr,
        MASK_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, FAST: tl.constexpr,
    ):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        ns = n_mid_splits + 1
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < GQA
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * stride_qb + (h * GQA + offs_h)[:, None] * stride_qh + offs_d[None, :],
                    mask=hmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        if split < n_mid_splits and FAST:
            # keys per channel, values per token: read [BLOCK_N, D/P] packed bytes contiguously, unpack the
            # P parts and interleave them (channel order perm(f)); key scales fold into the query.
            DPF: tl.constexpr = D * BITS // 8
            LEV: tl.constexpr = (1 << BITS) - 1
            P: tl.constexpr = 8 // BITS
            NG: tl.constexpr = D // GC
            offs_b = tl.arange(0, DPF)
            if P == 1:
                perm = offs_d
            elif P == 2:
                perm = (offs_d % 2) * DPF + offs_d // 2
            else:
                perm = (2 * (offs_d % 2) + (offs_d // 2) % 2) * DPF + offs_d // 4
            gf = perm // GC
            qp = tl.load(Q + b * stride_qb + (h * GQA + offs_h)[:, None] * stride_qh + perm[None, :],
                         mask=hmask[:, None], other=0.0).to(tl.float32)
            start = split * split_tokens
            cbase = b * stride_cb + h * stride_ch
            for n0 in range(0, split_tokens, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < m_len
                cptr = cbase + tok[:, None] * stride_ct + offs_b[None, :]
                kb = tl.load(CK + cptr, mask=valid[:, None], other=0)
                vb = tl.load(CV + cptr, mask=valid[:, None], other=0)
                if P == 1:
                    kc = kb
                    vc = vb
                elif P == 2:
                    kc = tl.reshape(tl.join(kb & LEV, kb >> BITS), [BLOCK_N, D])
                    vc = tl.reshape(tl.join(vb & LEV, vb >> BITS), [BLOCK_N, D])
                else:
                    kc = tl.reshape(tl.join(tl.join(kb & LEV, (kb >> BITS) & LEV),
                                            tl.join((kb >> 2 * BITS) & LEV, kb >> 3 * BITS)), [BLOCK_N, D])
                    vc = tl.reshape(tl.join(tl.join(vb & LEV, (vb >> BITS) & LEV),
                                            tl.join((vb >> 2 * BITS) & LEV, vb >> 3 * BITS)), [BLOCK_N, D])
                g0 = (start + n0) // GT
                krow = b * stride_ksb + h * stride_ksh + g0 * stride_kst + perm
                ks = tl.load(KS + krow).to(tl.float32)
                kz = tl.load(KZ + krow).to(tl.float32)
                qs = (qp * ks[None, :]).to(q.dtype)
                qz = tl.sum(qp * kz[None, :], 1)
                vrow = b * stride_vsb + h * stride_vsh + tok * stride_vst
                vs = tl.zeros([BLOCK_N, D], tl.float32)
                vz = tl.zeros([BLOCK_N, D], tl.float32)
                for g in tl.static_range(NG):
                    sg = tl.load(VS + vrow + g, mask=valid, other=0.0).to(tl.float32)
                    zg = tl.load(VZ + vrow + g, mask=valid, other=0.0).to(tl.float32)
                    vs = tl.where(gf[None, :] == g, sg[:, None], vs)
                    vz = tl.where(gf[None, :] == g, zg[:, None], vz)
                v = (vc.to(tl.float32) * vs + vz).to(q.dtype)
                valid, bias = _mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                bias = bias + qz[:, None] * qk_scale  # [BLOCK_H, BLOCK_N] via broadcast
                m_i, l_i, acc = _online(qs, kc.to(q.dtype), v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            offs_out = perm
        elif split < n_mid_splits:
            DP: tl.constexpr = D * BITS // 8
            LEVELS: tl.constexpr = (1 << BITS) - 1
            byte = offs_d % DP
            shift = (offs_d // DP) * BITS
            start = split * split_tokens
            cbase = b * stride_cb + h * stride_ch
            for n0 in range(0, split_tokens, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < m_len
                cptr = cbase + tok[:, None] * stride_ct + byte[None, :]
                if K_TOKEN:
                    kp = b * stride_ksb + h * stride_ksh + tok[:, None] * stride_kst + (offs_d // GC)[None, :]
                else:
                    kp = b * stride_ksb + h * stride_ksh + (tok // GT)[:, None] * stride_kst + offs_d[None, :]
                if V_TOKEN:
                    vp = b * stride_vsb + h * stride_vsh + tok[:, None] * stride_vst + (offs_d // GC)[None, :]
                else:
                    vp = b * stride_vsb + h * stride_vsh + (tok // GT)[:, None] * stride_vst + offs_d[None, :]
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
                valid, bias = _mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            offs_out = offs_d
        else:
            total = sink_cap + w_len
            fbase = b * stride_fb + h * stride_fh
            for n0 in range(0, total, BLOCK_N):
                j = n0 + offs_n
                valid = (j < s_len) | ((j >= sink_cap) & (j < total))
                slot = tl.where(j < sink_cap, j, j - sink_cap + s_len + m_len)
                fptr = fbase + j[:, None] * stride_ft + offs_d[None, :]
                k = tl.load(FK + fptr, mask=valid[:, None], other=0.0)
                v = tl.load(FV + fptr, mask=valid[:, None], other=0.0)
                valid, bias = _mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND)
                m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            offs_out = offs_d
        row = (b * HKV * GQA + h * GQA + offs_h) * ns + split
        tl.store(PM + row, m_i, mask=hmask)
        tl.store(PL + row, l_i, mask=hmask)
        tl.store(PA + row[:, None] * D + offs_out[None, :], acc, mask=hmask[:, None])

    @triton.jit
    def _merge_kernel(PM, PL, PA, Out, ns, D: tl.constexpr, NS_P2: tl.constexpr):
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
        denom = tl.where(denom == 0.0, 1.0, denom)
        out = tl.sum(w[:, None] * acc, 0) / denom
        tl.store(Out + r * D + offs_d, out.to(Out.dtype.element_ty))


def _splits(store, batch_heads: int, sms: int) -> tuple[int, int]:
    """(number of splits of the quantized middle, tokens per split)."""
    m = store.m
    if m == 0:
        return 0, BLOCK_N
    want = max(1, _cdiv(4 * sms, batch_heads))
    ns = max(1, min(want, _cdiv(m, SPLIT_MIN)))
    per = _cdiv(_cdiv(m, ns), BLOCK_N) * BLOCK_N
    return _cdiv(m, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


FAST = True  # the folded path for keys per channel + values per token


def _fast_ok(store) -> bool:
    # int4 only: with int8/int2 codes the folded bf16 query loses precision (measured 1.1-1.5% vs a float32
    # reference on an H100, over the 1% bar), so those take the generic path (0.75%).
    return (store.bits == 4 and store.key_axis == "channel" and store.value_axis == "token"
            and store.group % BLOCK_N == 0 and store.d % store.cgroup == 0)


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def decode_attention(store, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
                     ) -> torch.Tensor | None:
    """Attention of one query per head ``[B, Hq, 1, D]`` over ``store``; returns ``[B, 1, Hq, D]``.

    Returns ``None`` (use the dense path) for shapes the kernel does not cover.
    """
    b, hq, q, d = query.shape
    hkv, n = store.h, store.length
    if q != 1 or hq % hkv or d & (d - 1) or d < 16 or b != store.b:
        return None
    mask_kind, mask, smb, sms = 0, query, 0, 0
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-1] != n:
            return None
        mask = attention_mask[:, 0, -1]
        mask_kind = 1 if mask.dtype == torch.bool else 2
        smb = mask.stride(0) if mask.shape[0] > 1 else 0
        sms = mask.stride(1)
    qv = query[:, :, 0]
    if qv.stride(-1) != 1:
        qv = qv.contiguous()
    gqa = hq // hkv
    n_mid, per = _splits(store, b * hkv, _sm_count(query.device))
    ns = n_mid + 1
    pm = torch.empty((b * hq, ns), dtype=torch.float32, device=query.device)
    pl = torch.empty_like(pm)
    pa = torch.empty((b * hq, ns, d), dtype=torch.float32, device=query.device)
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    fk, ck, ks, vs = store.fk, store.ck, store.ks, store.vs
    _split_kernel[(ns, b * hkv)](
        qv, fk, store.fv, ck, store.cv, ks, store.kz, vs, store.vz, mask, pm, pl, pa,
        store.s, store.m, store.w, store.sink, per, n_mid, scaling * LOG2E,
        qv.stride(0), qv.stride(1), fk.stride(0), fk.stride(1), fk.stride(2),
        ck.stride(0), ck.stride(1), ck.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), smb, sms,
        HKV=hkv, GQA=gqa, BLOCK_H=max(16, triton.next_power_of_2(gqa)), D=d, BITS=store.bits,
        GT=store.group, GC=store.cgroup, K_TOKEN=store.key_axis == "token",
        V_TOKEN=store.value_axis == "token",
        MASK_KIND=mask_kind, BLOCK_N=BLOCK_N, DOT_F32=query.dtype == torch.float32, num_warps=NUM_WARPS,
        FAST=FAST and _fast_ok(store),
    )
    _merge_kernel[(b * hq,)](pm, pl, pa, out, ns, D=d, NS_P2=max(2, triton.next_power_of_2(ns)))
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
