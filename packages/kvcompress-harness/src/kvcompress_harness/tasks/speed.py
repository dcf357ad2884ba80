"""``speed``: prefill time, paired decode steps against ``full``, KV bytes and peak memory, at a batch size.

Every policy of a cell and ``full`` are prefilled side by side and held at once; then single decode steps
alternate between them in a shuffled order each round, so that drift of the host (other processes, clocks)
hits every policy within one step. The headline is the median over steps of (policy step / ``full`` step of
the same round); the ratio of mean steps is beside it (it also counts the rare steps that compress).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, ClassVar

from ..task import TaskContext
from .common import kv_bytes
from .inputs import batch_ids, cudnn_sdpa, is_oom, release

LABELS = {"decode_tokens_per_s": "decode tokens/s (all sequences of the batch)",
          "median_step_ratio": "decode step time / full's (median of paired steps)",
          "prefill_s": "prefill time (s)"}


class SpeedTask:
    """Paired decode steps against full (median step ratio), prefill time, KV bytes, allocator peak."""

    name = "speed"
    primary = "decode_tokens_per_s"
    higher_is_better = True
    default_lengths = (256, 512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"new_tokens": 32, "warmup": 4, "cudnn_sdpa": False, "hold": 0}
    limits: ClassVar[dict[str, tuple]] = {"new_tokens": (1, None), "warmup": (0, None), "hold": (0, None)}
    needs_text = False
    supports_batch = True
    labels: ClassVar[dict[str, str]] = LABELS

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """One policy, paired with ``full``."""
        specs = ["full"] if ctx.spec == "full" else ["full", ctx.spec]
        return self.run_group(ctx, specs)[ctx.spec]

    def run_group(self, ctx: TaskContext, specs: list[str]) -> dict[str, dict[str, Any]]:
        """Every spec of the cell (``full`` first) measured in one process, decode steps paired with ``full``'s.

        ``hold`` > 0 holds at most that many policies beside ``full`` at once (a long context at a large batch
        may not fit them all): the policies are then paired with ``full`` in rounds of ``hold``, and ``full``'s
        own numbers come from the first round.
        """
        hold = int(ctx.params.get("hold") or 0)
        others = [s for s in specs if s != "full"]
        if not hold or len(others) <= hold:
            return self._paired(ctx, specs)
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(others), hold):
            part = self._paired(ctx, ["full", *others[i:i + hold]])
            out.update({k: v for k, v in part.items() if k != "full" or "full" not in out})
        return out

    def _paired(self, ctx: TaskContext, specs: list[str]) -> dict[str, dict[str, Any]]:
        import torch

        from ..decoding import forward, prefill, sync
        from ..memory import PeakMemory

        new, warm = int(ctx.params["new_tokens"]), int(ctx.params["warmup"])
        ids = batch_ids(ctx)
        out: dict[str, dict[str, Any]] = {}
        state: dict[str, list[Any]] = {}
        with cudnn_sdpa(ctx.device, bool(ctx.params["cudnn_sdpa"])) as cudnn:
            for spec in specs:  # warm-up: kernels compiled, allocator primed, outside the timings
                try:
                    cache = ctx.make_cache(spec)
                    prefill(ctx.model, ids[:, : min(32, ids.shape[1])], cache, chunk=ctx.chunk)
                    forward(ctx.model, ids[:, :1], cache, last_only=True)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    out[spec] = {"oom": True, "error": f"OutOfMemoryError during prefill: {exc}".splitlines()[0]}
                cache = None
                release(ctx.device)
            for spec in [s for s in specs if s not in out]:
                try:
                    cache = ctx.make_cache(spec)
                    with PeakMemory(ctx.device) as mem:
                        sync(ctx.device)
                        t0 = time.perf_counter()
                        logits = prefill(ctx.model, ids, cache, chunk=ctx.chunk, progress=ctx.progress)
                        sync(ctx.device)
                        prefill_s = time.perf_counter() - t0
                    state[spec] = [cache, logits.argmax(-1, keepdim=True), []]
                    out[spec] = {"prefill_s": prefill_s, "prefill_tokens_per_s": ids.numel() / prefill_s,
                                 "peak_memory_bytes": mem.peak_bytes, "peak_memory_kind": mem.kind}
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    state.pop(spec, None)
                    out[spec] = {"oom": True, "error": f"OutOfMemoryError during prefill: {exc}".splitlines()[0]}
                    release(ctx.device)
            order = random.Random(ctx.seed)
            for _ in range(warm + new):  # the first `warm` paired steps are not counted
                for spec in order.sample(list(state), len(state)):
                    cache, token, steps = state[spec]
                    try:
                        sync(ctx.device)
                        t0 = time.perf_counter()
                        logits = forward(ctx.model, token, cache, last_only=True)[:, -1]
                        sync(ctx.device)
                    except Exception as exc:
                        if not is_oom(exc):
                            raise
                        del state[spec]
                        out[spec] = {**out[spec], "oom": True,
                                     "error": f"OutOfMemoryError while decoding: {exc}".splitlines()[0]}
                        release(ctx.device)
                        continue
                    steps.append(time.perf_counter() - t0)
                    state[spec][1] = logits.argmax(-1, keepdim=True)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
        full_steps = state["full"][2][warm:] if "full" in state else None
        for spec, (cache, _, steps) in state.items():
            out[spec].update(_decode_metrics(steps[warm:], full_steps, ids.shape[0]))
            out[spec].update(kv_bytes=kv_bytes(cache), kv_bytes_by_device=_by_device(cache),
                             cudnn_sdpa=cudnn, batch=ids.shape[0], paired_with=list(state),
                             timing="paired single decode steps, shuffled order each round")
        return out


def _by_device(cache: Any) -> dict[str, int]:
    import kvcompress

    return {k: int(v) for k, v in kvcompress.kv_bytes(cache, by_device=True).items()}


def _decode_metrics(steps: list[float], full: list[float] | None, batch: int) -> dict[str, Any]:
    """Median and mean step, tokens/s, and the paired ratios to ``full``'s steps of the same rounds."""
    if not steps:
        return {"decode_steps": 0}
    median, mean = statistics.median(steps), statistics.fmean(steps)
    out: dict[str, Any] = {"decode_steps": len(steps), "decode_ms_per_token": 1000 * median,
                           "decode_ms_mean": 1000 * mean, "decode_tokens_per_s": batch / median,
                           "decode_tokens_per_s_mean": batch / mean}
    if full and len(full) == len(steps):
        out["median_step_ratio"] = statistics.median(s / f for s, f in zip(steps, full))
        out["mean_ratio"] = mean / statistics.fmean(full)
    return out
