"""``--device-map``: a model spread over devices with accelerate, the cache on each layer's device, KV bytes and
memory per device. On a CPU the second device is ``meta`` (accelerate dispatches to it like to a GPU; tensors
there have shapes and no data), so the decoder stack runs and every layer's cache shows where it lives."""

from __future__ import annotations

import kvcompress
import pytest
import torch

from kvcompress_harness.errors import HarnessError, ModelLoadError
from kvcompress_harness.models import cache_argument, load_model
from kvcompress_harness.placement import parse_device_map
from kvcompress_harness.results import cell_key
from kvcompress_harness.runner import RunConfig, run

MODEL = "random:smollm2-135m?layers=2"
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "meta",
         "model.norm": "meta", "lm_head": "meta"}


@pytest.fixture(scope="module")
def split():
    return load_model(MODEL, device="cpu", device_map=SPLIT)


def test_the_model_is_split_as_mapped(split):
    model = split.model
    assert split.devices == ("cpu", "meta") and split.placement == {"cpu": 3, "meta": 3}
    assert split.device == torch.device("cpu")  # where the input ids go
    assert {p.device.type for p in model.model.layers[0].parameters()} == {"cpu"}
    assert {p.device.type for p in model.model.layers[1].parameters()} == {"meta"}
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("spec", ["sink(budget=8)", "keydiff(budget=8,step=4)", "dense", "full"])
def test_each_cache_layer_lives_on_its_layers_device(split, spec):
    model = split.model
    kvcompress.attach(model)
    cache = kvcompress.make_cache(spec, model=model)
    arg = {cache_argument(model): cache}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=True, **arg).last_hidden_state
        for _ in range(3):  # decode steps: the new ids start on the CPU, accelerate moves the activations
            hidden = model.model(input_ids=ids[:, :1], use_cache=True, **arg).last_hidden_state
    assert hidden.device.type == "meta"
    per_layer = {}
    for i, layer in enumerate(cache.layers):
        where = next(model.model.layers[i].parameters()).device
        held = list(layer.held_tensors()) if hasattr(layer, "held_tensors") else [layer.keys, layer.values]
        assert held and {t.device for t in held} == {where}, (i, {t.device for t in held})
        stored = layer.keys.shape[2]
        assert layer.keys.device == where and (stored == 27 if spec in ("dense", "full") else 8 <= stored < 12)
        per_layer[str(where)] = per_layer.get(str(where), 0) + sum(t.numel() * t.element_size() for t in held)
    by_device = kvcompress.kv_bytes(cache, by_device=True)
    assert by_device == per_layer and set(by_device) == {"cpu", "meta"}
    assert by_device["cpu"] == by_device["meta"] > 0  # the two layers hold the same shapes
    assert sum(by_device.values()) == kvcompress.kv_bytes(cache)


def test_device_map_auto_on_the_cpu_runs_speed_and_reports_per_device(tmp_path):
    out = tmp_path / "r.jsonl"
    base = {"policies": ["sink(budget=16)"], "tasks": ["speed"], "lengths": [48], "out": str(out), "model": MODEL,
            "device": "cpu", "params": {"speed": {"new_tokens": 3, "warmup": 0}}, "progress": False}
    records = run(RunConfig(**base, device_map="auto"))
    assert [r["policy"] for r in records] == ["full", "sink(budget=16)"]
    for r in records:
        m = r["metrics"]
        assert r["status"] == "ok" and r["device"] == "cpu" and r["device_map"] == "auto"
        assert r["devices"] == ["cpu"] and r["placement"] == {"cpu": 1}
        assert m["kv_bytes_by_device"] == {"cpu": m["kv_bytes"]} and set(m["peak_memory_by_device"]) == {"cpu"}
    # the same cells on one device are other cells: a rerun without the map measures them, not skips them
    again = run(RunConfig(**base))
    assert {cell_key(r) for r in again}.isdisjoint(cell_key(r) for r in records)
    assert all("device_map" not in r for r in again)


def test_bad_device_maps_are_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="--device-map: got 'everywhere'; allowed: auto, balanced"):
        parse_device_map("everywhere")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        parse_device_map("{model: 0}")
    with pytest.raises(ModelLoadError, match=r"module 'lm_head' -> 'tpu'; allowed: a GPU index"):
        parse_device_map('{"lm_head": "tpu"}')
    with pytest.raises(HarnessError, match=r"--device cuda:1 with --device-map: .*allowed: --device cpu or cuda"):
        load_model(MODEL, device="cuda:1", device_map="auto")
