"""Entry point of ``kvcompress-lowrank``: registers the ``lowrank`` representation."""

from __future__ import annotations

import kvcompress

from .policy import LowRank


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(LowRank)
