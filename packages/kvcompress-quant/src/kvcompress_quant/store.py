"""``QuantStore``: one layer's keys/values as fp sink + packed quantized middle + fp recent window."""

from __future__ import annotations

import torch

from kvcompress._kernels import append_pair
from kvcompress.attention import decode_attention
from kvcompress.buffers import GROWTH
from kvcompress.store import KVStore, Step

from . import codec


def _round_up(n: int, g: int) -> int:
    return -(-n // g) * g


class QuantStore(KVStore):
    """Slots ``[0, s)`` are the sink (model dtype), ``[s, s+m)`` the quantized middle (``m`` a multiple
    of ``group``), ``[s+m, s+m+w)`` the recent tail (model dtype, ``w < window + group``).

    Full-precision tokens live in one buffer ``fk``/``fv`` of at most ``sink + window + group`` slots: the
    sink at ``[0, s)``, the tail at ``[sink, sink + w)``. It grows with the tokens (a short context stays
    in the model's dtype and holds no more than it stores, plus 1/32). Once the tail reaches
    ``window + group`` tokens its oldest whole groups are quantized in one go, so quantization runs once
    per ``group`` decoded tokens.

    With ``rotate`` the middle's codes encode keys and values times the Hadamard rotation ``R``
    (see :mod:`.codec`); :meth:`keys_values` rotates them back. A decode step (one query) instead attends
    to the middle in the rotated basis, which costs ``O(D^2)`` per query rather than per stored token. The
    fused kernel rotates the query going in and each program's partial output going out (the sink + tail
    program works unrotated); the torch path rotates the query, the sink + tail and the output. Sink and
    tail are stored as given (bit-exact).
    """

    def __init__(self, bits: int, group: int, sink: int, window: int, key_axis: str, value_axis: str,
                 kernel: str = "auto", rotate: bool = False, channel_group: int | None = None) -> None:
        self.bits, self.group, self.sink, self.window = bits, group, sink, window
        self.channel_group = channel_group  # channels per group on the token axis; None: ``group``
        self.key_axis, self.value_axis, self.kernel = key_axis, value_axis, kernel
        self.rotate = rotate
        self.s = self.m = self.w = 0
        self.fk: torch.Tensor | None = None
        self.fv: torch.Tensor | None = None
        self.ck = self.cv = self.ks = self.kz = self.vs = self.vz = None
        self.cap_m = 0
        self.cap_hint: int | None = None
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_q = 0
        self._stand_in: torch.Tensor | None = None
        self._fused: bool | None = None  # whether attend() runs the Triton kernel (decided once)
        self.launch_cache: dict = {}  # the kernel's per-store launch plan (kernels.py); it holds the tensors
        self.pinned = False  # held in place by a static layout (static.py): the middle must not move

    # -- layout helpers --------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.s + self.m + self.w

    def _rows(self, axis: str, tokens: int) -> int:
        return tokens if axis == "token" else tokens // self.group

    def _g(self, axis: str) -> int:
        """Group size along ``axis``'s grouped dimension (channels for "token", tokens for "channel")."""
        return self.cgroup if axis == "token" else self.group

    def _init(self, keys: torch.Tensor) -> None:
        b, h, _, d = keys.shape
        p = codec.parts(self.bits)
        cg, name = (self.group, "group_size") if self.channel_group is None else (self.channel_group,
                                                                                  "channel_group")
        if d % cg and cg % d and "token" in (self.key_axis, self.value_axis):
            allowed = [g for g in range(1, d + 1) if d % g == 0]
            raise ValueError(
                f"quant: parameter '{name}' is {cg}, which does not divide head_dim {d}; "
                f"allowed: a divisor of {d} ({', '.join(map(str, allowed))}) or a multiple of {d}"
            )
        self.cgroup = min(cg, d)  # channels per group on the token axis (at most one row)
        if d % p:
            raise ValueError(f"quant: parameter 'bits' is {self.bits}: head_dim {d} must be a multiple of "
                             f"{p} to pack {p} codes per byte; allowed: bits=8")
        self.b, self.h, self.d, self.dtype, self.device = b, h, d, keys.dtype, keys.device
        self.fk = keys.new_empty((b, h, 0, d))
        self.fv = keys.new_empty((b, h, 0, d))
        self._alloc_mid(0)

    def _reserve_fp(self, needed: int) -> None:
        """Room for ``needed`` full-precision slots (sink at 0, tail at ``sink``), 1/32 of slack, at most
        ``sink + window + group``."""
        cap = self.fk.shape[2]
        if needed <= cap:
            return
        most = self.sink + self.window + self.group
        new_cap = min(most, needed + needed // GROWTH)
        self.launch_cache.clear()  # the cached plan holds the old tensors: they go once replaced
        fk, fv = self.fk.new_empty((self.b, self.h, new_cap, self.d)), self.fv.new_empty((self.b, self.h,
                                                                                          new_cap, self.d))
        fk[:, :, : self.s] = self.fk[:, :, : self.s]
        fv[:, :, : self.s] = self.fv[:, :, : self.s]
        if self.w:
            fk[:, :, self.sink : self.sink + self.w] = self.fk[:, :, self.sink : self.sink + self.w]
            fv[:, :, self.sink : self.sink + self.w] = self.fv[:, :, self.sink : self.sink + self.w]
        self.fk, self.fv = fk, fv

    def _alloc_mid(self, cap: int) -> None:
        """(Re)allocate the quantized middle with ``cap`` token slots, keeping the first ``m``."""
        b, h, d, g = self.b, self.h, self.d, self.group
        dp = d // codec.parts(self.bits)
        self.launch_cache.clear()  # the cached plan holds the old tensors: they go once replaced
        new = {
            "ck": torch.empty((b, h, cap, dp), dtype=torch.uint8, device=self.device),
            "cv": torch.empty((b, h, cap, dp), dtype=torch.uint8, device=self.device),
        }
        for name, axis in (("k", self.key_axis), ("v", self.value_axis)):
            shape = (b, h, cap, d // self.cgroup) if axis == "token" else (b, h, cap // g, d)
            new[name + "s"] = torch.empty(shape, dtype=codec.SCALE_DTYPE, device=self.device)
            new[name + "z"] = torch.empty(shape, dtype=codec.SCALE_DTYPE, device=self.device)
        if self.m and self.ck is not None:
            for name, t in new.items():
                axis = self.key_axis if name[0] == "k" else self.value_axis
                rows = self.m if name[0] == "c" else self._rows(axis, self.m)
                t[:, :, :rows] = getattr(self, name)[:, :, :rows]
        for name, t in new.items():
            setattr(self, name, t)
        self.cap_m = cap

    def _reserve_mid(self, needed: int) -> None:
        if needed <= self.cap_m:
            return
        if self.pinned:
            raise RuntimeError(f"QuantStore: the held middle of {self.cap_m} slots cannot take {needed}")
        grow = max(needed, self.cap_m + max(self.cap_m // GROWTH, self.group))  # little slack: memory counts
        if self.cap_hint is not None:
            bound = max(self.cap_hint - self.sink - self.window, needed)
            grow = min(grow, bound)
        self._alloc_mid(_round_up(grow, self.group))

    def _mid_append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize ``[B, H, n, D]`` (``n`` a multiple of ``group``) onto the end of the middle."""
        n = keys.shape[2]
        self._reserve_mid(self.m + n)
        a, e = self.m, self.m + n
        for x, c, sname, zname, axis in ((keys, self.ck, "ks", "kz", self.key_axis),
                                         (values, self.cv, "vs", "vz", self.value_axis)):
            packed, scale, zero = codec.quantize(x, self.bits, axis, self._g(axis), self.rotate)
            c[:, :, a:e] = packed
            ra, re = self._rows(axis, a), self._rows(axis, e)
            getattr(self, sname)[:, :, ra:re] = scale
            getattr(self, zname)[:, :, ra:re] = zero
        self.m = e

    # -- KVStore ---------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, step: Step | None = None) -> None:
        if self.fk is None:
            self._init(keys)
        self.cap_hint = step.cap if step is not None else None
        q = keys.shape[2]
        self._last_q = q
        self._fresh = (keys, values) if q > 1 else None
        if self.s < self.sink:
            take = min(self.sink - self.s, q)
            self._reserve_fp(self.s + take)
            self.fk[:, :, self.s : self.s + take] = keys[:, :, :take]
            self.fv[:, :, self.s : self.s + take] = values[:, :, :take]
            self.s += take
            if take == q:
                return
            keys, values, q = keys[:, :, take:], values[:, :, take:], q - take
        t0, w = self.sink, self.w
        total = w + q
        if total < self.window + self.group:  # the decode path, kept cheap on the host
            if t0 + total > self.fk.shape[2]:
                self._reserve_fp(t0 + total)
            if not append_pair(self.fk, self.fv, t0 + w, keys, values):
                self.fk.narrow(2, t0 + w, q).copy_(keys)
                self.fv.narrow(2, t0 + w, q).copy_(values)
            self.w = total
            return
        nq = (total - self.window) // self.group * self.group
        if w:
            all_k = torch.cat((self.fk[:, :, t0 : t0 + w], keys), dim=2)
            all_v = torch.cat((self.fv[:, :, t0 : t0 + w], values), dim=2)
        else:
            all_k, all_v = keys, values
        self._mid_append(all_k[:, :, :nq], all_v[:, :, :nq])
        rest = total - nq
        self._reserve_fp(t0 + rest)
        self.fk[:, :, t0 : t0 + rest] = all_k[:, :, nq:]
        self.fv[:, :, t0 : t0 + rest] = all_v[:, :, nq:]
        self.w = rest

    def _dense(self, dtype: torch.dtype, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored slot decoded, ``[B, H, length, D]`` of ``dtype``; ``rotated`` (a rotating store only):
        in the rotated basis, the middle as stored and the sink and tail rotated."""
        n, s, m = self.length, self.s, self.m
        out = []
        for f, c, sc, zr, axis in ((self.fk, self.ck, self.ks, self.kz, self.key_axis),
                                   (self.fv, self.cv, self.vs, self.vz, self.value_axis)):
            x = torch.empty((self.b, self.h, n, self.d), dtype=dtype, device=self.device)
            x[:, :, :s] = f[:, :, :s]
            if m:
                rows = self._rows(axis, m)
                codec.dequantize_into(x[:, :, s : s + m], c[:, :, :m], sc[:, :, :rows], zr[:, :, :rows],
                                      self.bits, axis, self._g(axis), self.rotate and not rotated)
            x[:, :, s + m :] = f[:, :, self.sink : self.sink + self.w]
            if rotated:
                x[:, :, :s] = codec.rotate(x[:, :, :s])
                x[:, :, s + m :] = codec.rotate(x[:, :, s + m :])
            out.append(x)
        return out[0], out[1]

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fk is None:
            raise RuntimeError("QuantStore.keys_values() before the first append")
        keys, values = self._dense(self.dtype)
        if self._fresh is not None:  # the tokens just appended attend in full precision this once
            fk, fv = self._fresh
            q = fk.shape[2]
            keys[:, :, -q:] = fk
            values[:, :, -q:] = fv
        return keys, values

    def stand_ins(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Zero-byte ``[B, H, length, D]`` placeholders when :meth:`attend` will take this decode step."""
        if self._last_q != 1 or not (self.rotate or self._fused_enabled()):
            return None
        if self._stand_in is None:
            self._stand_in = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        t = self._stand_in.expand(self.b, self.h, self.length, self.d)
        return t, t

    def _fused_enabled(self) -> bool:
        if self._fused is None:
            from . import kernels

            self._fused = self.kernel != "torch" and self.device.type == "cuda" and kernels.AVAILABLE
        return self._fused

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               bias: torch.Tensor | None = None, accumulate=None) -> torch.Tensor | None:
        self._fresh = None  # update() has already handed the model its full-precision copy
        if query.shape[2] != 1:
            return None
        if not self._fused_enabled():
            if accumulate is not None or not self.rotate:
                return None  # the core attends over keys_values() and observes there
            return self._attend_rotated_torch(query, attention_mask, scaling, bias)
        from . import kernels

        return kernels.decode_attention(self, query, attention_mask, scaling, bias, accumulate)

    def _attend_rotated_torch(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                              bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """One query per head ``[B, Hq, 1, D]`` against the store decoded in the rotated basis (the middle is
        not rotated back); returns ``[B, 1, Hq, D]``, or ``None`` for a mask of another shape."""
        n = self.length
        if query.shape[1] % self.h or (attention_mask is not None and (attention_mask.dim() != 4
                                                                       or attention_mask.shape[-1] != n)):
            return None
        keys, values = self._dense(query.dtype, rotated=True)
        out, _ = decode_attention(codec.rotate(query), keys, values, attention_mask, scaling, bias)
        return codec.rotate(out)

    def apply(self, index: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
              changed: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Rebuild from a plan ``[B, H, K]``: decode, gather (new contents where ``changed`` or
        ``index < 0``), and re-split into sink / middle / tail.

        A token that stays in the middle unchanged keeps its codes and scales exactly (per-token axis), and
        so does a whole group that stays together (per-channel axis); only groups broken by the eviction,
        and new contents, are quantized again. Sink and tail tokens stay bit-exact.
        """
        self._fresh = None
        b, h, k = index.shape
        d, g = self.d, self.group
        index = index.to(self.device, torch.long)
        write = None
        if keys is not None:
            write = (index < 0) if changed is None else (changed.to(self.device) | (index < 0))
            index = index.clamp(min=0)
        dense_k, dense_v = self._dense(torch.float32)
        gi = index.unsqueeze(-1).expand(b, h, k, d)
        gk, gv = dense_k.gather(2, gi), dense_v.gather(2, gi)
        del dense_k, dense_v
        if write is not None:
            gk = torch.where(write.unsqueeze(-1), keys.to(self.device, torch.float32), gk)
            gv = torch.where(write.unsqueeze(-1), values.to(self.device, torch.float32), gv)
        s_new = min(self.sink, k)
        m_new = max(0, k - s_new - self.window) // g * g
        w_new = k - s_new - m_new
        # where each new middle slot came from in the old middle (rewritten slots come from nowhere)
        src = index[:, :, s_new : s_new + m_new] - self.s
        from_mid = (src >= 0) & (src < self.m)
        if write is not None:
            from_mid &= ~write[:, :, s_new : s_new + m_new]
        old = (self.ck, self.cv, self.ks, self.kz, self.vs, self.vz, self.m)
        self.s, self.m, self.w = s_new, 0, 0
        cap = m_new
        if self.cap_hint is not None:
            cap = max(cap, _round_up(max(self.cap_hint - self.sink - self.window, 0), g))
        self.ck = None
        self._alloc_mid(cap)
        if m_new:
            self._mid_append(gk[:, :, s_new : s_new + m_new], gv[:, :, s_new : s_new + m_new])
            if old[6]:
                self._restore_exact(src, from_mid, old)
        self.w = 0
        self._reserve_fp(self.sink + w_new if w_new else s_new)
        self.fk[:, :, :s_new] = gk[:, :, :s_new]
        self.fv[:, :, :s_new] = gv[:, :, :s_new]
        self.fk[:, :, self.sink : self.sink + w_new] = gk[:, :, s_new + m_new :]
        self.fv[:, :, self.sink : self.sink + w_new] = gv[:, :, s_new + m_new :]
        self.w = w_new

    def _restore_exact(self, src: torch.Tensor, from_mid: torch.Tensor, old: tuple) -> None:
        """Put back the original codes of middle tokens (or whole groups) that the eviction left intact."""
        ck, cv, ks, kz, vs, vz, m_old = old
        g, m = self.group, self.m
        srcc = src.clamp(0, m_old - 1)
        grp_src = srcc.unflatten(-1, (m // g, g))
        grp_ok = (from_mid.unflatten(-1, (m // g, g)).all(-1) & (grp_src[..., 0] % g == 0)
                  & (grp_src[..., -1] - grp_src[..., 0] == g - 1))  # [B, H, m/g]
        for axis, c_old, s_old, z_old, c_new, s_new, z_new in (
            (self.key_axis, ck, ks, kz, self.ck, self.ks, self.kz),
            (self.value_axis, cv, vs, vz, self.cv, self.vs, self.vz),
        ):
            tok_ok = from_mid if axis == "token" else grp_ok.repeat_interleave(g, dim=-1)
            rows = c_old[:, :, :m_old].gather(2, srcc.unsqueeze(-1).expand(-1, -1, -1, c_old.shape[-1]))
            c_new[:, :, :m] = torch.where(tok_ok.unsqueeze(-1), rows, c_new[:, :, :m])
            if axis == "token":
                sel, ok = srcc, from_mid
            else:
                sel, ok = grp_src[..., 0] // g, grp_ok
            for t_old, t_new in ((s_old, s_new), (z_old, z_new)):
                r = t_old.gather(2, sel.unsqueeze(-1).expand(-1, -1, -1, t_old.shape[-1]))
                n = sel.shape[-1]
                t_new[:, :, :n] = torch.where(ok.unsqueeze(-1), r, t_new[:, :, :n])

    def truncate(self, n: int) -> None:
        self._fresh = None
        if n <= self.w:
            self.w -= n
            return
        n -= self.w
        self.w = 0
        if n <= self.m:
            keep_m = self.m - n
            g0 = keep_m // self.group * self.group
            if keep_m > g0:  # a partial group goes back to full precision in the tail
                keys, values = self._dense(self.dtype)
                self._reserve_fp(self.sink + keep_m - g0)
                a, e = self.s + g0, self.s + keep_m
                self.fk[:, :, self.sink : self.sink + keep_m - g0] = keys[:, :, a:e]
                self.fv[:, :, self.sink : self.sink + keep_m - g0] = values[:, :, a:e]
            self.m, self.w = g0, keep_m - g0
            return
        n -= self.m
        self.m = 0
        self.s -= n

    def select_batch(self, index: torch.Tensor) -> None:
        self.launch_cache.clear()
        for name in ("fk", "fv", "ck", "cv", "ks", "kz", "vs", "vz"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        if self.fk is not None:
            self.b = self.fk.shape[0]
        self._fresh = None

    def shrink(self, capacity: int) -> None:
        target = _round_up(max(self.m, capacity - self.sink - self.window, 0), self.group)
        if self.fk is not None and self.cap_m > target:
            self._alloc_mid(target)

    def static_layout(self, capacity: int, cuda_graph: bool):
        from .static import QuantLayout

        return QuantLayout(self, capacity, cuda_graph)

    def tensors(self) -> list[torch.Tensor]:
        names = ("fk", "fv", "ck", "cv", "ks", "kz", "vs", "vz")
        return [t for t in (getattr(self, n) for n in names) if t is not None]
