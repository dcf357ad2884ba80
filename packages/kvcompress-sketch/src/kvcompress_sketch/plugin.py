"""Entry point of the ``kvcompress`` group: registers ``sketch``."""

from __future__ import annotations

import kvcompress

from .policy import Sketch


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(Sketch)
