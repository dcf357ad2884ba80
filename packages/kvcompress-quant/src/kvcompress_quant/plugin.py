"""Entry point of ``kvcompress-quant``: registers the ``quant`` representation."""

from __future__ import annotations

import kvcompress

from .policy import Quant


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(Quant)
