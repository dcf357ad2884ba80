"""``full`` streaming perplexity on SmolLM2 agrees with a plain ``model(ids, labels=ids)``."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress_harness.runner import RunConfig, run


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [256, 64])
def test_full_perplexity_matches_plain_forward(smol, wikitext_file, tmp_path, chunk):
    cfg = RunConfig(policies=["full"], tasks=["perplexity"], lengths=[256], chunk=chunk, device="cpu",
                    data_file=str(wikitext_file), out=str(tmp_path / "r.jsonl"), progress=False)
    (record,) = run(cfg, loaded=smol)
    assert record["status"] == "ok", record.get("traceback")
    text = wikitext_file.read_bytes().decode("utf-8").replace("\r\n", "\n")
    ids = smol.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        plain = math.exp(float(smol.model(ids, labels=ids).loss))
    assert record["metrics"]["tokens_scored"] == 255
    assert record["metrics"]["ppl"] == pytest.approx(plain, rel=0.005)
