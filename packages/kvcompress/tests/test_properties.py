"""Property tests: random sequences of cache operations against a plain reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress import CompressedLayer
from kvcompress.builtins import Window

H, D = 2, 4

update_op = st.tuples(st.just("update"), st.integers(1, 6))
crop_op = st.tuples(st.just("crop"), st.integers(1, 3))
reorder_op = st.tuples(st.just("reorder"), st.integers(0, 10_000))
select_op = st.tuples(st.just("select"), st.integers(0, 10_000))
ops = st.lists(st.one_of(update_op, update_op, crop_op, reorder_op, select_op), min_size=1, max_size=25)


class Reference:
    """A plain DynamicCache-like list cut to its last ``budget`` entries once it holds budget+step."""

    def __init__(self, budget: int, step: int):
        self.keys = self.values = None
        self.seen = 0
        self.budget, self.step = budget, step

    def update(self, k, v):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        self.seen += k.shape[2]
        if self.keys.shape[2] >= self.budget + self.step:
            self.keys, self.values = self.keys[:, :, -self.budget:], self.values[:, :, -self.budget:]


@settings(max_examples=60, deadline=None)
@given(ops=ops, batch=st.integers(1, 3), budget=st.integers(2, 12), step=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_operations_match_reference(ops, batch, budget, step, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = CompressedLayer(Window(budget=budget, step=step), None, 0)
    ref = Reference(budget, step)
    for op, arg in ops:
        if op == "update":
            k = torch.randn(batch, H, arg, D, generator=gen)
            v = torch.randn(batch, H, arg, D, generator=gen)
            keys, values = layer.update(k, v)
            assert torch.equal(keys[:, :, -arg:], k)
            layer.finish_attention(None)  # what the attention wrapper does after attending
            ref.update(k, v)
        elif ref.keys is None:
            continue
        elif op == "crop":
            n = min(arg, ref.keys.shape[2] - 1)
            if n <= 0:
                continue
            layer.crop(-n)
            ref.keys, ref.values = ref.keys[:, :, :-n], ref.values[:, :, :-n]
            ref.seen -= n
        elif op == "reorder":
            perm = torch.randperm(batch, generator=torch.Generator().manual_seed(arg))
            layer.reorder_cache(perm)
            ref.keys, ref.values = ref.keys[perm], ref.values[perm]
        elif op == "select":
            keep = torch.randint(0, batch, (batch,), generator=torch.Generator().manual_seed(arg))
            layer.batch_select_indices(keep)
            ref.keys, ref.values = ref.keys[keep], ref.values[keep]
        if ref.keys is not None:
            keys, values = layer.store.keys_values()
            assert torch.equal(keys, ref.keys)
            assert torch.equal(values, ref.values)
            assert layer.get_seq_length() == ref.seen
            assert layer.get_mask_sizes(1) == (ref.keys.shape[2] + 1, ref.seen - ref.keys.shape[2])
