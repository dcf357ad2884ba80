"""kvcompress: KV-cache compression for Hugging Face transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .accounting import kv_bytes
from .attention import AttentionRecord, capture_attention
from .attention import register as _register_attention
from .buffers import SlotBuffer
from .cache import CompressedCache, Full, FullCache, build_policies, make_cache
from .errors import (
    AttentionNotAttachedError,
    KVCompressError,
    PolicyUnavailableError,
    RegistrationConflictError,
    UnknownPolicyError,
)
from .hookspecs import hookimpl, hookspec
from .layer import CompressedLayer
from .model import attach
from .params import param, parameters
from .plugins import Entry, PluginFailure, Registry, get_registry
from .policy import CachePolicy, Policy, Representation, SelectionPolicy, SlotContext
from .spec import parse_spec
from .store import DenseStore, KVStore

__version__ = "0.1.0"

_register_attention()


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
    "AttentionNotAttachedError", "AttentionRecord", "CachePolicy", "CompressedCache", "CompressedLayer",
    "DenseStore", "Entry",
    "Full", "FullCache", "KVCompressError", "KVStore", "PluginFailure", "Policy", "PolicyInfo",
    "PolicyUnavailableError", "Registry", "RegistrationConflictError", "Representation", "SelectionPolicy",
    "SlotBuffer", "SlotContext", "UnknownPolicyError", "attach", "build_policies", "capture_attention",
    "get_registry", "hookimpl", "hookspec", "kv_bytes", "list_policies", "make_cache", "param", "parameters",
    "parse_spec",
]
