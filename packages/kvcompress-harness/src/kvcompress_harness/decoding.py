"""Feeding tokens through a model with a cache: chunked prefill, streaming, greedy decoding."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import HarnessError
from .models import cache_argument
from .progress import track


def sync(device: torch.device | Sequence[torch.device]) -> None:
    """Wait for queued GPU work (timings) on ``device``, or on each of several (a model over a device map)."""
    for d in [device] if isinstance(device, torch.device) else device:
        if d.type == "cuda":
            torch.cuda.synchronize(d)




@torch.no_grad()
def forward(model: Any, ids: torch.Tensor, cache: Any, last_only: bool = False) -> torch.Tensor:
    """One forward of ``ids`` [B, n] through ``model`` with ``cache``; returns float32 logits."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    kwargs[cache_argument(model)] = cache
    out = model(input_ids=ids, use_cache=True, **kwargs)
    return out.logits.float()


def chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    """[start, end) pieces of ``range(n)`` of ``chunk`` tokens (one piece when chunk is None)."""
    if n <= 0:
        return []
    step = n if not chunk else chunk
    return [(s, min(s + step, n)) for s in range(0, n, step)]


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor, cache: Any, chunk: int | None = None,
            on_logits: Callable[[int, int, torch.Tensor], None] | None = None,
            progress: bool = False, desc: str = "prefill") -> torch.Tensor:
    """Feed ``ids`` [1, n] in chunks; call ``on_logits(start, end, logits)``; return the last position's logits."""
    pieces = chunks(ids.shape[1], chunk)
    last = None
    if not pieces:
        raise HarnessError("prefill: no tokens to feed; allowed: a prompt of at least one token")
    for start, end in track(pieces, len(pieces), desc, enabled=progress):
        logits = forward(model, ids[:, start:end], cache, last_only=on_logits is None)
        if on_logits is not None:
            on_logits(start, end, logits)
        last = logits[:, -1]
    return last


@dataclass
class Generation:
    """Greedy tokens and how long each phase took."""

    tokens: list[int]
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)


@torch.no_grad()
def greedy(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, chunk: int | None = None,
           eos_token_id: int | None = None, progress: bool = False) -> Generation:
    """Greedy decoding of up to ``new_tokens`` after the prompt ``ids`` [1, n], timing each step."""
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, chunk=chunk, progress=progress)
    sync(device)
    gen = Generation(tokens=[], prefill_s=time.perf_counter() - t0)
    for _ in range(new_tokens):
        token = int(logits[0].argmax())
        gen.tokens.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        if len(gen.tokens) == new_tokens:
            break
        t0 = time.perf_counter()
        logits = forward(model, torch.tensor([[token]], device=device), cache, last_only=True)[:, -1]
        sync(device)
        gen.decode_s.append(time.perf_counter() - t0)
    return gen
