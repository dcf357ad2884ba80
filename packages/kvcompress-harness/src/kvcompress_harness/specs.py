"""Checking what a run names before anything heavy is imported: policy specs and task names.

``kvcompress run`` calls these first, so a misspelt policy or task is one clear line in well under a
second (no torch, no transformers, no model).
"""

from __future__ import annotations

from typing import Any

from .errors import HarnessError, UnknownNameError

REFERENCE = "full"


def _registry() -> Any:
    import kvcompress

    return kvcompress.get_registry()


def canonical_spec(spec: str) -> str:
    """Check a policy spec (names and parameters) without a model; return it without spaces."""
    import kvcompress

    try:
        kvcompress.build_policies(spec)
    except (ValueError, TypeError, kvcompress.KVCompressError) as exc:
        raise HarnessError(f"--policy {spec!r}: {exc}") from exc
    return spec.replace(" ", "")


def check_specs(specs: list[str]) -> list[str]:
    """Every spec checked and canonical (spaces removed)."""
    return [canonical_spec(s) for s in specs]


def resolve_tasks(names: list[str]) -> dict[str, Any]:
    """Registry entries of the named tasks; an unknown or broken one is a clear error."""
    reg = _registry()
    out = {}
    for name in names:
        if name in reg.tasks:
            out[name] = reg.tasks[name]
            continue
        broken = [f for f in reg.failures if name in (f.plugin, f.distribution)]
        why = "".join(f"; plugin {f.plugin!r} ({f.distribution}) failed to load: {f.error}" for f in broken)
        raise UnknownNameError(
            f"--task: unknown task {name!r}; known tasks: {', '.join(sorted(reg.tasks)) or 'none'}{why}"
        )
    return out
