"""The ``kvcompress`` command end to end on the default model (SmolLM2-135M), short lengths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvcompress_harness.results import cell_key, read_records


def kvc(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``kvcompress ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "kvcompress_harness.cli", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_list_shows_policies_metrics_tasks():
    res = kvc("list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for kind, name, dist in [("policy", "window", "kvcompress"), ("policy", "sink", "kvcompress"),
                             ("metric", "rouge_l", "kvcompress-harness"),
                             ("task", "perplexity", "kvcompress-harness"), ("task", "speed", "kvcompress-harness")]:
        assert any(line.split()[:3] == [kind, name, dist] for line in lines), (kind, name, res.stdout)


def _assert_png_has_content(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 200
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 5, f"{path} looks blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


@pytest.mark.slow
def test_run_and_report_end_to_end(tmp_path, wikitext_file):
    out = tmp_path / "results.jsonl"
    res = kvc("run", "--policy", "window(budget=32)", "--policy", "sink(budget=32)", "--task", "perplexity",
              "--task", "passkey", "--task", "speed", "--length", "96", "--chunk", "16",
              "--param", "passkey.depths=[0, 1]", "--param", "speed.new_tokens=4", "--data-file",
              str(wikitext_file), "--out", str(out), "--device", "cpu", "--profile", "--no-progress")
    assert res.returncode == 0, res.stderr
    records = read_records(out)
    assert len(records) == 9 and all(r["status"] == "ok" for r in records), res.stderr
    assert {r["policy"] for r in records} == {"full", "window(budget=32)", "sink(budget=32)"}
    for r in records:
        assert "SmolLM2-135M-Instruct" in r["model"] and r["chunk"] == 16 and r["length"] == 96
        assert r["data_source"].startswith("file:") and r["versions"]["transformers"]
        assert r["reference"]["metrics"][r["primary"]] is not None
    for trace in {r["profile"] for r in records}:  # a speed group's cells share one trace (~100 MB here)
        assert json.loads((out.parent / trace).read_text())["traceEvents"]
    by = {(r["task"], r["policy"]): r["metrics"] for r in records}
    assert by[("passkey", "full")]["accuracy"] == 1.0
    assert by[("perplexity", "window(budget=32)")]["ppl"] > by[("perplexity", "full")]["ppl"]
    assert by[("speed", "sink(budget=32)")]["kv_bytes"] < by[("speed", "full")]["kv_bytes"]

    rep = kvc("report", str(out))
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "results-report.md").read_text()
    assert "## perplexity" in md and "| `sink(budget=32)` | 96 |" in md
    assert "Columns:" in md and "**perplexity** at 96 tokens" in md
    assert not (tmp_path / "results-quality-speed.png").exists()  # speed is not a quality
    names = ["quality-perplexity", "quality-passkey", "kv-bytes", "decode-speed"]
    for name in names:
        _assert_png_has_content(tmp_path / f"results-{name}.png")
    assert "| rank | policy |" in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.slow
def test_interrupted_run_resumes_without_losing_or_redoing_cells(tmp_path, wikitext_file):
    out = tmp_path / "r.jsonl"
    args = ["run", "--policy", "window(budget=32)", "--task", "perplexity", "--length", "64", "96", "128",
            "--chunk", "32", "--data-file", str(wikitext_file), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "kvcompress_harness.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_records(out)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text()
    first = read_records(out)
    assert 2 <= len(first) < 6, "kill the run between cells"
    assert before.endswith("\n")
    res = kvc(*args)
    assert res.returncode == 0, res.stderr
    after = out.read_text()
    assert after.startswith(before)
    records = read_records(out)
    keys = [cell_key(r) for r in records]
    assert len(records) == 6 and len(set(keys)) == 6 and all(r["status"] == "ok" for r in records)
    assert {r["run_id"] for r in records[:len(first)]} != {r["run_id"] for r in records[len(first):]}


def test_sigterm_ends_a_run_with_a_message_and_keeps_finished_cells(tmp_path, wikitext_file):
    out = tmp_path / "r.jsonl"
    args = ["run", "--policy", "window(budget=32)", "--task", "perplexity", "--length", "64", "96", "128", "160",
            "--chunk", "32", "--data-file", str(wikitext_file), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "kvcompress_harness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_records(out)) < 1:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    kept = read_records(out)
    assert 1 <= len(kept) < 8 and out.read_text().endswith("\n")
    assert f"terminated (SIGTERM); {len(kept)} finished cell(s) are kept in {out}; rerun the same command" in err
    assert "\x1b[" not in err  # not a terminal: plain lines, no escape codes
    assert "cell 1/8: perplexity L=64 full" in err and "data: file:" in err


def test_partial_last_line_is_moved_aside_with_a_warning(tiny, tmp_path, capsys):
    from kvcompress_harness.runner import RunConfig, run

    out = tmp_path / "r.jsonl"
    cfg = RunConfig(policies=["window(budget=8)"], tasks=["perplexity"], lengths=[16], chunk=8, out=str(out),
                    data="excerpt", progress=False)
    run(cfg, loaded=tiny)
    good = out.read_text()
    out.write_text(good + '{"model": "tiny-llama", "policy": "window(bud')
    cfg.lengths = [24]
    capsys.readouterr()
    run(cfg, loaded=tiny)
    err = capsys.readouterr().err
    assert f"warning: {out}: line 3 was cut short (45 bytes, not complete JSON); moved it to {out}.partial-1" in err
    assert (tmp_path / "r.jsonl.partial-1").read_text() == '{"model": "tiny-llama", "policy": "window(bud'
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["status"] == "ok" for line in lines)


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom kvcompress_harness.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: kvcompress" in res.stdout and "HEAVY []" in res.stdout


def _heavy_after(argv: list[str]) -> str:
    code = ("import sys\nfrom kvcompress_harness.cli import main\nmain(" + repr(argv) + ")\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True).stdout


@pytest.mark.parametrize("argv", [["list"], ["run", "--policy", "nosuch(budget=8)", "--task", "perplexity"]],
                         ids=["list", "spec-error"])
def test_list_and_spec_errors_import_neither_torch_nor_transformers(argv):
    assert "HEAVY []" in _heavy_after(argv)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("kvcompress: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_errors_are_one_clear_line(tmp_path):
    res = kvc("run", "--policy", "nosuch(budget=8)", "--task", "perplexity", "--out", str(tmp_path / "r.jsonl"))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert "unknown policy 'nosuch'" in line and "known policies:" in line and "window" in line
    res = kvc("run", "--policy", "window", "--task", "perplexity", "--data-file", str(tmp_path / "missing.txt"))
    assert res.returncode == 2 and "does not exist" in _one_error_line(res.stderr)
    res = kvc("--debug", "run", "--policy", "window", "--task", "nosuch")
    assert res.returncode == 2 and "Traceback" in res.stderr and "known tasks:" in res.stderr


@pytest.mark.parametrize("args, expected", [
    (["--param", "perplexity.offset=-5"], "--param perplexity.offset: got -5; allowed: >= 0"),
    (["--param", "perplexity.ofset=1"], "--param perplexity.ofset: unknown parameter; allowed: offset"),
    (["--batch", "0"], "--batch: got 0; allowed: an integer >= 1"),
    (["--compress", "everything"], "--compress: none of the tasks perplexity has compression modes"),
    (["--model", "random:gpt-9"], "--model 'random:gpt-9': unknown architecture 'gpt-9'; allowed: random:llama-3-8b"),
    (["--model", "random:llama-3-8b?layers=0"], "layers='0'; allowed: an integer >= 1"),
    (["--model", "random:smollm2-135m?layers=1"], "--task perplexity: needs text and a tokenizer"),
    (["--dtype", "float8"], "--dtype: got 'float8'; allowed: float32, float16, bfloat16"),
], ids=["offset", "unknown-param", "batch", "compress", "arch", "layers", "random-needs-text", "dtype"])
def test_bad_options_are_one_line_naming_the_option(tmp_path, args, expected):
    res = kvc("run", "--policy", "window(budget=8)", "--task", "perplexity", "--length", "16", "--data", "excerpt",
              "--out", str(tmp_path / "r.jsonl"), *args)
    assert res.returncode == 2, res.stderr
    assert expected in _one_error_line(res.stderr)


def test_results_path_and_report_errors_are_one_line(tmp_path):
    res = kvc("run", "--policy", "window(budget=8)", "--task", "perplexity", "--out", str(tmp_path))
    assert res.returncode == 2 and f"--out: '{tmp_path}' is a directory; allowed: a file path" in \
        _one_error_line(res.stderr)
    other = tmp_path / "other.json"
    other.write_text('{"name": "not ours", "value": 3}\n')
    res = kvc("report", str(other))
    assert res.returncode == 2 and "line 1 is JSON but not a kvcompress result" in _one_error_line(res.stderr)
    res = kvc("run", "--policy", "window(budget=8)", "--task", "perplexity", "--out", str(other))
    assert res.returncode == 2 and "--out: " in _one_error_line(res.stderr)
    res = kvc("report", str(tmp_path))
    assert res.returncode == 2 and "is a directory" in _one_error_line(res.stderr)


@pytest.mark.slow
def test_model_without_cache_api_is_a_clear_error(tmp_path, smol):
    from transformers import MambaConfig, MambaForCausalLM

    model_dir = tmp_path / "mamba"
    cfg = MambaConfig(vocab_size=len(smol.tokenizer), hidden_size=16, num_hidden_layers=1, state_size=4)
    MambaForCausalLM(cfg).save_pretrained(model_dir)
    smol.tokenizer.save_pretrained(model_dir)
    res = kvc("run", "--model", str(model_dir), "--policy", "window", "--task", "perplexity", "--length", "32",
              "--data", "excerpt", "--out", str(tmp_path / "r.jsonl"))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert "cannot be used" in line and "Cache API" in line
