"""Bad input gives a clear error naming the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import kvcompress


@pytest.mark.parametrize("spec,kwargs,error,words", [
    ("nosuch", {}, ValueError, ["'nosuch'", "known policies", "sink", "window"]),
    ("sink(bugdet=3)", {}, ValueError, ["'bugdet'", "allowed parameters", "budget"]),
    ("sink", {"budget": "big"}, TypeError, ["'budget'", "'big'", "int"]),
    ("sink", {"budget": 2.5}, TypeError, ["'budget'", "2.5", "int"]),
    ("sink", {"budget": True}, TypeError, ["'budget'", "True"]),
    ("sink", {"budget": 0}, ValueError, ["'budget'", "0", ">= 1"]),
    ("sink", {"budget": 3}, ValueError, ["'budget'", "3", "sink + recent"]),
    ("window", {"budget": 10, "recent": 8, "sink": 4}, ValueError, ["'budget'", "10", "sink + recent"]),
    ("window", {"ratio": 0.0}, ValueError, ["'ratio'", "0.0", "> 0.0", "<= 1.0"]),
    ("window", {"ratio": 1.5}, ValueError, ["'ratio'", "1.5", "<= 1.0"]),
    ("window", {"ratio": 0.5, "budget": 8}, ValueError, ["'budget'", "'ratio'", "not both"]),
    ("window", {"step": 0}, ValueError, ["'step'", "0", ">= 1"]),
    ("sink(budget=8)+window", {}, ValueError, ["at most one selection"]),
    ("sink(budget=8", {}, ValueError, ["unbalanced"]),
    ("", {}, ValueError, ["non-empty"]),
    ("sink(budget=8)", {"budget": 9}, ValueError, ["'budget'", "both in the spec"]),
])
def test_bad_policy_input(spec, kwargs, error, words):
    with pytest.raises(error) as info:
        kvcompress.make_cache(spec, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_model_without_cache_api_is_rejected():
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        kvcompress.attach(torch.nn.Linear(2, 2))
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM does not use transformers' Cache API"):
        kvcompress.make_cache("sink", model=mamba)


def test_model_with_eager_attention_is_switched_to_kvcompress():
    model = tiny_model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    kvcompress.attach(model)
    assert model.config._attn_implementation == "kvcompress"


def test_cache_on_unrouted_attention_raises():
    """A compressing cache used by eager attention (not routed through kvcompress) fails loudly."""
    model = tiny_model("llama", attn_implementation="eager")
    cache = kvcompress.make_cache("sink(budget=8)")
    model(torch.randint(1, 96, (1, 5)), past_key_values=cache, use_cache=True)
    with pytest.raises(kvcompress.AttentionNotAttachedError, match="attach"):
        model(torch.randint(1, 96, (1, 1)), past_key_values=cache, use_cache=True)


def test_composing_a_non_representation_is_a_type_error():
    cache = kvcompress.make_cache("sink(budget=8)")
    with pytest.raises(TypeError, match="Representation"):
        cache | "quant"
