"""A ``QuantStore`` held in place for :func:`kvcompress.static_generate` (decode steps as CUDA graphs)."""

from __future__ import annotations

import torch

from kvcompress.store import Accumulate, StaticLayout, restore_held

from .store import QuantStore, _round_up

_HELD = ("fk", "fv", "ck", "cv", "ks", "kz", "vs", "vz")


class QuantLayout(StaticLayout):
    """The store's tensors at fixed sizes: the full-precision buffer at ``sink + window + group`` slots, the
    packed middle at all the tokens the layer can hold beyond the sink and the window.

    A step writes its key and value at the device-side ``at`` (the next free full-precision slot: the sink
    fills first, then the tail) and the fused kernel reads ``[at, m]`` from the device, so a captured step
    replays as the store grows. Between steps, on the host: the counters (``s``, ``m``, ``w``) advance as the
    store's own ``append`` would have moved them; every ``group`` tokens the tail's oldest whole groups are
    quantized onto the middle and the rest moves to the front of the tail, in place, before the step whose
    eager ``append`` would have done it; an eviction rebuilds the store as eagerly, then its contents are
    copied back into the held tensors (a rebuild the core replays as a graph once it meets the same counters
    again: :meth:`host_state`).

    Without the fused kernel (CPU, ``kernel='torch'``; never under CUDA graphs) a step hands the model the
    store decoded over the whole capacity, from the host counters.
    """

    def __init__(self, store: QuantStore, capacity: int, cuda_graph: bool) -> None:
        self.store, self.capacity = store, capacity
        self.fused = store._fused_enabled()
        if cuda_graph and not self.fused:
            raise ValueError("static_generate: quant stores replay as CUDA graphs through the fused Triton "
                             "kernel only; allowed: quant(kernel='auto' or 'triton') with Triton installed, "
                             "or cuda_graph=False")
        store._reserve_fp(store.sink + store.window + store.group)
        middle = _round_up(max(capacity - store.sink - store.window, 0), store.group)
        if middle > store.cap_m or store.ck is None:
            store._alloc_mid(max(middle, store.group))
        store.pinned = True
        store._fresh = None  # the prompt's full-precision copy must not reappear in keys_values() afterwards
        self.held = {name: getattr(store, name) for name in _HELD}
        self.lens = torch.zeros(2, dtype=torch.long, device=store.device)
        self._stand_in = torch.zeros((1, 1, 1, 1), dtype=store.dtype, device=store.device)
        self._sync_lens()

    def _sync_lens(self) -> None:
        """The device's ``[at, m]`` from the host counters (two fills: no copy from the host, no sync)."""
        st = self.store
        self.lens[0].fill_(st.s + st.w if st.s < st.sink else st.sink + st.w)
        self.lens[1].fill_(st.m)

    def append(self, keys, values, slot):
        st, at = self.store, self.lens[:1]
        st.fk.index_copy_(2, at, keys)
        st.fv.index_copy_(2, at, values)
        at.add_(1)
        if self.fused:
            t = self._stand_in.expand(st.b, st.h, self.capacity, st.d)
            return t, t
        return self._decoded(keys, values)

    def _decoded(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The store with the step's token, decoded over the whole capacity (host counters: no graph here)."""
        st = self.store
        dk, dv = st._dense(st.dtype)
        n = dk.shape[2]
        out = []
        for dense, new in ((dk, keys), (dv, values)):
            full = dense.new_zeros((st.b, st.h, self.capacity, st.d))
            full[:, :, :n] = dense
            full[:, :, n : n + 1] = new
            out.append(full)
        return out[0], out[1]

    def attend(self, query: torch.Tensor, scaling: float, bias: torch.Tensor,
               accumulate: Accumulate | None) -> torch.Tensor | None:
        if not self.fused:
            return None
        from . import kernels

        out = kernels.decode_attention(self.store, query, None, scaling, bias, accumulate, lens=self.lens)
        if out is None:
            raise RuntimeError("static_generate: the quant kernel refused a static decode step (shapes it "
                               "does not cover); run with cuda_graph=False")
        return out

    def advance(self) -> None:
        st = self.store
        if st.s < st.sink:
            st.s += 1
        else:
            st.w += 1

    def prepare(self) -> None:
        """The tail's oldest whole groups join the middle where the next token's eager ``append`` would
        quantize them (before that step attends), and the rest moves to the front of the tail, in place."""
        st = self.store
        t0, w, g = st.sink, st.w, st.group
        if w + 1 < st.window + g:
            return
        nq = min((w + 1 - st.window) // g * g, w // g * g)  # window 0: the next token's own group waits
        if nq:
            st._mid_append(st.fk[:, :, t0 : t0 + nq], st.fv[:, :, t0 : t0 + nq])
            rest = w - nq
            st.fk[:, :, t0 : t0 + rest] = st.fk[:, :, t0 + nq : t0 + w].clone()
            st.fv[:, :, t0 : t0 + rest] = st.fv[:, :, t0 + nq : t0 + w].clone()
            st.w = rest
            self._sync_lens()

    def rebind(self) -> None:
        st = self.store
        restore_held(st, self.held, "QuantLayout")
        st.cap_m = self.held["ck"].shape[2]
        self._sync_lens()

    def host_state(self) -> tuple[int, int, int]:
        """The counters a rebuild reads and writes (sizes are held; ``rebind`` restores ``cap_m``)."""
        st = self.store
        return st.s, st.m, st.w

    def set_host_state(self, state: tuple[int, int, int]) -> None:
        st = self.store
        st.s, st.m, st.w = state
        st._fresh = None

    def release(self) -> None:
        self.store.pinned = False
