"""The three worked examples of ``docs/plugin-authors.md``, run from the page itself (its ``python`` blocks that
start with ``# worked example``), so that what the docs show is what the tests check:

- ``MergeNearest``: a merging policy (evicted tokens merged into their nearest kept key);
- ``LinearKeyScore``: a scorer with weights loaded from safetensors at setup, sliced per layer at bind;
- ``PreRope``: a representation whose store keeps keys before RoPE and rotates them when attending.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[3] / "docs" / "plugin-authors.md"
BLOCKS = re.findall(r"```python\n(# worked example: .*?)```", PAGE.read_text(encoding="utf-8"), re.S)
assert len(BLOCKS) == 3, f"expected 3 worked examples in {PAGE}, found {len(BLOCKS)}"
for _block in BLOCKS:
    exec(compile(_block, str(PAGE), "exec"), globals())  # noqa: S102 - our own documentation's code

__all__ = ["LinearKeyScore", "MergeNearest", "PreRope", "PreRopeStore"]  # noqa: F822 - defined by the blocks
