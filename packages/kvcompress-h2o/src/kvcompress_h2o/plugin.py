"""Entry point of the ``kvcompress`` group: registers ``h2o``, ``lru``, ``tova`` and ``snapkv``."""

from __future__ import annotations

import kvcompress

from .policies import H2O, LRU
from .retrieval import TOVA, SnapKV


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(H2O)
    register(LRU)
    register(TOVA)
    register(SnapKV)
