"""``max_batch``: the largest batch that fits at a context length, with the policy's cache.

Batches double from ``start`` until one runs out of memory (or ``limit`` is reached), then bisect
between the last that fit and the first that did not, until they are ``resolution`` apart (1: the exact edge;
8 spares the last three attempts of a search near 200). A batch fits when its prefill and ``new_tokens``
decode steps finish. ``allocator_peak_bytes`` is the CUDA allocator's peak at that batch, weights included.
An out-of-memory error is a result here, not a failure: each attempt is recorded.

``graphs=true`` decodes each attempt through ``kvcompress.static_generate`` (CUDA graphs on a GPU; its prompt
fed in ``prefill_chunk`` chunks) for every policy it accepts, so the batch must fit the static layout too and
``decode_tokens_per_s`` is the steady replay's; ``full`` and refused policies decode eagerly as without it
(``decode_mode`` says which). Aggregate tokens/s at each cache's largest batch against ``full``'s at its own
is then one grid away.

``replicate=true`` builds each attempt's batch from one sequence: its prompt but the last token is prefilled at
batch 1, the cache is repeated across the batch (``batch_repeat_interleave``), then the last token and the
decode steps run at the full batch. That is how a server fills a batch (each sequence prefilled on its own,
decoded together), and it costs one prefill per attempt instead of a batch of them: at 32k a batch of 200 is
about 700 s of prefill. The largest batch is then bound by the caches and the decode step, not by a batch's
prefill. Decode speed does not depend on which tokens are held, and every row keeps the same slots.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, ClassVar

from ..task import TaskContext
from .common import kv_bytes
from .inputs import batch_ids, cudnn_sdpa, is_oom, release


class MaxBatchTask:
    """Largest batch that fits at the length (doubling, then bisection); decode tokens/s there."""

    name = "max_batch"
    primary = "max_batch"
    higher_is_better = True
    default_lengths = (32768,)
    defaults: ClassVar[dict[str, Any]] = {"start": 1, "limit": 1024, "new_tokens": 4, "prefill_chunk": 2048,
                                          "cudnn_sdpa": False, "graphs": False, "replicate": False, "resolution": 1}
    limits: ClassVar[dict[str, tuple]] = {"start": (1, None), "limit": (1, None), "new_tokens": (1, None),
                                          "prefill_chunk": (1, None), "resolution": (1, None)}
    needs_text = False
    labels: ClassVar[dict[str, str]] = {"max_batch": "largest batch that fits (sequences)",
                                        "decode_tokens_per_s": "decode tokens/s at that batch"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Search the largest batch; record every attempt."""
        start, limit = int(ctx.params["start"]), int(ctx.params["limit"])
        if start > limit:
            from ..errors import HarnessError

            raise HarnessError(f"--param max_batch.start: got {start}; allowed: <= limit ({limit})")
        tried: dict[int, dict[str, Any]] = {}
        with cudnn_sdpa(ctx.device, bool(ctx.params["cudnn_sdpa"])) as cudnn:
            fits, fails, b = 0, None, start
            while b <= limit:  # doubling
                tried[b] = self._attempt(ctx, b)
                if not tried[b]["fits"]:
                    fails = b
                    break
                fits, b = b, b * 2
            if fails is None and fits < limit:
                tried[limit] = self._attempt(ctx, limit)
                fits, fails = (limit, None) if tried[limit]["fits"] else (fits, limit)
            resolution = int(ctx.params["resolution"])
            while fails is not None and fails - fits > resolution:  # bisection, to within `resolution`
                mid = (fits + fails) // 2
                tried[mid] = self._attempt(ctx, mid)
                fits, fails = (mid, fails) if tried[mid]["fits"] else (fits, mid)
        best = tried.get(fits, {})
        return {"max_batch": fits, "oom_at": fails, "limit": limit, "cudnn_sdpa": cudnn,
                "replicate": bool(ctx.params.get("replicate")),
                "decode_tokens_per_s": best.get("decode_tokens_per_s"), "decode_mode": best.get("decode_mode"),
                "graph_refused": best.get("graph_refused"), "kv_bytes": best.get("kv_bytes"),
                "allocator_peak_bytes": best.get("allocator_peak_bytes"),
                "allocator_peak_by_device": best.get("allocator_peak_by_device"),
                "kv_bytes_by_device": best.get("kv_bytes_by_device"),
                "attempts": [{"batch": k, **v} for k, v in sorted(tried.items())]}

    def _attempt(self, ctx: TaskContext, batch: int) -> dict[str, Any]:
        import kvcompress
        import torch

        from ..decoding import forward, prefill, sync
        from ..progress import say

        cache = None
        try:
            cuda = [d for d in ctx.all_devices if d.type == "cuda"]
            for d in cuda:
                torch.cuda.reset_peak_memory_stats(d)
            cache = ctx.make_cache()
            chunk = ctx.chunk or int(ctx.params["prefill_chunk"])
            if ctx.params.get("replicate"):  # one sequence prefilled, its cache repeated across the batch
                row = batch_ids(ctx, 1)
                prefill(ctx.model, row[:, :-1], cache, chunk=chunk)
                cache.batch_repeat_interleave(batch)
                ids = row.expand(batch, -1)
            else:
                ids = batch_ids(ctx, batch)
            per_step, refused = None, None
            if ctx.params.get("graphs"):
                per_step, refused = _static_step(ctx, cache, ids, chunk)
                mode = "graph replay" if ctx.device.type == "cuda" else "eager static layout (no CUDA)"
            if per_step is None:
                logits = prefill(ctx.model, ids[:, cache.get_seq_length():], cache, chunk=chunk)
                steps = []
                for _ in range(int(ctx.params["new_tokens"])):
                    sync(ctx.all_devices)
                    t0 = time.perf_counter()
                    logits = forward(ctx.model, logits.argmax(-1, keepdim=True), cache, last_only=True)[:, -1]
                    sync(ctx.all_devices)
                    steps.append(time.perf_counter() - t0)
                per_step, mode = statistics.median(steps), "eager"
            by_device = {str(d): torch.cuda.max_memory_allocated(d) for d in cuda}
            result = {"fits": True, "decode_tokens_per_s": batch / per_step, "decode_mode": mode,
                      "graph_refused": refused,
                      "kv_bytes": kv_bytes(cache), "allocator_peak_bytes": sum(by_device.values()) if cuda else None,
                      "allocator_peak_by_device": by_device or None,
                      "kv_bytes_by_device": kvcompress.kv_bytes(cache, by_device=True)}
        except Exception as exc:
            if not is_oom(exc):
                raise
            result = {"fits": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
        finally:
            del cache
            release(ctx.device)
        say(f"  max_batch {ctx.spec} L={ctx.length}: batch {batch} {'fits' if result['fits'] else 'out of memory'}")
        return result



def _static_step(ctx: TaskContext, cache: Any, ids: Any, chunk: int) -> tuple[float | None, str | None]:
    """(seconds per steady decode step through ``kvcompress.static_generate``, None), or (None, its refusal):
    it checks the cache before touching it, so a refused cache is decoded eagerly as it is."""
    import kvcompress

    timings: dict[str, float] = {}
    try:
        kvcompress.static_generate(ctx.model, cache, ids, int(ctx.params["new_tokens"]) + 1, timings=timings,
                                   prefill_chunk=chunk)
    except ValueError as exc:
        if not str(exc).startswith("static_generate:"):
            raise
        return None, " ".join(str(exc).split())
    return timings["steady_s"] / max(timings["steady_steps"], 1.0), None
