"""A left-padded batch gives the same tokens as each prompt alone: the store rotates keys again at the
positions the model used (generate numbers each row's real tokens from 0), which it reads off the model's
cos/sin."""

from __future__ import annotations

import pytest
import torch
from conftest import full_rank, ids, tiny_model

import kvcompress


def _pad_left(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(p.shape[-1] for p in prompts)
    batch = torch.full((len(prompts), n), pad)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, n - p.shape[-1] :] = p
        mask[i, n - p.shape[-1] :] = 1
    return batch, mask


@pytest.mark.parametrize(
    "spec",
    [
        full_rank(),
        "lowrank(basis=random,k_rank=20,v_rank=24,sink=2,window=6)",
        "window(budget=30,step=4)+lowrank(basis=random,k_rank=20,v_rank=24,sink=2,window=6)",
    ],
)
def test_left_padded_batch_gives_the_tokens_of_each_prompt_alone(spec):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # always 20 new tokens
    model.generation_config.pad_token_id = 0
    prompts = [ids(37, seed=1)[0], ids(22, seed=2)[0], ids(30, seed=3)[0]]
    alone = []
    for p in prompts:
        out = model.generate(
            p[None],
            past_key_values=kvcompress.make_cache(spec, model=model),
            max_new_tokens=20,
            do_sample=False,
            attention_mask=torch.ones_like(p[None]),
        )
        alone.append(out[0, p.shape[-1] :])
    batch, mask = _pad_left(prompts)
    cache = kvcompress.make_cache(spec, model=model)
    out = model.generate(
        batch, attention_mask=mask, past_key_values=cache, max_new_tokens=20, do_sample=False
    )
    for i, want in enumerate(alone):
        assert torch.equal(out[i, batch.shape[-1] :], want), i
    store = cache.layers[0].store
    # the true positions of row 1 (15 padding tokens) run 15 behind its slots
    assert store.offset.tolist() == [0, 15, 7]
