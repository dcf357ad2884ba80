"""Labels: the chunked sums against plain loops on random attention, and the collector against eager
attention on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import DynamicCache

from kvcompress_learned.collect import collect
from kvcompress_learned.labels import LabelSums, counts, reference


def random_attention(b: int, h: int, g: int, n: int, seed: int = 0) -> torch.Tensor:
    """Causal softmax weights ``[B, H_kv, G, n, n]`` of random scores."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, g, n, n, generator=gen) * 2
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("label, horizon, relative", [
    ("future", 5, True), ("future", 5, False), ("future", 100, True), ("h2o", 0, False), ("h2o", 0, True)])
def test_chunked_label_sums_equal_plain_loops(label, horizon, relative):
    w = random_attention(2, 3, 2, 37)
    sums = LabelSums(label, horizon, relative)
    for start, stop in [(0, 10), (10, 11), (11, 30), (30, 37)]:
        chunk = w[:, :, :, start:stop].clone()
        later = torch.arange(37).view(1, -1) > torch.arange(start, stop).view(-1, 1)
        chunk[..., later] = 7.0  # whatever a chunk holds at a query's later keys is not counted
        sums.add(chunk, start)
    want = reference(w, label, horizon, relative)
    torch.testing.assert_close(sums.result().double(), want, rtol=1e-5, atol=1e-6)


def test_future_bins_split_the_horizon_by_distance():
    """Bin b holds distances [2^b, 2^(b+1)) up to the horizon: summed, the plain future label."""
    w = random_attention(1, 2, 3, 20, seed=4)
    binned = reference(w, "future", 6, False)  # bins {1}, {2, 3}, {4, 5, 6}
    plain = torch.zeros(1, 2, 20, dtype=torch.float64)
    for j in range(20):
        for i in range(j + 1, min(j + 6, 19) + 1):
            plain[:, :, j] += w[:, :, :, i, j].double().sum(2)
    assert binned.shape == (1, 2, 20, 3)
    torch.testing.assert_close(binned.sum(-1), plain)
    torch.testing.assert_close(binned[:, :, 3, 0], w[:, :, :, 4, 3].double().sum(2))


def test_counts_are_the_queries_each_label_sums_over():
    assert counts("future", 3, 6).tolist() == [[1, 2], [1, 2], [1, 2], [1, 1], [1, 0], [0, 0]]
    assert counts("h2o", 0, 4).tolist() == [4, 3, 2, 1]


def test_a_label_name_is_checked():
    with pytest.raises(ValueError, match="label: got 'oracle'; allowed: future, h2o"):
        LabelSums("oracle", 4, False)


@torch.no_grad()
def test_collected_features_and_labels_match_eager_attention():
    """What the trainer collects equals, per layer, the attention inputs and the labels computed by the plain
    reference from transformers' eager attention weights."""
    model = tiny_model("qwen2", heads=6, kv_heads=2)
    ids = prompt(48, seed=7)[0]
    spec = {"future": ("future", 8, True), "h2o": ("h2o", 0, False)}
    got = collect(model, ids, 24, spec, progress=False)  # two sequences of 24 tokens
    assert got.features.shape == (2, 48, 64) and got.sequences == 2
    model.set_attn_implementation("eager")
    try:
        inputs: dict[int, torch.Tensor] = {}
        mods = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
        grab = lambda m, a, k: inputs.__setitem__(m.layer_idx, k["hidden_states"])  # noqa: E731
        hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
        for s in (0, 24):
            out = model(input_ids=ids[None, s:s + 24], past_key_values=DynamicCache(), output_attentions=True)
            for layer, weights in enumerate(out.attentions):
                w = weights.view(1, 2, 3, 24, 24)
                torch.testing.assert_close(got.features[layer, s:s + 24].float(), inputs[layer][0],
                                           atol=2e-3, rtol=2e-3)  # stored as float16
                for name, (label, horizon, relative) in spec.items():
                    want = reference(w, label, horizon, relative)[0].float()
                    torch.testing.assert_close(got.labels[name][layer, :, s:s + 24], want,
                                               atol=1e-5, rtol=1e-4)
        for h in hooks:
            h.remove()
    finally:
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
