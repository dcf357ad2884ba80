"""Spec strings."""

from __future__ import annotations

import pytest

from kvcompress import parse_spec


def test_parse_spec_forms():
    assert parse_spec("sink") == [("sink", {})]
    assert parse_spec("h2o(budget=256, recent=32)") == [("h2o", {"budget": 256, "recent": 32})]
    assert parse_spec("sink(budget=128)+quant(bits=4,axis=channel)") == [
        ("sink", {"budget": 128}), ("quant", {"bits": 4, "axis": "channel"})]
    assert parse_spec("window(ratio=0.5,flag=true,x=none)") == [
        ("window", {"ratio": 0.5, "flag": True, "x": None})]


@pytest.mark.parametrize("bad", ["sink(", "sink(budget)", "+sink", "sink(budget=1,budget=2)", "si nk(", "9x"])
def test_parse_spec_rejects(bad):
    with pytest.raises(ValueError, match="spec"):
        parse_spec(bad)
