"""Building retrieval prompts of a target token length with a fact at a given depth."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import HarnessError


def n_tokens(tokenizer: Any, text: str) -> int:
    """Token count of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def fit_units(tokenizer: Any, head: str, units: Sequence[str], fact: str, tail: str, length: int,
              depth: float) -> str:
    """``head`` + as many ``units`` as fit ``length`` tokens, with ``fact`` after a ``depth`` share of them."""
    if not 0.0 <= depth <= 1.0:
        raise HarnessError(f"depth: got {depth!r}; allowed: 0 <= depth <= 1")
    fixed = n_tokens(tokenizer, head + fact + tail)
    budget = length - fixed
    used, count = 0, 0
    while count < len(units):
        size = n_tokens(tokenizer, units[count])
        if used + size > budget:
            break
        used += size
        count += 1
    if count == 0:
        raise HarnessError(f"length {length} is too short for the prompt ({fixed} tokens without filler)")
    body = list(units[:count])
    body.insert(round(depth * count), fact)
    return head + "".join(body) + tail


def encode(tokenizer: Any, prompt: str, device: torch.device, chat: bool = False) -> torch.Tensor:
    """[1, n] ids of the prompt (through the chat template when ``chat``)."""
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise HarnessError("chat=true: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids.to(device)


def first_number(text: str) -> str | None:
    """The first run of digits in ``text``."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None
