"""Batches with left padding: the same tokens as each prompt alone; padding never uses the budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import kvcompress

PAD = 0


def _generate(model, prompts, spec, new_tokens=20):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cache = kvcompress.make_cache(spec, model=model)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    return out[:, width:], cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("spec", ["full", "dense", "window(budget=64)", "sink(budget=64)", "random(budget=64)",
                                  "sink(budget=10,step=3)", "window(budget=12)", "keydiff(budget=64)",
                                  "keydiff(budget=64,adaptive=2)"])
def test_batch_equals_each_prompt_alone(arch, spec):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (7, 19, 13)]
    batch, _ = _generate(model, prompts, spec)
    for i, p in enumerate(prompts):
        alone, _ = _generate(model, [p], spec)
        assert batch[i].tolist() == alone[0].tolist(), f"prompt {i} differs in a batch"


def test_padding_is_evicted_before_real_tokens():
    model = tiny_model("llama")
    prompts = [[5] * 4, list(range(1, 31))]
    _, cache = _generate(model, prompts, "sink(budget=16,sink=2)", new_tokens=2)
    layer = cache.layers[0]
    valid = layer.slots.view("valid")
    # the short row keeps all its 4+1 real tokens, padding fills the rest of its 16 slots;
    # the long row keeps only real tokens
    assert valid[1].all()
    assert int(valid[0, 0].sum()) == 4 + 1
    positions = layer.slots.view("positions")[1, 0].tolist()
    assert positions[:2] == [0, 1]
