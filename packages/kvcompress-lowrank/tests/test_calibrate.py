"""Calibration end to end on a tiny random-init model with a real (trained) tokenizer: the file, its metadata
and curves, the PCA against scikit-learn's on the same keys and values, the CLI, and the checks on loading."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys

import pytest
import torch
from conftest import HEAD_DIM, greedy_logits, ids, tiny_model
from transformers import DynamicCache, PreTrainedTokenizerFast

import kvcompress
from kvcompress_lowrank.calibrate import calibrate, curves_path, windows

TEXT = (
    codecs.decode(
        "Ornhgvshy vf orggre guna htyl. Rkcyvpvg vf orggre guna vzcyvpvg. Fvzcyr vf orggre guna pbzcyrk. "
        "Pbzcyrk vf orggre guna pbzcyvpngrq. Syng vf orggre guna arfgrq. Fcnefr vf orggre guna qrafr. "
        "Ernqnovyvgl pbhagf. Fcrpvny pnfrf nera'g fcrpvny rabhtu gb oernx gur ehyrf. ",
        "rot13",
    )
    * 40
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-pair tokenizer trained on the text (96 tokens: the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=96, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tokenizer):
    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("calib") / "tiny.safetensors"
    calibrate(model, tokenizer, TEXT, out, tokens=512, seq_len=128, skip=4, progress=False, source="zen")
    return model, out


def test_file_metadata_and_curves(calibrated):
    model, path = calibrated
    tensors, meta = kvcompress.load_weights(path)
    assert meta["architecture"] == "LlamaForCausalLM" and meta["num_kv_heads"] == "2"
    assert meta["head_dim"] == str(HEAD_DIM) and meta["tokens"] == str(4 * 124) and meta["source"] == "zen"
    for kind in ("keys", "values"):
        basis, eig = tensors[f"{kind}.basis"], tensors[f"{kind}.eigenvalues"]
        assert basis.shape == (2, 2, HEAD_DIM, HEAD_DIM) and bool((eig[..., :-1] >= eig[..., 1:]).all())
        torch.testing.assert_close(
            basis.transpose(-1, -2) @ basis, torch.eye(HEAD_DIM).expand_as(basis), rtol=1e-5, atol=1e-5
        )
    curves = json.loads(curves_path(path).read_text())["explained_variance"]
    assert set(curves) >= {"keys", "keys_rope", "values", "joint.keys"}
    assert abs(curves["keys"][0][0][-1] - 1.0) < 1e-6 and len(curves["joint.values"][0]) == 2 * HEAD_DIM


def test_pca_equals_scikit_learn_on_the_same_keys_and_values(calibrated, tokenizer):
    from sklearn.decomposition import PCA

    model, path = calibrated
    tensors, _ = kvcompress.load_weights(path)
    seen = {"keys": {}, "values": {}}

    def keep(name, i):
        def hook(module, args, out):  # Llama: k_proj / v_proj outputs are the keys before RoPE / the values
            seen[name].setdefault(i, []).append(out.view(out.shape[0], out.shape[1], 2, HEAD_DIM)[:, 4:])

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(keep("keys", i)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(keep("values", i)))
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        for chunk in windows(text_ids, 512, 128):
            model(chunk[None])
    for handle in handles:
        handle.remove()
    for kind in ("keys", "values"):
        for i in range(2):
            x = torch.cat(seen[kind][i], dim=1)[0].double()  # [n, H, D]
            for h in range(2):
                ref = PCA().fit(x[:, h].numpy())
                n = x.shape[0]
                torch.testing.assert_close(
                    tensors[f"{kind}.mean"][i, h].double(), torch.from_numpy(ref.mean_), rtol=1e-4, atol=1e-5
                )
                torch.testing.assert_close(
                    tensors[f"{kind}.eigenvalues"][i, h].double(),
                    torch.from_numpy(ref.explained_variance_) * (n - 1) / n,
                    rtol=1e-3,
                    atol=1e-6,
                )
                top = torch.from_numpy(ref.components_[:4]).float()  # well separated: same up to sign
                cos = (top * tensors[f"{kind}.basis"][i, h][:, :4].T).sum(-1).abs()
                assert bool((cos > 0.999).all()), cos


def test_lowrank_uses_the_file_full_rank_exact_and_ranks_by_energy(calibrated):
    model, path = calibrated
    prompt = ids(40)
    want = greedy_logits(model, prompt, DynamicCache(), steps=10)
    spec = (
        f"lowrank(calibration='{path}',k_rank={HEAD_DIM},v_rank={HEAD_DIM},coeff_bits=None,window=4,sink=2)"
    )
    got = greedy_logits(model, prompt, kvcompress.make_cache(spec, model=model), steps=10)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cache = kvcompress.make_cache(f"lowrank(calibration='{path}',energy=0.9,coeff_bits=8)", model=model)
    tensors, _ = kvcompress.load_weights(path)
    share = tensors["keys.eigenvalues"].cumsum(-1) / tensors["keys.eigenvalues"].sum(-1, keepdim=True)
    want_ranks = ((share < 0.9).sum(-1) + 1).max(-1).values.tolist()
    assert cache.shared["representation"].k_ranks == want_ranks
    int4 = kvcompress.make_cache(f"lowrank(calibration='{path}',energy=0.9,coeff_bits=4)", model=model)
    assert int4.shared["representation"].k_ranks == [r + r % 2 for r in want_ranks]  # two codes per byte


def test_another_models_file_is_refused(calibrated):
    _, path = calibrated
    with pytest.raises(
        kvcompress.WeightsError,
        match=r"made for another model \(architecture: file has "
        r"'LlamaForCausalLM', model has 'Qwen2ForCausalLM'",
    ):
        kvcompress.make_cache(f"lowrank(calibration='{path}')", model=tiny_model("qwen2"))
    with pytest.raises(kvcompress.WeightsError, match="num_layers: file has '2', model has '3'"):
        kvcompress.make_cache(
            f"lowrank(calibration='{path}')", model=tiny_model("llama", num_hidden_layers=3)
        )


@pytest.mark.parametrize("name", ["calib.pt", "calib.safetensors"])
def test_pickle_is_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"keys.basis": torch.zeros(2)}, path)  # a pickle, whatever its name says
    with pytest.raises(kvcompress.WeightsError, match="safetensors files only"):
        kvcompress.make_cache(f"lowrank(calibration='{path}')", model=tiny_model("llama"))


def test_cli_calibrates_a_saved_model(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "cli.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvcompress_lowrank",
            "calibrate",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--tokens",
            "256",
            "--seq-len",
            "64",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.exists() and curves_path(out).exists()


def test_cli_refuses_to_write_anything_but_safetensors(tmp_path, capsys):
    from kvcompress_lowrank.cli import main

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    assert main(["calibrate", "--model", "unused", "--data", str(data), "--out", str(tmp_path / "x.pt")]) == 2
    assert "--out: " in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
