"""Reported KV bytes equal the bytes of the tensors the cache actually holds."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.testing import reachable_tensors


@pytest.mark.parametrize("spec", ["full", "window(budget=16)", "sink(budget=24,step=8)", "random(budget=9)"])
def test_kv_bytes_equal_held_storage(spec):
    model = tiny_model("llama")
    cache = kvcompress.make_cache(spec, model=model)
    greedy_logits(model, torch.randint(1, 96, (2, 40)), cache, steps=10)
    layers = [layer for layer in cache.layers]
    held = {}
    for layer in layers:
        held.update(reachable_tensors(layer))
    storage_bytes = sum(t.untyped_storage().nbytes() for t in held.values())
    assert kvcompress.kv_bytes(cache) == storage_bytes


def test_window_holds_fewer_bytes_than_full():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 120))
    full, window = DynamicCache(), kvcompress.make_cache("window(budget=16,step=4)", model=model)
    greedy_logits(model, ids, full, steps=2)
    greedy_logits(model, ids, window, steps=2)
    # K+V: 2 layers x 2 heads x 16 dims x 4 bytes x 2 -> 512 bytes per token in full
    assert kvcompress.kv_bytes(full) == 122 * 512
    # window: at most budget+step slots of K/V plus 5 bytes (int32 position + bool validity) per slot-head,
    # plus the cached int64 keep-index of the budget per layer
    assert kvcompress.kv_bytes(window) <= 20 * (512 + 2 * 2 * 5) + 2 * 16 * 8


class _RowState:
    """A bound state with a tensor per batch row: listed by tensors(), reordered by select_batch()."""

    def __init__(self, batch: int) -> None:
        self.rows = torch.arange(batch, dtype=torch.float32).view(batch, 1).repeat(1, 8)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows]

    def select_batch(self, index: torch.Tensor) -> None:
        self.rows = self.rows.index_select(0, index)


def test_bound_state_tensors_are_counted_and_follow_batch_edits(monkeypatch):
    from kvcompress.builtins import Window

    monkeypatch.setattr(Window, "bind", lambda self, layer: _RowState(layer.batch), raising=False)
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=16,step=4)", model=model)
    greedy_logits(model, torch.randint(1, 96, (3, 30)), cache, steps=3)
    held = {}
    for layer in cache.layers:
        held.update(reachable_tensors(layer))
    assert kvcompress.kv_bytes(cache) == sum(t.untyped_storage().nbytes() for t in held.values())
    own = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.bound.tensors())
    assert own == 2 * 3 * 8 * 4  # 2 layers x 3 rows x 8 float32, inside the reported bytes
    cache.batch_select_indices(torch.tensor([2, 0]))
    for layer in cache.layers:
        assert layer.bound.rows[:, 0].tolist() == [2.0, 0.0]
