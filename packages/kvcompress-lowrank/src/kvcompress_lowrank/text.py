"""Calibration text: a file read whole, or one half of it split by WikiText article.

WikiText articles start with a top-level heading line `` = Title = `` (one ``=`` on each side). The shipped
calibration uses the first half of the articles of WikiText-2's test split; quality is measured on the second
half only (:func:`heldout_offset` gives the token where it starts in the harness's tokenisation).
"""

from __future__ import annotations

import re
from pathlib import Path

SPLITS = ("all", "first-half", "second-half")
_HEADING = re.compile(r" = [^=].* = ")


def read_text(path: str | Path) -> str:
    """The UTF-8 file ``path`` with CRLF/CR turned into LF (as the harness reads ``--data-file``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--data: file {str(p)!r} does not exist")
    return p.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def article_starts(text: str) -> list[int]:
    """Line numbers of the top-level article headings of ``text``."""
    return [i for i, line in enumerate(text.split("\n")) if _HEADING.fullmatch(line)]


def split_text(text: str, split: str = "all") -> str:
    """``text`` whole, or the first / second half of its articles (``split`` one of :data:`SPLITS`).

    The first half is the first ``n // 2`` articles of ``n``; the second half the rest. A text with fewer than
    two article headings cannot be split.
    """
    if split not in SPLITS:
        raise ValueError(f"--split: got {split!r}; allowed: one of {', '.join(SPLITS)}")
    if split == "all":
        return text
    lines = text.split("\n")
    starts = article_starts(text)
    if len(starts) < 2:
        raise ValueError(
            f"--split {split}: the text has {len(starts)} article headings (' = Title = ' lines); "
            "allowed: a text with at least 2, or --split all"
        )
    cut = starts[len(starts) // 2]
    return "\n".join(lines[:cut]) if split == "first-half" else "\n".join(lines[cut:])


def heldout_offset(tokenizer, text: str) -> int:
    """The first token of the second half of ``text``'s articles in the tokenisation of the whole text (the
    harness's ``--param perplexity.offset``): the token count of the first half, plus one so that a token
    straddling the cut is not counted as held out."""
    first = split_text(text, "first-half")
    return len(tokenizer(first, add_special_tokens=False).input_ids) + 1
