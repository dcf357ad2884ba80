"""Peers as policies: transformers' own caches, measured by the same tasks on the same tokens.

- ``hf-quanto(bits=4)``: ``QuantizedCache`` with the quanto backend (``optimum-quanto``), int2 or int4;
- ``hf-hqq(bits=4)``: ``QuantizedCache`` with the HQQ backend (``hqq``), 1, 2, 3, 4 or 8 bits;
- ``hf-sliding(window=256)``: a ``DynamicCache`` of ``DynamicSlidingWindowLayer``s (the last tokens only);
- ``hf-offloaded``: ``DynamicCache(offloading=True)`` (layers wait on the CPU while another layer runs; CUDA only).

Each is a ``kvcompress.CachePolicy`` registered from this module (entry point ``harness-peers``); the
libraries come with ``pip install kvcompress-harness[peers]``. Their bytes are counted from the tensors the
layers really hold (residual tokens plus the quantized data, scales and zero points).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import kvcompress
from kvcompress import param


def _leaves(value: Any) -> list[Any]:
    """The plain tensors inside a (possibly quantized, subclassed) tensor."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):  # HQQ keeps (codes, meta) with the scales and zero points in meta
        return [leaf for item in value.values() for leaf in _leaves(item)]
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is not None and type(value).__name__ != "Tensor":
        names, _ = flatten()
        return [leaf for name in names for leaf in _leaves(getattr(value, name))]
    return [value] if hasattr(value, "element_size") else []


def _count_held(cache: Any) -> Any:
    """Give every layer of a transformers cache ``held_tensors()`` (what ``kvcompress.kv_bytes`` counts)."""
    for layer in getattr(cache, "layers", []):
        cls = type(layer)
        if not hasattr(cls, "held_tensors"):
            layer.__class__ = type(f"Counted{cls.__name__}", (cls,), {"held_tensors": _held_tensors})
    return cache


def _held_tensors(layer: Any) -> list[Any]:
    names = ("keys", "values", "_quantized_keys", "_quantized_values")
    return [leaf for name in names for leaf in _leaves(getattr(layer, name, None))]


def _need(module: str, policy: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{policy}: needs the {package!r} package, which is not installed; allowed: "
                         f"pip install 'kvcompress-harness[peers]' (or pip install {package})")


def _config(model: Any, policy: str) -> Any:
    if model is None or getattr(model, "config", None) is None:
        raise ValueError(f"{policy}: builds its cache from the model's config; allowed: make_cache(spec, model=m)")
    return model.config


@dataclass
class _Quantized(kvcompress.CachePolicy):
    backend: ClassVar[str] = ""
    module: ClassVar[str] = ""
    package: ClassVar[str] = ""

    bits: int = param(4, help="bits per quantized value")
    group: int = param(64, min=1, help="values per quantization group (q_group_size)")
    residual: int = param(128, min=0, help="most recent tokens kept unquantized (residual_length)")

    def check(self) -> None:
        _need(self.module, self.name, self.package)

    def build(self, model: Any) -> Any:
        from transformers.cache_utils import QuantizedCache

        cache = QuantizedCache(backend=self.backend, config=_config(model, self.name), nbits=self.bits,
                               q_group_size=self.group, residual_length=self.residual)
        return _count_held(cache)


@dataclass
class HFQuanto(_Quantized):
    """transformers' QuantizedCache, quanto backend (optimum-quanto): int2 / int4 past a residual window."""

    name: ClassVar[str] = "hf-quanto"
    backend: ClassVar[str] = "quanto"
    module: ClassVar[str] = "optimum.quanto"
    package: ClassVar[str] = "optimum-quanto"
    bits: int = param(4, choices=(2, 4), help="bits per quantized value")


@dataclass
class HFHqq(_Quantized):
    """transformers' QuantizedCache, HQQ backend (hqq): 1-8 bits past a residual window."""

    name: ClassVar[str] = "hf-hqq"
    backend: ClassVar[str] = "hqq"
    module: ClassVar[str] = "hqq"
    package: ClassVar[str] = "hqq"
    bits: int = param(4, choices=(1, 2, 3, 4, 8), help="bits per quantized value")


@dataclass
class HFSliding(kvcompress.CachePolicy):
    """transformers' DynamicCache of sliding-window layers: only the last `window` tokens are kept."""

    name: ClassVar[str] = "hf-sliding"
    window: int = param(256, min=2, help="tokens kept (DynamicSlidingWindowLayer's sliding_window)")

    def build(self, model: Any) -> Any:
        from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

        layers = int(_config(model, self.name).get_text_config(decoder=True).num_hidden_layers)
        cache = DynamicCache()
        cache.layers = [DynamicSlidingWindowLayer(sliding_window=self.window) for _ in range(layers)]
        return cache


@dataclass
class HFOffloaded(kvcompress.CachePolicy):
    """transformers' DynamicCache with offloading: every layer but the running one waits in CPU memory."""

    name: ClassVar[str] = "hf-offloaded"

    def build(self, model: Any) -> Any:
        from transformers.cache_utils import DynamicCache

        device = getattr(model, "device", None)
        if device is None or device.type != "cuda":
            raise ValueError(f"{self.name}: offloads a GPU's cache to CPU memory; allowed: a model on CUDA "
                             f"(this one is on {device})")
        return DynamicCache(config=_config(model, self.name), offloading=True)


PEERS = (HFQuanto, HFHqq, HFSliding, HFOffloaded)


@kvcompress.hookimpl
def register_policies(register: Callable[..., None]) -> None:
    """transformers' own caches, as policies."""
    for cls in PEERS:
        register(cls)
