"""An 8k-token prompt is observed in chunks of queries: never an n x n weight matrix per head at once (the
chunked path every policy whose observe() is not a declared accumulation takes; h2o's own is fused)."""

from __future__ import annotations

from dataclasses import dataclass, field

import kvcompress
import torch
from conftest import prompt, tiny_model
from kvcompress import CompressedCache
from kvcompress.attention import QUERY_CHUNK

from kvcompress_h2o import H2O, mode


@dataclass
class RecordingH2O(H2O):
    """H2O that also records the shape of every weight tensor it is shown."""

    shapes: list = field(default_factory=list, init=False, repr=False, compare=False)
    mass: float = field(default=0.0, init=False, repr=False, compare=False)

    def accumulated_attention(self):
        return None  # its observe() does more than add: the core must call it (no fused observation)

    def observe(self, ctx, weights, query_positions):
        self.shapes.append((ctx.layer_idx, tuple(weights.shape), int(query_positions[0]), len(query_positions)))
        self.mass += float(weights.double().sum())
        super().observe(ctx, weights, query_positions)


@torch.no_grad()
def test_8k_prompt_observed_in_query_chunks():
    n = 8192
    model = tiny_model("llama", heads=4, kv_heads=2, layers=1)
    policy = RecordingH2O(budget=512, step=16)
    cache = CompressedCache(policy, model=kvcompress.attach(model))
    model(input_ids=prompt(n), past_key_values=cache, use_cache=True, logits_to_keep=1)
    assert {s[0] for s in policy.shapes} == {0}
    assert max(s[1][3] for s in policy.shapes) == QUERY_CHUNK < n
    for _, shape, first, count in policy.shapes:
        assert shape[:3] == (1, 2, 2) and shape[4] == n and shape[3] == count
    starts = [s[2] for s in policy.shapes]
    assert starts == list(range(0, n, QUERY_CHUNK))  # every query observed once, in order
    assert sum(s[3] for s in policy.shapes) == n
    layer = cache.layers[0]
    assert layer.slots.length == 512 and mode(cache) == "prompt"
    # each of the n queries of each of the 4 query heads was shown its whole (causal) row, summing to 1
    assert abs(policy.mass - n * 4) < 1e-3 * n
    assert (layer.slots.view("acc").sum(-1) < n * 2).all()  # the kept tokens hold part of each head's mass
