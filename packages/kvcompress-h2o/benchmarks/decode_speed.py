"""Decode ms/token of SmolLM2-135M at a long context, each policy against ``full`` in the same process.

Every spec prefills the same WikiText-2 context once, then the specs decode in
interleaved rounds of ``--block`` tokens (so load from other processes hits them
alike); the reported figure is the median ms/token over the rounds, and the
ratio is to ``full``'s median.

    python benchmarks/decode_speed.py --context 2048 --spec "h2o(budget=512,step=16)"
"""

from __future__ import annotations

import argparse
import statistics
import time

import kvcompress
import torch
from common import append_result, device_name, load_model, wikitext_ids

import kvcompress_h2o  # noqa: F401


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", action="append", required=True, help="policy spec (repeatable); full is added")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=16, help="tokens each spec decodes per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 copes best with a shared CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.device, getattr(torch, args.dtype))
    ids = wikitext_ids(tok, args.context).to(args.device)
    specs = ["full"] + [s for s in args.spec if s != "full"]
    state = {}
    for spec in specs:
        cache = kvcompress.make_cache(spec, model=model)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        state[spec] = [cache, logits[:, -1:].argmax(-1), []]
    for _ in range(args.rounds):
        for spec in specs:
            cache, nxt, times = state[spec]
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.block):
                nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sync(args.device)
            times.append((time.perf_counter() - t0) / args.block * 1e3)
            state[spec][1] = nxt
    base = statistics.median(state["full"][2])
    for spec in specs:
        cache, _, times = state[spec]
        ms = statistics.median(times)
        append_result(args.out, {
            "task": "decode_speed", "spec": spec, "context": args.context, "decoded": args.rounds * args.block,
            "ms_per_token": round(ms, 2), "ratio_to_full": round(ms / base, 3),
            "rounds_ms": [round(t, 2) for t in times], "kv_bytes": kvcompress.kv_bytes(cache),
            "mode": getattr(cache.selection, "mode", "n/a"), "device": device_name(args.device),
            "dtype": args.dtype})


if __name__ == "__main__":
    main()
