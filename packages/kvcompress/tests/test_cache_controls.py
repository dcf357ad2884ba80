"""Cache controls the harness relies on: compress now, freeze, per-device bytes, policies that build a cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.plugins import Entry


def _feed(model, cache, n: int, seed: int = 0) -> None:
    ids = torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)


def test_compress_evicts_to_target_whatever_the_step():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=16,step=64)", model=model)
    _feed(model, cache, 40)
    assert [layer.slots.length for layer in cache.layers] == [40, 40]  # under budget + step: kept
    cache.compress()
    assert [layer.slots.length for layer in cache.layers] == [16, 16]


def test_positions_name_the_tokens_kept():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("sink(budget=16,sink=4,step=64)", model=model)
    _feed(model, cache, 40)
    cache.compress()
    expected = [*range(4), *range(28, 40)]
    for layer in cache.layers:
        assert layer.positions.shape == (1, 2, 16)
        assert layer.positions[0, 0].tolist() == expected


def test_positions_mark_unused_adaptive_slots():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("keydiff(budget=16,step=64,adaptive=2)", model=model)
    _feed(model, cache, 40)
    cache.compress()
    for layer in cache.layers:
        live = (layer.positions >= 0).sum(dim=(1, 2))
        assert live.tolist() == [16 * 2]  # one layer-wide budget (16 per head) shared by the heads
        assert layer.positions.max() < 40


def test_freeze_keeps_every_token_until_unfrozen():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=16,step=4)", model=model)
    _feed(model, cache, 30)
    assert cache.layers[0].slots.length == 16
    cache.freeze()
    _feed(model, cache, 10, seed=1)
    assert cache.layers[0].slots.length == 26 and cache.get_seq_length() == 40
    cache.freeze(False)
    _feed(model, cache, 1, seed=2)
    assert cache.layers[0].slots.length == 16


def test_kv_bytes_by_device_sums_to_total():
    model = tiny_model("llama")
    for cache in (DynamicCache(), kvcompress.make_cache("sink(budget=8)", model=model)):
        _feed(model, cache, 20)
        per = kvcompress.kv_bytes(cache, by_device=True)
        assert list(per) == ["cpu"] and per["cpu"] == kvcompress.kv_bytes(cache) > 0


@dataclass
class Plain(kvcompress.CachePolicy):
    """transformers' DynamicCache, as a peer would register its own cache."""

    name: ClassVar[str] = "plain"

    def build(self, model):
        return DynamicCache()


def test_cache_policy_builds_its_own_cache_and_composes_with_nothing(monkeypatch):
    reg = kvcompress.get_registry()
    monkeypatch.setitem(reg.policies, "plain", Entry("plain", Plain, "test", "0", "plain"))
    assert type(kvcompress.make_cache("plain")) is DynamicCache
    with pytest.raises(ValueError, match="composes with no other policy"):
        kvcompress.make_cache("plain+quant(bits=4)" if "quant" in reg.policies else "plain+sink")
