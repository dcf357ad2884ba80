"""Entry point of the ``kvcompress`` group: registers ``learned``."""

from __future__ import annotations

import kvcompress

from .policy import Learned


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(Learned)
