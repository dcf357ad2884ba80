"""What the sketch's hash collisions do to the kept set: the sketch against exact counts.

Streams WikiText-2 through SmolLM2 with a ``sketch`` cache (the harness's model and data). At every
eviction of every layer it also scores the stored keys from *exact* per-cell statistics: the same SimHash
cells of the same queries, each cell with its own counter (no two cells share one, as they do in a
Count-Min row of ``width`` counters), and records the overlap of the two kept sets over the slots the
policy chooses (the protected sink and recent slots left out). With ``--drive exact`` the exact scores
decide the evictions instead, and the script reports the streaming perplexity (the harness's method:
NLL of tokens 1..L-1 fed in ``--chunk`` tokens).

    python packages/kvcompress-sketch/benchmarks/overlap.py --spec "sketch(budget=256,width=16,depth=4)" \
        --tokens 2048 --out benchmarks/results/sketch/overlap.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

import kvcompress
import torch
import torch.nn.functional as F
from kvcompress_harness import load_model
from kvcompress_harness.data import read_file
from kvcompress_harness.decoding import cache_argument

from kvcompress_sketch import Sketch
from kvcompress_sketch.state import simhash

DATA = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def exact_scores(state, queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, read: str) -> torch.Tensor:
    """Scores ``[B, H, S]`` from exact per-cell counts and sums of ``queries`` ``[B, H, G, n, D]``."""
    b, h, g, _, d = queries.shape
    cells = simhash(queries, state.planes, state.powers)  # [B, H, G, n]
    out = torch.empty(keys.shape[:3], dtype=torch.float32)
    for bi in range(b):
        for hi in range(h):
            per_head = []
            for gi in range(g):
                unique, inverse = torch.unique(cells[bi, hi, gi], return_inverse=True)
                w = weights[bi, hi, gi]
                mass = torch.zeros(len(unique)).index_add_(0, inverse, w)
                if read == "bucket":
                    key_cells = simhash(keys[bi, hi].float(), state.planes, state.powers)
                    pos = torch.searchsorted(unique, key_cells).clamp(max=len(unique) - 1)
                    per_head.append(torch.where(unique[pos] == key_cells, mass[pos], 0.0))
                    continue
                sums = torch.zeros(len(unique), d).index_add_(0, inverse, queries[bi, hi, gi].float() * w[:, None])
                mu = sums / mass.clamp(min=1e-30)[:, None]
                per_head.append(torch.logsumexp(keys[bi, hi].float() @ mu.T * d**-0.5 + mass.log(), -1))
            stacked = torch.stack(per_head)
            out[bi, hi] = stacked.sum(0) if read == "bucket" else torch.logsumexp(stacked, 0)
    return out


@dataclass
class Audited(Sketch):
    """The sketch policy, also scoring every eviction from exact per-cell statistics."""

    drive: str = "sketch"
    log: list = field(default_factory=list, repr=False, compare=False)
    history: dict = field(default_factory=dict, repr=False, compare=False)

    def on_tokens(self, ctx):
        q = ctx.queries
        b, hq, n, d = q.shape
        h = ctx.info.kv_heads
        valid = ctx.valid[:, :1, ctx.valid.shape[-1] - n:].float()  # [B, 1, n]
        x = q.float().view(b, h, hq // h, n, d)
        w = valid.unsqueeze(1).expand(b, h, hq // h, n)
        if self.weighting == "norm":
            w = w * x.norm(dim=-1)
        if self.half_life:
            pos = torch.arange(ctx.seen - n, ctx.seen, dtype=torch.float32)
            w = w * 2.0 ** (pos / self.half_life)  # fine for the few thousand tokens audited here
        old = self.history.get(ctx.layer_idx)
        self.history[ctx.layer_idx] = (x, w) if old is None else (torch.cat([old[0], x], 3), torch.cat([old[1], w], 3))
        super().on_tokens(ctx)

    def score(self, ctx):
        sketch = super().score(ctx)
        x, w = self.history[ctx.layer_idx]
        exact = exact_scores(ctx.bound, x, w, ctx.keys, self.read)
        target = self.target(ctx.seen)
        protected = min(self.sink + self.recent, target)
        a, e = ctx.select(sketch, target), ctx.select(exact, target)
        same = (a.unsqueeze(-1) == e.unsqueeze(-2)).any(-1).sum(-1).float()
        self.log.append(float(((same - protected) / max(target - protected, 1)).mean()))
        return exact if self.drive == "exact" else sketch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="a sketch spec, e.g. 'sketch(budget=256,width=16,depth=4)'")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--drive", choices=("sketch", "exact"), default="sketch")
    p.add_argument("--data-file", default=DATA)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    base, _ = kvcompress.build_policies(args.spec)
    params = {k: v for k, v in vars(base).items() if k in {f for f in Sketch.__dataclass_fields__}}
    policy = Audited(**params, drive=args.drive)
    loaded = load_model()
    kvcompress.attach(loaded.model)
    text = read_file(args.data_file).text
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :args.tokens]
    cache = kvcompress.CompressedCache(policy, model=loaded.model)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    arg = cache_argument(loaded.model)
    with torch.no_grad():
        for start in range(0, args.tokens, args.chunk):
            end = min(start + args.chunk, args.tokens)
            logits = loaded.model(input_ids=ids[:, start:end], use_cache=True, **{arg: cache}).logits
            targets = ids[0, start + 1:end + 1]
            nll += float(F.cross_entropy(logits[0, :len(targets)].float(), targets, reduction="sum"))
            count += len(targets)
    record = {"spec": args.spec, "drive": args.drive, "tokens": args.tokens, "chunk": args.chunk,
              "ppl": math.exp(nll / count), "kept_overlap_mean": sum(policy.log) / len(policy.log),
              "kept_overlap_min": min(policy.log), "evictions": len(policy.log),
              "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
