"""Every built-in task through the runner on a tiny random-init Llama (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcompress_harness.results import read_records
from kvcompress_harness.runner import RunConfig, run

FIXTURES = Path(__file__).parent / "fixtures"
WINDOW = "window(budget=16)"


def _run(tiny, tmp_path, task, lengths, params=None, **kw):
    cfg = RunConfig(policies=[WINDOW], tasks=[task], lengths=lengths, out=str(tmp_path / "r.jsonl"),
                    device="cpu", params={task: params or {}}, data="excerpt", progress=False, **kw)
    records = run(cfg, loaded=tiny)
    by_policy = {r["policy"]: r for r in records}
    for r in records:
        assert r["status"] == "ok", r.get("traceback")
        assert r["reference"]["metrics"] == by_policy["full"]["metrics"]
        assert r["model"] == "tiny-llama" and r["device"] == "cpu" and r["versions"]["kvcompress"]
    return by_policy["full"], by_policy[WINDOW]


def test_perplexity(tiny, tmp_path):
    full, win = _run(tiny, tmp_path, "perplexity", [64], chunk=8)
    assert full["metrics"]["tokens_scored"] == 63 and full["metrics"]["chunk"] == 8
    assert full["metrics"]["ppl"] > 1 and win["metrics"]["ppl"] != full["metrics"]["ppl"]
    assert win["metrics"]["kv_bytes"] < full["metrics"]["kv_bytes"]
    assert win["ratio_to_full"]["ppl"] == pytest.approx(win["metrics"]["ppl"] / full["metrics"]["ppl"])


def test_agreement(tiny, tmp_path):
    full, win = _run(tiny, tmp_path, "agreement", [48], {"prompts": 2, "new_tokens": 6}, chunk=8)
    assert full["metrics"]["token_match"] == 1.0 and full["metrics"]["bleu"] == pytest.approx(100)
    assert full["metrics"]["first_divergence"] == 6
    assert 0 <= win["metrics"]["token_match"] <= 1 and 0 <= win["metrics"]["rouge_l"] <= 1


def test_fidelity(tiny, tmp_path):
    full, win = _run(tiny, tmp_path, "fidelity", [48], {"steps": 3}, chunk=8)
    assert full["metrics"]["next_token_kl"] == pytest.approx(0, abs=1e-6)
    assert full["metrics"]["attention_cosine"] == pytest.approx(1, abs=1e-5)
    assert full["metrics"]["attention_peak_shift"] == 0
    assert set(full["metrics"]["attention_by_layer"]) == {"0", "1"}
    assert win["metrics"]["next_token_kl"] > 0 and win["metrics"]["attention_kl"] > 0
    assert win["metrics"]["attention_l1"] > 0 and win["metrics"]["attention_cosine"] < 1


def test_speed_pairs_steps_with_full(tiny, tmp_path):
    full, win = _run(tiny, tmp_path, "speed", [64], {"new_tokens": 5, "warmup": 2})
    for rec in (full, win):
        m = rec["metrics"]
        assert m["prefill_s"] > 0 and m["decode_tokens_per_s"] > 0 and m["decode_steps"] == 5
        assert m["peak_memory_kind"] == "rss" and m["paired_with"] == ["full", WINDOW] and m["batch"] == 1
        assert rec["batch"] == 1 and rec["compress"] is None
    assert full["metrics"]["median_step_ratio"] == 1.0 and full["metrics"]["mean_ratio"] == 1.0
    w, f = win["metrics"], full["metrics"]
    assert w["median_step_ratio"] > 0 and w["mean_ratio"] == pytest.approx(w["decode_ms_mean"] / f["decode_ms_mean"])
    assert w["decode_tokens_per_s"] == pytest.approx(1000 / w["decode_ms_per_token"])
    assert win["metrics"]["kv_bytes"] < full["metrics"]["kv_bytes"]


@pytest.mark.parametrize("task", ["passkey", "needle"])
@pytest.mark.parametrize("mode", ["prompt", "context"])
def test_retrieval_tasks_in_both_modes(tiny, tmp_path, task, mode):
    full, win = _run(tiny, tmp_path, task, [128], {"depths": [0.0, 1.0], "trials": 2, "new_tokens": 4},
                     compress=[mode])
    for rec in (full, win):
        assert rec["compress"] == mode and list(rec["params"]["depths"]) == [0.0, 1.0]
        assert rec["metrics"]["trials"] == 4
        assert set(rec["metrics"]["by_depth"]) == {"0", "1"}
        assert 0 <= rec["metrics"]["accuracy"] <= 1
    assert full["metrics"]["fact_kept"] is None  # a DynamicCache does not say which tokens it holds
    assert 0 <= win["metrics"]["fact_kept"] <= 1
    assert win["metrics"]["fact_kept_by_depth"]["0"] == 0.0  # the window dropped the fact at the start
    if mode == "context":
        assert win["metrics"]["context_compressed"] is True and full["metrics"]["context_compressed"] is False
        # the question and the answer are kept whole after the context was compressed to the budget
        assert win["metrics"]["context_kv_bytes"] < win["metrics"]["kv_bytes"] < full["metrics"]["kv_bytes"]


def test_context_mode_keeps_question_and_answer(tiny):
    """In context mode the cache holds budget + question + answer tokens; in prompt mode only the budget."""
    import kvcompress

    from kvcompress_harness.data import excerpt
    from kvcompress_harness.task import TaskContext
    from kvcompress_harness.tasks.prompts import Prompt
    from kvcompress_harness.tasks.retrieval import answer

    ids = tiny.tokenizer(excerpt().text[:4000], return_tensors="pt").input_ids
    prompt = Prompt(context=ids[:, :100], question=ids[:, 100:110])
    stored = {}
    for mode in ("prompt", "context"):
        ctx = TaskContext(model=tiny.model, tokenizer=tiny.tokenizer, device=tiny.device, spec="window(budget=16)",
                          length=110, params={}, seed=0, chunk=None, text=excerpt(), compress=mode)
        made = []
        orig = ctx.make_cache
        ctx.make_cache = lambda spec=None, orig=orig, made=made: made.append(orig(spec)) or made[-1]
        tokens, _ = answer(ctx, prompt, 5)
        assert len(tokens) == 5
        stored[mode] = made[0].layers[0].slots.length
        assert made[0].get_seq_length() == 114 and isinstance(made[0], kvcompress.CompressedCache)
    assert stored["prompt"] == 16 and stored["context"] == 16 + 10 + 4


def test_needle_several_needles_and_values(tiny, tmp_path):
    full, _ = _run(tiny, tmp_path, "needle", [256], {"depths": [0.5], "needles": 3, "values": 2, "new_tokens": 4})
    assert full["metrics"]["trials"] == 1 and full["params"]["needles"] == 3 and full["params"]["values"] == 2
    assert full["metrics"]["accuracy"] in (0.0, 0.5, 1.0)


def test_longbench_offline_fixture(tiny, tmp_path):
    params = {"path": str(FIXTURES / "longbench"), "samples": 1, "max_new_tokens": 4}
    full, _ = _run(tiny, tmp_path, "longbench", [256], params)
    assert set(full["metrics"]["by_subset"]) == {"narrativeqa", "qasper", "multifieldqa_en"}
    assert 0 <= full["metrics"]["f1"] <= 100


def test_failing_cell_is_recorded_and_the_run_goes_on(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 10)
    cfg = RunConfig(policies=[WINDOW], tasks=["perplexity"], lengths=[24, 500], out=str(tmp_path / "r.jsonl"),
                    data_file=str(short), progress=False)
    records = run(cfg, loaded=tiny)
    status = {(r["length"], r["policy"]): r["status"] for r in records}
    assert status == {(24, "full"): "ok", (24, WINDOW): "ok", (500, "full"): "error", (500, WINDOW): "error"}
    err = next(r for r in records if r["status"] == "error")
    assert "needs more tokens than the text has" in err["error"]
    # a rerun skips finished cells and retries the failed ones
    again = run(cfg, loaded=tiny)
    assert {(r["length"], r["policy"]) for r in again} == {(500, "full"), (500, WINDOW)}
    assert len(read_records(cfg.out)) == 6


def test_bad_parameters_are_clear(tiny, tmp_path):
    from kvcompress_harness.errors import HarnessError

    base = {"tasks": ["perplexity"], "out": str(tmp_path / "r.jsonl"), "progress": False}
    with pytest.raises(HarnessError, match=r"--param perplexity.offset: got -5; allowed: >= 0"):
        run(RunConfig(policies=["full"], params={"perplexity": {"offset": -5}}, **base), loaded=tiny)
    with pytest.raises(HarnessError, match=r"--param needle.depths: got \(0.5, 2.0\); allowed: 0.0 <= value <= 1.0"):
        run(RunConfig(policies=["full"], params={"needle": {"depths": [0.5, 2]}}, **{**base, "tasks": ["needle"]}),
            loaded=tiny)
    with pytest.raises(HarnessError, match="--compress: got 'all'; allowed: prompt, context"):
        run(RunConfig(policies=["full"], compress=["all"], **{**base, "tasks": ["passkey"]}), loaded=tiny)
    with pytest.raises(HarnessError, match="unknown parameter; allowed: offset"):
        run(RunConfig(policies=["full"], params={"perplexity": {"ofset": 1}}, **base), loaded=tiny)
    with pytest.raises(HarnessError, match=r"--length: got 4096; allowed: <= 2048"):
        run(RunConfig(policies=["full"], lengths=[4096], **base), loaded=tiny)
    with pytest.raises(HarnessError, match="known policies: .*window"):
        run(RunConfig(policies=["nosuch(budget=3)"], **base), loaded=tiny)
    with pytest.raises(HarnessError, match="budget"):
        run(RunConfig(policies=["window(budget=-1)"], **base), loaded=tiny)
    with pytest.raises(HarnessError, match="known tasks: .*perplexity"):
        run(RunConfig(policies=["full"], tasks=["nosuch"], out=base["out"]), loaded=tiny)
