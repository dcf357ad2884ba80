"""A ``LowRankStore`` held in place for :func:`kvcompress.static_generate` (decode steps as CUDA graphs)."""

from __future__ import annotations

import torch

from kvcompress.store import Accumulate, StaticLayout, restore_held

from .store import LowRankStore

_HELD = ("fk", "fv", "hpos", "ck", "cv", "ks", "vs", "mpos")


class LowRankLayout(StaticLayout):
    """The store's tensors at fixed sizes: the rest's coefficients at ``capacity`` slots, the exact head and
    ring at the head's length (plus ``sink`` while the head may still grow) and the ring's entries.

    Fused (the Triton kernels: a CUDA GPU, or the interpreter): a step's token is projected and written at
    the device-side ``lens`` ``[s, m]`` (its rest slot ``m``, exact in ring entry ``s + m % window``) at the
    true positions ``rows``; then ``lens`` grows by ``grow`` (``[0, 1]``) and ``rows`` by 1, on the device,
    and attention reads its lengths there. On the host the counters follow as the store's own ``append``
    moves them. While the head is open (a row's prompt shorter than ``sink``) a token that eager decoding
    puts in the head is written the same way (its ring entry is the head's next slot) with ``grow`` ``[1, 0]``
    (set between steps): that step attends it in the head, exact (eager: a row whose token is already past
    its sink attends its reconstruction), and after it the host makes that row's slot the reconstruction.
    An eviction rebuilds the store as eagerly; its contents are then copied into the held tensors.

    Without the kernels (CPU, ``kernel='torch'``; never under CUDA graphs) a step runs the store's own append
    and torch attention, from the host counters, at the true positions ``rows``.
    """

    def __init__(self, store: LowRankStore, capacity: int, cuda_graph: bool) -> None:
        self.store = st = store
        self.capacity, self.fused = capacity, store._fused_enabled()
        if cuda_graph and not self.fused:
            raise ValueError("static_generate: lowrank stores replay as CUDA graphs through the fused Triton "
                             "kernels only; allowed: lowrank(kernel='auto' or 'triton') with Triton "
                             "installed, or cuda_graph=False")
        st._fresh, st.cap_hint = None, capacity  # no exact prompt copy afterwards; an eviction's room
        if st.cap_m < capacity:
            st._alloc_mid(capacity)
        self.rows = (st.seen - st.offset).to(torch.int32).view(st.b, 1)  # the next token's true positions
        room = st.s + (st.sink if st.head_open else 0)  # the head's most slots (an eviction only shrinks it)
        # fused, window 0: the append kernel still writes each token exact after the head (one may join it)
        self._reserve(("fk", "fv"), room + (max(st.window, 1) if self.fused else st.window))
        self._reserve(("hpos",), room)
        self.next_min: int | None = None  # the fused steps' lowest true position, for the head's steps
        if self.fused:
            self.next_min = int(self.rows.min())  # one sync, before any step
            st.mid_start = None  # the kernels write positions the host does not check
        self.held = {name: getattr(st, name) for name in _HELD if getattr(st, name) is not None}
        self.lens = torch.zeros(2, dtype=torch.long, device=st.device)
        self.grow = torch.tensor([0, 1], dtype=torch.long, device=st.device)
        self.joins_head = False  # the next step's token joins the head (grow [1, 0])
        self.work: tuple[torch.Tensor, ...] | None = None
        stand_in = torch.zeros((1, 1, 1, 1), dtype=st.dtype, device=st.device)
        self.stand_in = stand_in.expand(st.b, st.h, capacity, st.d)
        self._sync_lens()

    def _reserve(self, names: tuple[str, ...], rows: int) -> None:
        """At least ``rows`` slots in the store's tensors ``names`` (zeros beyond what they hold)."""
        st = self.store
        for name in names:
            old = getattr(st, name)
            if old.shape[2] < rows:
                new = old.new_zeros((*old.shape[:2], rows, *old.shape[3:]))
                new[:, :, : old.shape[2]] = old
                setattr(st, name, new)

    def _sync_lens(self) -> None:
        """The device's ``[s, m]`` from the host counters (fills: no copy from the host, no sync)."""
        self.lens[0].fill_(self.store.s)
        self.lens[1].fill_(self.store.m)

    def append(self, keys, values, slot):
        st = self.store
        if self.fused:
            from . import kernels

            if not kernels.append_token(st, keys, values, self.rows, lens=self.lens):
                raise RuntimeError("static_generate: the lowrank append kernel refused a static decode step "
                                   "(strides or dtype it does not cover); run with cuda_graph=False")
            self.lens.add_(self.grow)
        else:
            st._append_rows(keys, values, self.rows)
        self.rows.add_(1)
        return self.stand_in, self.stand_in

    def attend(self, query: torch.Tensor, scaling: float, bias: torch.Tensor,
               accumulate: Accumulate | None) -> torch.Tensor:
        st = self.store
        if accumulate is not None and accumulate.replace:
            accumulate.into.zero_()  # the step's attention replaces the state: added onto zeros
        if not self.fused:
            from .attend import attend_torch

            return attend_torch(st, query, None, scaling, bias, accumulate)
        from . import kernels

        if self.work is None:  # the first step is eager (never captured): the workspace is made there
            self.work = kernels.static_workspace(st, query)
        out = kernels.decode_attention(st, query, None, scaling, bias, accumulate, lens=self.lens,
                                       work=self.work)
        if out is None:
            raise RuntimeError("static_generate: the lowrank kernel refused a static decode step (shapes it "
                               "does not cover); run with cuda_graph=False")
        return out

    def prepare(self) -> None:
        """Whether the next token joins the head, as the store's own ``append`` decides: some row's true
        position is below ``sink`` while the head is open (fills only when that changes)."""
        st = self.store
        joins = self.fused and st.head_open and self.next_min < st.sink
        if joins != self.joins_head:
            self.joins_head = joins
            self.grow[0].fill_(int(joins))
            self.grow[1].fill_(int(not joins))

    def advance(self) -> None:
        st = self.store
        st.seen += 1
        if not self.fused:  # the store's own append counted it
            return
        self.next_min += 1
        if not self.joins_head:
            st.m += 1  # the kernel's write, as the store's own append counts it
            st.head_open = False
            return
        s, pos = st.s, (self.rows - 1).view(st.b, 1, 1).expand(st.b, st.h, 1)
        hk, hv = st._head(st.fk[:, :, s : s + 1].clone(), st.fv[:, :, s : s + 1].clone(), pos)
        st.fk[:, :, s : s + 1], st.fv[:, :, s : s + 1], st.hpos[:, :, s : s + 1] = hk, hv, pos
        st.s = st.hc = s + 1

    def rebind(self) -> None:
        st = self.store
        restore_held(st, self.held, "LowRankLayout")
        self._sync_lens()
