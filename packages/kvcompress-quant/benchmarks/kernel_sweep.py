"""Sweep the fused int4 decode kernel's tunables at 32k tokens, against an older version of the kernel.

    git show <rev>:packages/kvcompress-quant/src/kvcompress_quant/kernels.py > /tmp/kernels_old.py
    python kernel_sweep.py --baseline /tmp/kernels_old.py --out results/kernel_sweep.jsonl   (GPU)

Times every variant with CUDA-graph replays (``gpu_bench.graph_ms``) next to bf16 sdpa, at batch 1 and
8, random-init Llama-3-8B heads (8 kv heads, GQA 4, head_dim 128), and records each output's relative
error against float32 dequantize-then-sdpa plus the launch grid it chose. One JSON line per variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import gpu_bench as gb
import torch

from kvcompress_quant import kernels

TUNABLES = ("BLOCK_N", "NUM_WARPS", "NUM_STAGES", "MERGE_CHUNK", "SPLIT_MIN", "MAXNREG", "PROGRAMS_PER_SM",
            "MAX_WAVES", "SPLITS_PER_SM")
VARIANTS = [{"MERGE_CHUNK": mc, "MAXNREG": mr} for mc in (0, 16) for mr in (None, 168, 128)] + [
    {"PROGRAMS_PER_SM": 2, "MAXNREG": 168}, {"PROGRAMS_PER_SM": 4, "MAXNREG": 168},
    {"MAX_WAVES": 1, "MAXNREG": 168}, {"NUM_STAGES": 2}, {"NUM_STAGES": 4},
]


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("kernels_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdpa_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    return gb.graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="an older kernels.py, timed with its defaults and MERGE_CHUNK=0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    modules = [("current", kernels)] + ([("baseline", load_baseline(args.baseline))] if args.baseline else [])
    defaults = {m: {k: getattr(m, k) for k in TUNABLES if hasattr(m, k)} for _, m in modules}
    n, hkv, hq, d = 32768, 8, 32, 128
    with open(args.out, "a") as out:
        def emit(**row):
            row["device"] = torch.cuda.get_device_name()
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")

        for b in (1, 8):
            k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            emit(batch=b, name="sdpa", graph_ms=sdpa_ms(q, k, v))
            del k, v
            store = gb.random_store(4, "channel", "token", b, hkv, n)
            ref = kernels.reference_attention(store, q, None, d**-0.5)
            runs = [(name, m, {"MERGE_CHUNK": 0}) for name, m in modules if m is not kernels]
            runs += [("current", kernels, {})] + [("current", kernels, v) for v in VARIANTS]
            for name, module, variant in runs:
                for key, value in {**defaults[module], **variant}.items():
                    setattr(module, key, value)
                store.launch_cache.clear()  # the plan cache is shared by both modules' kernels

                def step(module=module, store=store, q=q):
                    return module.decode_attention(store, q, None, d**-0.5)

                try:
                    result = step()
                    torch.cuda.synchronize()
                    rel = float((result.float() - ref).norm() / ref.norm())
                    plan = store.launch_cache.get("plan")
                    emit(batch=b, name=name, **variant, graph_ms=gb.graph_ms(step), rel=rel,
                         grid=plan[1].grid if plan else None)
                except Exception as exc:  # a variant that does not fit (e.g. shared memory) is recorded
                    emit(batch=b, name=name, **variant, error=repr(exc)[:300])
            for module, values in defaults.items():
                for key, value in values.items():
                    setattr(module, key, value)
            del store, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
