"""Building retrieval prompts of a target token length with facts at given depths, split into a context
and a question so that either the whole prompt or only the context can be compressed."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import HarnessError

if TYPE_CHECKING:
    import torch


def n_tokens(tokenizer: Any, text: str) -> int:
    """Token count of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise HarnessError(f"depth: got {depth!r}; allowed: 0 <= depth <= 1")


def fit_facts(tokenizer: Any, head: str, units: Sequence[str], facts: Sequence[tuple[float, str]], tail: str,
              length: int) -> str:
    """``head`` + as many ``units`` as fit ``length`` tokens, each ``(depth, fact)`` after a ``depth`` share of
    them, + ``tail``."""
    for depth, _ in facts:
        _check_depth(depth)
    fixed = n_tokens(tokenizer, head + "".join(f for _, f in facts) + tail)
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
    for depth, fact in sorted(facts, key=lambda f: -f[0]):  # deepest first keeps earlier indices valid
        body.insert(round(depth * count), fact)
    return head + "".join(body) + tail


def fit_units(tokenizer: Any, head: str, units: Sequence[str], fact: str, tail: str, length: int,
              depth: float) -> str:
    """``head`` + as many ``units`` as fit ``length`` tokens, with ``fact`` after a ``depth`` share of them."""
    return fit_facts(tokenizer, head, units, [(depth, fact)], tail, length)


@dataclass
class Prompt:
    """A prompt as token ids: the context (compressed in ``context`` mode) and the question after it."""

    context: torch.Tensor
    question: torch.Tensor
    marked: tuple[int, ...] = ()  # positions of the tokens that carry the fact asked for (see split_prompt)

    @property
    def length(self) -> int:
        """Tokens in the whole prompt."""
        return int(self.context.shape[1] + self.question.shape[1])


def split_prompt(tokenizer: Any, prompt: str, question: str, device: torch.device, chat: bool = False,
                 mark: str | None = None) -> Prompt:
    """Token ids of ``prompt`` (ending in ``question``) as context + question, through the chat template when
    ``chat``; ``marked`` holds the positions of the tokens overlapping the first ``mark`` in the text (the
    fact's value), so that what a cache kept of it can be read.

    The whole text is tokenised once and cut at the first token that reaches into the question, so both
    compression modes feed exactly the ids a plain tokenisation of the prompt gives (tokenising the two parts
    apart would change the tokens at the seam); the only difference between the modes is when the cache
    compresses.
    """
    import torch

    if not prompt.endswith(question):
        raise HarnessError("prompt: the question must end the prompt")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise HarnessError("chat=true: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        cut = text.rfind(question)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        text, cut = prompt, len(prompt) - len(question)
        enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    k = next((i for i, (start, end) in enumerate(offsets) if end > cut and end > start), len(ids))
    if k == 0 or k == len(ids):
        raise HarnessError("prompt: empty context or question")
    marked: tuple[int, ...] = ()
    if mark:
        at = text.find(mark)
        if at < 0:
            raise HarnessError(f"prompt: the marked text {mark!r} is not in the prompt")
        marked = tuple(i for i, (start, end) in enumerate(offsets) if start < at + len(mark) and end > at)
    whole = torch.tensor([ids], dtype=torch.long, device=device)
    return Prompt(whole[:, :k], whole[:, k:], marked)


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


def numbers(text: str) -> list[str]:
    """Every run of digits in ``text``, in order."""
    return re.findall(r"\d+", text)
