"""``speed``: prefill time, paired decode steps against ``full``, KV bytes and peak memory, at a batch size.

Every policy of a cell and ``full`` are prefilled side by side and held at once; then single decode steps
alternate between them in a shuffled order each round, so that drift of the host (other processes, clocks)
hits every policy within one step. The headline is the median over steps of (policy step / ``full`` step of
the same round); the ratio of mean steps is beside it (it also counts the rare steps that compress).

``profile_steps=N`` adds each policy's GPU time per step (``gpu_time.py``: torch.profiler over N more eager
steps, after the timed ones) and the share of the step the host takes. ``graphs=true`` adds the graph phase
(``graphs.py``): whole greedy decodes through ``kvcompress.static_generate`` (CUDA graphs on a GPU) against
``full`` in eager ``model.generate``; ``paired=false`` leaves the paired steps out.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, ClassVar

from ..task import TaskContext
from .common import kv_bytes
from .gpu_time import gpu_ms_per_step
from .inputs import batch_ids, cudnn_sdpa, is_oom, release

LABELS = {"decode_tokens_per_s": "decode tokens/s (all sequences of the batch)",
          "graph_ms_per_token": "static_generate decode ms per step (CUDA graphs on a GPU)",
          "generate_ms_per_token": "model.generate decode ms per step (eager full)",
          "median_step_ratio": "decode step time / full's (median of paired steps)",
          "gpu_ms_per_step": "GPU kernel time per eager decode step (torch.profiler)",
          "prefill_s": "prefill time (s)"}


class SpeedTask:
    """Paired decode steps against full (median step ratio), prefill time, KV bytes, allocator peak."""

    name = "speed"
    primary = "decode_tokens_per_s"
    higher_is_better = True
    default_lengths = (256, 512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"new_tokens": 32, "warmup": 4, "cudnn_sdpa": False, "hold": 0,
                                          "paired": True, "graphs": False, "graph_rounds": 3,
                                          "profile_steps": 0}
    limits: ClassVar[dict[str, tuple]] = {"new_tokens": (1, None), "warmup": (0, None), "hold": (0, None),
                                          "graph_rounds": (1, None), "profile_steps": (0, None)}
    needs_text = False
    supports_batch = True
    labels: ClassVar[dict[str, str]] = LABELS

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """One policy, paired with ``full``."""
        specs = ["full"] if ctx.spec == "full" else ["full", ctx.spec]
        return self.run_group(ctx, specs)[ctx.spec]

    def check_params(self, params: dict[str, Any]) -> None:
        """Something to measure: the paired steps, the graph phase or both."""
        if not params["paired"] and not params["graphs"]:
            from ..errors import HarnessError

            raise HarnessError("--param speed.paired: got false with speed.graphs false; allowed: paired=true, "
                               "or graphs=true (then paired=false measures only the graph phase)")

    def run_group(self, ctx: TaskContext, specs: list[str]) -> dict[str, dict[str, Any]]:
        """Every spec of the cell (``full`` first) measured in one process: the paired steps, then with
        ``graphs`` the graph phase, whose ratios use the paired steps as each policy's eager time."""
        out = self._paired_in_rounds(ctx, specs) if ctx.params.get("paired", True) else {s: {} for s in specs}
        if ctx.params.get("graphs"):
            from .graphs import graph_phase

            graphs = graph_phase(ctx, specs, int(ctx.params["new_tokens"]), int(ctx.params["graph_rounds"]))
            for spec, m in graphs.items():
                eager, graph = out[spec].get("decode_ms_per_token"), m.get("graph_ms_per_token")
                if eager is not None and spec != "full":
                    m["eager_ms_per_token"] = eager
                    if graph:
                        m["graph_speedup_over_eager"] = eager / graph
                replay, gpu = m.get("graph_replay_ms_per_token"), out[spec].get("gpu_ms_per_step")
                if replay and gpu:
                    m["graph_replay_over_gpu"] = replay / gpu
                full_step = out.get("full", {}).get("decode_ms_per_token")
                if replay and full_step:
                    m["graph_replay_speedup_over_full_step"] = full_step / replay
                if "kv_bytes" not in out[spec] and "graph_kv_bytes" in m:
                    out[spec].update(kv_bytes=m["graph_kv_bytes"], batch=ctx.batch)
                out[spec].update(m)
        return out

    def _paired_in_rounds(self, ctx: TaskContext, specs: list[str]) -> dict[str, dict[str, Any]]:
        """The paired steps. ``hold`` > 0 holds at most that many policies beside ``full`` at once (a long
        context at a large batch may not fit them all): the policies are then paired with ``full`` in rounds of
        ``hold``, and ``full``'s own numbers come from the first round."""
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

        from ..decoding import forward, prefill, sync
        from ..memory import PeakMemory

        new, warm = int(ctx.params["new_tokens"]), int(ctx.params["warmup"])
        devices = ctx.all_devices
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
                    with PeakMemory(devices) as mem:
                        sync(devices)
                        t0 = time.perf_counter()
                        logits = prefill(ctx.model, ids, cache, chunk=ctx.chunk, progress=ctx.progress)
                        sync(devices)
                        prefill_s = time.perf_counter() - t0
                    state[spec] = [cache, logits.argmax(-1, keepdim=True), []]
                    out[spec] = {"prefill_s": prefill_s, "prefill_tokens_per_s": ids.numel() / prefill_s,
                                 "peak_memory_bytes": mem.peak_bytes, "peak_memory_kind": mem.kind,
                                 "peak_memory_by_device": mem.by_device}
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
                        sync(devices)
                        t0 = time.perf_counter()
                        logits = forward(ctx.model, token, cache, last_only=True)[:, -1]
                        sync(devices)
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
            sync(devices)
            profiled = int(ctx.params.get("profile_steps") or 0)
            for spec in list(state) if profiled else []:
                try:
                    gpu = gpu_ms_per_step(lambda s=spec: self._step(ctx, state[s]), profiled, devices)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    out[spec]["profile_error"] = f"OutOfMemoryError while profiling: {exc}".splitlines()[0]
                    release(ctx.device)
                    continue
                if gpu is not None:
                    out[spec].update(gpu_ms_per_step=gpu, profiled_steps=profiled)
        full_steps = state["full"][2][warm:] if "full" in state else None
        for spec, (cache, _, steps) in state.items():
            out[spec].update(_decode_metrics(steps[warm:], full_steps, ids.shape[0]))
            if out[spec].get("gpu_ms_per_step") and out[spec].get("decode_ms_per_token"):
                out[spec]["host_share"] = max(0.0, 1 - out[spec]["gpu_ms_per_step"] / out[spec]["decode_ms_per_token"])
            out[spec].update(kv_bytes=kv_bytes(cache), kv_bytes_by_device=_by_device(cache),
                             cudnn_sdpa=cudnn, batch=ids.shape[0], paired_with=list(state),
                             timing="paired single decode steps, shuffled order each round")
        return out

    @staticmethod
    def _step(ctx: TaskContext, entry: list[Any]) -> None:
        """One more eager decode step of a held cache (``[cache, token, steps]``), untimed."""
        from ..decoding import forward

        entry[1] = forward(ctx.model, entry[1], entry[0], last_only=True)[:, -1].argmax(-1, keepdim=True)


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
