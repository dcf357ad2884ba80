"""CPU decode speed, SmolLM2-135M at a 2k context: full (DynamicCache) vs quant, same process, interleaved.

  python cpu_speed.py [--context 2048] [--steps 24] "quant(bits=4)" "quant(bits=8)" ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smollm2 import load  # noqa: E402

import kvcompress  # noqa: E402


@torch.no_grad()
def decode_ms(model, ids, spec, steps):
    cache = kvcompress.make_cache(spec, model=model)
    for s in range(0, ids.shape[1], 256):
        out = model(input_ids=ids[:, s : s + 256], past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        token = out.logits[:, -1:].argmax(-1)
    times.sort()
    return times[len(times) // 2] * 1e3, kvcompress.kv_bytes(cache)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load()
    ids = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))
    res: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for spec in ["full", *args.specs]:
            ms, kvb = decode_ms(model, ids, spec, args.steps)
            res.setdefault(spec, []).append(ms)
            print(json.dumps({"spec": spec, "ms_per_token": ms, "kv_bytes": kvb}), flush=True)
    full = min(res["full"])
    for spec in args.specs:
        print(json.dumps({"summary": spec, "ms_per_token": min(res[spec]), "full_ms_per_token": full,
                          "ratio_vs_full": min(res[spec]) / full, "context": args.context, "device": "cpu"}))


if __name__ == "__main__":
    main()
