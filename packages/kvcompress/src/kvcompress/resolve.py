"""Resolving a spec string into policy objects (torch-free: validating a spec loads nothing)."""

from __future__ import annotations

from typing import Any

from .builtins import Full
from .plugins import get_registry
from .policy import Policy, Representation
from .spec import parse_spec


def build_policies(spec: str, **params: Any) -> tuple[Policy, Representation | None]:
    """Resolve a spec (plus keyword parameters for its first part) into policy objects.

    Policies are configuration only: this validates names and parameters and loads nothing.
    """
    parts = parse_spec(spec)
    if params:
        name, first = parts[0]
        for key in params:
            if key in first:
                raise ValueError(f"parameter {key!r} is given both in the spec {spec!r} and as a keyword")
        parts[0] = (name, {**first, **params})
    registry = get_registry()
    selection: Policy | None = None
    representation: Representation | None = None
    for name, kwargs in parts:
        cls = registry.policy(name).obj
        policy = cls.from_params(**kwargs)
        if policy.kind == "cache" and len(parts) > 1:
            raise ValueError(f"spec {spec!r}: {name!r} builds a cache of its own and composes with no other "
                             "policy; allowed: it alone")
        if policy.kind == "representation":
            if representation is not None:
                raise ValueError(f"spec {spec!r}: at most one representation policy, got "
                                 f"{representation.name!r} and {name!r}")
            representation = policy
        else:
            if selection is not None:
                raise ValueError(f"spec {spec!r}: at most one selection policy, got {selection.name!r} and {name!r}")
            selection = policy
    return selection or Full(), representation


def validate_spec(spec: str) -> str:
    """Check a policy spec's names and parameters (loading nothing, building no cache); return it without
    spaces. Raises the same errors as :func:`kvcompress.make_cache` would for the spec itself."""
    build_policies(spec)
    return spec.replace(" ", "")
