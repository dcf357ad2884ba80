"""Answering a retrieval prompt in one of two compression modes (``--compress``).

- ``prompt``: the whole prompt (context + question) is prefilled and the policy compresses as it always
  does (right after prefill, then while decoding).
- ``context``: only the context is prefilled, then compressed to the policy's target at once
  (``cache.compress()``) and frozen (``cache.freeze()``): the question is fed and the answer decoded with no
  further eviction, as kvpress evaluates question-agnostic compression. A cache without ``compress``
  (``full``, a peer's cache) runs the same steps without them.
"""

from __future__ import annotations

from typing import Any

from ..task import TaskContext
from .common import kept_share, kv_bytes
from .prompts import Prompt

COMPRESS_MODES = ("prompt", "context")


def answer(ctx: TaskContext, prompt: Prompt, new_tokens: int, eos_token_id: int | None = None
           ) -> tuple[list[int], dict[str, Any]]:
    """Greedy answer tokens and what the cache held (``kv_bytes`` at the end, ``context_kv_bytes``;
    ``fact_kept``: the share of the prompt's marked tokens the cache holds at the end, None when unknown)."""
    import torch

    from ..decoding import greedy, prefill

    cache = ctx.make_cache()
    mode = ctx.compress or "prompt"
    if mode == "prompt":
        ids = torch.cat([prompt.context, prompt.question], dim=1)
        gen = greedy(ctx.model, ids, cache, new_tokens, chunk=ctx.chunk, eos_token_id=eos_token_id)
        return gen.tokens, {"kv_bytes": kv_bytes(cache), "fact_kept": kept_share(cache, prompt.marked)}
    prefill(ctx.model, prompt.context, cache, chunk=ctx.chunk)
    controls = hasattr(cache, "compress") and hasattr(cache, "freeze")
    if controls:
        cache.compress()
        cache.freeze(True)
    held = kv_bytes(cache)
    try:
        gen = greedy(ctx.model, prompt.question, cache, new_tokens, chunk=ctx.chunk, eos_token_id=eos_token_id)
    finally:
        if controls:
            cache.freeze(False)
    return gen.tokens, {"kv_bytes": kv_bytes(cache), "context_kv_bytes": held, "context_compressed": controls,
                        "fact_kept": kept_share(cache, prompt.marked)}
