"""Where a decode step's time goes on the GPU: host (Python + launches) vs device, per policy.

    python benchmarks/gpu_profile.py --length 16384 --batch 1 \
        --policy "sink(budget=0.25,step=32)" --policy "h2o(budget=0.25,step=32)" --policy "quant(bits=4)"

For each policy (and `full`) on the random-init Llama-3-8B architecture: prefill, then
(1) steps run back to back with no sync (wall per step = max(host, device)),
(2) the device time per step (CUDA events around one synchronised step, repeated),
(3) a torch.profiler table of one step's host-side operators (self CPU time, calls),
and the number of host-device synchronisations. Diagnostic only; the speed numbers
we report come from gpu_speed.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_speed import build_model, resolve

import kvcompress


@torch.no_grad()
def profile(model, spec: str, length: int, batch: int, chunk: int, steps: int, table_rows: int,
            cprofile: bool = False) -> None:
    torch.cuda.empty_cache()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    cache = kvcompress.make_cache(spec, model=model)
    for i in range(0, length, chunk):
        out = model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)

    def step(token):
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1:].argmax(-1)

    for _ in range(4):
        token = step(token)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    host_end = time.perf_counter()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    host = (host_end - t0) / steps * 1e3
    device = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        token = step(token)
        e.record()
        e.synchronize()
        device.append(s.elapsed_time(e))
    if table_rows == 0:
        print(f"{spec:32s} b{batch} {length}: back-to-back {wall:.2f} ms/step, host enqueue {host:.2f} ms/step, "
              f"one synced step {statistics.median(device):.2f} ms", flush=True)
        return
    if cprofile:
        import cProfile
        import pstats

        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(8):
            token = step(token)
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n## {spec}  (length {length}, batch {batch}): back-to-back wall {wall:.2f} ms/step, "
              f"synced step {statistics.median(device):.2f} ms; cProfile of 8 steps (host time)", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(table_rows)
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            token = step(token)
        torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpy")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / 2
    print(f"\n## {spec}  (length {length}, batch {batch})")
    print(f"back-to-back wall {wall:.2f} ms/step, host enqueue {host:.2f} ms/step, one synced step "
          f"{statistics.median(device):.2f} ms, device busy {gpu_ms:.2f} ms/step, launches/step "
          f"{launches / 2:.0f}, syncs in 2 steps {syncs}", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=table_rows, max_name_column_width=60), flush=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25, help="rows of the profile table (0: timings only)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the policies")
    parser.add_argument("--policy", action="append", default=[])
    parser.add_argument("--cprofile", action="store_true", help="Python-level host profile instead of torch's")
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(args.layers)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for spec in ["full", *(resolve(p, args.length) for p in args.policy)] * args.repeat:
        profile(model, spec, args.length, args.batch, args.chunk, args.steps, args.rows, args.cprofile)


if __name__ == "__main__":
    main()
