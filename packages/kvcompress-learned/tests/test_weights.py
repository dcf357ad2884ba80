"""Which weights a cache uses, and which it refuses: another model's, pickle files, files that are not a
scorer; 'auto' without shipped weights names the train command; 'random' has the right shape."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, weights_file

import kvcompress
from kvcompress_learned.files import TRAIN_COMMAND, resolve, shipped


def test_weights_for_another_architecture_are_refused(llama, tmp_path):
    path = weights_file(tmp_path / "qwen.safetensors", tiny_model("qwen2"))
    with pytest.raises(kvcompress.WeightsError, match=r"made for another model \(architecture: file has "
                                                      r"'Qwen2ForCausalLM', model has 'LlamaForCausalLM'\)"):
        kvcompress.make_cache(f"learned(budget=64,weights='{path}')", model=llama)


def test_weights_for_other_dimensions_are_refused(llama, tmp_path):
    path = weights_file(tmp_path / "deep.safetensors", tiny_model("llama", layers=3))
    with pytest.raises(kvcompress.WeightsError, match="num_layers: file has '3', model has '2'"):
        kvcompress.make_cache(f"learned(budget=64,weights='{path}')", model=llama)


@pytest.mark.parametrize("name", ["scorer.pt", "scorer.safetensors"])
def test_pickle_files_are_refused(llama, tmp_path, name):
    path = tmp_path / name
    torch.save({"w1": torch.zeros(2, 64, 8)}, path)  # a pickle (zip) file, whatever its name says
    with pytest.raises(kvcompress.WeightsError, match="safetensors files only"):
        kvcompress.make_cache(f"learned(budget=64,weights='{path}')", model=llama)


def test_a_safetensors_file_that_is_no_scorer_is_refused(llama, tmp_path):
    path = weights_file(tmp_path / "other.safetensors", llama, format="something-else/2")
    with pytest.raises(kvcompress.WeightsError,
                       match="is not a learned scorer .*'format' is 'something-else/2'"):
        kvcompress.make_cache(f"learned(budget=64,weights='{path}')", model=llama)


def test_a_missing_file_is_named(llama):
    with pytest.raises(kvcompress.WeightsError, match="'/no/such.safetensors' does not exist"):
        kvcompress.make_cache("learned(budget=64,weights='/no/such.safetensors')", model=llama)


def test_auto_without_shipped_weights_names_the_train_command(llama):
    with pytest.raises(kvcompress.WeightsError) as err:
        kvcompress.make_cache("learned(budget=64)", model=llama)
    assert ("no shipped weights fit LlamaForCausalLM (2 layers, hidden size 64, 2 kv heads of dim 16)"
            in str(err.value))
    assert TRAIN_COMMAND in str(err.value)


def test_weights_are_loaded_once_per_cache_and_bound_per_layer(llama, tmp_path):
    path = weights_file(tmp_path / "w.safetensors", llama)
    cache = kvcompress.make_cache(f"learned(budget=64,weights='{path}')", model=llama)
    shared = cache.shared["selection"]
    assert shared["metadata"]["label"] == "random" and shared["tensors"]["w1"].shape == (2, 64, 8)
    with torch.no_grad():
        llama(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache)
    torch.testing.assert_close(cache.layers[1].bound.w1, shared["tensors"]["w1"][1])


def test_random_weights_have_the_shape_of_the_model():
    """weights='random' needs only the model's dims: e.g. Llama-3-8B's (32 layers, hidden 4096, 8 kv
    heads)."""
    info = kvcompress.ModelInfo(config=object(), architecture="LlamaForCausalLM", num_layers=32,
                                hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128)
    tensors, meta = resolve("random", info, seed=1)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "w1": (32, 4096, 16), "b1": (32, 16), "w2": (32, 16, 8), "b2": (32, 8), "age": (32, 8, 20)}
    assert meta["label"] == "random" and meta["num_kv_heads"] == "8"
    again, _ = resolve("random", info, seed=1)
    assert torch.equal(again["w1"], tensors["w1"])


def test_parsing_a_spec_loads_nothing():
    policy, _ = kvcompress.build_policies("learned(budget=64,weights='/no/such/file.safetensors')")
    assert policy.weights == "/no/such/file.safetensors"


def test_shipped_weights_are_small_safetensors_files():
    files = shipped()
    assert files, "the package ships at least one scorer"
    for path in files.values():
        assert path.suffix == ".safetensors" and path.stat().st_size < 1_000_000
