"""A selection policy whose budget covers the sequence gives the full cache's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits, tiny_model
from transformers import DynamicCache

import kvcompress

COVERING = ["full", "dense", "window(budget=80)", "sink(budget=80)", "random(budget=80)", "sink(ratio=1.0)",
            "window(budget=80,step=8)"]


@pytest.mark.parametrize("spec", COVERING)
def test_covering_budget_matches_dynamic_cache(arch, spec):
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    reference = greedy_logits(model, ids, DynamicCache())
    got = greedy_logits(model, ids, kvcompress.make_cache(spec, model=model))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_generate_matches_full_for_sampling_with_seed():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    outs = []
    for cache in (DynamicCache(), kvcompress.make_cache("sink(budget=200)", model=model)):
        torch.manual_seed(7)
        outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])


def test_small_budget_changes_logits():
    """The equivalence above is not vacuous: a budget below the sequence does change the result."""
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    reference = greedy_logits(model, ids, DynamicCache(), steps=4)
    got = greedy_logits(model, ids, kvcompress.make_cache("window(budget=8)", model=model), steps=4)
    assert not torch.allclose(got[1:], reference[1:], atol=1e-4)
