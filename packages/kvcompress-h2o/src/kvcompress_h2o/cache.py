"""``H2OCache`` / ``LRUCache``: the policies as ready-made transformers caches."""

from __future__ import annotations

from typing import Any

from kvcompress import Representation
from kvcompress.cache import CompressedCache
from kvcompress.model import attach

from .policies import H2O, LRU, evictions, mode


class H2OCache(CompressedCache):
    """A :class:`kvcompress.CompressedCache` under :class:`H2O`, made for ``model``.

    ``H2OCache(model, budget=512, heavy_ratio=0.5, recent_ratio=0.5)``, then
    ``model.generate(ids, past_key_values=cache, ...)``. Parameters are validated
    like ``make_cache("h2o", ...)``. ``cache.mode`` / ``cache.evictions`` tell
    whether the prompt was compressed after prefill and/or the cache was held
    within budget while decoding.
    """

    policy_class: type = H2O

    def __init__(self, model: Any, representation: Representation | None = None, **params: Any) -> None:
        policy = self.policy_class.from_params(**params)
        super().__init__(policy, representation, model=attach(model))

    @property
    def mode(self) -> str:
        return mode(self)

    @property
    def evictions(self) -> dict[str, int]:
        return evictions(self)


class LRUCache(H2OCache):
    """A :class:`kvcompress.CompressedCache` under :class:`LRU`, e.g. ``LRUCache(budget=512)``."""

    policy_class: type = LRU
