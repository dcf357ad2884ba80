"""``speed`` with ``graphs=true``: whole decodes through kvcompress.static_generate (on a CPU the same static layout
run eagerly, minus the graph capture) against full in model.generate, a refusal recorded as a result."""

from __future__ import annotations

import pytest
import torch

from kvcompress_harness.errors import HarnessError
from kvcompress_harness.models import load_model
from kvcompress_harness.runner import RunConfig, run

BUDGET = "sink(budget=32,step=8)"


@pytest.fixture(scope="module")
def random_model():
    return load_model("random:smollm2-135m?layers=1", device="cpu")


def _run(loaded, tmp_path, policies=(BUDGET,), **speed):
    cfg = RunConfig(policies=list(policies), tasks=["speed"], lengths=[64], batches=[2],
                    out=str(tmp_path / "r.jsonl"), params={"speed": {"new_tokens": 6, "warmup": 1, **speed}},
                    progress=False)
    records = run(cfg, loaded=loaded)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    return {r["policy"]: r["metrics"] for r in records}


def test_graph_phase_beside_the_paired_steps(random_model, tmp_path, unfusable):
    m = _run(random_model, tmp_path, policies=(BUDGET, "window(budget=24,step=4)", unfusable), graphs=True,
             graph_rounds=2)
    full, refused = m["full"], m[unfusable]
    ref = full["graph_reference"]
    assert ref["graph_mode"] == "eager static layout (no CUDA)" and ref["graph_decode_forwards"] == 5
    assert ref["dense_graph_ms_per_token"] > 0 and ref["dense_token_match_full"] == 1.0  # dense decodes as full
    assert full["generate_ms_per_token"] == ref["full_generate_ms_per_token"] > 0 and len(full["generate_rounds_ms"]) == 2
    for spec in (BUDGET, "window(budget=24,step=4)"):
        g = m[spec]
        assert g["graph_reference"] == ref and len(g["graph_rounds_ms"]) == 2 and g["graph_prefill_s"] > 0
        assert g["graph_ratio_to_full_generate"] == pytest.approx(g["graph_ms_per_token"] / ref["full_generate_ms_per_token"])
        assert g["eager_ms_per_token"] == g["decode_ms_per_token"]  # the policy's own paired steps
        assert g["graph_speedup_over_eager"] == pytest.approx(g["decode_ms_per_token"] / g["graph_ms_per_token"])
        assert g["graph_tokens_per_s"] == pytest.approx(2000 / g["graph_ms_per_token"])
        assert 0 <= g["graph_token_match_full"] <= 1 and g["graph_kv_bytes"] < full["graph_kv_bytes"]
        # the steady state, split off by static_generate's timings: every decode forward eagerly (no warm-up)
        assert g["graph_replay_steps"] == 5 and len(g["graph_replay_rounds_ms"]) == 2 and g["graph_setup_s"] >= 0
        assert 0 < g["graph_replay_ms_per_token"] <= g["graph_ms_per_token"] * 1.001
        assert g["graph_replay_ratio_to_full_generate"] == pytest.approx(
            g["graph_replay_ms_per_token"] / ref["full_generate_ms_per_token"])
        assert g["graph_replay_speedup_over_full_step"] == pytest.approx(
            full["decode_ms_per_token"] / g["graph_replay_ms_per_token"])
    # a policy static_generate cannot hold is a result with the reason, its paired steps measured as ever
    assert "decode steps cannot fuse" in refused["graph_refused"] and "graph_ms_per_token" not in refused
    assert refused["decode_steps"] == 6 and refused["median_step_ratio"] > 0


def test_graph_phase_alone(random_model, tmp_path, unfusable):
    m = _run(random_model, tmp_path, policies=(BUDGET, unfusable), graphs=True, paired=False, graph_rounds=1)
    assert "decode_ms_per_token" not in m[BUDGET] and m[BUDGET]["graph_ms_per_token"] > 0
    assert "eager_ms_per_token" not in m[BUDGET]
    assert m[BUDGET]["kv_bytes"] == m[BUDGET]["graph_kv_bytes"] < m["full"]["kv_bytes"]
    assert m[unfusable]["graph_refused"] and "kv_bytes" not in m[unfusable]


def test_nothing_to_measure_is_refused_before_any_cell(random_model, tmp_path):
    with pytest.raises(HarnessError, match="--param speed.paired: got false with speed.graphs false"):
        _run(random_model, tmp_path, paired=False)


def test_profile_steps_without_a_gpu_record_nothing(random_model, tmp_path):
    m = _run(random_model, tmp_path, policies=(BUDGET,), profile_steps=2)
    assert m[BUDGET]["decode_steps"] == 6  # the profiled steps come after the timed ones, not among them
    assert "gpu_ms_per_step" not in m[BUDGET] and "host_share" not in m[BUDGET]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's own time needs a CUDA device")
def test_profile_steps_give_each_policy_its_gpu_time(tmp_path):
    loaded = load_model("random:smollm2-135m?layers=2", device="cuda")
    cfg = RunConfig(policies=[BUDGET], tasks=["speed"], lengths=[256], batches=[1], out=str(tmp_path / "g.jsonl"),
                    params={"speed": {"new_tokens": 6, "warmup": 1, "profile_steps": 3, "graphs": True,
                                      "graph_rounds": 1}}, progress=False)
    m = {r["policy"]: r["metrics"] for r in run(cfg, loaded=loaded)}
    for spec in ("full", BUDGET):
        assert m[spec]["profiled_steps"] == 3 and 0 < m[spec]["gpu_ms_per_step"] < m[spec]["decode_ms_per_token"]
        assert m[spec]["host_share"] == pytest.approx(1 - m[spec]["gpu_ms_per_step"] / m[spec]["decode_ms_per_token"])
    assert m[BUDGET]["graph_replay_over_gpu"] == pytest.approx(
        m[BUDGET]["graph_replay_ms_per_token"] / m[BUDGET]["gpu_ms_per_step"])
