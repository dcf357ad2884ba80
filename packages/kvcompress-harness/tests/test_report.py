"""``kvcompress report`` on results of a tiny model: markdown, and PNGs that are real pictures."""

from __future__ import annotations

import numpy as np
import pytest

from kvcompress_harness.report import report
from kvcompress_harness.runner import RunConfig, run


def test_report_tables_and_plots(tiny, tmp_path):
    out = tmp_path / "res.jsonl"
    cfg = RunConfig(policies=["window(budget=24)", "sink(budget=24)"], tasks=["needle", "perplexity"],
                    lengths=[96, 128], chunk=32, out=str(out), data="excerpt", progress=False,
                    params={"needle": {"depths": [0.0, 0.5, 1.0], "new_tokens": 3}})
    assert all(r["status"] == "ok" for r in run(cfg, loaded=tiny))
    made = report(str(out))
    md = made["markdown"].read_text()
    assert "## needle" in md and "## perplexity" in md and "| `window(budget=24)` | 128 |" in md
    names = {p.name for p in made["plots"]}
    assert {"res-quality-needle.png", "res-quality-perplexity.png", "res-kv-bytes.png",
            "res-needle-full.png", "res-needle-sink_budget_24_.png"} <= names
    import matplotlib.image as mpimg

    for path in made["plots"]:
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert np.asarray(img[..., :3]).std() > 0.02, f"{path.name} looks blank"


def test_report_errors(tmp_path):
    from kvcompress_harness.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        report(str(tmp_path / "none.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no results"):
        report(str(empty))
