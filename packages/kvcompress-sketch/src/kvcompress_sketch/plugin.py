"""Entry point of the ``kvcompress`` group: registers ``sketch``, and the harness task ``sketch-overlap``."""

from __future__ import annotations

import kvcompress

from .audit import OverlapTask
from .policy import Sketch


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(Sketch)


@kvcompress.hookimpl
def register_tasks(register) -> None:  # runs only under the harness (it needs kvcompress-harness)
    register(OverlapTask())
