"""quant inside real (tiny, random-init) transformers models: alone, composed, batched, generate()."""

from __future__ import annotations

import pytest
import torch
from conftest import decode_logits, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress_quant import Quant, QuantStore

SMALL = "quant(bits={bits},group_size=8,sink=2,window=8)"


def _ids(n, seed=0, batch=1):
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_registered_and_builds_compressed_cache():
    names = {p.name: p for p in kvcompress.list_policies()}
    assert names["quant"].kind == "representation"
    assert names["quant"].distribution == "kvcompress-quant"
    assert names["quant"].params["bits"] == 4
    cache = kvcompress.make_cache("quant(bits=4)")
    assert isinstance(cache, kvcompress.CompressedCache)
    assert isinstance(cache.selection, kvcompress.Full) and isinstance(cache.representation, Quant)


def test_defaults_group_sizes_by_bits_and_rotate():
    for bits, group, rotate in ((2, 16, True), (4, 64, False), (8, 64, False)):
        store = Quant(bits=bits).make_store(0)
        assert (store.group, store.channel_group, store.rotate) == (group, 64, rotate)
    assert Quant(bits=4, rotate=True).make_store(0).rotate
    store = Quant(bits=2, group_size=32, rotate=False).make_store(0)
    assert (store.group, store.channel_group, store.rotate) == (32, None, False)  # None: follows group
    store = Quant(bits=4, group_size=32, channel_group=16).make_store(0)
    assert (store.group, store.channel_group) == (32, 16)


def test_short_sequence_equals_full():
    """Nothing leaves the full-precision window: logits equal DynamicCache's."""
    model = tiny_model()
    ids = _ids(10)
    ref = decode_logits(model, ids, DynamicCache(), steps=6)
    got = decode_logits(model, ids, kvcompress.make_cache("quant(bits=2)", model=model), steps=6)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15), (2, 0.6)])
def test_logits_close_to_full_and_error_grows_as_bits_drop(bits, tol):
    model = tiny_model()
    ids = _ids(60)
    ref = decode_logits(model, ids, DynamicCache())
    cache = kvcompress.make_cache(SMALL.format(bits=bits), model=model)
    got = decode_logits(model, ids, cache)
    store = cache.layers[0].store
    assert isinstance(store, QuantStore) and store.m >= 64
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < tol, err


def test_kv_bytes_are_what_the_stores_hold():
    model = tiny_model()
    ids = _ids(200)
    full, quant = DynamicCache(), kvcompress.make_cache("quant(bits=4,group_size=8,sink=2,window=16)")
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=quant)
    held = sum(t.numel() * t.element_size() for layer in quant.layers for t in layer.store.tensors())
    assert kvcompress.kv_bytes(quant) == held + sum(layer.slots.nbytes() for layer in quant.layers)
    assert held < 0.45 * kvcompress.kv_bytes(full)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_composes_with_sink_budget_covering_sequence(arch):
    """A selection that never evicts + quant == quant alone (same stored tokens, same logits)."""
    model = tiny_model(arch)
    ids = _ids(40)
    alone = decode_logits(model, ids, kvcompress.make_cache(SMALL.format(bits=4), model=model))
    spec = "sink(budget=500)+" + SMALL.format(bits=4)
    cache = kvcompress.make_cache(spec, model=model)
    composed = decode_logits(model, ids, cache)
    assert cache.layers[0].evictions == 0
    assert torch.allclose(composed, alone, atol=1e-5)


def test_composes_with_evicting_sink():
    """sink(budget)+quant keeps `budget` slots, the stores shrink to them, logits stay near sink alone."""
    model = tiny_model()
    ids = _ids(30)
    spec = "sink(budget=48,step=8)"
    ref = decode_logits(model, ids, kvcompress.make_cache(spec, model=model), steps=40)
    cache = kvcompress.make_cache(spec + "+quant(bits=8,group_size=8,sink=2,window=8)", model=model)
    got = decode_logits(model, ids, cache, steps=40)
    layer = cache.layers[0]
    assert layer.evictions > 0 and layer.store.length == layer.slots.length <= 48 + 8
    assert layer.store.m > 0
    assert float((got - ref).norm() / ref.norm()) < 0.03


def test_h2o_style_selection_with_quant_when_available():
    if "h2o" not in {p.name for p in kvcompress.list_policies()}:
        pytest.skip("kvcompress-h2o is not installed beside kvcompress-quant")
    model = tiny_model()
    cache = kvcompress.make_cache("h2o(budget=32,step=4)+quant(bits=8,group_size=8,sink=2,window=8)",
                                  model=model)
    got = decode_logits(model, _ids(30), cache, steps=20)
    assert torch.isfinite(got).all() and cache.layers[0].store.length <= 36


def _generate(model, prompts, spec, new_tokens=12, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cache = kvcompress.make_cache(spec, model=model)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, width:], torch.stack(out.logits, 1)


def test_generate_batch_with_left_padding_matches_each_prompt_alone():
    model = tiny_model()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (7, 40, 23)]
    spec = "quant(bits=8,group_size=8,sink=2,window=8,key_axis=token)"
    batch, batch_scores = _generate(model, prompts, spec)
    for i, p in enumerate(prompts):
        alone, alone_scores = _generate(model, [p], spec)
        assert batch[i].tolist() == alone[0].tolist(), f"prompt {i} differs in a batch"
        rel = (batch_scores[i] - alone_scores[0]).norm() / alone_scores[0].norm()
        assert rel < 0.02


def test_generate_sampling_runs():
    model = tiny_model("qwen2")
    cache = kvcompress.make_cache("quant(bits=4,group_size=8,sink=2,window=8)", model=model)
    torch.manual_seed(0)
    out = model.generate(_ids(20, batch=2), past_key_values=cache, max_new_tokens=30, do_sample=True,
                         top_k=20, pad_token_id=0)
    assert out.shape == (2, 50) and cache.layers[0].store.m > 0
