"""Entry point of the ``kvcompress`` group: registers ``h2o`` and ``lru``."""

from __future__ import annotations

import kvcompress

from .policies import H2O, LRU


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(H2O)
    register(LRU)
