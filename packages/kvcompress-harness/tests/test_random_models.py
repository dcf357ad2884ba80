"""``random:NAME`` models: the published shapes, built on the device with a cut layer count, speed only."""

from __future__ import annotations

import pytest
import torch

from kvcompress_harness.architectures import ARCHITECTURES, parse_random, random_config
from kvcompress_harness.errors import HarnessError, ModelLoadError
from kvcompress_harness.models import load_model
from kvcompress_harness.runner import RunConfig, run

# Published parameter counts (embeddings and head included), in billions.
PUBLISHED = {"llama-3-8b": 8.03, "llama-3-70b": 70.55, "qwen2.5-7b": 7.62, "mistral-7b": 7.25, "smollm2-135m": 0.1345}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_named_architectures_have_their_published_size(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config(f"random:{name}"))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], rel=0.01)
    cut = random_config(f"random:{name}?layers=2")
    assert cut.num_hidden_layers == 2 and cut.hidden_size == ARCHITECTURES[name]["hidden_size"]


def test_spec_errors():
    assert parse_random("random:llama-3-8b?layers=3") == ("llama-3-8b", {"layers": 3})
    with pytest.raises(ModelLoadError, match="unknown architecture 'gpt'; allowed: random:llama-3-8b"):
        parse_random("random:gpt")
    with pytest.raises(ModelLoadError, match="unknown option 'heads'; allowed: layers"):
        parse_random("random:llama-3-8b?heads=2")


def test_random_model_runs_paired_speed_at_two_batches(tmp_path):
    loaded = load_model("random:smollm2-135m?layers=2", device="cpu", dtype="float32")
    assert loaded.tokenizer is None and loaded.model.config.num_hidden_layers == 2
    cfg = RunConfig(policies=["sink(budget=32)", "window(budget=32)"], tasks=["speed"], lengths=[96],
                    batches=[1, 2], out=str(tmp_path / "r.jsonl"), model="random:smollm2-135m?layers=2",
                    params={"speed": {"new_tokens": 6, "warmup": 1}}, progress=False)
    records = run(cfg, loaded=loaded)
    assert [(r["batch"], r["policy"]) for r in records] == [
        (b, p) for b in (1, 2) for p in ("full", "sink(budget=32)", "window(budget=32)")]
    for r in records:
        m = r["metrics"]
        assert r["status"] == "ok" and r["model"] == "random:smollm2-135m?layers=2"
        assert m["batch"] == r["batch"] and m["decode_steps"] == 6
        assert m["median_step_ratio"] > 0 and m["mean_ratio"] > 0 and m["kv_bytes_by_device"] == {"cpu": m["kv_bytes"]}
        assert r["reference"]["metrics"]["decode_steps"] == 6
    two = {r["policy"]: r["metrics"] for r in records if r["batch"] == 2}
    one = {r["policy"]: r["metrics"] for r in records if r["batch"] == 1}
    assert two["full"]["kv_bytes"] == 2 * one["full"]["kv_bytes"]
    assert two["sink(budget=32)"]["kv_bytes"] < two["full"]["kv_bytes"] / 2


def test_random_model_refuses_text_tasks(tmp_path):
    loaded = load_model("random:smollm2-135m?layers=1", device="cpu")
    cfg = RunConfig(policies=["sink(budget=8)"], tasks=["perplexity"], lengths=[16], out=str(tmp_path / "r.jsonl"),
                    progress=False)
    with pytest.raises(HarnessError, match="--task perplexity: needs text and a tokenizer.*allowed with random: "
                                           "models: .*speed"):
        run(cfg, loaded=loaded)


def test_speed_holds_policies_in_rounds(tmp_path):
    loaded = load_model("random:smollm2-135m?layers=1", device="cpu")
    specs = ["sink(budget=16)", "window(budget=16)", "random(budget=16)"]
    cfg = RunConfig(policies=specs, tasks=["speed"], lengths=[48], out=str(tmp_path / "r.jsonl"), progress=False,
                    params={"speed": {"new_tokens": 3, "warmup": 0, "hold": 2}})
    records = {r["policy"]: r["metrics"] for r in run(cfg, loaded=loaded)}
    assert records["sink(budget=16)"]["paired_with"] == ["full", "sink(budget=16)", "window(budget=16)"]
    assert records["random(budget=16)"]["paired_with"] == ["full", "random(budget=16)"]
    assert all(m["median_step_ratio"] > 0 for m in records.values())
