"""Entry point of the ``kvcompress`` group: registers ``cluster``."""

from __future__ import annotations

import kvcompress

from .policy import Cluster


@kvcompress.hookimpl
def register_policies(register) -> None:
    register(Cluster)
