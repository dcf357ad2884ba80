"""kvcompress.testing: the tiny models plugin tests build on are seeded, shaped as asked, decode through a
compressed cache in every architecture, and refuse unknown architectures."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.testing import ARCHITECTURES, EmulatedGraphs, random_ids, tiny_model


def test_tiny_model_is_seeded_and_shaped_as_asked():
    a, b = tiny_model("qwen2", heads=6, kv_heads=2, layers=3), tiny_model("qwen2", heads=6, kv_heads=2, layers=3)
    assert a.config.num_hidden_layers == 3 and a.config.num_key_value_heads == 2
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(tiny_model(seed=1).parameters()), next(tiny_model(seed=0).parameters()))
    ids = random_ids(12, seed=3, batch=2)
    assert ids.shape == (2, 12) and int(ids.min()) >= 2 and torch.equal(ids, random_ids(12, seed=3, batch=2))
    assert a(ids).logits.shape == (2, 12, a.config.vocab_size)


def test_tiny_model_refuses_an_unknown_architecture():
    allowed = "llama, qwen2, qwen3, mistral, phi3, gpt2"
    with pytest.raises(ValueError, match=f"parameter 'arch' is 'gpt9'; allowed: {allowed}"):
        tiny_model("gpt9")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_decodes_through_a_compressed_cache(arch):
    model = tiny_model(arch)
    info = kvcompress.ModelInfo.from_model(model)
    assert info.head_dim == 16 and info.num_kv_heads == (4 if arch == "gpt2" else 2)
    cache = kvcompress.make_cache("sink(budget=8,step=2)", model=model)
    out = model.generate(random_ids(20), past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 24) and all(layer.slots.length < 8 + 2 for layer in cache.layers)


def test_gpt2_has_no_grouped_heads():
    with pytest.raises(ValueError, match="parameter 'kv_heads' is 2 for gpt2; allowed: 4"):
        tiny_model("gpt2", kv_heads=2)


def test_greedy_logits_follow_the_greedy_path():
    from transformers import DynamicCache

    from kvcompress.testing import greedy_logits

    model = tiny_model("llama")
    ids = random_ids(20)
    full = greedy_logits(model, ids, DynamicCache(), steps=5)
    assert full.shape == (6, 1, model.config.vocab_size)
    dense = greedy_logits(model, ids, kvcompress.make_cache("dense", model=model), steps=5)
    torch.testing.assert_close(dense, full, rtol=1e-5, atol=1e-5)
    tight = greedy_logits(model, ids, kvcompress.make_cache("window(budget=4)", model=model), steps=5)
    assert not torch.allclose(tight[1:], full[1:], atol=1e-3)  # a 4-token window changes what follows


def test_emulated_graphs_bake_host_values_and_write_where_the_capture_wrote():
    graphs = EmulatedGraphs()
    x, n = torch.zeros(3), [1]

    def region() -> None:
        y = x + n[0]  # a fresh tensor: each replay writes its result where the capture's was
        x.copy_(y * 2)

    replay = graphs.capture(region, "rebuild")  # runs once as it is recorded: x = 2
    assert x.tolist() == [2.0, 2.0, 2.0]
    n[0] = 100  # Python does not run again: the capture's 1 is baked in, as in a CUDA graph
    replay()
    assert x.tolist() == [6.0, 6.0, 6.0]
    assert graphs.captures == {"step": 0, "rebuild": 1} and graphs.replays == {"step": 0, "rebuild": 1}


@pytest.mark.parametrize("read", [lambda x: bool(x.sum() > 1), lambda x: x.nonzero(), lambda x: int(x[0]),
                                  lambda x: x.repeat_interleave(x.long())])
def test_emulated_graphs_refuse_a_host_read_of_a_device_value(read):
    x = torch.ones(2)
    with pytest.raises(RuntimeError, match="reads a device value on the host"):
        EmulatedGraphs().capture(lambda: read(x), "step")


@pytest.mark.parametrize("make", [lambda x: torch.tensor([1.0, 2.0], device=x.device) + x,
                                  lambda x: torch.as_tensor([[0, 1]], device=x.device)])
def test_emulated_graphs_refuse_a_tensor_made_of_host_data(make):
    x = torch.ones(2)
    with pytest.raises(RuntimeError, match="tensor of host data"):
        EmulatedGraphs().capture(lambda: make(x), "rebuild")
