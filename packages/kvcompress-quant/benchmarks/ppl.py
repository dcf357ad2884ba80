"""Streaming perplexity of SmolLM2-135M on WikiText-2 under KV-cache policies (one token per step).

Usage: python ppl.py --tokens 2048 --out results.jsonl full "quant(bits=4)" quanto:4 ...
A spec ``quanto:N`` is transformers' QuantizedCache with optimum-quanto (residual 128, group 64).
Each result is appended as one JSON line; finished specs in --out are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm2 import load

DATA = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def make(spec: str, model):
    import kvcompress

    if spec.startswith("quanto:"):
        from transformers import QuantizedCache

        return QuantizedCache("quanto", model.config, nbits=int(spec.split(":")[1]), q_group_size=64,
                              residual_length=128)
    return kvcompress.make_cache(spec, model=model)


@torch.no_grad()
def streaming_nll(model, ids: torch.Tensor, spec: str, chunk: int) -> tuple[float, float, int]:
    """Mean NLL of tokens 1..n-1, feeding ``chunk`` tokens per forward through the cache.

    With ``chunk <= window`` the tokens of a chunk are in quant's full-precision window anyway, so this
    equals token-by-token decoding up to when a block is quantized (within one chunk).
    """
    import kvcompress

    cache = make(spec, model)
    n = ids.shape[1]
    nll, t0 = 0.0, time.perf_counter()
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        logits = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, start + 1 : end + 1],
                                                       reduction="sum"))
    return nll / (n - 1), time.perf_counter() - t0, kvcompress.kv_bytes(cache)


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="ppl.jsonl")
    ap.add_argument("--chunk", type=int, default=16, help="tokens per forward (<= quant's window)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["spec"] for line in f if line.strip()}
    model, tok = load()
    with open(DATA, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text[:40000], return_tensors="pt").input_ids[:, : args.tokens]
    for spec in args.specs:
        if spec in done:
            continue
        nll, secs, kvb = streaming_nll(model, ids, spec, args.chunk)
        row = {"spec": spec, "tokens": ids.shape[1], "chunk": args.chunk, "nll": nll,
               "ppl": math.exp(nll),
               "seconds": secs, "kv_bytes": kvb,
               "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized, fp32)"}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
