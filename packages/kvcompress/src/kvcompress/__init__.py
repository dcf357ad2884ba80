"""kvcompress: KV-cache compression for Hugging Face transformers.

``import kvcompress`` is light (neither torch nor transformers is imported): the cache machinery loads on
first use of a name that needs it, so listing and validating policies stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import (
    AttentionNotAttachedError,
    CacheReuseError,
    KVCompressError,
    ModelRequiredError,
    PolicyUnavailableError,
    RegistrationConflictError,
    UnknownPolicyError,
    WeightsError,
)
from .hookspecs import hookimpl, hookspec
from .params import param, parameters
from .plugins import Entry, PluginFailure, Registry, get_registry
from .policy import CachePolicy, Policy, Representation, SelectionPolicy
from .resolve import build_policies, validate_spec
from .spec import parse_spec

__version__ = "0.2.0"

# name -> module that defines it (imported on first access: these need torch / transformers)
_LAZY = {
    "make_cache": "cache", "CompressedCache": "cache", "FullCache": "cache",
    "Full": "builtins", "CompressedLayer": "layer", "SlotContext": "context", "LayerInfo": "context",
    "ModelInfo": "context", "Plan": "plan", "Added": "plan", "merge_into": "plan", "KVStore": "store",
    "DenseStore": "store", "Step": "store", "Accumulate": "store", "SlotBuffer": "buffers",
    "attach": "model", "detach": "model", "kv_bytes": "accounting", "capture_attention": "attention",
    "AttentionRecord": "attention", "decode_attention": "attention", "load_weights": "weights",
    "save_weights": "weights", "static_generate": "static",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


@dataclass(frozen=True)
class PolicyInfo:
    """What ``list_policies`` reports about one policy."""

    name: str
    kind: str
    distribution: str
    version: str
    params: dict[str, Any]
    description: str


def list_policies() -> list[PolicyInfo]:
    """Every installed policy: name, kind, distribution, version, parameters with defaults, description."""
    reg = get_registry()
    return [
        PolicyInfo(e.name, e.obj.kind, e.distribution, e.version, parameters(e.obj), e.description)
        for e in sorted(reg.policies.values(), key=lambda e: e.name)
    ]


__all__ = [
    "AttentionNotAttachedError", "CachePolicy", "CacheReuseError", "Entry", "KVCompressError",
    "ModelRequiredError", "Policy", "PolicyInfo", "PolicyUnavailableError", "PluginFailure", "Registry",
    "RegistrationConflictError", "Representation", "SelectionPolicy", "UnknownPolicyError", "WeightsError",
    "build_policies", "get_registry", "hookimpl", "hookspec", "list_policies", "param", "parameters", "parse_spec",
    "validate_spec", *_LAZY,
]
