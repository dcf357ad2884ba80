"""``H2OCache`` / ``LRUCache``: the policies as ready-made transformers caches."""

from __future__ import annotations

from typing import Any

from kvcompress import CompressedCache, Representation

from .policies import H2O, LRU


class H2OCache(CompressedCache):
    """A :class:`kvcompress.CompressedCache` under :class:`H2O`.

    ``H2OCache(budget=512, heavy_ratio=0.5, recent_ratio=0.5)``, then
    ``model.generate(ids, past_key_values=cache, ...)``. Parameters are validated
    like ``make_cache("h2o", ...)``. ``cache.mode`` / ``cache.evictions`` tell
    whether the prompt was compressed after prefill and/or the cache was held
    within budget while decoding.
    """

    policy_class: type = H2O

    def __init__(self, representation: Representation | None = None, **params: Any) -> None:
        super().__init__(self.policy_class.from_params(**params), representation)

    @property
    def mode(self) -> str:
        return self.selection.mode

    @property
    def evictions(self) -> dict[str, int]:
        return {"prompt": self.selection.evictions["prompt"], "decode": self.selection.evictions["decode"]}


class LRUCache(H2OCache):
    """A :class:`kvcompress.CompressedCache` under :class:`LRU`, e.g. ``LRUCache(budget=512)``."""

    policy_class: type = LRU
