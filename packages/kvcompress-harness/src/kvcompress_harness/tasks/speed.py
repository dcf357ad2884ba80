"""``speed``: prefill time, decode ms/token, tokens/s, KV bytes and peak memory per length."""

from __future__ import annotations

import statistics
from typing import Any, ClassVar

from ..decoding import greedy
from ..memory import PeakMemory
from ..task import TaskContext
from .common import kv_bytes


class SpeedTask:
    """Prefill and greedy-decode timings with the policy's cache; KV bytes held; peak memory."""

    name = "speed"
    primary = "decode_tokens_per_s"
    higher_is_better = True
    default_lengths = (256, 512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"new_tokens": 32, "warmup": 1}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Time a prefill of ``length`` text tokens and ``new_tokens`` greedy decode steps."""
        ids = ctx.tokens(ctx.length)
        new = int(ctx.params["new_tokens"])
        for _ in range(int(ctx.params["warmup"])):
            greedy(ctx.model, ids[:, : min(64, ctx.length)], ctx.make_cache(), 4, chunk=ctx.chunk)
        cache = ctx.make_cache()
        with PeakMemory(ctx.device) as mem:
            gen = greedy(ctx.model, ids, cache, new, chunk=ctx.chunk, progress=ctx.progress)
        steps = gen.decode_s
        decode_total = sum(steps)
        return {
            "prefill_s": gen.prefill_s,
            "prefill_tokens_per_s": ctx.length / gen.prefill_s,
            "decode_ms_per_token": 1000 * decode_total / len(steps) if steps else None,
            "decode_ms_per_token_median": 1000 * statistics.median(steps) if steps else None,
            "decode_tokens_per_s": len(steps) / decode_total if steps and decode_total > 0 else None,
            "decode_steps": len(steps),
            "kv_bytes": kv_bytes(cache),
            "peak_memory_bytes": mem.peak_bytes,
            "peak_memory_kind": mem.kind,
        }
