"""Parameters are validated at construction: errors name the parameter, its value and what is allowed."""

from __future__ import annotations

import pytest

import kvcompress
from kvcompress_cluster import Cluster


def test_registered_through_entry_points():
    info = {p.name: p for p in kvcompress.list_policies()}["cluster"]
    assert info.distribution == "kvcompress-cluster" and info.kind == "selection"
    assert info.params["clusters"] == 16 and info.params["mode"] == "merge"
    assert info.params["share"] == "attention"


def test_spec_round_trip():
    spec = "cluster(budget=128,clusters=8,iters=3,distance=l2,mode=evict,share=size)"
    policy, _ = kvcompress.build_policies(spec)
    assert isinstance(policy, Cluster)
    assert kvcompress.build_policies(policy.spec())[0] == policy
    assert policy.needs_attention is False and set(policy.slot_states) == {"cluster"}
    assert Cluster().needs_attention is True and set(Cluster().slot_states) == {"cluster", "acc"}


def test_observing_without_a_model_says_to_pass_it():
    with pytest.raises(kvcompress.ModelRequiredError, match="observes attention; pass the model"):
        kvcompress.make_cache("cluster(budget=128)")
    assert kvcompress.make_cache("cluster(budget=128,share=size)") is not None  # k-means alone needs no model


@pytest.mark.parametrize("params, words", [
    ({"budget": 100, "clusters": 40}, ["'clusters' is 40", "budget - sink - recent", "100 - 4 - 64 = 32"]),
    ({"budget": 16, "sink": 0, "recent": 0, "clusters": 17}, ["'clusters' is 17", "16 - 0 - 0 = 16"]),
    ({"iters": 0}, ["'iters'", "0", ">= 1"]),
    ({"clusters": 0}, ["'clusters'", "0", ">= 1"]),
    ({"distance": "manhattan"}, ["'distance'", "'manhattan'", "'cosine'", "'l2'"]),
    ({"mode": "drop"}, ["'mode'", "'drop'", "'merge'", "'evict'"]),
    ({"share": "mass"}, ["'share'", "'mass'", "'attention'", "'size'"]),
    ({"seed": -1}, ["'seed'", "-1", ">= 0"]),
    ({"budget": 32}, ["'budget' is 32", ">= sink + recent", "4 + 64"]),
    ({"clusters": 2.5}, ["'clusters'", "2.5", "int"]),
    ({"k": 8}, ["unknown parameter 'k'", "clusters"]),
])
def test_bad_parameters(params, words):
    with pytest.raises((ValueError, TypeError)) as info:
        Cluster.from_params(**params)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_parameters_through_a_spec():
    with pytest.raises(ValueError, match=r"cluster: parameter 'iters' got 0; allowed: int >= 1"):
        kvcompress.build_policies("cluster(iters=0)")


def test_ratio_leaves_the_seat_check_to_each_eviction():
    policy = Cluster.from_params(ratio=0.1, clusters=64)  # seats grow with the tokens seen
    assert policy.target(10000) == 1000
