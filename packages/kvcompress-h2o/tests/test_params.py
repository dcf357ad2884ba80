"""Parameters are validated at construction, with errors naming parameter, value and what is allowed."""

from __future__ import annotations

import kvcompress
import pytest

from kvcompress_h2o import H2O, LRU, H2OCache, LRUCache


def test_registered_through_entry_points():
    infos = {p.name: p for p in kvcompress.list_policies()}
    for name in ("h2o", "lru"):
        assert infos[name].distribution == "kvcompress-h2o"
        assert infos[name].kind == "selection"
    assert infos["h2o"].params["heavy_ratio"] == 0.5 and infos["h2o"].params["recent_ratio"] == 0.5
    assert infos["h2o"].params["gqa"] == "sum" and infos["h2o"].params["normalize"] is False


def test_spec_round_trip():
    policy, _ = kvcompress.build_policies("h2o(budget=64,heavy_ratio=0.25,recent_ratio=0.75,gqa=max,step=8)")
    assert isinstance(policy, H2O)
    assert policy.spec() == "h2o(budget=64,step=8,heavy_ratio=0.25,recent_ratio=0.75,gqa=max)"
    assert kvcompress.build_policies(policy.spec())[0] == policy
    assert isinstance(kvcompress.build_policies("lru", budget=32)[0], LRU)


def test_observing_policy_without_model_says_to_pass_it():
    with pytest.raises(kvcompress.ModelRequiredError, match=r"observes attention; pass the model.*model=model"):
        kvcompress.make_cache("h2o(budget=64)")


@pytest.mark.parametrize("params, words", [
    ({"heavy_ratio": 0.6, "recent_ratio": 0.5}, ["'heavy_ratio' (0.6)", "'recent_ratio' (0.5)", "sum to 1.1",
                                                 "must sum to 1"]),
    ({"heavy_ratio": 0.3}, ["'heavy_ratio' (0.3)", "sum to 0.8"]),
    ({"budget": -4}, ["'budget'", "-4", ">= 1"]),
    ({"budget": 0}, ["'budget'", "0", ">= 1"]),
    ({"recent_ratio": 1.5, "heavy_ratio": -0.5}, ["'heavy_ratio'", "-0.5", ">= 0.0"]),
    ({"gqa": "mean"}, ["'gqa'", "'mean'", "'sum'", "'max'"]),
    ({"normalize": "yes"}, ["'normalize'", "'yes'", "bool"]),
    ({"budget": 8, "recent": 10}, ["'budget'", "8", ">= sink + recent"]),
    ({"budget": 64, "ratio": 0.2}, ["'budget' (64)", "'ratio' (0.2)", "not both"]),
    ({"ratio": 1.5}, ["'ratio'", "1.5", "<= 1.0"]),
    ({"heavy": 0.5}, ["unknown parameter 'heavy'", "heavy_ratio"]),
])
def test_bad_h2o_parameters(params, words):
    with pytest.raises((ValueError, TypeError)) as info:
        H2OCache(None, **params)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_parameters_through_spec_and_lru():
    with pytest.raises(ValueError, match=r"'heavy_ratio' \(0.7\).*'recent_ratio' \(0.5\)"):
        kvcompress.build_policies("h2o(budget=64,heavy_ratio=0.7)")
    with pytest.raises(ValueError, match=r"lru: parameter 'threshold' got 0.0; allowed: float > 0.0"):
        LRUCache(None, threshold=0.0)
    with pytest.raises(ValueError, match=r"lru: parameter 'budget' got -1"):
        kvcompress.build_policies("lru(budget=-1)")


def test_ratio_budget_and_recent_share():
    policy = H2O.from_params(ratio=0.25, heavy_ratio=0.25, recent_ratio=0.75)
    assert policy.target(1000) == 250
    assert round(policy.recent_ratio * policy.target(1000)) == 188
