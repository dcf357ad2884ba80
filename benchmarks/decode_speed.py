"""Decode ms/token of cache policies against `full` on SmolLM2-135M, same process, as a ratio.

    python benchmarks/decode_speed.py --context 2048 --tokens 64 --rounds 3 \
        --policy "window(budget=256)" --policy "sink(budget=256)" --policy "random(budget=256)"

Each round prefills the same context for every policy (in a shuffled order) and times each
greedy decode step; the reported figure is the median step over all rounds, so a noisy
neighbour on the machine shifts every policy alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import kvcompress

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "kvcompress" / "tests"))
from real_model import load_smollm2, wikitext_ids  # noqa: E402


def decode_steps(model, ids: torch.Tensor, spec: str, tokens: int) -> tuple[list[float], int]:
    cache = kvcompress.make_cache(spec, model=model)
    times = []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(tokens):
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return times, kvcompress.kv_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tok = load_smollm2()
    ids = wikitext_ids(tok, args.context)
    specs = ["full", *args.policy]
    steps: dict[str, list[float]] = {s: [] for s in specs}
    nbytes: dict[str, int] = {}
    decode_steps(model, ids[:, :256], "full", 4)  # warm-up
    for _ in range(args.rounds):
        for spec in random.sample(specs, len(specs)):
            times, nbytes[spec] = decode_steps(model, ids, spec, args.tokens)
            steps[spec].extend(times[2:])
    full_ms = statistics.median(steps["full"]) * 1e3
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"context {args.context}, {args.tokens} tokens x {args.rounds} rounds")
    print("| policy | decode ms/token | ratio to full | KV bytes | KV fraction of full |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for spec in specs:
        ms = statistics.median(steps[spec]) * 1e3
        rows.append({"policy": spec, "ms_per_token": ms, "ratio": ms / full_ms, "kv_bytes": nbytes[spec]})
        print(f"| {spec} | {ms:.1f} | {ms / full_ms:.3f} | {nbytes[spec]:,} | {nbytes[spec] / nbytes['full']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
