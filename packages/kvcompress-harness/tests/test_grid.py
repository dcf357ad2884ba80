"""--grid files and --param values."""

from __future__ import annotations

import pytest

from kvcompress_harness.errors import HarnessError
from kvcompress_harness.grid import apply_grid, parse_params
from kvcompress_harness.runner import RunConfig


def test_parse_params():
    assert parse_params(["passkey.trials=3", "passkey.depths=[0, 1]", "needle.chat=true", "x.y=word"]) == {
        "passkey": {"trials": 3, "depths": [0, 1]}, "needle": {"chat": True}, "x": {"y": "word"}}
    with pytest.raises(HarnessError, match="TASK.KEY=VALUE"):
        parse_params(["trials=3"])


def test_grid_fills_what_the_command_line_left_unset(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('policies = ["sink(budget=64)"]\ntasks = ["perplexity"]\nlengths = [64, 128]\n'
                    'chunk = 8\n[params.perplexity]\noffset = 5\n')
    cfg = RunConfig(policies=[], tasks=["speed"], params={"perplexity": {"offset": 7}})
    out = apply_grid(cfg, str(grid), given={"policy": None, "task": ["speed"], "length": None, "chunk": None})
    assert out.policies == ["sink(budget=64)"] and out.tasks == ["speed"]
    assert out.lengths == [64, 128] and out.chunk == 8
    assert out.params == {"perplexity": {"offset": 7}}


def test_grid_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("policies = [")
    cfg = RunConfig(policies=[], tasks=[])
    with pytest.raises(HarnessError, match="not valid TOML"):
        apply_grid(cfg, str(bad), given={})
    bad.write_text("colour = 1")
    with pytest.raises(HarnessError, match="unknown key"):
        apply_grid(cfg, str(bad), given={})
    with pytest.raises(HarnessError, match="cannot read"):
        apply_grid(cfg, str(tmp_path / "none.toml"), given={})
