"""What the speed tasks share: batched input ids, the cuDNN sdpa switch, OOM handling."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..task import TaskContext

if TYPE_CHECKING:
    import torch


def batch_ids(ctx: TaskContext, batch: int | None = None) -> torch.Tensor:
    """[batch, length] int64 ids on the device: windows of the run's text when the model has a tokenizer,
    else random token ids drawn with the cell's seed (speed does not depend on what the tokens say)."""
    import torch

    b = batch or ctx.batch
    if ctx.tokenizer is None:
        gen = torch.Generator().manual_seed(ctx.seed)
        vocab = int(ctx.model.config.vocab_size)
        return torch.randint(0, vocab, (b, ctx.length), generator=gen).to(ctx.device)
    total = ctx.text_ids().numel()
    stride = max(0, total - ctx.length) // max(1, b - 1) if b > 1 else 0
    return torch.cat([ctx.tokens(ctx.length, offset=i * stride) for i in range(b)])


@contextlib.contextmanager
def cudnn_sdpa(device: torch.device, enabled: bool) -> Iterator[bool | None]:
    """On CUDA, PyTorch's cuDNN sdpa on or off for the block (off by default: on torch 2.11 it builds a graph
    for every new KV length, ~20 ms a call, which makes any growing cache look slow). Yields the setting
    (None off CUDA)."""
    import torch

    if device.type != "cuda":
        yield None
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield enabled
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def is_oom(exc: BaseException) -> bool:
    """True for torch's out-of-memory error (CUDA or CPU allocator)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release(device: torch.device) -> None:
    """Give cached blocks back after an OOM so the next attempt starts clean."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tokens_per_s(batch: int, seconds: Any) -> float | None:
    """Aggregate tokens/s of ``batch`` sequences stepping once in ``seconds``."""
    return batch / seconds if seconds else None
