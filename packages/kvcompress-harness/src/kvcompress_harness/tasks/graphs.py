"""The ``speed`` task's graph phase (``--param speed.graphs=true``): whole greedy decodes through
``kvcompress.static_generate`` (each decode step a replayed CUDA graph on a GPU; the same static slot layout run
eagerly elsewhere) against ``full`` decoding in transformers' eager ``model.generate``.

Every policy of the cell is tried; one that ``static_generate`` refuses (a ratio budget, a packed store, a policy
with ``on_tokens``) is recorded with the refusal, not run. ``full`` goes through ``model.generate`` (``static_generate``
refuses transformers' DynamicCache) and ``dense``, kvcompress's own uncompressed layer, through ``static_generate``
for reference, whether or not the cell names it. After a short warm-up of each (kernels compiled, graphs captured
once), the decodes alternate in a shuffled order for ``graph_rounds`` rounds in one process; each number is the
median over rounds.

Timing is a synchronised wall clock: the prefill (the model's first forward, marked by a forward hook) apart, and
the decode from the prefill's end to the last token, over the ``new_tokens - 1`` forwards it takes (the first new
token comes from the prefill's logits). The decode includes what a user pays once per call: laying the cache out
statically, the warm-up steps and the graph capture. ``static_generate``'s own ``timings`` split that off:
``graph_replay_ms_per_token`` is the steady state (replays, each with its eviction when due) and
``graph_setup_s`` the one-off part; with ``profile_steps`` the replay is also set against the step's GPU time
(``graph_replay_over_gpu``, the GPU time of the policy's eager step from the paired phase).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from ..task import TaskContext
from .common import kv_bytes
from .inputs import batch_ids, is_oom, release

DENSE = "dense"
REFUSAL = "static_generate:"


def _decode(ctx: TaskContext, spec: str, ids: Any, new: int) -> tuple[float, float, Any, int, dict[str, float]]:
    """(prefill s, decode s, new tokens [B, new], KV bytes at the end, static_generate's timings) of one whole
    greedy decode of ``spec``."""
    import kvcompress
    import torch

    from ..decoding import sync
    from ..models import cache_argument

    devices = ctx.all_devices
    cache = ctx.make_cache(spec)
    marks: list[float] = []
    timings: dict[str, float] = {}

    def prefill_done(module: Any, args: Any, output: Any) -> None:
        if not marks:  # the first forward only: later ones may be under CUDA graph capture
            sync(devices)
            marks.append(time.perf_counter())

    handle = ctx.model.register_forward_hook(prefill_done)
    try:
        with torch.no_grad():
            sync(devices)
            t0 = time.perf_counter()
            if spec == "full":
                kwargs = {cache_argument(ctx.model): cache}
                tokens = ctx.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            min_new_tokens=new, do_sample=False, pad_token_id=0,
                                            **kwargs)[:, ids.shape[1]:]
            else:
                tokens = kvcompress.static_generate(ctx.model, cache, ids, new, timings=timings)
            sync(devices)
            t1 = time.perf_counter()
    finally:
        handle.remove()
    return marks[0] - t0, t1 - marks[0], tokens, kv_bytes(cache), timings


def graph_phase(ctx: TaskContext, specs: list[str], new: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Graph-phase metrics per spec of the cell (``full`` first), ``dense`` added for reference when absent."""
    ids = batch_ids(ctx)
    runs = list(dict.fromkeys(["full", *specs, DENSE]))
    notes: dict[str, dict[str, Any]] = {s: {} for s in runs}
    live: list[str] = []
    for spec in runs:  # warm-up on a short prompt; a refusal shows here, before any prefill
        try:
            _decode(ctx, spec, ids[:, : min(32, ids.shape[1])], min(new, 4))
            live.append(spec)
        except Exception as exc:  # noqa: BLE001 - a refusal, an OOM or an error is the spec's result
            _note(notes[spec], exc)
        release(ctx.device)
    timed: dict[str, list[tuple[float, float, Any, int, dict[str, float]]]] = {s: [] for s in live}
    order = random.Random(ctx.seed)
    for _ in range(rounds):
        for spec in order.sample(list(timed), len(timed)):
            if spec not in timed:
                continue
            try:
                timed[spec].append(_decode(ctx, spec, ids, new))
            except Exception as exc:  # noqa: BLE001
                _note(notes[spec], exc)
                del timed[spec]
            release(ctx.device)
    return _metrics(ctx, specs, notes, timed, new, ids.shape[0])


def _note(note: dict[str, Any], exc: BaseException) -> None:
    text = " ".join(f"{exc}".split())
    if isinstance(exc, ValueError) and text.startswith(REFUSAL):
        note["graph_refused"] = text
    elif is_oom(exc):
        note["graph_oom"] = f"OutOfMemoryError: {text}"[:300]
    else:
        note["graph_error"] = f"{type(exc).__name__}: {text}"[:300]


def _metrics(ctx: TaskContext, specs: list[str], notes: dict[str, dict[str, Any]],
             timed: dict[str, list[tuple[float, float, Any, int, dict[str, float]]]], new: int, batch: int
             ) -> dict[str, dict[str, Any]]:
    steps = max(new - 1, 1)
    summary: dict[str, dict[str, Any]] = {}
    for spec, runs in timed.items():
        ms = [1000 * r[1] / steps for r in runs]
        summary[spec] = {"ms_per_token": statistics.median(ms), "rounds_ms": ms,
                         "prefill_s": statistics.median(r[0] for r in runs),
                         "decode_s": statistics.median(r[1] for r in runs),
                         "tokens": runs[0][2], "kv_bytes": runs[-1][3]}
        steady = [1000 * r[4]["steady_s"] / r[4]["steady_steps"] for r in runs if r[4].get("steady_steps")]
        if steady:
            summary[spec].update(replay_ms=statistics.median(steady), replay_rounds_ms=steady,
                                 setup_s=statistics.median(r[4]["setup_s"] for r in runs),
                                 replay_steps=int(runs[0][4]["steady_steps"]))
    full = summary.get("full")
    dense = summary.get(DENSE)
    reference = {"full_generate_ms_per_token": full and full["ms_per_token"],
                 "dense_graph_ms_per_token": dense and dense["ms_per_token"],
                 "dense_replay_ms_per_token": dense and dense.get("replay_ms"),
                 "graph_mode": "cuda graph replay" if ctx.device.type == "cuda" else "eager static layout (no CUDA)",
                 "graph_decode_forwards": steps}
    if full is not None and dense is not None:  # kvcompress's dense layer under graphs decodes what full does
        reference["dense_token_match_full"] = float((dense["tokens"] == full["tokens"]).float().mean())
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        m: dict[str, Any] = {"graph_reference": reference, **notes.get(spec, {})}
        s = summary.get(spec)
        if s is not None:
            kind = "generate" if spec == "full" else "graph"
            m.update({f"{kind}_ms_per_token": s["ms_per_token"], f"{kind}_rounds_ms": s["rounds_ms"],
                      f"{kind}_prefill_s": s["prefill_s"], f"{kind}_decode_s": s["decode_s"],
                      f"{kind}_tokens_per_s": 1000 * batch / s["ms_per_token"], "graph_kv_bytes": s["kv_bytes"]})
            if "replay_ms" in s:
                m.update(graph_replay_ms_per_token=s["replay_ms"], graph_replay_rounds_ms=s["replay_rounds_ms"],
                         graph_setup_s=s["setup_s"], graph_replay_steps=s["replay_steps"],
                         graph_replay_tokens_per_s=1000 * batch / s["replay_ms"])
            if full is not None:
                m[f"{kind}_ratio_to_full_generate"] = s["ms_per_token"] / full["ms_per_token"]
                if "replay_ms" in s:
                    m["graph_replay_ratio_to_full_generate"] = s["replay_ms"] / full["ms_per_token"]
                if spec != "full":
                    m["graph_token_match_full"] = float((s["tokens"] == full["tokens"]).float().mean())
        out[spec] = m
    return out
