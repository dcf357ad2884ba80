"""Host time of a decode step at 16k, batch 1, per policy, and a cProfile of 20 steps of each (GPU).

    python benchmarks/gpu_host_profile.py

Random-init Llama-3-8B (32 layers, bf16). For each of ``full``, ``sink`` and ``quant(bits=4)``: the median
over 40 steps of the time until ``model(...)`` returns (the host's enqueue time) and of the whole step
(synchronized), then the 22 functions with the most own time over 20 profiled steps. torch's sdpa
backends are left at their defaults (cuDNN sdpa allowed), unlike ``gpu_speed.py``.

The session that cited it ran these statements as a throwaway script; committed here reformatted, not
rerun as committed.
"""

import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import gpu_speed as gs  # noqa: E402

torch.manual_seed(0)
model = gs.build_model(32)
specs = ["full", "sink(budget=4096,step=32)", "quant(bits=4)"]
state = {s: gs.prefill(model, s, 16384, 1, 4096) for s in specs}
torch.cuda.synchronize()


def step(spec):
    cache, tok = state[spec]
    t0 = time.perf_counter()
    out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    state[spec] = (cache, out.logits[:, -1:].argmax(-1))
    torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t0


with torch.no_grad():
    for _ in range(5):
        for s in specs:
            step(s)
    res = {s: [] for s in specs}
    for _ in range(40):
        for s in specs:
            res[s].append(step(s))
    for s in specs:
        print(s, "host enqueue ms", round(statistics.median(r[0] for r in res[s]) * 1e3, 2), "step ms",
              round(statistics.median(r[1] for r in res[s]) * 1e3, 2))
    for s in specs:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            step(s)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(22)
        print("=====", s)
        print(buf.getvalue()[-5200:])
