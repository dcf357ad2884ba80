"""The pieces of a sharded run that need no second process: the split of groups over ranks, torchrun's
environment, and merging the ranks' files into ``--out``."""

from __future__ import annotations

import pytest

from kvcompress_harness.distributed import Rank, assign, from_env
from kvcompress_harness.errors import HarnessError
from kvcompress_harness.results import append_record, cell_key, read_records
from kvcompress_harness.shards import merge, shard_dir, shard_files, shard_path


def test_assign_balances_and_is_deterministic():
    costs = [8, 1, 1, 4, 4, 2, 2, 2]
    owner = assign(costs, 2)
    assert owner == assign(list(costs), 2)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert load == [12, 12]
    assert assign([5, 5], 4) == [0, 1]  # more ranks than groups: the others idle
    assert assign([], 3) == []


def test_torchrun_environment():
    assert from_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert from_env(env) == Rank(3, 4, 1, 2) and not from_env(env).leader
    with pytest.raises(HarnessError, match=r"environment RANK='x': allowed: an integer >= 0"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(HarnessError, match="allowed: 0 <= RANK < WORLD_SIZE"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


def _record(policy: str, length: int, run_id: str = "a", started: float = 0.0) -> dict:
    return {"task": "perplexity", "policy": policy, "status": "ok", "length": length, "run_id": run_id,
            "started_at": started, "model": "m"}


def test_merge_appends_in_grid_order_once_and_removes_the_shards(tmp_path):
    out = tmp_path / "r.jsonl"
    append_record(out, _record("full", 8, run_id="old"))  # an earlier run's cell stays first
    plan = [_record(p, n) for n in (16, 32) for p in ("full", "sink")]
    index = {cell_key(r): i for i, r in enumerate(plan)}
    for i, r in enumerate(reversed(plan)):
        append_record(shard_path(out, i % 2), {**r, "started_at": float(i)})
    assert [f.name for f in shard_files(out)] == ["rank-0.jsonl", "rank-1.jsonl"]
    merged = merge(out, lambda r: index.get(cell_key(r), -1))
    assert len(merged) == 4 and not shard_dir(out).exists()
    assert [(r["length"], r["policy"]) for r in read_records(out)] == [(8, "full"), (16, "full"), (16, "sink"),
                                                                        (32, "full"), (32, "sink")]
    # a crash after the rename but before the shards were removed: merging again adds nothing
    append_record(shard_path(out, 0), {**plan[0], "started_at": 3.0})
    assert merge(out) == [] and len(read_records(out)) == 5


def test_a_torn_shard_line_is_skipped(tmp_path):
    out = tmp_path / "r.jsonl"
    append_record(shard_path(out, 0), _record("full", 8))
    with open(shard_path(out, 0), "a") as f:
        f.write('{"task": "perplexity", "pol')  # the rank was killed in the middle of a write
    with pytest.warns(UserWarning, match="not complete JSON"):
        merged = merge(out)
    assert [r["policy"] for r in merged] == ["full"] and len(read_records(out)) == 1


def test_records_sent_to_rank_0_are_merged_once_even_when_a_shard_is_not_visible(tmp_path):
    out = tmp_path / "r.jsonl"
    mine, theirs = _record("full", 8, started=1.0), _record("sink", 8, started=2.0)
    append_record(shard_path(out, 0), mine)  # rank 1's shard was written on a disk rank 0 does not see
    merged = merge(out, sent=[mine, theirs])
    assert [r["policy"] for r in merged] == ["full", "sink"] and len(read_records(out)) == 2
    assert merge(out, sent=[mine, theirs]) == [] and len(read_records(out)) == 2
