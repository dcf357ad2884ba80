"""``LowRankStore``: one layer's keys/values as an exact head, low-rank coefficients, an exact recent window.

Per (batch row, kv head) the slots are ``[0, s)`` the head and ``[s, s+m)`` the rest. Every slot of the rest
has ``k_rank`` coefficients of its key *before* RoPE (``(k_raw - mean) @ basis.T``) and ``v_rank`` of its
value, in the model's dtype or int8/int4 with a float16 scale, and its true position: a token is projected
once, when it arrives. The last ``w = min(window, m)`` slots are also kept exact, in a ring of ``window``
entries (slot ``s + i`` at ring entry ``i % window``), and attended exactly; the middle ``[s, s+m-w)`` is
attended from its coefficients. Head and ring share one buffer ``fk``/``fv``: the head at ``[0, hc)``, the
ring after it.

The head holds each row's first ``sink`` tokens by *true* position (and any left padding before them, which
has position 0): in a left-padded batch a row's first real tokens sit after its padding, so the head is as
long as the longest padding plus ``sink``, and a row's head slots past its own sink hold the low-rank
reconstruction of their tokens. The window is the last ``window`` slots, real tokens in every row. A row
of a left-padded batch therefore attends to exactly what it would alone.

Attention reads the stored form: keys are reconstructed (``mean + c @ basis``) and rotated at their positions
tile by tile inside the fused Triton kernel on a GPU, or per layer with torch ops; values are attended in the
low-rank space (``p @ c``) and projected once (``@ basis + mean * sum(p)``). Only :meth:`keys_values` (a
prompt's attention, a policy that reads keys) decodes the whole middle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvcompress.buffers import GROWTH
from kvcompress.store import KVStore, Step

from . import codec
from .positions import RopeError

if TYPE_CHECKING:  # pragma: no cover
    from kvcompress import LayerInfo

    from .policy import LowRank


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[..., D]`` with the half tables ``cos``/``sin`` ``[..., D/2]``, in float32."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate` for the same tables (also when they carry a scale), in float32."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    norm = cos * cos + sin * sin
    return torch.cat(((x1 * cos + x2 * sin) / norm, (x2 * cos - x1 * sin) / norm), dim=-1)


class LowRankStore(KVStore):
    """Exact head + low-rank coefficients + exact recent window (see the module docstring)."""

    def __init__(self, layer: LayerInfo, policy: LowRank) -> None:
        self.layer, self.shared = layer, layer.shared
        self.sink, self.window, self.kernel = policy.sink, policy.window, policy.kernel
        self.bits = policy.coeff_bits  # None: coefficients in the model's dtype
        self.quantized = self.bits is not None
        self.basis = self.shared.layer(layer.index, layer.device, layer.dtype)
        self.table = self.shared.table(layer.index, layer.device)
        self.rk, self.rv = self.basis.k_basis.shape[1], self.basis.v_basis.shape[1]
        self.b, self.h, self.d = layer.batch, layer.kv_heads, layer.head_dim
        self.dtype, self.device = layer.dtype, layer.device
        self.s = self.m = 0
        self.seen = 0  # the next token's slot position (the layer's tokens seen)
        self.hc = 0  # where the ring starts in fk/fv: the head's length once it is complete
        self.head_open = True  # tokens with a true position < sink may still come
        self.cap_hint: int | None = None
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_q = 0
        self._stand_in: torch.Tensor | None = None
        self._fused: bool | None = None
        self._ring_index: tuple[tuple[int, int], torch.Tensor] | None = None
        self.mid_start: int | None = 0  # CPU only: the rest's positions are mid_start + arange(m) everywhere
        cdt = torch.int8 if self.quantized else self.dtype
        b, h, d, dev = self.b, self.h, self.d, self.device
        self.fk = torch.empty((b, h, 0, d), dtype=self.dtype, device=dev)
        self.fv = torch.empty((b, h, 0, d), dtype=self.dtype, device=dev)
        self.hpos = torch.empty((b, h, 0), dtype=torch.int32, device=dev)
        self.ck = torch.empty((b, h, 0, codec.stored_width(self.rk, self.bits)), dtype=cdt, device=dev)
        self.cv = torch.empty((b, h, 0, codec.stored_width(self.rv, self.bits)), dtype=cdt, device=dev)
        self.ks = self.vs = None
        if self.quantized:
            self.ks = torch.empty((b, h, 0), dtype=codec.SCALE_DTYPE, device=dev)
            self.vs = torch.empty((b, h, 0), dtype=codec.SCALE_DTYPE, device=dev)
        self.mpos = torch.empty((b, h, 0), dtype=torch.int32, device=dev)
        self.offset = torch.zeros(
            (b,), dtype=torch.int32, device=dev
        )  # slot position - true position, per row

    # -- layout
    # ------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.s + self.m

    @property
    def w(self) -> int:
        """Slots of the exact window: the last ``min(window, m)``."""
        return min(self.window, self.m)

    @property
    def cap_m(self) -> int:
        return self.ck.shape[2]

    def _mid_names(self) -> tuple[str, ...]:
        return ("ck", "cv", "mpos") + (("ks", "vs") if self.quantized else ())

    def _reserve_head(self, needed: int) -> None:
        """Room for ``needed`` head slots (only while the rest is empty: the ring comes after the head)."""
        if needed <= self.fk.shape[2]:
            return
        cap = needed + needed // GROWTH
        for name in ("fk", "fv", "hpos"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], cap, *old.shape[3:]))
            new[:, :, : self.s] = old[:, :, : self.s]
            setattr(self, name, new)

    def _reserve_ring(self) -> None:
        """The ring's ``window`` entries after the head."""
        need = self.hc + self.window
        for name in ("fk", "fv"):
            old = getattr(self, name)
            if old.shape[2] != need:
                new = old.new_empty((*old.shape[:2], need, *old.shape[3:]))
                keep = min(old.shape[2], need)
                new[:, :, :keep] = old[:, :, :keep]
                setattr(self, name, new)
        if self.hpos.shape[2] != self.hc:
            self.hpos = self.hpos[:, :, : self.hc].clone()

    def _alloc_mid(self, cap: int) -> None:
        """(Re)allocate the rest's coefficients with ``cap`` slots, keeping the first ``m``."""
        for name in self._mid_names():
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], cap, *old.shape[3:]))
            if self.m:
                new[:, :, : self.m] = old[:, :, : self.m]
            setattr(self, name, new)

    def _reserve_mid(self, needed: int) -> None:
        if needed <= self.cap_m:
            return
        grow = max(needed, self.cap_m + self.cap_m // GROWTH)
        if self.cap_hint is not None:
            grow = min(grow, max(self.cap_hint - self.hc, needed))
        self._alloc_mid(grow)

    # -- projection
    # --------------------------------------------------------------------------------------------
    def _raw(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys before RoPE (float32) of keys ``[B, H, n, D]`` after RoPE at true ``positions`` ``[B, H,
        n]``."""
        if self.table is None:
            return keys.float()
        return unrotate(keys, *self.table.at(positions))

    def _encode(
        self, x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, inv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Coefficients of ``x`` ``[B, H, n, D]`` (keys before RoPE, or values) as stored, and their scales:
        ``((x - mean) @ basis.T) * inv`` (``basis`` rows carry each coefficient's deviation, ``inv`` its
        inverse square: whitened coefficients)."""
        coeff = torch.matmul(x.float() - mean.float()[None, :, None], basis.float().transpose(1, 2)[None])
        if self.quantized:
            return codec.quantize(coeff * inv.float()[None, :, None], self.bits)
        return coeff.to(self.ck.dtype), None

    def _decode(
        self, c: torch.Tensor, scale: torch.Tensor | None, mean: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """``mean + c @ basis`` ``[B, H, n, D]`` in the basis's dtype."""
        c = codec.dequantize(c, scale, basis.dtype, self.bits) if scale is not None else c.to(basis.dtype)
        return torch.matmul(c, basis[None]) + mean[None, :, None]

    def _project(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, at: int) -> None:
        """Write the coefficients of ``[B, H, n, D]`` keys (after RoPE, at ``positions``) and values into
        slots ``at .. at+n`` of the rest."""
        n = keys.shape[2]
        bs = self.basis
        for x, mean, basis, inv, c, scale in (
            (self._raw(keys, positions), bs.k_mean, bs.k_basis, bs.k_inv, self.ck, self.ks),
            (values, bs.v_mean, bs.v_basis, bs.v_inv, self.cv, self.vs),
        ):
            coeff, sc = self._encode(x, mean, basis, inv)
            c[:, :, at : at + n] = coeff
            if sc is not None:
                scale[:, :, at : at + n] = sc
        self.mpos[:, :, at : at + n] = positions

    def _approx(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the middle makes of exact keys (after RoPE) and values at ``positions``: their low-rank
        reconstructions, keys rotated again, in the model's dtype."""
        bs = self.basis
        raw = self._decode(
            *self._encode(self._raw(keys, positions), bs.k_mean, bs.k_basis, bs.k_inv), bs.k_mean, bs.k_basis
        )
        if self.table is not None:
            raw = rotate(raw, *self.table.at(positions))
        v = self._decode(*self._encode(values, bs.v_mean, bs.v_basis, bs.v_inv), bs.v_mean, bs.v_basis)
        return raw.to(self.dtype), v.to(self.dtype)

    def _head(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head slots as stored: exact where the true position is < ``sink`` (sink tokens, padding), the
        low-rank reconstruction elsewhere (a row whose sink ends before the head does)."""
        exact = positions < self.sink
        if bool(exact.all()):
            return keys, values
        ak, av = self._approx(keys, values, positions)
        keep = exact.unsqueeze(-1)
        return torch.where(keep, keys, ak), torch.where(keep, values, av)

    def _ring_write(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """Exact ``[B, H, n, D]`` keys/values of rest slots ``first .. first+n`` into the ring (the last
        ``window`` of them are kept)."""
        n, win = keys.shape[2], self.window
        if not win:
            return
        skip = max(0, n - win)  # at most `window` entries remain: one wrap, two copies
        a = (first + skip) % win
        count = n - skip
        head = min(count, win - a)
        base = self.hc
        self.fk[:, :, base + a : base + a + head] = keys[:, :, skip : skip + head]
        self.fv[:, :, base + a : base + a + head] = values[:, :, skip : skip + head]
        if count > head:
            self.fk[:, :, base : base + count - head] = keys[:, :, skip + head :]
            self.fv[:, :, base : base + count - head] = values[:, :, skip + head :]

    # -- KVStore
    # -----------------------------------------------------------------------------------------------
    def _true_positions(self, q: int, step: Step | None) -> torch.Tensor:
        """True positions ``[B, q]`` (int32) of the ``q`` tokens being appended; records each row's offset."""
        start = step.start if step is not None else self.length
        self.seen = start + q
        if step is None or step.cos is None or self.shared.decoder is None:
            pos = torch.arange(start, start + q, device=self.device, dtype=torch.int32).expand(self.b, q)
        else:
            if step.cos.shape[-1] != self.d:
                raise RopeError(
                    f"lowrank: the model's RoPE covers {step.cos.shape[-1]} of head_dim {self.d} "
                    "dims (partial rotary); allowed: RoPE over the whole head"
                )
            pos = self.shared.positions(step.cos, step.sin, start).to(self.device).expand(self.b, q)
        if q > 1 or self.device.type == "cpu":  # a decode step (one launch on a GPU) keeps each row's offset
            self.offset = (start + q - 1) - pos[:, -1]
        return pos

    def append(self, keys: torch.Tensor, values: torch.Tensor, step: Step | None = None) -> None:
        self.cap_hint = step.cap if step is not None else None
        b, h, q, _ = keys.shape
        self._last_q = q
        self._fresh = (keys, values) if q > 1 else None
        self._append_rows(keys, values, self._true_positions(q, step))

    def _append_rows(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Append ``[B, H, q, D]`` keys and values at true positions ``rows`` ``[B or 1, q]`` (int32)."""
        b, h, q, _ = keys.shape
        pos = rows.unsqueeze(1).expand(b, h, q)
        if self.head_open:  # the leading tokens that are some row's sink (or padding before it) join the head
            take = int((rows < self.sink).sum(-1).max()) if self.sink else 0
            if take:
                self._reserve_head(self.s + take)
                hk, hv = self._head(keys[:, :, :take], values[:, :, :take], pos[:, :, :take])
                self.fk[:, :, self.s : self.s + take] = hk
                self.fv[:, :, self.s : self.s + take] = hv
                self.hpos[:, :, self.s : self.s + take] = pos[:, :, :take]
                self.s += take
                self.hc = self.s
            if take == q:
                return
            self.head_open = False
            self._reserve_ring()
            keys, values, pos, q = keys[:, :, take:], values[:, :, take:], pos[:, :, take:], q - take
            rows = rows[:, take:]
        self._reserve_mid(self.m + q)
        if self.mid_start is not None:
            self.mid_start = self._uniform_start(pos, self.m)
        if q == 1 and self._fused_enabled():
            from . import kernels

            if kernels.append_token(self, keys, values, rows):
                self.m += 1
                return
        self._project(keys, values, pos, self.m)
        self._ring_write(keys, values, self.m)
        self.m += q

    def _uniform_start(self, positions: torch.Tensor, at: int) -> int | None:
        """``mid_start`` after appending ``positions`` at rest slot ``at`` (CPU only: it costs a sync)."""
        if self.device.type != "cpu" or not positions.numel():
            return None
        start = int(positions[0, 0, 0]) - at
        if at and start != self.mid_start:
            return None
        want = torch.arange(start + at, start + at + positions.shape[2], dtype=positions.dtype)
        return start if bool((positions == want).all()) else None

    def _mid_cos_sin(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, H, n, D/2]`` (or broadcastable ``[n, D/2]``) of the first ``n`` rest slots."""
        if self.mid_start is not None:
            a = self.mid_start
            self.table.ensure(a + n)
            return self.table.cos[a : a + n], self.table.sin[a : a + n]
        return self.table.at(self.mpos[:, :, :n])

    def value_coefficients(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The first ``n`` rest slots' value coefficients ``[B, H, n, v_rank]`` in ``dtype``."""
        if self.quantized:
            return codec.dequantize(self.cv[:, :, :n], self.vs[:, :, :n], dtype, self.bits)
        return self.cv[:, :, :n].to(dtype)

    def mid_keys(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The first ``n`` rest slots' keys after RoPE, reconstructed: ``[B, H, n, D]`` of ``dtype``."""
        bs = self.basis
        raw = self._decode(
            self.ck[:, :, :n], self.ks[:, :, :n] if self.quantized else None, bs.k_mean, bs.k_basis
        )
        if self.table is None:
            return raw.to(dtype)
        return rotate(raw, *self._mid_cos_sin(n)).to(dtype)

    def mid_values(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        bs = self.basis
        return self._decode(
            self.cv[:, :, :n], self.vs[:, :, :n] if self.quantized else None, bs.v_mean, bs.v_basis
        ).to(dtype)

    def exact_slots(self) -> torch.Tensor:
        """The slot of each exact entry ``fk[:, :, :s + w]`` (the head, then the ring's entries), ``[s +
        w]``."""
        key = (self.s, self.m, self.w)
        if self._ring_index is None or self._ring_index[0] != key:
            start, win = self.m - self.w, max(self.window, 1)
            ring = start + (torch.arange(self.w, device=self.device) - start) % win
            self._ring_index = (key, torch.cat((torch.arange(self.s, device=self.device), self.s + ring)))
        return self._ring_index[1]

    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact slots in slot order: the head, then the window, ``[B, H, s + w, D]``."""
        order = self.exact_slots().argsort()
        return self.fk.index_select(2, order), self.fv.index_select(2, order)

    def _dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored slot, ``[B, H, length, D]`` of ``dtype``: exact head and window, decoded middle."""
        s, n_mid = self.s, self.m - self.w
        ek, ev = self.exact()
        keys = torch.cat((ek[:, :, :s].to(dtype), self.mid_keys(dtype, n_mid), ek[:, :, s:].to(dtype)), dim=2)
        values = torch.cat(
            (ev[:, :, :s].to(dtype), self.mid_values(dtype, n_mid), ev[:, :, s:].to(dtype)), dim=2
        )
        return keys, values

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._dense(self.dtype)
        if self._fresh is not None:  # the tokens just appended attend exactly this once (a prompt)
            fk, fv = self._fresh
            self._fresh = None  # not held past this step
            q = fk.shape[2]
            keys[:, :, -q:] = fk
            values[:, :, -q:] = fv
        return keys, values

    def positions(self) -> torch.Tensor:
        """True positions ``[B, H, length]`` of the stored slots (int32)."""
        return torch.cat((self.hpos[:, :, : self.s], self.mpos[:, :, : self.m]), dim=2)

    # -- attention from the stored form ---------------------------------------------------------------------
    def _fused_enabled(self) -> bool:
        if self._fused is None:
            from . import kernels

            self._fused = self.kernel != "torch" and kernels.usable(self.device)
        return self._fused

    def stand_ins(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Zero-byte ``[B, H, length, D]`` placeholders when :meth:`attend` takes this decode step."""
        if self._last_q != 1:
            return None
        if self._stand_in is None:
            self._stand_in = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        t = self._stand_in.expand(self.b, self.h, self.length, self.d)
        return t, t

    def attend(self, query, attention_mask, scaling, bias=None, accumulate=None):
        self._fresh = None
        if query.shape[2] != 1 or query.shape[1] % self.h:
            return None
        n = self.length
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[-1] != n):
            return None
        if accumulate is not None and accumulate.replace:
            accumulate.into.zero_()  # the step's attention replaces the state (tova): added onto zeros
        if self._fused_enabled():
            from . import kernels

            out = kernels.decode_attention(self, query, attention_mask, scaling, bias, accumulate)
            if out is not None:
                return out
        from .attend import attend_torch

        return attend_torch(self, query, attention_mask, scaling, bias, accumulate)

    # -- plans, truncation, batch ---------------------------------------------------------------------------
    def apply(self, index, keys=None, values=None, changed=None, positions=None) -> None:
        """Rebuild from a plan. Slots of the rest that stay unchanged keep their coefficients exactly; new
        contents are projected; the head (each row's sink by position) and the window are exact where their
        source was (decoded where it came from the middle)."""
        self._fresh = None
        b, h, k = index.shape
        index = index.to(self.device, torch.long)
        write = None
        if keys is not None:
            write = (index < 0) if changed is None else (changed.to(self.device) | (index < 0))
        src = index.clamp(min=0)
        dense_k, dense_v = self._dense(self.dtype)
        gi = src.unsqueeze(-1).expand(b, h, k, self.d)
        gk, gv = dense_k.gather(2, gi), dense_v.gather(2, gi)
        gp = self.positions().gather(2, src)
        del dense_k, dense_v
        if write is not None:
            wm = write.unsqueeze(-1)
            gk = torch.where(wm, keys.to(self.device, gk.dtype), gk)
            gv = torch.where(wm, values.to(self.device, gv.dtype), gv)
            if (
                positions is not None
            ):  # an added slot's true position: its slot position less the row's offset
                added = positions.to(self.device, torch.int32) - self.offset.view(-1, 1, 1)
                gp = torch.where(index < 0, added, gp)
        s_new = (
            int((gp < self.sink).sum(-1).max()) if self.sink else 0
        )  # the head: each row's sink by position
        m_new = k - s_new
        rest_src = src[:, :, s_new:] - self.s
        keep_codes = rest_src >= 0  # came from the rest (its coefficients exist)
        if write is not None:
            keep_codes &= ~write[:, :, s_new:]
        old = {name: getattr(self, name)[:, :, : self.m] for name in self._mid_names()}
        cap = m_new if self.cap_hint is None else max(m_new, self.cap_hint - s_new)
        self.m = 0
        self._alloc_mid(cap)
        if m_new:
            rk, rv, rp = gk[:, :, s_new:], gv[:, :, s_new:], gp[:, :, s_new:]
            self._project(rk, rv, rp, 0)
            if old["ck"].shape[2]:
                msrc = rest_src.clamp(0, old["ck"].shape[2] - 1)
                for name, t in old.items():
                    idx = msrc if t.dim() == 3 else msrc.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
                    cond = keep_codes if t.dim() == 3 else keep_codes.unsqueeze(-1)
                    view = getattr(self, name)[:, :, :m_new]
                    view.copy_(torch.where(cond, t.gather(2, idx), view))
        self.mid_start = None
        self._ring_index = None
        self.s, self.hc, self.m = 0, s_new, 0
        self.head_open = bool(((gp >= self.sink).sum(-1) == 0).any()) if self.sink else False
        self._reserve_head(s_new)
        if s_new:
            hk, hv = self._head(gk[:, :, :s_new], gv[:, :, :s_new], gp[:, :, :s_new])
            self.fk[:, :, :s_new], self.fv[:, :, :s_new] = hk, hv
            self.hpos[:, :, :s_new] = gp[:, :, :s_new]
        self.s = s_new
        self._reserve_ring()
        self._ring_write(gk[:, :, s_new:], gv[:, :, s_new:], 0)
        self.m = m_new

    def truncate(self, n: int) -> None:
        self._fresh = None
        self.seen -= n
        cut = min(n, self.m)
        if cut:
            old_start = self.m - self.w
            self.m -= cut
            self._ring_index = None
            a, e = self.m - self.w, min(old_start, self.m)
            if e > a:  # slots back in the window whose exact values the ring no longer has: reconstructions
                bs = self.basis
                raw = self._decode(
                    self.ck[:, :, a:e], self.ks[:, :, a:e] if self.quantized else None, bs.k_mean, bs.k_basis
                )
                if self.table is not None:
                    raw = rotate(raw, *self.table.at(self.mpos[:, :, a:e]))
                val = self._decode(
                    self.cv[:, :, a:e], self.vs[:, :, a:e] if self.quantized else None, bs.v_mean, bs.v_basis
                )
                self._ring_write(raw.to(self.dtype), val.to(self.dtype), a)
        n -= cut
        if n:  # into the head (the rest is empty now)
            self.s -= n
            self.hc = self.s
            self.head_open = True
            self._reserve_ring()

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("fk", "fv", "hpos", "offset", *self._mid_names()):
            t = getattr(self, name)
            setattr(self, name, t.index_select(0, index.to(t.device)))
        self.b = self.fk.shape[0]
        self._fresh = None

    def shrink(self, capacity: int) -> None:
        target = max(self.m, capacity - self.hc)
        if self.cap_m > target:
            self._alloc_mid(target)

    def static_layout(self, capacity: int, cuda_graph: bool):
        from .static import LowRankLayout

        return LowRankLayout(self, capacity, cuda_graph)

    def tensors(self) -> list[torch.Tensor]:
        own = [self.fk, self.fv, self.hpos, self.offset, *(getattr(self, n) for n in self._mid_names())]
        if self._stand_in is not None:
            own.append(self._stand_in)
        if self._ring_index is not None:
            own.append(self._ring_index[1])
        unique = {
            t.untyped_storage().data_ptr(): t
            for t in (*own, *self.basis.tensors(), *self.shared.owned(self.layer.index))
        }
        return list(unique.values())
