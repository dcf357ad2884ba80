"""What one eviction of ``cluster`` costs: the k-means alone and the whole plan (k-means, seats, merge, the
layer applying it), per layer, at a given batch / kv heads / head dim / budget.

    python benchmarks/kmeans_cost.py --heads 3 --dim 64 --budget 128 256 512 --clusters 8 16 32 64
    python benchmarks/kmeans_cost.py --device cuda --heads 8 --dim 128 --batch 1 8 --budget 4096 \
        --dtype bfloat16

A real ``CompressedLayer`` is driven with random keys/values (``step`` new tokens per eviction, attention
observed from random weights): timings only, never quality. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcompress import CompressedLayer, build_policies
from kvcompress_cluster import kmeans


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: str, batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device,
            evictions: int) -> dict:
    policy, _ = build_policies(spec)
    layer = CompressedLayer(policy, None, layer_idx=0)
    g = torch.Generator(device=device).manual_seed(0)

    def feed(q: int) -> None:
        k = torch.randn(batch, heads, q, dim, generator=g, device=device, dtype=dtype)
        layer.update(k, torch.randn(batch, heads, q, dim, generator=g, device=device, dtype=dtype))
        if policy.needs_attention:
            s = layer.slots.length
            w = torch.rand(batch, heads, 1, q, s, generator=g, device=device).softmax(-1)
            policy.observe(layer.context(), w, torch.arange(layer.seen - q, layer.seen, device=device))

    feed(policy.budget + policy.step)  # a prompt, then the first (cold-start) eviction
    layer.finish_attention(None)
    plan_ms, kmeans_ms = [], []
    for _ in range(evictions):
        feed(policy.step)
        ctx = layer.context()
        n, s = batch * heads, layer.slots.length
        points = kmeans.prepare(ctx.keys.reshape(n, s, dim), policy.distance)
        weight = torch.ones(n, s, device=device)
        start = points[:, : policy.clusters].clone()
        _sync(device)
        t0 = time.perf_counter()
        kmeans.lloyd(points, weight, start, policy.iters, policy.distance)
        _sync(device)
        t1 = time.perf_counter()
        layer.finish_attention(None)  # the eviction: plan + apply
        _sync(device)
        t2 = time.perf_counter()
        kmeans_ms.append(1e3 * (t1 - t0))
        plan_ms.append(1e3 * (t2 - t1))
    assert layer.evictions == evictions + 1
    return {"policy": spec, "batch": batch, "kv_heads": heads, "head_dim": dim, "dtype": str(dtype),
            "device": str(device), "kmeans_ms": statistics.median(kmeans_ms),
            "eviction_ms": statistics.median(plan_ms), "evictions": evictions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--budget", type=int, nargs="+", default=[256])
    p.add_argument("--clusters", type=int, nargs="+", default=[16])
    p.add_argument("--extra", default="", help="more spec parameters, e.g. 'mode=evict,share=size'")
    p.add_argument("--evictions", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with torch.no_grad():
        for batch in args.batch:
            for budget in args.budget:
                for clusters in args.clusters:
                    extra = f",{args.extra}" if args.extra else ""
                    spec = f"cluster(budget={budget},clusters={clusters}{extra})"
                    row = measure(spec, batch, args.heads, args.dim, dtype, device, args.evictions)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
