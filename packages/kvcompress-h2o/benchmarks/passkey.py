"""Passkey retrieval with SmolLM2-135M: a 5-digit key hidden at several depths of a 2-3k token prompt.

Each policy's budget is ``--fraction`` of the prompt's tokens: the prompt is
compressed once after prefill (prompt compression), then the answer is decoded
greedily under the same budget. ``full`` is the reference on the same prompts.

    python benchmarks/passkey.py --policy full --policy h2o --policy lru --policy sink --lengths 2048 3000
"""

from __future__ import annotations

import argparse
import random
import time

import kvcompress
import torch
from common import append_result, device_name, load_model

import kvcompress_h2o  # noqa: F401

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def make_prompt(tok, length: int, depth: float, key: int) -> torch.Tensor:
    """About ``length`` tokens with the key sentence at ``depth`` (0 = start, 1 = end) of the filler."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tok(FILLER * 20).input_ids) / 20  # tokens per repeat inside a run of repeats
    fixed = len(tok(INTRO + needle + QUESTION).input_ids)
    n = max(1, int((length - fixed) / per))
    before = round(n * depth)
    text = INTRO + FILLER * before + needle + FILLER * (n - before) + QUESTION
    return tok(text, return_tensors="pt").input_ids


@torch.no_grad()
def answer(model, tok, ids: torch.Tensor, spec: str, new_tokens: int = 8) -> tuple[str, object]:
    cache = kvcompress.make_cache(spec, model=model)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:]), cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", required=True, help="policy name, optionally with parameters other than budget/step: h2o(gqa=max)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 3000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--fraction", type=float, default=0.25, help="budget as a fraction of the prompt")
    ap.add_argument("--step", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.device)
    rng = random.Random(args.seed)
    for length in args.lengths:
        for depth in args.depths:
            key = rng.randint(10000, 99999)
            ids = make_prompt(tok, length, depth, key).to(args.device)
            budget = int(args.fraction * ids.shape[1])
            for policy in args.policy:
                name, _, extra = policy.rstrip(")").partition("(")
                spec = "full" if name == "full" else f"{name}(budget={budget},step={args.step}{',' * bool(extra)}{extra})"
                t0 = time.perf_counter()
                text, cache = answer(model, tok, ids, spec)
                append_result(args.out, {
                    "task": "passkey", "spec": spec, "prompt_tokens": ids.shape[1], "depth": depth, "key": key,
                    "found": str(key) in text, "output": text, "mode": getattr(cache.selection, "mode", "n/a"),
                    "seconds": round(time.perf_counter() - t0, 1), "device": device_name(args.device)})


if __name__ == "__main__":
    main()
