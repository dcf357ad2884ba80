"""Results file: atomic appends, tolerant reads, stable cell keys."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

from kvcompress_harness.results import append_record, cell_key, finished, read_records


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_record(path, {"worker": worker, "i": i, "payload": "x" * (1000 + 37 * i)})


def test_concurrent_appends_never_interleave(tmp_path):
    path = str(tmp_path / "r.jsonl")
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 160
    recs = [json.loads(line) for line in lines]
    assert sorted((r["worker"], r["i"]) for r in recs) == [(w, i) for w in range(4) for i in range(40)]


def test_torn_line_is_skipped_and_nan_becomes_null(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"a": 1, "x": math.nan})
    with open(path, "a") as f:
        f.write('{"a": 2, "broken')
    import pytest

    with pytest.warns(UserWarning, match="not complete JSON"):
        recs = read_records(path)
    assert recs == [{"a": 1, "x": None}]


def test_cell_key_ignores_metrics_and_order():
    a = {"model": "m", "policy": "sink", "task": "t", "params": {"x": 1, "y": 2}, "length": 8, "device": "cpu",
         "seed": 0, "chunk": None, "data_source": "d", "metrics": {"v": 1}}
    b = dict(reversed(list(a.items())), metrics={"v": 2}, params={"y": 2, "x": 1})
    assert cell_key(a) == cell_key(b)
    assert cell_key(a) != cell_key({**a, "length": 16})
    assert finished([{**a, "status": "error"}]) == {}
    assert list(finished([{**a, "status": "ok"}])) == [cell_key(a)]


def test_prepare_out_repairs_and_refuses(tmp_path):
    import pytest

    from kvcompress_harness.errors import HarnessError
    from kvcompress_harness.results import prepare_out

    path = tmp_path / "r.jsonl"
    assert prepare_out(path) == []
    rec = {"task": "t", "policy": "p", "status": "ok"}
    append_record(path, rec)
    assert prepare_out(path) == []
    path.write_text(path.read_text() + json.dumps(rec))  # whole record, newline missing
    (msg,) = prepare_out(path)
    assert "line 2 had no newline" in msg and len(read_records(path)) == 2 and path.read_text().endswith("\n")
    path.write_text(path.read_text() + '{"task": "t", "pol')
    (msg,) = prepare_out(path)
    assert "line 3 was cut short (18 bytes" in msg and (tmp_path / "r.jsonl.partial-1").exists()
    assert path.read_text().count("\n") == 2 and len(read_records(path)) == 2
    with pytest.raises(HarnessError, match="is a directory"):
        prepare_out(tmp_path)
    other = tmp_path / "o.jsonl"
    other.write_text('{"x": 1}\n')
    with pytest.raises(HarnessError, match="line 1 is JSON but not a kvcompress result"):
        prepare_out(other)
