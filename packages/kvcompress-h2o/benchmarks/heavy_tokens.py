"""Which tokens h2o keeps as heavy hitters: stream WikiText through SmolLM2-135M, then decode the kept slots.

    python benchmarks/heavy_tokens.py --spec "h2o(budget=256,step=16)" --tokens 2048
"""

from __future__ import annotations

import argparse
import collections

import torch
from common import load_model, wikitext_ids
from streaming_ppl import streaming_nll

STRUCTURAL = {"", ",", ".", "=", "@", "-", "'", '"', "(", ")", "the", "of", "and", "in", "a"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="h2o(budget=256,step=16)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    ids = wikitext_ids(tok, args.tokens)
    _, cache = streaming_nll(model, ids, args.spec, 16)
    policy = cache.selection
    n_recent = round(policy.recent_ratio * policy.target(args.tokens))
    for li in args.layers:
        positions = cache.layers[li].slots.view("positions")[0]  # [H_kv, S]
        for h, row in enumerate(positions.tolist()):
            heavy = [p for p in row if p < args.tokens - n_recent]
            words = [tok.decode([int(ids[0, p])]) for p in heavy]
            structural = sum(w.strip() in STRUCTURAL for w in words)
            print(f"layer {li} kv-head {h}: {len(heavy)} heavy hitters, {sum(p < 4 for p in heavy)} of the first 4 "
                  f"tokens, {structural} punctuation/newline/marker/function words; most common: "
                  f"{collections.Counter(words).most_common(6)}")


if __name__ == "__main__":
    main()
