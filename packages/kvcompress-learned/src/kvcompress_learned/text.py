"""Training and held-out text: a file cut in two halves at an article boundary.

WikiText articles start with a top-level heading line `` = Title = `` (sub-headings are `` = = ... = = ``).
The first half (the articles before the boundary nearest the middle of the file, by characters) is what the
trainer reads; the second half is the held-out text every quality number is measured on. A file without
such headings is cut at the line boundary nearest its middle.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_ARTICLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)
HALVES = ("first", "second")


@dataclass(frozen=True)
class Half:
    """One half of a text file: its text and where it came from."""

    text: str
    source: str  # file name
    half: str  # "first" or "second"
    articles: int  # articles in this half (0 for a file without headings)
    sha256: str  # of the whole file, normalised to LF line ends

    def describe(self) -> str:
        what = f"{self.articles} articles" if self.articles else "lines"
        return (f"{self.source} ({self.half} half by article: {what}, {len(self.text)} chars, "
                f"sha256 {self.sha256[:12]})")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with CRLF / CR line ends made LF (as the harness reads ``--data-file``)."""
    return Path(path).read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def split_point(text: str) -> tuple[int, int, int]:
    """``(cut, articles_before, articles_after)``: the character index of the article start nearest the
    middle of ``text`` (or, without article headings, of the line start nearest it)."""
    starts = [m.start() for m in _ARTICLE.finditer(text)]
    middle = len(text) // 2
    if len(starts) >= 2:
        cut = min(starts[1:], key=lambda s: abs(s - middle))
        before = sum(s < cut for s in starts)
        return cut, before, len(starts) - before
    lines = [0, *(m.end() for m in re.finditer(r"\n", text) if m.end() < len(text))]
    return min(lines, key=lambda s: abs(s - middle)) if len(lines) > 1 else middle, 0, 0


def half(path: str | Path, which: str = "first") -> Half:
    """The ``which`` (``"first"`` or ``"second"``) half of the text file ``path``."""
    if which not in HALVES:
        raise ValueError(f"half: parameter 'which' is {which!r}; allowed: 'first', 'second'")
    text = read_text(path)
    cut, before, after = split_point(text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    part = text[:cut] if which == "first" else text[cut:]
    return Half(part, Path(path).name, which, before if which == "first" else after, digest)
