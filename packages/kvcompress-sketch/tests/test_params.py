"""Parameters are validated at construction, with errors naming parameter, value and what is allowed."""

from __future__ import annotations

import kvcompress
import pytest

from kvcompress_sketch import Sketch


def test_registered_through_entry_points():
    info = {p.name: p for p in kvcompress.list_policies()}["sketch"]
    assert info.distribution == "kvcompress-sketch" and info.kind == "selection"
    assert info.params["strategy"] == "topk" and info.params["width"] == 1 and info.params["depth"] == 1
    assert info.params["sink"] == 4 and info.params["recent"] == 64 and info.params["step"] == 32


def test_spec_round_trip():
    spec = "sketch(budget=128,strategy=aggregate,width=8,depth=2,planes=12,half_life=512,buckets=8,seed=3)"
    policy, rep = kvcompress.build_policies(spec + "+quant(bits=4)")
    assert isinstance(policy, Sketch) and rep.name == "quant"
    assert kvcompress.build_policies(policy.spec())[0] == policy
    assert policy.slot_states == {"bucket": "int32"} and Sketch().slot_states == {}


def test_needs_no_model_to_build():  # no attention weights, no hidden states: a plain cache works
    assert kvcompress.make_cache("sketch(budget=64,recent=8)").selection.name == "sketch"


@pytest.mark.parametrize("spec, words", [
    ("sketch(width=0)", ["'width'", "0", ">= 1"]),
    ("sketch(width=5000)", ["'width'", "5000", "<= 4096"]),
    ("sketch(depth=0)", ["'depth'", "0", ">= 1"]),
    ("sketch(depth=17)", ["'depth'", "17", "<= 16"]),
    ("sketch(planes=25)", ["'planes'", "25", "<= 24"]),
    ("sketch(planes=0)", ["'planes'", "0", ">= 1"]),
    ("sketch(half_life=-1)", ["'half_life'", "-1", ">= 0"]),
    ("sketch(strategy=merge)", ["'strategy'", "'merge'", "'topk'", "'aggregate'"]),
    ("sketch(read=exact)", ["'read'", "'exact'", "'centroid'", "'bucket'"]),
    ("sketch(weighting=square)", ["'weighting'", "'square'", "'one'", "'norm'"]),
    ("sketch(width=2.5)", ["'width'", "2.5", "int"]),
    ("sketch(strategy=aggregate,buckets=12)", ["'buckets'", "12", "a power of two"]),
    ("sketch(strategy=aggregate,buckets=0)", ["'buckets'", "0", ">= 1"]),
    ("sketch(budget=70,strategy=aggregate)", ["'budget'", "70", "sink + recent + buckets", "4 + 64 + 4 = 72"]),
    ("sketch(strategy=aggregate,adaptive=2)", ["'adaptive'", "2.0", "1.0 with strategy 'aggregate'"]),
    ("sketch(budget=32)", ["'budget'", "32", ">= sink + recent", "4 + 64 = 68"]),
    ("sketch(budget=64,ratio=0.25)", ["'budget' (64)", "'ratio' (0.25)", "not both"]),
    ("sketch(hash=simhash)", ["unknown parameter 'hash'", "width", "depth"]),
])
def test_bad_parameters(spec, words):
    with pytest.raises((ValueError, TypeError)) as info:
        kvcompress.build_policies(spec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_ratio_target_leaves_room_for_the_aggregates():
    policy = Sketch.from_params(ratio=0.1, strategy="aggregate", buckets=16)
    assert policy.target(2000) == 200
    assert policy.target(100) == 4 + 64 + 16  # never fewer than the exact tokens it protects plus buckets
    assert Sketch.from_params(ratio=0.1).target(100) == 68
