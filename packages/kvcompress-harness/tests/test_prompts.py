"""Retrieval prompts: fit the length, hold the fact at the asked depth."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress_harness.errors import HarnessError
from kvcompress_harness.tasks import passkey
from kvcompress_harness.tasks.prompts import fit_units, n_tokens


@settings(max_examples=25, deadline=None)
@given(length=st.integers(100, 700), depth=st.floats(0.0, 1.0))
def test_prompt_fits_and_places_the_fact(smol, length, depth):
    tok = smol.tokenizer
    fact = passkey.FACT.format(key="12345")
    units = [passkey.FILLER] * 200
    prompt = fit_units(tok, passkey.HEAD, units, fact, passkey.TAIL, length, depth)
    size = n_tokens(tok, prompt)
    assert length - 2 * n_tokens(tok, passkey.FILLER) <= size <= length + 2
    body = prompt[len(passkey.HEAD):-len(passkey.TAIL)]
    before = body.index(fact)
    share = body[:before].count(passkey.FILLER) / (body.count(passkey.FILLER))
    assert abs(share - depth) <= 1 / body.count(passkey.FILLER) + 1e-9


def test_prompt_errors(smol):
    with pytest.raises(HarnessError, match="depth: got 1.5; allowed: 0 <= depth <= 1"):
        fit_units(smol.tokenizer, "h", ["u "], "f", "t", 100, 1.5)
    with pytest.raises(HarnessError, match="too short"):
        fit_units(smol.tokenizer, passkey.HEAD, [passkey.FILLER], "fact", passkey.TAIL, 10, 0.5)


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_split_prompt_feeds_the_ids_of_the_whole_prompt(smol, depth):
    import torch

    from kvcompress_harness.tasks.prompts import encode, split_prompt

    tok = smol.tokenizer
    text = fit_units(tok, passkey.HEAD, [passkey.FILLER] * 50, passkey.FACT.format(key="12345"), passkey.TAIL, 200,
                     depth)
    for chat in (False, True):
        parts = split_prompt(tok, text, passkey.TAIL, torch.device("cpu"), chat=chat)
        assert torch.equal(torch.cat([parts.context, parts.question], 1),
                           encode(tok, text, torch.device("cpu"), chat=chat))
        assert "What is the pass key?" in tok.decode(parts.question[0])
        assert "What is" not in tok.decode(parts.context[0])
        marked = split_prompt(tok, text, passkey.TAIL, torch.device("cpu"), chat=chat, mark="12345").marked
        assert marked and max(marked) < parts.context.shape[1]
        assert tok.decode(parts.context[0, list(marked)]).strip() == "12345"
