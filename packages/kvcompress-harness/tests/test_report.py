"""``kvcompress report``: tables with a legend and a summary line, the leaderboard from a results fixture,
and PNGs that are real pictures (single length: bars; several: lines; quality against KV kept)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kvcompress_harness.errors import DataError
from kvcompress_harness.report import BEGIN, END, report
from kvcompress_harness.runner import RunConfig, run

FIXTURE = Path(__file__).parent / "fixtures" / "leaderboard"


def _picture(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 0.02, f"{path.name} looks blank"
    return img


def _coloured(img: np.ndarray) -> int:
    """Pixels that are clearly coloured (not white, grey or black): the drawn series."""
    return int(((img.max(-1) - img.min(-1)) > 0.25).sum())


def test_report_tables_and_plots(tiny, tmp_path):
    out = tmp_path / "res.jsonl"
    cfg = RunConfig(policies=["window(budget=24)", "sink(budget=24)"], tasks=["needle", "perplexity"],
                    lengths=[96, 128], chunk=32, out=str(out), data="excerpt", progress=False,
                    params={"needle": {"depths": [0.0, 0.5, 1.0], "new_tokens": 3}})
    assert all(r["status"] == "ok" for r in run(cfg, loaded=tiny))
    made = report(str(out))
    md = made["markdown"].read_text()
    assert "## needle" in md and "## perplexity" in md and "| `window(budget=24)` | 128 tokens |" in md
    assert "Columns: *policy*" in md and "**perplexity** at 128 tokens" in md
    names = {p.name for p in made["plots"]}
    assert {"res-quality-needle.png", "res-quality-perplexity.png", "res-kv-bytes.png",
            "res-needle-full.png", "res-needle-sink_budget_24_.png"} <= names
    for path in made["plots"]:
        _picture(path)
    quality = _picture(tmp_path / "res-quality-perplexity.png")
    assert _coloured(quality) > 300  # three policies' markers in two panels
    assert "| rank | policy |" in made["leaderboard"].read_text()


def test_single_length_plots_are_bars(tiny, tmp_path):
    out = tmp_path / "one.jsonl"
    cfg = RunConfig(policies=["window(budget=16)", "sink(budget=16)", "random(budget=16)"], tasks=["speed"],
                    lengths=[64], out=str(out), data="excerpt", progress=False,
                    params={"speed": {"new_tokens": 3, "warmup": 1}})
    run(cfg, loaded=tiny)
    made = report(str(out))
    assert {p.name for p in made["plots"]} == {"one-kv-bytes.png", "one-decode-speed.png"}
    kv = _picture(tmp_path / "one-kv-bytes.png")
    assert _coloured(kv) > 2000  # four filled bars, not a column of dots


def test_graph_phase_gets_its_own_table(tiny, tmp_path, unfusable):
    out = tmp_path / "g.jsonl"
    cfg = RunConfig(policies=["sink(budget=16,step=4)", unfusable], tasks=["speed"], lengths=[64],
                    out=str(out), data="excerpt", progress=False,
                    params={"speed": {"new_tokens": 4, "warmup": 1, "graphs": True, "graph_rounds": 1}})
    run(cfg, loaded=tiny)
    board = report(str(out))["leaderboard"].read_text()
    head = "| policy | context | batch | eager step ms | GPU ms per step | graph replay ms/token |"
    table = board.split(head)[1].split("\n\n")[0].splitlines()
    row = next(line for line in table if line.startswith("| `sink(budget=16,step=4)` | 64 | 1 | "))
    assert float(row.split("|")[6]) > 0 and row.split("|")[8].strip().endswith("x")  # replay, speed-up over full
    assert "refused: policy 'observe-all' observes attention decode steps cannot fuse" in board


def test_leaderboard_is_regenerated_from_the_fixture(tmp_path):
    shutil.copy(FIXTURE / "results.jsonl", tmp_path / "results.jsonl")
    made = report(str(tmp_path / "results.jsonl"))
    assert made["leaderboard"].read_text() == (FIXTURE / "leaderboard.md").read_text()
    board = made["leaderboard"].read_text()
    assert "about 8x compression" in board and "`h2o(budget=256)` +60.0% perplexity" in board
    assert "| 7 | `window(budget=256)` | 12.5% | 12.00 MB | 44 | +193.3% perplexity |  |" in board  # off the front
    assert "| `quant(bits=4)` | 16384 | 8 | out of memory |" in board and "3.13x" in board
    quality = _picture(tmp_path / "results-quality-perplexity.png")
    assert _coloured(quality) > 300
    _picture(tmp_path / "results-quality-passkey.png")


def test_docs_page_keeps_what_is_outside_the_markers(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\nhand-written intro\n\n{BEGIN}\nold numbers\n{END}\n\n## GPU, awaiting rerun\n")
    shutil.copy(FIXTURE / "results.jsonl", tmp_path / "quality-smollm2.jsonl")
    report(str(tmp_path / "quality-smollm2.jsonl"), docs=str(page))
    text = page.read_text()
    assert "hand-written intro" in text and "## GPU, awaiting rerun" in text and "old numbers" not in text
    assert "## quality-smollm2" in text and "Made by `kvcompress run --grid benchmarks/quality-smollm2.toml`" in text
    assert "Device: CPU x86_64 (2 cores). Date: 2026-" in text and "### perplexity" in text


def test_report_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        report(str(tmp_path / "none.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no results"):
        report(str(empty))
    with pytest.raises(DataError, match="is a directory"):
        report(str(tmp_path))
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n')
    with pytest.raises(DataError, match=r"line 1 is JSON but not a kvcompress result \(no task, policy, status\)"):
        report(str(other))
    array = tmp_path / "array.json"
    array.write_text('[\n {"task": "x"}\n]\n')
    with pytest.raises(DataError, match="is not JSON lines"):
        report(str(array))
