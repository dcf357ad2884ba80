"""The core's extension points: plans that merge, the per-slot bias, state bound per layer, stores that see
positions and RoPE, transformers' layer contract, no global side effect, safetensors-only weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import greedy_logits, tiny_model
from example_policies import LinearKeyScore, MergeNearest, PreRope
from transformers import DynamicCache

import kvcompress
from kvcompress import Plan
from kvcompress.attention import decode_attention
from kvcompress.plugins import Entry


@pytest.fixture
def registered(monkeypatch):
    """The example policies registered as a plugin would register them."""
    reg = kvcompress.get_registry()
    for cls in (MergeNearest, LinearKeyScore, PreRope):
        monkeypatch.setitem(reg.policies, cls.name, Entry(cls.name, cls, "tests", "0", cls.__doc__))
    return reg


def _prefill(model, cache, n=20, seed=0, batch=1):
    ids = torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


def _step(model, cache, tokens):
    with torch.no_grad():
        return model(tokens, past_key_values=cache, use_cache=True).logits


# -- the per-slot bias: a token stored n times == stored once with bias log n ----------------------------------

def test_bias_identity_on_the_torch_decode_path():
    g = torch.Generator().manual_seed(0)
    b, hkv, grp, s, d, n = 2, 3, 2, 9, 16, 4
    q = torch.randn(b, hkv * grp, 1, d, generator=g)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    dup = torch.cat([torch.arange(s), torch.full((n - 1,), 5)])  # slot 5 stored n times
    bias = torch.zeros(b, hkv, s)
    bias[..., 5] = math.log(n)
    want, w_dup = decode_attention(q, k[:, :, dup], v[:, :, dup], None, d**-0.5)
    got, w_once = decode_attention(q, k, v, None, d**-0.5, bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w_once[..., 5], w_dup[..., 5] + w_dup[..., s:].sum(-1))  # observed mass too


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("new_tokens", [1, 3])  # a decode step (torch path) and a chunk (sdpa with a mask)
@pytest.mark.parametrize("observe", [False, True])
def test_bias_identity_through_the_model(arch, new_tokens, observe):
    """Slots 0..9 plus slot 10 stored 5 times, against slots 0..10 with bias log 5 on slot 10: same logits
    for the next forward, on every attention path the core takes (observing or not)."""
    model = tiny_model(arch)
    spec = "h2o(budget=200)" if observe else "window(budget=200)"
    if observe and "h2o" not in kvcompress.get_registry().policies:
        pytest.skip("kvcompress-h2o is not installed (an observing policy is needed for this path)")
    caches = [kvcompress.make_cache(spec, model=model) for _ in range(2)]
    for cache in caches:
        _prefill(model, cache)
    h = caches[0].layers[0].slots.tensors["valid"].shape[1]
    dup = torch.cat([torch.arange(11), torch.full((4,), 10)]).view(1, 1, -1).expand(1, h, -1)
    once = torch.arange(11).view(1, 1, -1).expand(1, h, -1)
    bias = torch.zeros(1, h, 11)
    bias[..., 10] = math.log(5)
    for layer in caches[0].layers:
        layer._apply(Plan(keep=dup), target=200)
    for layer in caches[1].layers:
        layer._apply(Plan(keep=once, bias=bias), target=200)
    tokens = torch.randint(1, 96, (1, new_tokens), generator=torch.Generator().manual_seed(1))
    want, got = _step(model, caches[0], tokens), _step(model, caches[1], tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert caches[1].layers[0].bias_view().shape == (1, h, 11 + new_tokens)


def test_no_bias_tensor_until_a_plan_sets_one():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=8,step=4)", model=model)
    greedy_logits(model, torch.randint(1, 96, (1, 30)), cache, steps=3)
    assert all(layer.bias_view() is None and "bias" not in layer.slots.tensors for layer in cache.layers)


# -- worked example 1: a merging policy ---------------------------------------------------------------------------

def test_merge_of_n_copies_equals_one_token_with_log_n_bias(registered):
    model = tiny_model("llama")
    merged, reference = (kvcompress.make_cache("merge-nearest(budget=200)", model=model),
                         kvcompress.make_cache("window(budget=200)", model=model))
    for cache in (merged, reference):
        _prefill(model, cache)
    # store slot 10 five times in the merging cache, then let its plan merge them back into one slot
    for layer in merged.layers:
        layer._apply(Plan(keep=torch.cat([torch.arange(11), torch.full((4,), 10)]).view(1, 1, -1).expand(1, 2, -1)),
                     target=200)
        ctx = layer.context()
        keep = torch.arange(11).view(1, 1, -1).expand(1, 2, -1)
        into = torch.cat([torch.arange(11), torch.full((4,), 10)]).view(1, 1, -1).expand(1, 2, -1)
        layer._apply(kvcompress.merge_into(ctx, keep, into), target=200)
        assert torch.allclose(layer.bias_view()[..., 10], torch.tensor(math.log(5)))
    for layer in reference.layers:
        layer._apply(Plan(keep=torch.arange(11).view(1, 1, -1).expand(1, 2, -1),
                          bias=torch.zeros(1, 2, 11).index_fill_(2, torch.tensor([10]), math.log(5))), target=200)
    token = torch.tensor([[7]])
    torch.testing.assert_close(_step(model, merged, token), _step(model, reference, token), rtol=1e-5, atol=1e-5)


def test_merging_policy_keeps_budget_and_carries_the_evicted_mass(registered):
    model = tiny_model("qwen2")
    cache = kvcompress.make_cache("merge-nearest(budget=12,step=4)", model=model)
    greedy_logits(model, torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(3)), cache, steps=6)
    for layer in cache.layers:
        assert layer.slots.length < 12 + 4
        counts = layer.bias_view().exp()
        # every token seen is accounted for by exactly one slot: merged slots stand for several
        torch.testing.assert_close(counts.sum(-1), torch.full((2, 2), float(cache.get_seq_length())))
        keys = layer.keys
        assert keys.shape == (2, 2, layer.slots.length, 16)


def test_merging_policy_with_a_covering_budget_equals_dynamic_cache(registered):
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    want = greedy_logits(model, ids, DynamicCache(), steps=10)
    got = greedy_logits(model, ids, kvcompress.make_cache("merge-nearest(budget=64)", model=model), steps=10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_added_slots_take_their_place_by_position():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=100)", model=model)
    _prefill(model, cache, n=12)
    layer = cache.layers[0]
    keys, values = layer.keys.clone(), layer.values.clone()
    keep = torch.tensor([0, 1, 8, 9, 10, 11]).view(1, 1, -1).expand(1, 2, -1)
    added = kvcompress.Added(keys=keys[:, :, 2:4].mean(2, keepdim=True), values=values[:, :, 2:4].mean(2, keepdim=True),
                             positions=torch.full((1, 2, 1), 2), bias=torch.full((1, 2, 1), math.log(2)))
    layer._apply(Plan(keep=keep, added=added), target=100)
    assert layer.slots.view("positions")[0, 0].tolist() == [0, 1, 2, 8, 9, 10, 11]
    torch.testing.assert_close(layer.keys[:, :, 2], keys[:, :, 2:4].mean(2))
    torch.testing.assert_close(layer.keys[:, :, 3:], keys[:, :, 8:])
    assert layer.bias_view()[0, 0].tolist() == pytest.approx([0, 0, math.log(2), 0, 0, 0, 0])


def test_a_plan_larger_than_the_target_is_refused():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=100)", model=model)
    _prefill(model, cache, n=12)
    with pytest.raises(ValueError, match="plan keeps 12 slots; allowed: at most the target 8"):
        cache.layers[0]._apply(Plan(keep=torch.arange(12).view(1, 1, -1).expand(1, 2, -1)), target=8)


# -- worked example 2: a scorer with weights loaded at setup, bound per layer -----------------------------------

def _linear_weights(tmp_path, model, **meta):
    info = kvcompress.ModelInfo.from_model(model)
    metadata = {"architecture": info.architecture, "num_layers": str(info.num_layers),
                "head_dim": str(info.head_dim), **meta}
    w = torch.randn(info.num_layers, info.num_kv_heads, info.head_dim, generator=torch.Generator().manual_seed(0))
    return kvcompress.save_weights(tmp_path / "linear.safetensors", {"w": w}, metadata), w


def test_scorer_loads_weights_at_setup_and_binds_each_layer(registered, tmp_path):
    model = tiny_model("llama")
    path, w = _linear_weights(tmp_path, model)
    cache = kvcompress.make_cache(f"linear-key(budget=8,weights='{path}')", model=model)
    assert isinstance(cache.shared["selection"], torch.Tensor)  # loaded once, at make_cache
    full = DynamicCache()
    _prefill(model, full, n=30)
    _prefill(model, cache, n=30)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.bound, w[i])  # this layer's slice, on its device
        score = torch.einsum("bhsd,hd->bhs", full.layers[i].keys.float(), w[i])  # a plain reference
        want = score.topk(8, dim=-1).indices.sort(-1).values
        assert torch.equal(layer.slots.view("positions").long(), want)


def test_weights_for_another_model_are_refused(registered, tmp_path):
    model = tiny_model("llama")
    path, _ = _linear_weights(tmp_path, tiny_model("qwen2"))
    with pytest.raises(kvcompress.WeightsError, match=r"made for another model \(architecture: file has "
                                                      r"'Qwen2ForCausalLM', model has 'LlamaForCausalLM'\)"):
        kvcompress.make_cache(f"linear-key(budget=8,weights='{path}')", model=model)


@pytest.mark.parametrize("name", ["scorer.pt", "scorer.safetensors"])
def test_pickle_weights_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)  # a pickle (zip) file, whatever its name says
    with pytest.raises(kvcompress.WeightsError, match="safetensors files only"):
        kvcompress.load_weights(path)


def test_parsing_a_spec_loads_nothing(registered, tmp_path):
    policy, _ = kvcompress.build_policies("linear-key(budget=8,weights='/no/such/file.safetensors')")
    assert policy.weights == "/no/such/file.safetensors"  # validated as configuration; never opened
    assert kvcompress.validate_spec("linear-key(budget=8, weights='/no/such/file.safetensors')")


# -- worked example 3: a store that keeps keys before RoPE -----------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_pre_rope_store_round_trip_equals_dynamic_cache(registered, arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    want = greedy_logits(model, ids, DynamicCache(), steps=8)
    cache = kvcompress.make_cache("full+pre-rope", model=model)
    got = greedy_logits(model, ids, cache, steps=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    store = cache.layers[0].store
    raw, rotated = store.buf.view("keys"), cache.layers[0].keys
    assert not torch.allclose(raw, rotated)  # what is stored really is before RoPE


def test_pre_rope_store_under_eviction_and_merging(registered):
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(5))
    want = greedy_logits(model, ids, kvcompress.make_cache("merge-nearest(budget=10,step=4)", model=model), steps=6)
    got = greedy_logits(model, ids, kvcompress.make_cache("merge-nearest(budget=10,step=4)+pre-rope", model=model),
                        steps=6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_store_needing_rope_without_a_model_says_to_pass_it(registered):
    with pytest.raises(kvcompress.ModelRequiredError, match="pass the model"):
        kvcompress.make_cache("full+pre-rope")


# -- per-layer state ------------------------------------------------------------------------------------------

def test_two_caches_from_one_spec_share_no_state():
    model = tiny_model("llama")
    spec = "random(budget=6,step=2,seed=3)"
    a, b = kvcompress.make_cache(spec, model=model), kvcompress.make_cache(spec, model=model)
    assert a.selection == b.selection
    before = dataclasses.asdict(a.selection)
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    # interleaved: if the generator were shared, b would draw what a left and keep other tokens
    _prefill(model, a, n=12)
    _step(model, a, torch.tensor([[3]]))
    with torch.no_grad():
        model(ids, past_key_values=b, use_cache=True)
    _step(model, b, torch.tensor([[3]]))
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.bound is not lb.bound
        assert torch.equal(la.slots.view("positions"), lb.slots.view("positions"))
    assert a.layers[0].bound is not a.layers[1].bound
    assert dataclasses.asdict(a.selection) == before  # the policy is configuration only


# -- transformers' layer contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["window(budget=16,step=4)", "sink(budget=12)", "random(budget=10,step=3)"])
def test_layer_keys_values_are_what_is_stored(spec):
    model = tiny_model("llama")
    cache = kvcompress.make_cache(spec, model=model)
    greedy_logits(model, torch.randint(1, 96, (2, 40)), cache, steps=5)
    stored = max(layer.keys.shape[-2] for layer in cache.layers)
    assert stored == max(layer.slots.length for layer in cache.layers) < 20
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == layer.values.shape == (2, 2, layer.slots.length, 16)
        keys, values = cache[i]
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_crop_means_what_it_means_in_transformers():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=64)", model=model)
    _prefill(model, cache, n=20)
    cache.crop(-3)  # remove the last 3
    assert cache.get_seq_length() == 17 and cache.layers[0].keys.shape[-2] == 17
    cache.crop(12)  # the legacy positive form: keep 12
    assert cache.get_seq_length() == 12
    cache.crop(15)  # longer than held: nothing to do
    assert cache.get_seq_length() == 12


def test_reusing_a_cache_for_a_new_prompt_says_what_to_do():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("window(budget=64)", model=model)
    model.generate(torch.randint(1, 96, (1, 20)), past_key_values=cache, max_new_tokens=3, do_sample=False)
    with pytest.raises(kvcompress.CacheReuseError, match="make a new cache"):
        model.generate(torch.randint(1, 96, (1, 8)), past_key_values=cache, max_new_tokens=3, do_sample=False)
    cache.reset()
    out = model.generate(torch.randint(1, 96, (1, 8)), past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


# -- no global side effect ---------------------------------------------------------------------------------------

def test_a_second_model_keeps_transformers_own_attention():
    from transformers import AttentionInterface

    sdpa_before = AttentionInterface._global_mapping["sdpa"]
    first, second = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = torch.randint(1, 96, (1, 12))
    with torch.no_grad():
        before = second(ids).logits
    kvcompress.make_cache("sink(budget=8)", model=first)
    assert first.config._attn_implementation == "kvcompress"
    assert second.config._attn_implementation == "sdpa"
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_before
    with torch.no_grad():
        assert torch.equal(second(ids).logits, before)
    kvcompress.detach(first)
    assert first.config._attn_implementation == "sdpa"


def test_import_is_light():
    """``import kvcompress``, the built-ins' registration, listing and validating import neither torch nor
    transformers (the other installed plugins are left out: each package tests its own import)."""
    import subprocess
    import sys

    code = ("import sys, kvcompress, kvcompress.plugins as p; "
            "eps = p._entry_points; p._entry_points = lambda: [e for e in eps() if e.name == 'builtins']; "
            "kvcompress.validate_spec('sink(budget=8)'); kvcompress.list_policies(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
