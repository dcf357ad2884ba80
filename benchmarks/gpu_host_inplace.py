"""Host time of a decode step inside the 32-layer model: whole step, attention modules, cache updates.

    python benchmarks/gpu_host_inplace.py

Random-init Llama-3-8B architecture, bf16, 16k prompt, batch 1; `full`, sink, quant and h2o held side by
side and stepped in shuffled turns (40 steps each), three passes: GC on, GC off, GC on. Every
``LlamaAttention.forward`` and ``Cache.update`` call is timed with ``perf_counter`` (host time; the
attention modules include the cache update). Printed per policy: medians, and the extra host time per
layer against `full` in the same pass.
"""

from __future__ import annotations

import gc
import random
import statistics
import time

import torch
from gpu_speed import build_model, prefill
from transformers.cache_utils import DynamicCache
from transformers.models.llama import modeling_llama

from kvcompress.cache import CompressedCache

SPECS = ["full", "sink(budget=4096,step=32)", "quant(bits=4)", "h2o(budget=4096,step=32)"]
TIMED = {"attn": 0.0, "update": 0.0}


def timed(fn, slot: str):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMED[slot] += time.perf_counter() - t
        return out

    return wrapper


@torch.no_grad()
def main() -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    modeling_llama.LlamaAttention.forward = timed(modeling_llama.LlamaAttention.forward, "attn")
    for cls in (DynamicCache, CompressedCache):
        cls.update = timed(cls.update, "update")
    model = build_model(32)
    state = {spec: prefill(model, spec, 16384, 1, 4096) for spec in SPECS}
    for mode in ("gc on", "gc off", "gc on"):
        if mode == "gc off":
            gc.collect()
            gc.disable()
        else:
            gc.enable()
        rows: dict[str, list[tuple[float, ...]]] = {spec: [] for spec in SPECS}
        for _ in range(40):
            for spec in random.sample(SPECS, len(SPECS)):
                cache, token = state[spec]
                torch.cuda.synchronize()
                TIMED["attn"] = TIMED["update"] = 0.0
                t = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                host = time.perf_counter() - t
                token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                state[spec] = (cache, token)
                rows[spec].append((time.perf_counter() - t, host, TIMED["attn"], TIMED["update"]))
        print(mode, torch.cuda.get_device_name())
        median = {spec: [statistics.median(r[k] for r in rows[spec][4:]) for k in range(4)] for spec in SPECS}
        f = median["full"]
        for spec in SPECS:
            m = median[spec]
            print(f"  {spec:28s} wall {m[0] * 1e3:6.2f} ms ({m[0] / f[0]:.3f})  host {m[1] * 1e3:6.2f}  "
                  f"attn-modules {m[2] * 1e3:6.2f} (+{(m[2] - f[2]) / 32 * 1e6:5.1f} us/layer)  "
                  f"cache.update {m[3] * 1e3:5.2f} (+{(m[3] - f[3]) / 32 * 1e6:5.1f} us/layer)")


if __name__ == "__main__":
    main()
