"""Peers (transformers' own caches) as policies, measured by the same task as every policy."""

from __future__ import annotations

import importlib.util

import kvcompress
import pytest

from kvcompress_harness.runner import RunConfig, run


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'kvcompress-harness[peers]')")


def _perplexity(tiny, tmp_path, spec, length=160):
    cfg = RunConfig(policies=[spec], tasks=["perplexity"], lengths=[length], chunk=32, out=str(tmp_path / "r.jsonl"),
                    data="excerpt", progress=False)
    full, peer = run(cfg, loaded=tiny)
    assert peer["status"] == "ok", peer.get("traceback")
    assert peer["versions"]["kvcompress-harness"] and peer["reference"]["metrics"] == full["metrics"]
    return full["metrics"], peer["metrics"]


@pytest.mark.parametrize("spec, module", [("hf-quanto(bits=4,residual=32,group=32)", "optimum.quanto"),
                                          ("hf-quanto(bits=2,residual=32,group=32)", "optimum.quanto"),
                                          ("hf-hqq(bits=4,residual=32,group=32)", "hqq")])
def test_quantized_peer_measured_through_perplexity(tiny, tmp_path, spec, module):
    _need(module)
    full, peer = _perplexity(tiny, tmp_path, spec)
    assert peer["ppl"] != full["ppl"] and peer["ppl"] < 2 * full["ppl"]
    # bytes are those the layers hold: residual tokens + quantized data, scales and zero points
    assert 0 < peer["kv_bytes"] < 0.6 * full["kv_bytes"]


def test_sliding_peer_keeps_the_window(tiny, tmp_path):
    full, peer = _perplexity(tiny, tmp_path, "hf-sliding(window=64)")
    assert peer["ppl"] != full["ppl"]
    per_token = full["kv_bytes"] / 160
    assert peer["kv_bytes"] <= 64 * per_token


def test_peer_errors_are_clear(tiny):
    with pytest.raises(ValueError, match="hf-quanto: parameter 'bits' got 3; allowed: one of 2, 4"):
        kvcompress.make_cache("hf-quanto(bits=3)", model=tiny.model)
    with pytest.raises(ValueError, match="hf-offloaded: offloads a GPU's cache to CPU memory; allowed: a model on CUDA"):
        kvcompress.make_cache("hf-offloaded", model=tiny.model)
    with pytest.raises(ValueError, match="composes with no other policy"):
        kvcompress.make_cache("hf-sliding+sink", model=tiny.model)
