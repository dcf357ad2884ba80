"""``perplexity``: streaming NLL with the policy's cache active while the text is fed through."""

from __future__ import annotations

from typing import Any, ClassVar

from ..metrics import perplexity
from ..task import TaskContext
from .common import kv_bytes


class PerplexityTask:
    """Streaming perplexity: the text goes through the cache token by token (or --chunk tokens)."""

    name = "perplexity"
    primary = "ppl"
    higher_is_better = False
    default_lengths = (512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"offset": 0}
    limits: ClassVar[dict[str, tuple]] = {"offset": (0, None)}
    labels: ClassVar[dict[str, str]] = {"ppl": "perplexity (lower is better)"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """NLL of tokens 1..L-1 of the first L tokens of the text, fed in chunks of ``ctx.chunk``."""
        import torch
        import torch.nn.functional as F

        from ..decoding import prefill

        chunk = ctx.chunk or 1
        ids = ctx.tokens(ctx.length, offset=int(ctx.params["offset"]))
        cache = ctx.make_cache()
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        peak_kv = 0

        def score(start: int, end: int, logits: Any) -> None:
            nonlocal total, count, peak_kv
            targets = ids[0, start + 1:end + 1]
            if targets.numel():
                nll = F.cross_entropy(logits[0, :targets.numel()], targets, reduction="sum")
                total += nll.double().cpu()
                count += targets.numel()
            peak_kv = max(peak_kv, kv_bytes(cache))

        prefill(ctx.model, ids, cache, chunk=chunk, on_logits=score, progress=ctx.progress, desc="perplexity")
        nll = float(total) / count
        return {"ppl": perplexity(nll), "nll": nll, "tokens_scored": count, "chunk": chunk,
                "kv_bytes": kv_bytes(cache), "kv_bytes_peak": peak_kv}
