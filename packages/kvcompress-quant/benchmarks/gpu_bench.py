"""GPU benchmarks of quant on a random-init Llama-3-8B architecture (bf16), in one process.

  python gpu_bench.py numerics kernel [--out FILE]   (either or both; JSON lines on stdout)

numerics  fused kernel vs float32 dequantize-then-sdpa on random stores (bits x axes x mask kinds)
kernel    decode attention alone at 32k tokens: int4 fused kernel vs bf16 sdpa (+ a small tile sweep)

End-to-end decode speed and the largest batch that fits are harness tasks now (``speed``, ``max_batch``:
``kvcompress run --grid benchmarks/speed-gpu.toml`` from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

try:
    import triton
except ImportError:  # a CPU dry run
    triton = None

from kvcompress_quant import QuantStore, kernels

warnings.filterwarnings("ignore")
OUT: list[dict] = []
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DRY = DEV == "cpu"


def sync():
    if not DRY:
        torch.cuda.synchronize()


def emit(**row):
    row["device"] = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    OUT.append(row)
    print(json.dumps(row), flush=True)


def random_store(bits, key_axis, value_axis, b, h, n, d=128, dtype=torch.bfloat16, chunk=8192):
    store = QuantStore(bits, 64, 4, 128, key_axis, value_axis)
    done = 0
    while done < n:
        q = min(chunk, n - done)
        k = torch.randn(b, h, q, d, device=DEV, dtype=dtype)
        k[..., 5] *= 10
        store.append(k, torch.randn(b, h, q, d, device=DEV, dtype=dtype))
        done += q
    store._fresh = None
    return store


def numerics():
    for pieces in (True, False):
        kernels.PIECES = pieces
        numerics_one(pieces)
    kernels.PIECES = True


def numerics_one(fast):
    worst = bf16_worst = 0.0
    for bits in (8, 4, 2):
        for axes in (("channel", "token"), ("token", "token"), ("token", "channel")):
            store = random_store(bits, *axes, b=2, h=8, n=5000)
            n = store.length
            for mk in (None, "bool", "float"):
                q = torch.randn(2, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
                mask = None
                if mk:
                    valid = torch.ones(2, n, dtype=torch.bool, device=DEV)
                    valid[1, :1500] = False
                    valid[0, 4000] = False
                    mask = valid[:, None, None, :]
                    if mk == "float":
                        mask = torch.zeros(mask.shape, dtype=torch.bfloat16, device=DEV).masked_fill(
                            ~mask, torch.finfo(torch.bfloat16).min)
                out = kernels.decode_attention(store, q, mask, 128**-0.5)
                ref = kernels.reference_attention(store, q, mask, 128**-0.5)
                bf16 = kernels.reference_attention(store, q, mask, 128**-0.5, dtype=torch.bfloat16)
                rel = float((out.float() - ref).norm() / ref.norm())
                bf16_worst = max(bf16_worst, float((bf16.float() - ref).norm() / ref.norm()))
                ok = bool(torch.isfinite(out).all()) and rel < 1e-2
                worst = max(worst, rel if ok else float("inf"))
                if not ok:
                    emit(test="numerics", bits=bits, axes=axes, mask=mk, rel=rel, ok=False)
    emit(test="numerics", fast=fast, worst_rel_err=worst, bf16_dequant_sdpa_worst_rel_err=bf16_worst,
         ok=worst < 1e-2, reference="float32 dequantize-then-sdpa")


def graph_ms(fn, reps=20):
    """GPU time per call from CUDA-graph replays of ``reps`` calls (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=20, rep=200, return_mode="median") / reps


def kernel_bench():
    n, hkv, hq, d = 32768, 8, 32, 128
    for b in (1, 8):
        k = torch.randn(b, hkv, n, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(b, hq, 1, d, device=DEV, dtype=torch.bfloat16)

        def sdpa(q=q, k=k, v=v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        sdpa_ms = triton.testing.do_bench(sdpa, warmup=50, rep=300, return_mode="median")
        sdpa_graph = graph_ms(sdpa)
        del k, v, sdpa
        store = random_store(4, "channel", "token", b, hkv, n)
        best = None
        base = dict(PIECES=True, BLOCK_N=64, NUM_WARPS=4, SPLIT_MIN=128, NUM_STAGES=3, PROGRAMS_PER_SM=None,
                    MAX_WAVES=8, MAXNREG=None, CONV=2, MERGE_CHUNK=16)
        variants = [base, dict(base, MERGE_CHUNK=0), dict(base, MAXNREG=168),
                    dict(base, MAXNREG=168, MERGE_CHUNK=0),
                    dict(base, CONV=0), dict(base, NUM_STAGES=2), dict(base, NUM_STAGES=4),
                    dict(base, MAX_WAVES=1), dict(base, PROGRAMS_PER_SM=8)]
        for variant in variants:
            for name, value in variant.items():
                setattr(kernels, name, value)

            def fused(store=store, q=q):
                return kernels.decode_attention(store, q, None, d**-0.5)

            t = triton.testing.do_bench(fused, warmup=50, rep=300, return_mode="median")
            tg = graph_ms(fused)
            emit(test="kernel_variant", batch=b, **{k.lower(): v for k, v in variant.items()}, ms=t,
                 graph_ms=tg)
            if best is None or tg < best[0]:
                best = (tg, t, variant)
        for name, value in best[2].items():
            setattr(kernels, name, value)
        gb = store.nbytes() / 1e9
        bf16_gb = 2 * b * hkv * n * d * 2 / 1e9
        emit(test="decode_attention_32k", batch=b, sdpa_bf16_ms=sdpa_ms, sdpa_bf16_graph_ms=sdpa_graph,
             int4_fused_ms=best[1], int4_fused_graph_ms=best[0], speedup_graph=sdpa_graph / best[0],
             speedup_launch_included=sdpa_ms / best[1], int4_store_GB=gb, int4_GBps=gb / best[0] * 1e3,
             bf16_GB=bf16_gb, bf16_GBps=bf16_gb / sdpa_graph * 1e3,
             config={k.lower(): v for k, v in best[2].items()})
        del store
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print("torch", torch.__version__, "triton", getattr(triton, "__version__", None), DEV, flush=True)
    try:
        if "numerics" in args.what:
            numerics()
        if "kernel" in args.what:
            kernel_bench()
        gone = {"e2e", "maxbatch"} & set(args.what)
        if gone:
            raise SystemExit(f"{', '.join(sorted(gone))}: measured by the harness now (kvcompress run --grid "
                             "benchmarks/speed-gpu.toml, tasks speed and max_batch)")
    finally:
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in OUT)


if __name__ == "__main__":
    sys.exit(main())
