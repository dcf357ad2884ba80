"""Out of memory is a result: a policy that raises torch.OutOfMemoryError above a batch size (CPU stand-in
for a full GPU) gives a recorded max_batch and an ``oom`` cell, and the grid goes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import kvcompress
import pytest
import torch
from kvcompress import param
from kvcompress.plugins import Entry
from transformers.cache_utils import DynamicCache

from kvcompress_harness.results import read_records
from kvcompress_harness.runner import RunConfig, run


class _Limited(DynamicCache):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: batch {key_states.shape[0]} > {self.limit}")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class OomAbove(kvcompress.CachePolicy):
    """A DynamicCache that runs out of memory above `limit` sequences."""

    name: ClassVar[str] = "oom-above"
    limit: int = param(3, min=0)

    def build(self, model):
        return _Limited(self.limit)


@pytest.fixture
def oom_policy(monkeypatch):
    reg = kvcompress.get_registry()
    monkeypatch.setitem(reg.policies, "oom-above", Entry("oom-above", OomAbove, "tests", "0", "oom stand-in"))
    return "oom-above(limit=3)"


def test_max_batch_finds_the_edge_and_records_every_attempt(tiny, tmp_path, oom_policy):
    cfg = RunConfig(policies=[oom_policy], tasks=["max_batch"], lengths=[32], out=str(tmp_path / "r.jsonl"),
                    data="excerpt", progress=False,
                    params={"max_batch": {"start": 1, "limit": 8, "new_tokens": 2, "prefill_chunk": 16}})
    full, limited = run(cfg, loaded=tiny)
    assert limited["status"] == "ok" and limited["metrics"]["max_batch"] == 3 and limited["metrics"]["oom_at"] == 4
    attempts = {a["batch"]: a["fits"] for a in limited["metrics"]["attempts"]}
    assert attempts == {1: True, 2: True, 4: False, 3: True}
    assert "simulated: batch 4 > 3" in next(a["error"] for a in limited["metrics"]["attempts"] if not a["fits"])
    assert full["metrics"]["max_batch"] == 8 and full["metrics"]["oom_at"] is None
    assert limited["ratio_to_full"]["max_batch"] == pytest.approx(3 / 8)
    assert limited["metrics"]["decode_tokens_per_s"] > 0


def test_speed_cell_out_of_memory_is_a_result_and_the_grid_goes_on(tiny, tmp_path, oom_policy):
    out = tmp_path / "r.jsonl"
    cfg = RunConfig(policies=[oom_policy, "window(budget=8)"], tasks=["speed"], lengths=[32], batches=[2, 4],
                    out=str(out), data="excerpt", progress=False, params={"speed": {"new_tokens": 3, "warmup": 0}})
    records = run(cfg, loaded=tiny)
    status = {(r["batch"], r["policy"]): r["status"] for r in records}
    assert status == {(2, "full"): "ok", (2, oom_policy): "ok", (2, "window(budget=8)"): "ok",
                      (4, "full"): "ok", (4, oom_policy): "oom", (4, "window(budget=8)"): "ok"}
    oom = next(r for r in records if r["status"] == "oom")
    assert "OutOfMemoryError during prefill: simulated: batch 4 > 3" in oom["error"]
    assert len(read_records(out)) == 6
    assert run(cfg, loaded=tiny) == []  # an out-of-memory cell is finished: a rerun does not retry it


def test_max_batch_decodes_through_static_generate_where_it_can(tiny, tmp_path, unfusable):
    cfg = RunConfig(policies=["sink(budget=16,step=4)", unfusable], tasks=["max_batch"], lengths=[32],
                    out=str(tmp_path / "g.jsonl"), data="excerpt", progress=False,
                    params={"max_batch": {"start": 2, "limit": 4, "new_tokens": 3, "prefill_chunk": 16,
                                          "graphs": True}})
    m = {r["policy"]: r["metrics"] for r in run(cfg, loaded=tiny)}
    static = m["sink(budget=16,step=4)"]
    assert static["max_batch"] == 4 and static["decode_mode"] == "eager static layout (no CUDA)"
    assert static["graph_refused"] is None and static["decode_tokens_per_s"] > 0
    for spec, words in (("full", "allowed: a kvcompress cache"), (unfusable, "decode steps cannot fuse")):
        assert m[spec]["decode_mode"] == "eager" and words in m[spec]["graph_refused"]  # decoded eagerly instead
        assert m[spec]["max_batch"] == 4 and m[spec]["decode_tokens_per_s"] > 0


def test_replicate_prefills_one_sequence_and_decodes_the_whole_batch(tiny, tmp_path, oom_policy):
    params = {"start": 2, "limit": 4, "new_tokens": 3, "prefill_chunk": 16, "graphs": True}
    cells = {}
    for replicate in (False, True):
        cfg = RunConfig(policies=[oom_policy, "sink(budget=16,step=4)"], tasks=["max_batch"], lengths=[32],
                        out=str(tmp_path / f"{replicate}.jsonl"), data="excerpt", progress=False,
                        params={"max_batch": {**params, "replicate": replicate}})
        cells[replicate] = {r["policy"]: r["metrics"] for r in run(cfg, loaded=tiny)}
    rep = cells[True]
    assert rep[oom_policy]["replicate"] and rep[oom_policy]["max_batch"] == 3  # batch 4 fails at the full batch
    sink = rep["sink(budget=16,step=4)"]
    assert sink["max_batch"] == 4 and sink["decode_mode"] == "eager static layout (no CUDA)"
    assert sink["kv_bytes"] == cells[False]["sink(budget=16,step=4)"]["kv_bytes"]  # the same layout, all 4 rows


def test_resolution_stops_the_bisection_short_of_the_edge(tiny, tmp_path, monkeypatch):
    reg = kvcompress.get_registry()
    monkeypatch.setitem(reg.policies, "oom-above", Entry("oom-above", OomAbove, "tests", "0", "oom stand-in"))
    cfg = RunConfig(policies=["oom-above(limit=21)"], tasks=["max_batch"], lengths=[16], out=str(tmp_path / "r.jsonl"),
                    data="excerpt", progress=False,
                    params={"max_batch": {"start": 4, "limit": 64, "new_tokens": 1, "prefill_chunk": 16,
                                          "resolution": 4}})
    m = next(r for r in run(cfg, loaded=tiny) if r["policy"] != "full")["metrics"]
    tried = [a["batch"] for a in m["attempts"]]
    assert tried == [4, 8, 16, 20, 24, 32] and (m["max_batch"], m["oom_at"]) == (20, 24)  # 20 fits, 24 not: 4 apart
