"""Plugin discovery: the ``kvcompress`` entry-point group and the registry built from it."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PolicyUnavailableError, RegistrationConflictError, UnknownPolicyError

GROUP = "kvcompress"
KINDS = ("policies", "metrics", "tasks")
_SINGULAR = {"policies": "policy", "metrics": "metric", "tasks": "task"}


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    name: str
    obj: Any
    distribution: str
    version: str
    description: str


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose hook raised."""

    plugin: str
    distribution: str
    error: str


@dataclass
class Registry:
    """Everything the installed plugins registered, plus the plugins that failed."""

    policies: dict[str, Entry] = field(default_factory=dict)
    metrics: dict[str, Entry] = field(default_factory=dict)
    tasks: dict[str, Entry] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def policy(self, name: str) -> Entry:
        """Return the policy entry ``name`` or raise a clear error."""
        if name in self.policies:
            return self.policies[name]
        broken = [f for f in self.failures if f.plugin == name or name in f.plugin.split(".")]
        if broken:
            f = broken[0]
            raise PolicyUnavailableError(
                f"policy {name!r} is unavailable: plugin {f.plugin!r} from distribution "
                f"{f.distribution!r} failed to load: {f.error}"
            )
        failed = "".join(f"; plugin {f.plugin!r} ({f.distribution}) failed: {f.error}" for f in self.failures)
        raise UnknownPolicyError(
            f"unknown policy {name!r}; known policies: {', '.join(sorted(self.policies)) or 'none'}{failed}"
        )


def _describe(obj: Any, description: str | None) -> str:
    if description:
        return description
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _make_register(registry: Registry, kind: str, distribution: str, version: str):
    table: dict[str, Entry] = getattr(registry, kind)

    def register(obj: Any, name: str | None = None, description: str | None = None) -> None:
        key = name or getattr(obj, "name", None) or getattr(obj, "__name__", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"register: cannot tell the name of {obj!r}; pass name=")
        if key in table:
            other = table[key]
            raise RegistrationConflictError(
                f"{_SINGULAR[kind]} name {key!r} is registered twice: by distribution {other.distribution!r} "
                f"and by distribution {distribution!r}"
            )
        table[key] = Entry(key, obj, distribution, version, _describe(obj, description))

    return register


def _entry_points() -> list[md.EntryPoint]:
    return sorted(md.entry_points(group=GROUP), key=lambda ep: (ep.name != "builtins", ep.name))


def build_registry() -> Registry:
    """Load every plugin of the ``kvcompress`` group and collect what it registers.

    A plugin that fails to import, or whose hook raises, is recorded in
    ``Registry.failures`` and the others go on. A name clash is an error.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    origin: dict[str, tuple[str, str]] = {}
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        try:
            module = ep.load()
            pm.register(module, name=ep.value)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            continue
        origin[ep.value] = (dist, version)
    for kind in KINDS:
        caller = getattr(pm.hook, f"register_{kind}")
        for impl in reversed(caller.get_hookimpls()):
            dist, version = origin.get(impl.plugin_name, ("unknown", "unknown"))
            register = _make_register(registry, kind, dist, version)
            try:
                impl.function(register=register)
            except RegistrationConflictError:
                raise
            except Exception as exc:
                registry.failures.append(
                    PluginFailure(impl.plugin_name, dist, f"register_{kind} raised {type(exc).__name__}: {exc}")
                )
    return registry


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """Return the registry, building it on first use (or again with ``refresh=True``)."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = build_registry()
        return _registry
