"""The trainer end to end on a tiny random-init model and a short text: the command writes a safetensors file
with its metadata, the policy loads it, its scores decide what is kept; same seed, same file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import kvcompress
from kvcompress_learned.cli import main
from kvcompress_learned.text import half

WORDS = ("the cat sat on a mat while rain fell over old stone bridges and river boats drifted past quiet "
         "houses where people read long letters about distant wars , harvests , storms and songs .").split()


def short_text(articles: int = 6, lines: int = 6) -> str:
    """A WikiText-like text of a few articles, each a heading line and sentences of a small vocabulary."""
    g = torch.Generator().manual_seed(0)
    out = []
    for a in range(articles):
        out.append(f" = Article {a} = \n")
        for _ in range(lines):
            idx = torch.randint(0, len(WORDS), (30,), generator=g).tolist()
            out.append(" " + " ".join(WORDS[i] for i in idx) + " \n")
    return "".join(out)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama with a word-level tokenizer over ``WORDS``, saved as a transformers dir."""
    where = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "=", "Article", *map(str, range(10)),
                                         *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(where)
    tiny_model("llama", vocab=len(vocab)).save_pretrained(where)
    return where


def run_train(tiny_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--tokens", "600",
                 "--seq-len", "120", "--horizon", "16", "--units", "8", "--epochs", "4", "--no-progress",
                 *extra])


def test_train_writes_a_scorer_the_policy_loads_and_uses(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(short_text(), encoding="utf-8")
    out = tmp_path / "w.safetensors"
    assert run_train(tiny_dir, data, out) == 0
    assert "wrote" in capsys.readouterr().out
    tensors, meta = kvcompress.load_weights(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "w1": (2, 64, 8), "b1": (2, 8), "w2": (2, 8, 2), "b2": (2, 2), "age": (2, 2, 20)}
    assert meta["label"] == "h2o" and meta["horizon"] == "16"
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["training_text"].startswith("text.txt (first half by article: 3 articles")
    assert meta["version"].startswith("kvcompress-learned ") and meta["seed"] == "0"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    held_out = half(data, "second").text
    ids = AutoTokenizer.from_pretrained(tiny_dir)(held_out, return_tensors="pt").input_ids[:, :80]
    kept = {}
    for spec in (f"learned(budget=24,sink=2,recent=4,weights='{out}')", "sink(budget=24,sink=2)"):
        cache = kvcompress.make_cache(spec, model=model)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        kept[spec.split("(")[0]] = cache.layers[0].slots.view("positions")
    assert cache.layers[0].slots.length == 24
    assert not torch.equal(kept["learned"], kept["sink"])  # the scores, not recency, chose the middle tokens
    assert (kept["learned"][..., :2] == torch.arange(2)).all() and (kept["learned"][..., -4:] >= 76).all()


def test_same_seed_same_file_other_seed_other_weights(tiny_dir, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(short_text(), encoding="utf-8")
    files = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    for path, seed in zip(files, ("0", "0", "1"), strict=True):
        assert run_train(tiny_dir, data, path, "--seed", seed, "--label", "h2o") == 0
    (a, meta), (b, _), (c, _) = (kvcompress.load_weights(p) for p in files)
    assert meta["label"] == "h2o" and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w1"], c["w1"])


def test_bad_arguments_are_named(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(short_text(), encoding="utf-8")
    assert run_train(tiny_dir, data, tmp_path / "w.pt") == 2
    assert "parameter 'out' is" in capsys.readouterr().err and not (tmp_path / "w.pt").exists()
    assert run_train(tiny_dir, data, tmp_path / "w.safetensors", "--horizon", "0") == 2
    assert "parameter 'horizon' is 0; allowed: an integer >= 1" in capsys.readouterr().err


def test_python_dash_m_reaches_the_same_command():
    out = subprocess.run([sys.executable, "-m", "kvcompress_learned", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--label {future,h2o}" in out and "--tokens" in out and "--seed" in out


def test_also_fits_the_other_label_from_the_same_collection(tiny_dir, tmp_path, capsys):
    """--also future FILE: one collection, two files; each equals the file its own run writes."""
    data = tmp_path / "text.txt"
    data.write_text(short_text(), encoding="utf-8")
    both = tmp_path / "h2o.safetensors", tmp_path / "future.safetensors"
    assert run_train(tiny_dir, data, both[0], "--also", "future", str(both[1])) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    alone = tmp_path / "future-alone.safetensors"
    assert run_train(tiny_dir, data, alone, "--label", "future") == 0
    (h, hmeta), (f, fmeta), (a, ameta) = (kvcompress.load_weights(p) for p in (*both, alone))
    assert hmeta["label"] == "h2o" and fmeta["label"] == "future" and fmeta == ameta
    assert all(torch.equal(f[k], a[k]) for k in a) and not torch.equal(f["w1"], h["w1"])
    assert run_train(tiny_dir, data, both[0], "--also", "other", str(both[1])) == 2
    assert "parameter 'also' is 'other'; allowed: future, h2o" in capsys.readouterr().err
