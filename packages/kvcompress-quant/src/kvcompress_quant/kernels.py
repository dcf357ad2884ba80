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

from kvcompress.kernels import kernel_mask, launch

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
SPLITS_PER_SM = 8  # aim for this many programs per SM
NUM_STAGES = 3  # the best of a sweep on an H100 (gpu_bench.py kernel)
LOG2E = 1.4426950408889634

if AVAILABLE:

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

    @triton.jit
    def _piece(C, cbase, tok, valid, J: tl.constexpr, W: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
        """Codes of piece ``J`` (channels ``J*W .. J*W+W``) of a tile, as fp16 ``[BLOCK_N, W]``."""
        offs_w = tl.arange(0, W)
        x = tl.load(C + cbase + tok[:, None] * DP + ((J * W) % DP + offs_w)[None, :], mask=valid[:, None],
                    other=0)
        if BITS < 8:
            x = (x >> ((J * W) // DP * BITS)) & ((1 << BITS) - 1)
        return x.to(tl.float16)

    @triton.jit
    def _piece_qk(q, CK, KS, KZ, cbase, krow, tok, valid, J: tl.constexpr, W: tl.constexpr, DP: tl.constexpr,
                  BITS: tl.constexpr):
        """Scores of piece ``J`` of a tile: ``(q * ks) . codes`` and ``q . kz`` (one key group per tile)."""
        offs_w = tl.arange(0, W)
        ks = tl.load(KS + krow + J * W + offs_w).to(tl.float32)
        kz = tl.load(KZ + krow + J * W + offs_w).to(tl.float32)
        x = _piece(CK, cbase, tok, valid, J, W, DP, BITS)
        return tl.dot((q * ks[None, :]).to(tl.float16), tl.trans(x)), tl.sum(q * kz[None, :], 1)

    @triton.jit
    def _piece_pv(acc, alpha, p, CV, VS, VZ, cbase, vrow, tok, valid, J: tl.constexpr, W: tl.constexpr,
                  DP: tl.constexpr, BITS: tl.constexpr, GC: tl.constexpr):
        """``acc`` rescaled plus ``p @ values`` of piece ``J``: token value scales fold into ``p``."""
        vs = tl.load(VS + vrow + (J * W) // GC, mask=valid, other=0.0).to(tl.float32)
        vz = tl.load(VZ + vrow + (J * W) // GC, mask=valid, other=0.0).to(tl.float32)
        x = _piece(CV, cbase, tok, valid, J, W, DP, BITS)
        pv = tl.dot((p * vs[None, :]).to(tl.float16), x)
        return acc * alpha[:, None] + pv + tl.sum(p * vz[None, :], 1)[:, None]

    @triton.jit
    def _softmax_step(s, valid, bias, m_i, l_i, qk_scale):
        """Online-softmax bookkeeping of one tile of raw scores ``s`` [BLOCK_H, BLOCK_N]."""
        s = s * qk_scale + bias[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit(do_not_specialize=["s_len", "m_len", "w_len", "cap_m", "split_tokens", "n_mid_splits",
                                   "stride_mb", "stride_ms"], do_not_specialize_on_alignment=["Q", "M"])
    def _split_kernel(
        Q, FK, FV, CK, CV, KS, KZ, VS, VZ, M, PM, PL, PA,
        s_len, m_len, w_len, cap_m, split_tokens, n_mid_splits, qk_scale, stride_mb, stride_ms,
        HKV: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        GT: tl.constexpr, GC: tl.constexpr, K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr, CAPF: tl.constexpr,
        SINK: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
        PIECES: tl.constexpr, W: tl.constexpr,
    ):
        # Every store tensor is contiguous, so strides follow from the shapes: codes [B, HKV, cap_m, DP],
        # scales [B, HKV, cap_m // GT, D] (per channel) or [B, HKV, cap_m, D // GC] (per token),
        # full-precision buffers [B, HKV, CAPF, D], the query [B, HKV * GQA, D].
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
            # codes (< 256) are exact in fp16, so the dots take fp16 operands with fp32 accumulation.
            NP: tl.constexpr = D // W
            offs_w = tl.arange(0, W)
            q0 = tl.load(qrow + offs_w[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
            q1 = q0
            q2 = q0
            q3 = q0
            if NP > 1:
                q1 = tl.load(qrow + (W + offs_w)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
            if NP > 2:
                q2 = tl.load(qrow + (2 * W + offs_w)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
                q3 = tl.load(qrow + (3 * W + offs_w)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
            a0 = tl.zeros([BLOCK_H, W], tl.float32)
            a1 = tl.zeros([BLOCK_H, W], tl.float32)
            a2 = tl.zeros([BLOCK_H, W], tl.float32)
            a3 = tl.zeros([BLOCK_H, W], tl.float32)
            start = split * split_tokens
            kbase = bh * (cap_m // GT) * D
            vbase = bh * cap_m * NGC
            for n0 in range(0, split_tokens, BLOCK_N):
                tok = start + n0 + offs_n
                valid = tok < m_len
                krow = kbase + (start + n0) // GT * D
                s, z = _piece_qk(q0, CK, KS, KZ, cbase, krow, tok, valid, 0, W, DP, BITS)
                if NP > 1:
                    s1, z1 = _piece_qk(q1, CK, KS, KZ, cbase, krow, tok, valid, 1, W, DP, BITS)
                    s += s1
                    z += z1
                if NP > 2:
                    s2, z2 = _piece_qk(q2, CK, KS, KZ, cbase, krow, tok, valid, 2, W, DP, BITS)
                    s3, z3 = _piece_qk(q3, CK, KS, KZ, cbase, krow, tok, valid, 3, W, DP, BITS)
                    s += s2 + s3
                    z += z2 + z3
                valid, bias = _mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                p, alpha, m_i, l_i = _softmax_step(s + z[:, None], valid, bias, m_i, l_i, qk_scale)
                vrow = vbase + tok * NGC
                a0 = _piece_pv(a0, alpha, p, CV, VS, VZ, cbase, vrow, tok, valid, 0, W, DP, BITS, GC)
                if NP > 1:
                    a1 = _piece_pv(a1, alpha, p, CV, VS, VZ, cbase, vrow, tok, valid, 1, W, DP, BITS, GC)
                if NP > 2:
                    a2 = _piece_pv(a2, alpha, p, CV, VS, VZ, cbase, vrow, tok, valid, 2, W, DP, BITS, GC)
                    a3 = _piece_pv(a3, alpha, p, CV, VS, VZ, cbase, vrow, tok, valid, 3, W, DP, BITS, GC)
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
                    valid, bias = _mask_bias(M, b, s_len + tok, valid, stride_mb, stride_ms, MASK_KIND)
                    m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            else:  # the full-precision sink and tail
                total = SINK + w_len
                fbase = bh * CAPF * D
                for n0 in range(0, total, BLOCK_N):
                    j = n0 + offs_n
                    valid = (j < s_len) | ((j >= SINK) & (j < total))
                    slot = tl.where(j < SINK, j, j - SINK + s_len + m_len)
                    fptr = fbase + j[:, None] * D + offs_d[None, :]
                    k = tl.load(FK + fptr, mask=valid[:, None], other=0.0)
                    v = tl.load(FV + fptr, mask=valid[:, None], other=0.0)
                    valid, bias = _mask_bias(M, b, slot, valid, stride_mb, stride_ms, MASK_KIND)
                    m_i, l_i, acc = _online(q, k, v, valid, bias, m_i, l_i, acc, qk_scale, DOT_F32)
            tl.store(PA + row[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
        tl.store(PM + row, m_i, mask=hmask)
        tl.store(PL + row, l_i, mask=hmask)

    @triton.jit(do_not_specialize=["ns"])
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


def _splits(m: int, batch_heads: int, sms: int) -> tuple[int, int]:
    """(number of splits of a quantized middle of ``m`` tokens, tokens per split)."""
    if m == 0:
        return 0, BLOCK_N
    want = max(1, _cdiv(SPLITS_PER_SM * sms, batch_heads))
    ns = max(1, min(want, _cdiv(m, SPLIT_MIN)))
    per = _cdiv(_cdiv(m, ns), BLOCK_N) * BLOCK_N
    return _cdiv(m, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


PIECES = True  # the folded path for keys per channel + values per token (False: always the generic path)


def _piece_width(store, dtype: torch.dtype) -> int:
    """Channels per piece for the folded path, or 0 where it does not apply."""
    if not (PIECES and store.key_axis == "channel" and store.value_axis == "token"
            and dtype in (torch.float16, torch.bfloat16) and store.group % BLOCK_N == 0):
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


def _workspace(device: torch.device, rows: int, ns: int, d: int) -> tuple[torch.Tensor, ...]:
    """Partial softmax states of the splits; shared by every layer (one stream runs them in order)."""
    key = (device, rows, ns, d)
    work = _WORK.get(key)
    if work is None:
        if len(_WORK) > 64:
            _WORK.clear()
        pm = torch.empty((rows, ns), dtype=torch.float32, device=device)
        work = _WORK[key] = (pm, torch.empty_like(pm), torch.empty((rows, ns, d), dtype=torch.float32,
                                                                   device=device))
    return work


def _constants(store, query: torch.Tensor, mask: torch.Tensor, mask_kind: int) -> tuple[dict, tuple]:
    """The split kernel's constexprs (in signature order) and launch key, cached on the store."""
    cache_key = (query.shape[1], query.dtype, mask.dtype, mask_kind, PIECES, BLOCK_N, NUM_WARPS, NUM_STAGES)
    hit = store.launch_cache.get(cache_key)
    if hit is None:
        hq, d, hkv = query.shape[1], query.shape[3], store.h
        width = _piece_width(store, query.dtype)
        consts = dict(
            HKV=hkv, GQA=hq // hkv, BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)), D=d, BITS=store.bits,
            GT=store.group, GC=store.cgroup, K_TOKEN=store.key_axis == "token",
            V_TOKEN=store.value_axis == "token", CAPF=store.fk.shape[2], SINK=store.sink, MASK_KIND=mask_kind,
            BLOCK_N=BLOCK_N, DOT_F32=query.dtype == torch.float32, PIECES=width > 0, W=max(16, width),
        )
        key = (query.device, query.dtype, store.dtype, mask.dtype, NUM_WARPS, NUM_STAGES, *consts.values())
        hit = store.launch_cache[cache_key] = (consts, key)
    return hit


def decode_attention(store, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
                     ) -> torch.Tensor | None:
    """Attention of one query per head ``[B, Hq, 1, D]`` over ``store``; returns ``[B, 1, Hq, D]``.

    Returns ``None`` (use the dense path) for shapes the kernel does not cover.
    """
    b, hq, q, d = query.shape
    hkv = store.h
    if q != 1 or hq % hkv or d & (d - 1) or d < 16 or b != store.b:
        return None
    decode_mask = kernel_mask(attention_mask, store.length, query)
    if decode_mask is None:
        return None
    mask_kind, mask, smb, sms = decode_mask
    if not query.is_contiguous():
        query = query.contiguous()
    n_mid, per = _splits(store.m, b * hkv, _sm_count(query.device))
    ns = n_mid + 1
    pm, pl, pa = _workspace(query.device, b * hq, ns, d)
    out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
    consts, key = _constants(store, query, mask, mask_kind)
    launch(_split_kernel, (ns, b * hkv), key, (
        query, store.fk, store.fv, store.ck, store.cv, store.ks, store.kz, store.vs, store.vz, mask,
        pm, pl, pa, store.s, store.m, store.w, store.cap_m, per, n_mid, scaling * LOG2E, smb, sms,
    ), consts, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    consts = dict(D=d, NS_P2=max(2, triton.next_power_of_2(ns)))
    key = (query.device, out.dtype, *consts.values())
    launch(_merge_kernel, (b * hq,), key, (pm, pl, pa, out, ns), consts)
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
