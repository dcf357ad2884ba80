"""Sharded grids through torchrun: two gloo ranks on the CPU, each appending its cells to its own shard, merged by
rank 0 into results equal, cell for cell, to a single process's; a rank killed mid-run is resumed without losing or
repeating a cell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kvcompress_harness.results import cell_key, read_records
from kvcompress_harness.runner import RunConfig, run
from kvcompress_harness.shards import shard_dir, shard_files

# perplexity on a tiny model, token by token: deterministic metrics, about half a second a cell
GRID = """model = "{model}"
tasks = ["perplexity"]
lengths = [96, 128, 160]
device = "cpu"
data = "excerpt"
policies = ["window(budget=16)", "sink(budget=16)"]
"""
CELLS = 9
RUN_ONLY = {"run_id", "started_at", "wall_s", "command", "rank", "world_size"}


@pytest.fixture(scope="module")
def grid(tiny, tmp_path_factory) -> Path:
    """The grid file, its model the tiny Llama saved as a local checkpoint (loads in a blink in every rank)."""
    d = tmp_path_factory.mktemp("sharded")
    tiny.model.save_pretrained(d / "tiny")
    tiny.tokenizer.save_pretrained(d / "tiny")
    path = d / "grid.toml"
    path.write_text(GRID.format(model=d / "tiny"))
    return path


@pytest.fixture(scope="module")
def single(grid, tmp_path_factory) -> dict[str, dict]:
    """The grid run in this process (one thread, as every rank runs), by cell."""
    import torch

    from kvcompress_harness.grid import apply_grid

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single") / "single.jsonl"
        config = apply_grid(RunConfig(policies=[], tasks=[], out=str(out), progress=False), str(grid), given={})
        records = run(config)
    finally:
        torch.set_num_threads(threads)
    assert len(records) == CELLS and all(r["status"] == "ok" for r in records)
    return {cell_key(r): r for r in records}


def _torchrun(grid: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kvcompress_harness", "run", "--grid", str(grid), "--out", str(out), "--threads", "1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    return log


def _comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in RUN_ONLY}
    out["reference"] = {k: v for k, v in record["reference"].items() if k != "run_id"}
    return out


def _assert_equal_to_single(records: list[dict], single: dict[str, dict], whole_groups: bool = True) -> None:
    keys = [cell_key(r) for r in records]
    assert len(keys) == len(set(keys)) == CELLS, "a cell is missing or was done twice"
    assert keys == list(single), "the merged file is not in the grid's order"
    for r in records:
        assert _comparable(r) == _comparable(single[cell_key(r)])
        assert r["world_size"] == 2 and r["status"] == "ok"
    by_group: dict[tuple, set] = {}
    for r in records:  # a policy and its full are measured in one process
        by_group.setdefault((r["task"], r["length"]), set()).add((r["rank"], r["run_id"]))
    assert not whole_groups or all(len(v) == 1 for v in by_group.values()), by_group
    for r in records:  # and each record's reference is its own group's full, from the same run
        full = next(f for f in records if f["policy"] == "full" and f["length"] == r["length"])
        assert r["reference"]["run_id"] == full["run_id"] and r["reference"]["metrics"] == full["metrics"]


def test_two_ranks_equal_one_process(grid, single, tmp_path):
    out = tmp_path / "r.jsonl"
    log = _finish(_torchrun(grid, out))
    assert "joined the gloo process group of 2 rank(s)" in log
    records = read_records(out)
    _assert_equal_to_single(records, single)
    assert {r["rank"] for r in records} == {0, 1}
    assert not shard_dir(out).exists()


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun")


def test_a_killed_rank_is_resumed_without_loss_or_repeats(grid, single, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = _torchrun(grid, out)
    shard = shard_dir(out) / "rank-1.jsonl"
    deadline = time.monotonic() + 240
    while not (shard.exists() and shard.read_text().count("\n") >= 1):  # rank 1 has finished a cell
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    _rank_process(proc, 1).send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log  # torchrun stops the job when a rank dies
    assert not out.exists(), "nothing is merged by a run that did not finish"
    first = [r for f in shard_files(out) for r in read_records(f)]
    keys = [cell_key(r) for r in first]
    assert 1 <= len(first) < CELLS and len(set(keys)) == len(keys), "killed too late, or a cell written twice"

    _finish(_torchrun(grid, out))  # the same command again
    records = read_records(out)
    _assert_equal_to_single(records, single, whole_groups=False)  # a group cut by the kill ends in the next run
    kept = {(r["run_id"], cell_key(r)) for r in first}
    assert kept <= {(r["run_id"], cell_key(r)) for r in records}, "a cell finished before the kill was redone"
    assert len({r["run_id"] for r in records} - {r["run_id"] for r in first}) >= 1
    assert not shard_dir(out).exists()
    assert json.loads(out.read_text().splitlines()[0])["policy"] == "full"
