"""Decode speed and KV memory on a GPU, random-init Llama-3-8B architecture, bf16.

    python benchmarks/gpu_speed.py --lengths 1024 4096 16384 --batch 1 --tokens 32 \
        --policy "sink(budget=0.25)" --policy "h2o(ratio=0.25)" --policy "quant(bits=4)"

A budget written as a fraction (``budget=0.25``) is turned into a quarter of the context.
Every policy is timed in the same process as `full` at the same length and batch, in
interleaved shuffled rounds (median decode step over all rounds); the result is a ratio. With
``--paired`` every policy's cache is held at once and single decode steps alternate between them,
so that host drift cancels step by step (the ratio is the median of per-step ratios).
Random weights: speed and memory only, never quality.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcompress

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                 rope_theta=500000.0, attn_implementation="sdpa")


def build_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def resolve(spec: str, length: int) -> str:
    """``budget=0.25`` -> a quarter of the context, in tokens."""
    return re.sub(r"budget=(0\.\d+)", lambda m: f"budget={int(float(m.group(1)) * length)}", spec)


@torch.no_grad()
def measure(model, spec: str, length: int, batch: int, tokens: int, chunk: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda", generator=gen)
    cache = kvcompress.make_cache(spec, model=model)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, length, chunk):
        out = model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(tokens):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        e.record()
        token = out.logits[:, -1:].argmax(-1)
        e.synchronize()
        steps.append(s.elapsed_time(e))
    return {"policy": spec, "length": length, "batch": batch, "prefill_s": prefill, "steps_ms": steps[2:],
            "kv_bytes": kvcompress.kv_bytes(cache), "peak_bytes": torch.cuda.max_memory_allocated() - base}


@torch.no_grad()
def prefill(model, spec: str, length: int, batch: int, chunk: int) -> tuple[object, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda", generator=gen)
    cache = kvcompress.make_cache(spec, model=model)
    for i in range(0, length, chunk):
        out = model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def paired(model, specs: list[str], length: int, batch: int, tokens: int, chunk: int) -> dict[str, dict]:
    """Every policy's cache prefilled side by side, then one decode step of each in turn (shuffled).

    Host drift between rounds hits every policy alike at the granularity of one step (tens of ms).
    Returns per policy its median and mean step, the median of its per-step ratios to `full` (the headline:
    robust to the host's hiccups), the ratio of means (which also counts the rare steps that compress), and
    its KV bytes.
    """
    state = {spec: prefill(model, spec, length, batch, chunk) for spec in specs}
    torch.cuda.synchronize()
    steps: dict[str, list[float]] = {spec: [] for spec in specs}
    for _ in range(tokens):
        for spec in random.sample(specs, len(specs)):
            cache, token = state[spec]
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            e.record()
            state[spec] = (cache, out.logits[:, -1:].argmax(-1))
            e.synchronize()
            steps[spec].append(s.elapsed_time(e))
    warm = 4
    result = {}
    for spec in specs:
        ratios = [t / f for t, f in zip(steps[spec][warm:], steps["full"][warm:], strict=True)]
        result[spec] = {"policy": spec, "length": length, "batch": batch, "paired": True,
                        "decode_ms": statistics.median(steps[spec][warm:]),
                        "median_step_ratio": statistics.median(ratios), "steps": len(ratios),
                        "mean_ms": statistics.fmean(steps[spec][warm:]),
                        "mean_ratio": statistics.fmean(steps[spec][warm:]) / statistics.fmean(steps["full"][warm:]),
                        "kv_bytes": kvcompress.kv_bytes(state[spec][0])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per policy")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    parser.add_argument("--policy", action="append", default=[])
    parser.add_argument("--paired", action="store_true",
                        help="hold every policy's cache at once and alternate single decode steps between them "
                             "(--tokens steps each) instead of whole rounds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cudnn-sdpa", action="store_true",
                        help="leave PyTorch's cuDNN attention on (it rebuilds a graph for every new KV length: "
                             "~20 ms per call on torch 2.11, which makes a growing cache look very slow)")
    args = parser.parse_args()
    if not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(args.layers)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, random-init Llama-3-8B "
          f"architecture ({args.layers} layers), bf16")
    print("| policy | batch | context | decode ms/token | ratio to full | tokens/s | KV GiB | KV fraction |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch:
        for length in args.lengths:
            measure(model, "full", min(length, 512), batch, 4, args.chunk)  # warm-up
            specs = ["full", *(resolve(raw, length) for raw in args.policy)]
            if args.paired:
                summary = paired(model, specs, length, batch, args.tokens, args.chunk)
                for spec in specs:
                    row = summary[spec]
                    rows.append(row)
                    print(f"| {spec} | {batch} | {length} | {row['decode_ms']:.2f} | "
                          f"{row['median_step_ratio']:.3f} (paired; means {row['mean_ratio']:.3f}) | "
                          f"{batch * 1e3 / row['decode_ms']:.1f} | "
                          f"{row['kv_bytes'] / 2**30:.3f} | {row['kv_bytes'] / summary['full']['kv_bytes']:.3f} |",
                          flush=True)
                del summary
                torch.cuda.empty_cache()
                continue
            runs: dict[str, list[dict]] = {spec: [] for spec in specs}
            for _ in range(args.rounds):  # interleaved, shuffled: drift on the host hits every policy alike
                for spec in random.sample(specs, len(specs)):
                    runs[spec].append(measure(model, spec, length, batch, args.tokens, args.chunk))
            summary = {}
            for spec in specs:
                steps = [t for run in runs[spec] for t in run["steps_ms"]]
                ms = statistics.median(steps)
                summary[spec] = {**runs[spec][-1], "steps_ms": None, "decode_ms": ms,
                                 "tokens_per_s": batch * 1e3 / ms, "rounds": args.rounds}
            full = summary["full"]
            for spec in specs:
                row = summary[spec]
                rows.append(row)
                print(f"| {spec} | {batch} | {length} | {row['decode_ms']:.2f} | "
                      f"{row['decode_ms'] / full['decode_ms']:.3f} | {row['tokens_per_s']:.1f} | "
                      f"{row['kv_bytes'] / 2**30:.3f} | {row['kv_bytes'] / full['kv_bytes']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
